"""The training loop's edges: what it writes (the job directory's status, metrics,
TensorBoard events and log; engine/job.py describes the files, engine/sample_grid.py
writes the sample grids), how it hears Ctrl+C, SIGTERM and a stop request during setup,
its peak-memory reading, the messages it gives for out-of-memory errors, the captions
a run encodes and the dataset fingerprint."""

from __future__ import annotations

import _thread
import contextlib
import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from engine.config import RunConfig
from engine.distributed import peak_rss_mb
from engine.job import HEARTBEAT_SECONDS, RunDir, Status


class _CompileClock:
    """Wall seconds this process has spent in torch.compile: tracing, code generation and
    a backward compiled at its first use. Dynamo calls its compile callbacks once around
    the outermost compile, from whichever thread compiles."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = 0.0
        self._since: float | None = None
        self._ended = -math.inf
        self._listen()

    def _listen(self) -> None:
        """(Re-)register the callbacks: torch._dynamo.reset() drops them, and the probe
        for a working compiler (engine.distributed.compiler_problem) resets."""
        from torch._dynamo.callback import callback_handler
        if self._start not in callback_handler.start_callbacks:
            callback_handler.register_start_callback(self._start)
        if self._end not in callback_handler.end_callbacks:
            callback_handler.register_end_callback(self._end)

    def _start(self, _args) -> None:
        with self._lock:
            self._since = time.perf_counter()

    def _end(self, _args) -> None:
        with self._lock:
            if self._since is not None:
                self._ended = time.perf_counter()
                self._done += self._ended - self._since
                self._since = None

    def seconds(self) -> float:
        """Seconds compiled so far, a compile in progress included."""
        self._listen()
        with self._lock:
            now = time.perf_counter() - self._since if self._since is not None else 0.0
            return self._done + now

    def quiet_for(self) -> float:
        """Seconds since the last compile ended (0 while one is in progress, inf before
        the first)."""
        self._listen()
        with self._lock:
            return 0.0 if self._since is not None else time.perf_counter() - self._ended


_compile_clock: _CompileClock | None = None


def start_compile_clock() -> None:
    """Count compiles from now on; called where a process decides to compile, so that a
    process that does not registers no compile callbacks."""
    global _compile_clock
    if _compile_clock is None:
        _compile_clock = _CompileClock()


def compile_seconds() -> float:
    """Seconds this process has spent compiling since start_compile_clock (0 without)."""
    return _compile_clock.seconds() if _compile_clock is not None else 0.0


def compile_quiet_for() -> float:
    """Seconds since the last compile ended (0 while one is in progress, inf before any)."""
    return _compile_clock.quiet_for() if _compile_clock is not None else math.inf


# The studio shows a run's status message. While the blocks compile the heartbeat says so,
# because a compiled run otherwise stands still at its first step for a minute or more
# and looks stuck. A block's forward and backward compile one after the other with eager
# work between them, so the note stays until compiling has been quiet for this long.
COMPILING_NOTE = "compiling"
COMPILE_NOTE_LINGER_S = 10.0
# A run whose steps stop without the process ending (a GPU or driver hang, a dataset on a
# network drive that stopped answering, under DDP a rank that hangs while the others wait
# for it) keeps its heartbeat and would look like it trains. The heartbeat says so after
# this long without a step (or STALL_STEPS times the last step's time, if longer).
STALLED_NOTE = "no step"
STALL_SECONDS = 600.0
STALL_STEPS = 20


class StoppedEarly(Exception):
    """A stop signal arrived while the run was still being set up; `requested`: it came
    from a stop request (the studio's Stop), not from a signal."""

    def __init__(self, message: str, requested: bool = False):
        super().__init__(message)
        self.requested = requested


class StopSignals:
    """Ctrl+C, SIGTERM and a stop request: before the loop runs they stop at once (there
    is nothing to save yet); inside it they ask the loop to save and stop at the next step.

    The loop reads requests itself. Before it, setup can take minutes (loading the text
    encoder, filling the feature cache), and a stop request would wait for it, or, where
    the studio has no SIGTERM to send (Windows), end in a forced kill and a run called
    crashed. So `watch` polls for one meanwhile and delivers it as a SIGTERM would."""

    def __init__(self):
        self.hit, self.in_loop, self._old = False, False, {}
        self._why = ""
        self.early: StoppedEarly | None = None   # the stop raised before the loop, if any
        self._done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):   # only the main thread may set handlers
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.hit = True
        if not self.in_loop:
            why = self._why or f"by signal {signal.Signals(signum).name}"
            self.early = StoppedEarly(f"stopped {why} before training began",
                                      requested=bool(self._why))
            raise self.early

    def watch(self, pending: Callable[[], dict], every: float = 0.5) -> None:
        """Until the loop begins (or restore), poll `pending()`, the run's unhandled
        requests, and interrupt the main thread when a stop is among them."""
        if signal.SIGTERM not in self._old:   # no handler of ours to deliver it to
            return

        def poll() -> None:
            while not self.in_loop and not self._done.is_set():
                with contextlib.suppress(OSError):
                    if "stop" in pending() and not self.in_loop:
                        self._why = "by a stop request"
                        _thread.interrupt_main(signal.SIGTERM)
                        return
                self._done.wait(every)
        threading.Thread(target=poll, name="stop-request-watch", daemon=True).start()

    def restore(self) -> None:
        self._done.set()
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def oom_message(cfg: RunConfig, shape) -> str:
    tr = cfg.train
    hints = [f"lower train.batch_size (now {tr.batch_size}; raise train.grad_accum to keep the "
             f"effective batch)", f"lower data.max_side (now {cfg.data.max_side})"]
    if not tr.grad_checkpointing:
        hints.append("set train.grad_checkpointing: true")
    if tr.precision == "fp32":
        hints.append("use train.precision: bf16")
    return (f"out of GPU memory on a batch of {shape[0]} images of {shape[3]}x{shape[2]}: "
            + "; or ".join(hints))


LOG_CAPTURED_ENV = "PIXELHDM_LOG_CAPTURED"   # set by the studio, which redirects output to log.txt


class JobReporter:
    """The trainer's side of the job directory. On ranks other than 0 it only logs."""

    def __init__(self, run: RunDir, *, main: bool, world: int, device: str):
        self.run, self.main, self.world = run, main, world
        self.rank_tag = "" if main else f"[rank {os.environ.get('RANK', '?')}] "
        old = run.read_status() if main else None   # a resumed run keeps what it handled
        self.previous = old   # the last trainer's status (its state says how it ended)
        # how far the last trainer's metric lines got, read before this one adds any
        self.previous_logged = run.last_logged_step() if main else 0
        self.status = Status(pid=os.getpid(), world_size=world, device=device,
                             started_at=time.time(), heartbeat=time.time(),
                             handled=dict(old.handled) if old else {})
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tb = None
        # a resumed run's first step: TensorBoard hides what earlier trainers logged from it
        # on (steps trained again after a kill showed twice, the curve doubling back)
        self.purge_from: int | None = None
        self._logfile = None
        # a progress bar redrawn in place, on a terminal that clears a line
        self._tty = sys.stderr.isatty() and line_clearing_terminal()
        # the compile clock: seconds spent compiling so far, which the speed leaves out,
        # and since the last compile ended, until when the status says "compiling"
        self.compile_seconds: Callable[[], float] = compile_seconds
        self.compile_quiet_for: Callable[[], float] = compile_quiet_for
        # seconds of one-off work the speed leaves out: the studio's "save now" and
        # "sample now", which come once, not every speed_span steps
        self._one_off = 0.0
        # (time, step, seconds left out) marks of the speed window: from the newest mark at
        # least `speed_span` steps back (or the start) to now
        self._marks: deque[tuple[float, int, float]] = deque(
            [(time.time(), 0, self._left_out())])
        # steps the speed is measured over (the trainer's longest periodic event, so each
        # window holds its share of validation, samples and saves)
        self.speed_span = 1
        # the steps to train, in steps at the current speed (the trainer's, with stages)
        self.steps_left: Callable[[int, int], float] = lambda step, stop_at: stop_at - step
        # when the loop last made progress, and how long its last step took (`progress`)
        self.progress_at, self.step_seconds = time.monotonic(), 0.0
        if main:
            run.create()
            if os.environ.get(LOG_CAPTURED_ENV) != "1":
                self._logfile = open(run.log_file, "a", encoding="utf-8")
            # heartbeat from the start: loading a large text encoder can take minutes
            self._write(state="starting")
            self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
            self._thread.start()

    # logging --------------------------------------------------------------------------
    def log(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.rank_tag}{message}"
        if self._tty:
            sys.stderr.write("\r\033[K")
        print(line, file=sys.stderr, flush=True)
        if self._logfile is not None:
            self._logfile.write(line + "\n")
            self._logfile.flush()

    # status ---------------------------------------------------------------------------
    def _write(self, **changes) -> None:
        if not self.main:
            return
        with self._lock:
            for k, v in changes.items():
                setattr(self.status, k, v)
            self.status.heartbeat = time.time()
            self.run.write_status(self.status)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._write(**(self._compile_note() or self._stall_note()))
            except OSError:
                pass   # a full disk must not kill the heartbeat thread; the next beat retries

    def progress(self, step_seconds: float | None = None) -> None:
        """The loop moved on (a step done, or about to begin); with the step's time."""
        self.progress_at = time.monotonic()
        if step_seconds is not None:
            self.step_seconds = step_seconds

    def _stall_note(self) -> dict:
        """The status message of a running loop that has made no step for long (not while
        compiling, which the compile note says), and its removal once it moves again."""
        quiet = time.monotonic() - self.progress_at
        if (self.status.state == "running"
                and quiet >= max(STALL_SECONDS, STALL_STEPS * self.step_seconds)):
            several = " (with several GPUs: or another one)" if self.world > 1 else ""
            return {"message": f"{STALLED_NOTE} for {quiet / 60:.0f} min after step "
                               f"{self.status.step}: the trainer may be stuck, e.g. its GPU, "
                               f"driver or dataset drive{several}. Stop saves and ends it "
                               f"at its next step; Force stop ends it now, and Resume "
                               f"continues from its last checkpoint"}
        if self.status.message.startswith(STALLED_NOTE):
            return {"message": ""}
        return {}

    def _compile_note(self, running: bool = True) -> dict:
        """The status message while a compile is in progress, and its removal after (and
        when the run ends)."""
        if running and self.compile_quiet_for() < COMPILE_NOTE_LINGER_S:
            return {"message": f"{COMPILING_NOTE} the network's blocks, "
                               f"{self.compile_seconds():.0f} s so far in this run (the first "
                               "steps, each new size and the first validation and samples "
                               "compile once)"}
        if self.status.message.startswith(COMPILING_NOTE):
            return {"message": ""}
        return {}

    def start(self, step: int, total: int, epoch: int, handled: dict) -> None:
        self.restart_speed(step)
        self._write(state="running", step=step, total=total, epoch=epoch, handled=dict(handled),
                    error="", message="")

    def restart_speed(self, step: int) -> None:
        """Measure the speed from `step` on (a new stage trains at its own)."""
        self._marks = deque([(time.time(), step, self._left_out())])

    def one_off(self, seconds: float) -> None:
        """Seconds of work done once on request (a save or sample grid the studio asked
        for), which the speed leaves out."""
        self._one_off += seconds

    def _left_out(self) -> float:
        return self.compile_seconds() + self._one_off

    def _speed(self, step: int) -> float:
        """Steps per second over the window ending now at `step`, less the time spent
        compiling in it and on one-off requests: compiled blocks take minutes at their
        first steps, at each new size and at the first validation and sample grid, which
        an ETA would otherwise count as the speed of every step to come (it read hours in
        a ten-minute run), and a grid asked for right after a resume, in a window of a few
        steps, read as five times slower steps."""
        marks = self._marks
        marks.append((time.time(), step, self._left_out()))
        while len(marks) > 2 and marks[1][1] <= step - self.speed_span:
            marks.popleft()
        (t0, s0, c0), (t1, s1, c1) = marks[0], marks[-1]
        return (s1 - s0) / max(t1 - t0 - (c1 - c0), 1e-9)

    def requests(self) -> dict[str, str]:
        return self.run.pending_requests(self.status.handled)

    def handled(self, wanted: dict[str, str]) -> None:
        if self.main and wanted:
            handled = dict(self.status.handled)
            handled.update({k: v for k, v in wanted.items() if v != "signal"})
            self._write(handled=handled)

    @staticmethod
    def record_end(run: RunDir, state: str, message: str) -> None:
        """The status (and log line) of a run that ended outside the loop: a failure
        before or while training, or an early stop. Rank 0 only."""
        status = run.read_status() or Status()
        status.state, status.pid, status.message = state, os.getpid(), message
        status.error = message if state == "failed" else ""
        status.heartbeat = time.time()
        run.write_status(status)
        if os.environ.get(LOG_CAPTURED_ENV) != "1":
            with open(run.log_file, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {state}: {message}\n")

    def finish(self, state: str, step: int) -> None:
        self._stop_heartbeat()
        self._write(state=state, step=step, eta_s=0.0, **self._compile_note(running=False))
        self.log(f"{state} at step {step}")

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def close(self) -> None:
        """Stop the heartbeat and close the files (also after an error, before the
        caller records the failure)."""
        self._stop_heartbeat()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._logfile is not None:
            self._logfile.close()
            self._logfile = None

    # metrics --------------------------------------------------------------------------
    @property
    def tb(self):
        if self._tb is None and self.main:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.run.root), flush_secs=5,
                                     purge_step=self.purge_from)
        return self._tb

    def _record(self, record: dict) -> None:
        if not self.main:
            return
        self.run.append_metrics(record)
        step = record["step"]
        for k, v in record.items():
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            if k in ("step", "time", "epoch") or not numeric:
                continue
            tag = (f"quality/{k[2:]}" if k.startswith("q_") else
                   ("val/" if k.startswith("val") else "train/") + k)
            self.tb.add_scalar(tag, v, step)
        bins = record.get("loss_t") or []   # the loss in equal bins of t, noise first
        digits = 1 if 10 % max(len(bins), 1) == 0 else 2   # 10 bins: 0.0-0.1 ... 0.9-1.0
        for i, v in enumerate(bins):
            if v is not None:
                self.tb.add_scalar(f"loss_by_t/{i / len(bins):.{digits}f}-"
                                   f"{(i + 1) / len(bins):.{digits}f}", v, step)
        self.tb.flush()

    def metrics(self, step: int, epoch: int, lr: float, window: dict, stop_at: int,
                device: torch.device) -> None:
        it_s = self._speed(step)
        eta = self.steps_left(step, stop_at) / it_s if it_s > 0 else None
        # on a GPU what the allocator reserved (what the card gives the process, and what
        # nvidia-smi shows less the CUDA context), not the smaller allocated figure
        mem = (torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda"
               else peak_rss_mb())
        record = {"step": step, "epoch": epoch, "time": round(time.time(), 3), "lr": lr,
                  **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in window.items()},
                  "mem_mb": round(mem, 1)}
        self._record(record)
        self._write(step=step, epoch=epoch, loss=window.get("loss"), lr=lr, it_s=it_s,
                    images_s=window.get("images_s"), eta_s=eta)
        if not self.main:
            return
        text = (f"step {step}/{stop_at} loss {window.get('loss', float('nan')):.4f} lr {lr:.3g} "
                f"{window.get('images_s', 0):.1f} img/s ETA {format_duration(eta)}")
        if self._tty:
            done = int(30 * step / max(stop_at, 1))
            sys.stderr.write(f"\r\033[K[{'#' * done}{'.' * (30 - done)}] {text}")
            sys.stderr.flush()
            if self._logfile is not None:
                self._logfile.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
                self._logfile.flush()
        else:
            self.log(text)

    def validation(self, step: int, value: float) -> None:
        self._record({"step": step, "time": round(time.time(), 3), "val_loss": round(value, 6)})
        self.log(f"step {step}: validation loss {value:.5f}")

    def quality(self, step: int, figures: dict[str, float], seconds: float) -> None:
        """One line of live quality figures (engine/evaluate.py LiveQuality: q_* keys) and
        the seconds they took (q_seconds); TensorBoard shows them under quality/."""
        self._record({"step": step, "time": round(time.time(), 3),
                      **{k: round(v, 5) for k, v in figures.items()},
                      "q_seconds": round(seconds, 3)})
        shown = ", ".join(f"{k[2:]} {v:.3g}" for k, v in figures.items())
        self.log(f"step {step}: quality {shown or 'not measured'} ({seconds:.1f} s)")

    def event(self, step: int, kind: str, message: str, files: list[str] | None = None) -> None:
        record = {"step": step, "time": round(time.time(), 3), "event": kind, "message": message}
        if files:
            record["files"] = files[:64]
        self._record(record)
        self._write(message=f"step {step}: {message}")

    def checkpoint(self, step: int, path: Path) -> None:
        self._write(last_checkpoint=str(path))
        self.log(f"step {step}: saved {path.name}")

    def sample(self, step: int, path: Path | None) -> None:
        if path is None or not self.main:
            return
        self._write(last_sample=str(path))
        self.log(f"step {step}: sample grid {path.name}")
        try:
            arr = np.asarray(Image.open(path).convert("RGB"))
            self.tb.add_image("samples", arr, step, dataformats="HWC")
            self.tb.flush()
        except OSError:
            pass


def line_clearing_terminal() -> bool:
    """Whether stderr's terminal clears a line on ESC[K: any but a Windows console, where
    it is switched on here (Windows 10 and later); an older one gets plain lines."""
    if os.name != "nt":
        return True
    try:
        import ctypes
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.GetStdHandle(-12)                       # STD_ERROR_HANDLE
        mode = ctypes.c_uint32()
        if not kernel32.GetConsoleMode(handle, ctypes.byref(mode)):
            return False
        return bool(kernel32.SetConsoleMode(handle, mode.value | 0x0004))   # VT processing
    except (OSError, AttributeError):
        return False


def shell_arg(arg: str | os.PathLike) -> str:
    """An argument written as the user's shell reads it back in a suggested command:
    quoted where it holds spaces or shell characters (cmd.exe's on Windows, where
    list2cmdline quotes spaces only and cmd would cut at an &)."""
    text = str(arg)
    if os.name != "nt":
        return shlex.quote(text)
    quoted = subprocess.list2cmdline([text])
    return quoted if quoted.startswith('"') or not set(text) & set("&()^%!;,<>|") else \
        f'"{text}"'



def format_duration(seconds: float | None) -> str:
    """723 -> '12:03', 3723 -> '1:02:03', two days -> '2 d 0:00:00'; None -> '--:--'."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    text = f"{h}:{m:02d}:{sec:02d}" if h or days else f"{m}:{sec:02d}"
    return f"{days} d {text}" if days else text


# --------------------------------------------------------------------------------------
# Metric windows
# --------------------------------------------------------------------------------------

class MetricWindow:
    """Sums over the optimizer steps between two metric lines; `flush` returns their
    means (and the loss by time bin) and starts a new window. The loss terms and time
    bins stay on the device until `flush` reads them in one transfer."""

    def __init__(self, t_bins: int):
        self.t_bins = t_bins
        self.reset()

    def reset(self):
        self.n, self.terms, self.norm, self.clipped, self.clips = 0, {}, 0.0, 0.0, 0
        self.images, self.tokens, self.seconds, self.waited = 0, 0, 0.0, 0.0
        self.bin_loss, self.bin_count = 0.0, 0.0

    def add(self, terms: dict[str, Tensor], norm: float, clipped: float, images: int,
            tokens: int, seconds: float, bin_loss: Tensor, bin_count: Tensor,
            waited: float = 0.0):
        """One optimizer step; `waited`: the seconds of it spent waiting for its batches."""
        self.n += 1
        self.waited += waited
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v
        self.norm += norm
        self.clipped += clipped
        self.clips += clipped < norm
        self.images += images
        self.tokens += tokens
        self.seconds += seconds
        self.bin_loss = self.bin_loss + bin_loss
        self.bin_count = self.bin_count + bin_count

    def flush(self, over_ranks: Callable[[Tensor], Tensor] | None = None,
              world: int = 1) -> dict:
        """The window's means. Under DDP (`over_ranks`: the sum of a tensor over the
        `world` ranks, a collective that every rank calls at the same step) the loss terms
        and time bins are those of every rank's batches, not rank 0's alone; the rest
        (gradient norm, speed, `data_wait`: the share of the time spent waiting for
        batches) are this process's."""
        n = max(self.n, 1)
        keys = list(self.terms)
        if self.n:
            sums = torch.cat([torch.stack([self.terms[k] for k in keys]).double(),
                              self.bin_loss.double(), self.bin_count.double()])
            host = (over_ranks(sums) if over_ranks is not None else sums).tolist()
        else:
            host = [0.0] * (len(keys) + 2 * self.t_bins)
        sums, bins = host[:len(keys)], host[len(keys):]
        out = {("loss" if k == "total" else f"loss_{k}"): v / (n * world)
               for k, v in zip(keys, sums)}
        out.update(grad_norm=self.norm / n, grad_norm_clipped=self.clipped / n,
                   clip_fraction=self.clips / n, images_s=self.images / max(self.seconds, 1e-9),
                   tokens_s=self.tokens / max(self.seconds, 1e-9), step_s=self.seconds / n,
                   data_wait=self.waited / max(self.seconds, 1e-9),
                   loss_t=[round(s / c, 5) if c > 0 else None
                           for s, c in zip(bins[:self.t_bins], bins[self.t_bins:])])
        self.reset()
        return out


# a share of the step time spent waiting for images that earns the run a hint in its log
DATA_WAIT_HINT = 0.15


class DataWaitHint:
    """Says once in the log what to do about a run that waits for its images (at least
    DATA_WAIT_HINT of the step time in two metric windows in a row: one alone may be the
    loader starting its workers); `uncached()`: engine.crop_cache.uncached_advice."""

    def __init__(self, workers: int, device: torch.device, log: Callable[[str], None],
                 uncached: Callable[[], str] = lambda: ""):
        self.workers, self.device, self.log, self.uncached = workers, device, log, uncached
        self.slow_windows, self.said = 0, False

    def __call__(self, wait: float, step: int) -> None:
        self.slow_windows = self.slow_windows + 1 if wait >= DATA_WAIT_HINT else 0
        if self.slow_windows >= 2 and not self.said:
            self.said = True
            self.log(self.text(wait, step))

    def text(self, wait: float, step: int) -> str:
        cores = os.cpu_count() or 1
        head = (f"step {step}: {wait:.0%} of the training time went to waiting for images "
                f"(data.workers = {self.workers})")
        advice = []
        # on the CPU, worker processes would take cores from the training itself
        if self.device.type != "cpu" and self.workers < cores - 1:
            advice.append(f"raise data.workers (this machine has {cores} CPU cores; each "
                          f"worker process prepares batches ahead of the GPU)")
        advice.append(self.uncached() or "every crop already comes from the crop cache: "
                      "put data.cache_dir on a faster disk")
        return f"{head}; " + "; and ".join(advice)


# --------------------------------------------------------------------------------------
# Captions and dataset fingerprint
# --------------------------------------------------------------------------------------

def run_captions(plan, cfg: RunConfig, prompts: list[str] = (), *,
                 samples: bool = True) -> list[str]:
    """Every caption a run can encode, once each: its training captions, data.default_caption,
    the empty prompt (caption dropout, guidance) and, with `samples` (rank 0, which alone
    validates and samples), the validation captions, the sample prompts and the sample
    negative prompt, and `prompts` (the texts of the run's prompts file). A frozen
    encoder's features are made for these before training, and the encoder is unloaded."""
    sampled = [*(im.caption for im in plan.val_images), *cfg.sample.prompts,
               cfg.sample.negative, *prompts] if samples else []
    return list(dict.fromkeys([*(im.caption for im in plan.images), cfg.data.default_caption,
                               "", *sampled]))


def dataset_fingerprint(plan) -> str:
    """A short hash of what is trained: every image's path, size, caption and bucket."""
    h = hashlib.blake2b(digest_size=8)
    for im in plan.images:
        h.update(json.dumps([im.rel, im.record.file_size, im.caption, list(im.bucket)]).encode())
    return h.hexdigest()
