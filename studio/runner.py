"""The studio's training worker: starts trainer processes and reads what they report.

A run is a folder `<workspace>/runs/<run-id>/` (engine/job.py describes its files). The
trainer (`python -m engine.train`, or torchrun for several GPUs) runs in its own process
session, so it outlives a browser refresh and a restart of the studio. Everything shown
comes from the run folder, never from this process's memory: a new `Runner` on the same
workspace re-attaches to a run an earlier one started.

Besides config.yaml (written once) and control/ (requests), the runner owns one file:

    launch.json   pid, argv, started_at, device, gpus and max_steps of the latest process
                  the studio started for the run (a resume reuses device and GPUs). Until
                  the trainer writes a status, a live launch pid means "starting" and a
                  dead one "crashed".

Whether a run is alive is studio.liveness's one rule (on top of engine.job.effective_state:
a process that is gone, or whose heartbeat is stale, in a non-final state is "crashed");
every RunInfo carries its answer, and `Runner.ensure_stopped` refuses by it what needs a
stopped run.

`ComputeGate` keeps training and image generation from fighting over the CPU: a
generation is refused while a CPU run is alive, and a CPU run cannot start while a
generation holds the gate.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from engine.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    latest_resumable,
    list_checkpoints,
    read_state_info,
)
from engine.config import (
    ConfigError,
    RunConfig,
    save_config,
    validate,
)
from engine.distributed import resolve_device
from engine.fileio import atomic_write_text
from engine.job import (
    FINAL_STATES,
    LAUNCH_MARK,
    REQUESTS,
    RunDir,
    resume_target,
    run_owner,
    wait_for_owner_exit,
)
from engine.train import RunFinished, TrainError, resume_config, resume_point
from engine.train_io import LOG_CAPTURED_ENV
from studio.liveness import (
    ACTIVE_STATES,
    LAUNCH_FILE,
    Launch,
    judge,
    looks_like_trainer,
    read_launch,
)
from studio.paths import NAME_MAX, PathError, safe_name

PROJECT_ROOT = Path(__file__).resolve().parent.parent   # the folder holding engine/
EXIT_WAIT_SECONDS = 15.0   # how long start/resume wait for a run that reported its end to exit


class RunnerError(RuntimeError):
    """A run cannot be started, resumed, asked or deleted; the message says why."""


@dataclass
class RunInfo:
    """One run as the studio shows it."""
    run_id: str
    path: Path
    state: str              # starting|running|stopping|paused|stopped|completed|failed|crashed|none
    step: int
    total: int
    loss: float | None
    eta_s: float | None
    description: str
    created: float
    last_checkpoint: str
    last_sample: str
    error: str
    message: str
    resumable: bool         # not running, and has a checkpoint with training state or its
                            # config (a resume then starts it again from step 0)
    resume_to: int          # the step a resume without a target trains to (0: none)
    finished: bool          # its newest state is at that step: a resume needs a later one
    alive: bool             # a process of this run is alive (also while it exits)
    device: str             # "cpu", "cuda", "cuda:1"... ("" when unknown)
    pid: int                # the trainer's pid (the launched one while starting; 0 if none)
    owner: int | None = None  # the pid holding the run's lock (0: unknown), None when free
    dataset: str = ""       # the folder name of data.path


def on_cpu(device: str | torch.device) -> bool:
    return str(device).split(":")[0] == "cpu"


# --------------------------------------------------------------------------------------
# Run folders and launched processes
# --------------------------------------------------------------------------------------

def _is_run_dir(path: Path) -> bool:
    return (not path.name.startswith(".") and path.is_dir()
            and any((path / f).is_file() for f in ("config.yaml", "status.json", LAUNCH_FILE)))


def _unwritable(folder: Path, e: OSError) -> RunnerError:
    """The RunnerError of a run folder that cannot be written (a full disk, a read-only
    one, permissions): every tab shows a RunnerError as a message."""
    return RunnerError(f"cannot write in {folder} ({e.strerror or e}): free some disk space, "
                       f"or check that the folder is writable")


def _launched_group(launch: Launch | None, pid: int) -> int:
    """The process group the studio started for the run (its leader's pid), when the
    trainer `pid` or the leader still belongs to it; 0 otherwise (a run started from a
    terminal, or an old launch.json whose pid has been reused)."""
    if launch is None or not hasattr(os, "getpgid"):
        return 0
    for p in (pid, launch.pid):
        try:
            if p > 0 and os.getpgid(p) == launch.pid:
                return launch.pid
        except (ProcessLookupError, PermissionError):
            continue
    return 0


# --------------------------------------------------------------------------------------
# The compute gate
# --------------------------------------------------------------------------------------

class ComputeGate:
    """Generation and CPU training exclude each other; on a GPU both may run.

        with runner.gate.generation() as note:   # RunnerError while a CPU run is alive
            ...                                   # note: "" or a word on shared GPU memory
    """

    def __init__(self, runner: Runner):
        self._runner = runner
        self._holders = 0

    @property
    def busy(self) -> bool:
        """True while a generation holds the gate."""
        return self._holders > 0

    @contextlib.contextmanager
    def _held(self, refusal: Callable[[RunInfo | None], str]) -> Iterator[RunInfo | None]:
        """Hold the gate for the work in the `with` block, unless `refusal` of the active run
        (None when none is) gives a reason not to: then RunnerError with it."""
        with self._runner._lock:
            run = self._runner.active()
            if why := refusal(run):
                raise RunnerError(why)
            self._holders += 1
        try:
            yield run
        finally:
            with self._runner._lock:
                self._holders -= 1

    @staticmethod
    def _generation_refusal(run: RunInfo | None) -> str:
        if run is not None and on_cpu(run.device or resolve_device(None)):
            return "training is running on the CPU: pause it (Train tab) to generate"
        return ""

    def generation_blocked(self) -> str:
        """Why a generation would be refused now ('' when it would not), to say it before
        the user presses Generate."""
        return self._generation_refusal(self._runner.active())

    @contextlib.contextmanager
    def generation(self) -> Iterator[str]:
        """A generation: refused beside a run on the CPU, with a note beside one on a GPU."""
        with self._held(self._generation_refusal) as run:
            yield self._note(run)

    @contextlib.contextmanager
    def dry_run(self) -> Iterator[None]:
        """The Train tab's dry run: three whole training steps in the studio's own
        process, so never beside a live run, on any device (on a GPU it would take a second
        run's memory from the card the run trains on)."""
        def refusal(run: RunInfo | None) -> str:
            if run is None:
                return ""
            return (f"training ({run.run_id}) is running on {run.device or 'this machine'}: "
                    f"a dry run beside it would take its memory and time; pause or stop it "
                    f"first")
        with self._held(refusal):
            yield

    @staticmethod
    def _note(run: RunInfo | None) -> str:
        if run is None:
            return ""
        return (f"training ({run.run_id}) is using {run.device} at the same time: both share "
                f"its memory and run slower; pause the run if memory runs out")


# --------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------

class Runner:
    """Starts, watches and stops training runs in one workspace."""

    def __init__(self, workspace: str | os.PathLike, allow_dirs=()):
        self.workspace = Path(workspace).expanduser().resolve()
        # where run folders may lie, links resolved: the studio writes nowhere else
        self.roots = [self.workspace, *(Path(d).expanduser().resolve() for d in allow_dirs)]
        self.runs_root = self.workspace / "runs"
        self.datasets_root = self.workspace / "datasets"
        self.outputs_root = self.workspace / "outputs"
        self.models_root = self.workspace / "models"
        for d in (self.runs_root, self.datasets_root, self.outputs_root, self.models_root):
            d.mkdir(parents=True, exist_ok=True)
        self.gate = ComputeGate(self)
        self._lock = threading.RLock()
        self._procs: dict[str, subprocess.Popen] = {}   # kept only to reap them
        self._issued: set[str] = set()
        # config.yaml -> (mtime_ns, description, train.max_steps, dataset folder name)
        self._config_cache: dict[str, tuple[int, str, int, str]] = {}
        self._state_cache: dict[str, tuple[tuple[str, int], dict]] = {}

    # ---- names -------------------------------------------------------------------------
    def new_run_id(self, preset_name: str) -> str:
        """A fresh run id, e.g. '20261125-190102-tiny-cpu' (made unique with -2, -3...)."""
        stem = Path(preset_name).stem if preset_name.endswith((".yaml", ".yml")) else preset_name
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.")[:NAME_MAX - 24] or "run"
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
        with self._lock:
            run_id, n = base, 1
            while run_id in self._issued or (self.runs_root / run_id).exists():
                n += 1
                run_id = f"{base}-{n}"
            self._issued.add(run_id)
        return run_id

    def _run(self, run_id: str) -> RunDir:
        """The run folder named `run_id`: one plain path component under runs/."""
        if (not isinstance(run_id, str) or not run_id or run_id in (".", "..")
                or run_id.startswith(".") or any(c in run_id for c in "/\\:\x00")):
            raise RunnerError(f"{run_id!r} is not a run name")
        run = RunDir(self.runs_root / run_id)
        if not self._inside_roots(run.root):
            raise RunnerError(f"run '{run_id}' links to {run.root.resolve()}, outside the "
                              f"workspace: the studio reads and writes runs only inside it "
                              f"(start it with --allow-dir FOLDER to allow that folder)")
        return run

    def _inside_roots(self, path: Path) -> bool:
        real = path.resolve()
        return any(real == r or real.is_relative_to(r) for r in self.roots)

    def _existing(self, run_id: str) -> RunDir:
        run = self._run(run_id)
        if not _is_run_dir(run.root):
            raise RunnerError(f"there is no run '{run_id}' in {self.runs_root} (deleted, or "
                              f"never started)")
        return run

    # ---- starting ----------------------------------------------------------------------
    def start(self, cfg: RunConfig, run_id: str | None = None, *, gpus: int = 1,
              max_steps: int | None = None, device: str | None = None,
              sample_prompts: str = "") -> RunDir:
        """Write `cfg` into a new run folder and start training it in the background;
        `sample_prompts`, when given, is its sample_prompts.txt (the trainer refuses one
        that does not parse). RunnerError when it cannot start; engine.distributed.
        DeviceError for a device that is not there."""
        if gpus < 1:
            raise RunnerError(f"gpus = {gpus}: at least 1")
        if max_steps is not None and max_steps < 1:
            raise RunnerError(f"max steps = {max_steps}: at least 1")
        if not cfg.data.path:
            raise RunnerError("no dataset chosen: pick a dataset folder before starting")
        if not Path(cfg.data.path).is_dir():
            raise RunnerError(f"the dataset folder {cfg.data.path} does not exist")
        try:
            validate(cfg, "the run's settings")
        except ConfigError as e:
            raise RunnerError(str(e)) from e
        if run_id is None:
            run_id = self.new_run_id("run")
        else:
            try:
                run_id = safe_name(run_id)
            except PathError as e:
                raise RunnerError(f"run name: {e}") from e
        run = self._run(run_id)
        where = resolve_device(device)
        self._wait_for_exit()
        with self._lock:
            self._check_free(where)
            try:
                self.runs_root.mkdir(parents=True, exist_ok=True)
                run.root.mkdir()
            except FileExistsError:
                raise RunnerError(f"a run named '{run_id}' already exists; choose another "
                                  f"name, or resume that run") from None
            except OSError as e:
                raise _unwritable(run.root, e) from e
            try:
                run.create()
                save_config(cfg, run.config)
                if sample_prompts.strip():
                    atomic_write_text(run.sample_prompts, sample_prompts)
                run.clear_requests()
                self._spawn(run, [], str(where), device, gpus, max_steps)
            except BaseException as e:
                shutil.rmtree(run.root, ignore_errors=True)
                if isinstance(e, OSError):
                    raise _unwritable(run.root, e) from e
                raise
        return run

    def resume(self, run_id: str, *, max_steps: int | None = None, gpus: int | None = None,
               device: str | None = None) -> RunDir:
        """Continue a paused, stopped, crashed (or finished, with a higher `max_steps`)
        run from its newest checkpoint that has the training state, on the device and
        number of GPUs of its latest launch unless `device` / `gpus` are given. Whether
        anything is left to train is the trainer's own rule (engine.train.resume_point).
        RunnerError when it cannot resume; engine.distributed.DeviceError for a device
        that is not there."""
        if gpus is not None and gpus < 1:
            raise RunnerError(f"gpus = {gpus}: at least 1")
        if max_steps is not None and max_steps < 1:
            raise RunnerError(f"max steps = {max_steps}: at least 1")
        run = self._existing(run_id)
        launch = read_launch(run)
        if gpus is None:
            gpus = launch.gpus if launch is not None else 1
        if device is None and launch is not None:
            device = launch.device
        where = resolve_device(device)
        self._wait_for_exit()
        wait_for_owner_exit(run, 3.0)   # a trainer killed a moment ago may still be ending
        with self._lock:
            owner = run_owner(run)
            if owner is not None:   # e.g. a trainer started from the command line
                raise RunnerError(f"run '{run_id}' is being trained by process "
                                  f"{owner or '(unknown pid)'} right now; one trainer per run: "
                                  f"stop that process first")
            self._check_free(where)
            try:
                cfg, _ = resume_config(run)   # (the trainer says what it completed)
                resume_point(run, cfg, max_steps)
            except RunFinished as e:
                raise RunnerError(
                    f"run '{run_id}' is already at step {e.step}, the step it would train to: "
                    f"to train on, resume until a later step (Train tab: 'Resume until step'; "
                    f"past its planned steps a cosine learning rate stays at its minimum), "
                    f"or start a new run from its weights (Checkpoints tab: Train from "
                    f"this)") from e
            except (ConfigError, TrainError, CheckpointError) as e:
                raise RunnerError(f"run '{run_id}' cannot be resumed: {e}") from e
            try:
                run.clear_requests()   # an old stop request must not stop the new process
            except OSError as e:
                raise _unwritable(run.root, e) from e
            self._spawn(run, ["--resume"], str(where), device, gpus, max_steps)
        return run

    def _wait_for_exit(self) -> None:
        """Give a run that has reported its end but is still exiting up to
        EXIT_WAIT_SECONDS to go. Called without the lock: generations and the other
        runner calls go on meanwhile (start and resume check again under the lock)."""
        busy = self.active()
        deadline = time.monotonic() + EXIT_WAIT_SECONDS
        while busy is not None and busy.state in FINAL_STATES and time.monotonic() < deadline:
            time.sleep(0.2)
            busy = self.active()

    def _check_free(self, device: torch.device) -> None:
        """Refuse while another run is alive, or while a generation holds the CPU (under
        the lock, without waiting)."""
        busy = self.active()
        if busy is not None:
            what = busy.state if busy.state in ACTIVE_STATES else "still held"
            raise RunnerError(f"run '{busy.run_id}' is {what} (process {busy.pid}); one run "
                              f"trains at a time: pause or stop it first")
        if self.gate.busy and on_cpu(device):
            raise RunnerError("an image is being generated, or a dry run is running, on the "
                              "CPU: start training when it is done (both at once would crawl)")

    def _spawn(self, run: RunDir, extra: list[str], device: str, device_flag: str | None,
               gpus: int, max_steps: int | None) -> None:
        """Start the trainer on `run` (`device`: where it will run; `device_flag`: the
        --device given to it, None to let it choose the same way)."""
        if gpus > 1:
            head = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={gpus}", "-m", "engine.train"]
        else:
            head = [sys.executable, "-m", "engine.train"]
        argv = head + ["--run-dir", str(run.root), *extra]
        if max_steps is not None:
            argv += ["--max-steps", str(max_steps)]
        if device_flag:
            argv += ["--device", device_flag]
        # UTF-8 mode: log.txt is read as UTF-8, where Windows would write its ANSI code page
        env = {**os.environ, LOG_CAPTURED_ENV: "1", "PYTHONUNBUFFERED": "1", "PYTHONUTF8": "1"}
        if os.name == "nt":  # pragma: no cover - Windows
            # torchrun's rendezvous store: Windows builds of torch have no libuv, which
            # the store would otherwise ask for
            env["USE_LIBUV"] = "0"
            # a hidden console, not none: the trainer's own console children (DataLoader
            # workers, torchrun's ranks, the compiler) share it instead of each opening a
            # window of its own, which closing would kill
            detach = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP
                      | subprocess.CREATE_NO_WINDOW}
        else:
            detach = {"start_new_session": True}
        started = time.time()
        try:
            with open(run.log_file, "ab") as log:
                log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}{LAUNCH_MARK}"
                          f"{shlex.join(argv)}\n".encode("utf-8"))
                log.flush()
                proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=env,
                                        stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, **detach)
        except OSError as e:
            raise RunnerError(f"cannot start the trainer ({e.strerror or e}): "
                              f"{shlex.join(argv)}") from e
        try:
            atomic_write_text(run.root / LAUNCH_FILE, json.dumps(
                {"pid": proc.pid, "argv": argv, "started_at": started, "device": device,
                 "max_steps": max_steps, "gpus": gpus}, indent=1))
        except OSError as e:   # a run the studio could not find again must not go on
            proc.kill()
            proc.wait()
            raise RunnerError(f"cannot write {run.root / LAUNCH_FILE} ({e.strerror or e}); "
                              f"is the disk full?") from e
        self._procs[run.run_id] = proc

    # ---- asking and stopping -----------------------------------------------------------
    def request(self, run_id: str, kind: str) -> str:
        """Ask the running trainer to stop, pause, save-now or sample-now; returns the
        request id (status.json's `handled` holds it once done)."""
        if kind not in REQUESTS:
            raise RunnerError(f"unknown request '{kind}' (allowed: {', '.join(REQUESTS)})")
        run = self._existing(run_id)
        info = self._info(run)
        if not info.alive or info.state not in ACTIVE_STATES:
            raise RunnerError(f"run '{run_id}' is not running (it is {info.state}); there is "
                              f"nothing to {kind}")
        try:
            return run.request(kind)
        except OSError as e:
            raise _unwritable(run.root, e) from e

    def force_stop(self, run_id: str, grace: float = 30.0) -> bool:
        """Stop the run now: a stop request and SIGTERM (the trainer saves and stops at the
        next step), then, after `grace` seconds, kill its whole process group. Returns
        whether the run's process is gone (at once when it was not alive); False when it
        outlived the kill, or its pid now belongs to another program (left alone)."""
        run = self._existing(run_id)
        info = self._info(run)
        if not info.alive:
            return True
        group = _launched_group(read_launch(run), info.pid)
        leader = group or info.pid
        if leader <= 0 or not looks_like_trainer(leader):
            return False
        if info.state in ACTIVE_STATES:
            with contextlib.suppress(OSError):
                run.request("stop")
        if os.name != "nt":
            # the leader only: torchrun forwards it to its ranks, while data-loader workers
            # killed under a trainer would make it fail instead of saving
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(leader, signal.SIGTERM)
        if self._wait_gone(run, grace):
            return True
        if os.name == "nt":  # pragma: no cover - Windows
            # the tree from the process this studio started (the venv's python.exe, which
            # starts the real interpreter, or torchrun over its ranks): the lock's owner
            # under it may be rank 0 alone
            proc = self._procs.get(run.run_id)
            root = proc.pid if proc is not None and proc.poll() is None else leader
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(root)], capture_output=True,
                           check=False)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if group:
                    os.killpg(group, signal.SIGKILL)
                else:
                    os.kill(leader, signal.SIGKILL)
        return self._wait_gone(run, 10.0)

    def _wait_gone(self, run: RunDir, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            if not self._info(run).alive:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def ensure_stopped(self, run_id: str, doing: str) -> RunInfo:
        """The run's info when no process of it is alive (the liveness rule); RunnerError
        naming its state otherwise. `doing` completes "stop it before ...", e.g.
        "deleting it"."""
        info = self.info(run_id)
        if info.alive:
            raise RunnerError(f"run '{run_id}' is {info.state}; stop it before {doing}")
        return info

    def delete_run(self, run_id: str) -> None:
        """Delete the run folder (checkpoints, samples, logs); refused while it is alive."""
        run = self._existing(run_id)
        with self._lock:
            self.ensure_stopped(run_id, "deleting it")
            try:
                shutil.rmtree(run.root)
            except OSError as e:
                raise RunnerError(f"cannot delete {run.root} completely ({e}); close programs "
                                  f"using its files and try again") from e
            self._procs.pop(run_id, None)

    # ---- reading -----------------------------------------------------------------------
    def info(self, run_id: str) -> RunInfo:
        return self._info(self._existing(run_id))

    def runs(self) -> list[RunInfo]:
        """Every run in the workspace, newest first."""
        self._reap()
        try:
            paths = [p for p in self.runs_root.iterdir()
                     if _is_run_dir(p) and self._inside_roots(p)]
        except OSError:
            return []
        out = []
        for p in paths:
            try:
                out.append(self._info(RunDir(p)))
            except OSError:   # deleted while being read
                continue
        return sorted(out, key=lambda r: r.created, reverse=True)

    def active(self) -> RunInfo | None:
        """The run whose process is alive, if any."""
        alive = [r for r in self.runs() if r.alive]
        return alive[0] if alive else None

    def metrics(self, run_id: str, offset: int = 0) -> tuple[list[dict], int]:
        """Metric records after byte `offset`, and the offset to continue from."""
        return self._run(run_id).read_metrics(offset)

    def log_tail(self, run_id: str, lines: int = 60) -> str:
        return self._run(run_id).log_tail(lines)

    # ---- state derivation ----------------------------------------------------------------
    def _reap(self) -> None:
        for run_id, proc in list(self._procs.items()):
            if proc.poll() is not None:
                self._procs.pop(run_id, None)

    def _config_summary(self, run: RunDir) -> tuple[str, int, float, str]:
        """(description, train.max_steps, mtime, dataset folder name) of config.yaml; ("",
        0, 0.0, "") if unreadable."""
        try:
            st = run.config.stat()
        except OSError:
            return "", 0, 0.0, ""
        key = str(run.config)
        cached = self._config_cache.get(key)
        if cached is None or cached[0] != st.st_mtime_ns:
            try:
                raw = yaml.safe_load(run.config.read_text(encoding="utf-8"))
            except (OSError, ValueError, yaml.YAMLError):
                raw = None
            raw = raw if isinstance(raw, dict) else {}
            train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
            desc = raw.get("description") if isinstance(raw.get("description"), str) else ""
            steps = train.get("max_steps") if isinstance(train.get("max_steps"), int) else 0
            data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
            folder = Path(data["path"]).name if isinstance(data.get("path"), str) else ""
            cached = (st.st_mtime_ns, desc, steps, folder)
            self._config_cache[key] = cached
        return cached[1], cached[2], st.st_mtime, cached[3]

    def _resume_span(self, run: RunDir, last: CheckpointInfo | None, cfg_steps: int
                     ) -> tuple[int, int]:
        """(step, target) of a resume without a target step from `last`, the newest
        training state: its step and the step it would train to by the trainer's rule
        (engine.train.resume_point); (0, 0) when it cannot be read; (0, cfg_steps) with no
        checkpoint yet (the run starts again from step 0). Its JSON is read once per file."""
        if last is None:
            return 0, cfg_steps
        try:
            key = (str(last.state_path), last.state_path.stat().st_mtime_ns)
            cached = self._state_cache.get(str(run.root))
            saved = cached[1] if cached and cached[0] == key else read_state_info(last.state_path)
        except (OSError, CheckpointError):
            return 0, 0      # resuming says what is wrong with it
        self._state_cache[str(run.root)] = (key, saved)
        step, stop_at = (saved.get("step"), saved.get("stop_at")) if isinstance(saved, dict) \
            else (None, None)
        if not isinstance(step, int) or not isinstance(stop_at, (int, type(None))):
            return 0, 0      # not a state this trainer wrote: resuming says so
        return step, resume_target(stop_at, cfg_steps, None)

    def _info(self, run: RunDir) -> RunInfo:
        status = run.read_status()
        launch = read_launch(run)
        live = judge(run, status, launch, self._procs.get(run.run_id), time.time())
        state, alive, error, owner, fresh = (live.state, live.alive, live.error, live.owner,
                                             live.fresh)
        message = status.message if fresh else ""
        if status is None and run.status_file.exists():
            message = "status.json is damaged; the run's state is unknown"
        description, cfg_steps, created, dataset = self._config_summary(run)
        ckpts = list_checkpoints(run.checkpoints)
        # where the trainer resumes from: a step checkpoint or the newer time-based point
        damaged: list = []
        last_state = latest_resumable(run.checkpoints, damaged)
        # before its first checkpoint a run that has its config starts again from step 0;
        # one whose every checkpoint is damaged does not (the trainer refuses: it says why)
        resumable = not alive and (last_state is not None
                                   or (run.config.is_file() and not damaged))
        if damaged and last_state is None and not alive:
            message = (f"no checkpoint can be resumed from ({damaged[0][1]}): restore the "
                       f"checkpoints from a copy, or move them out of its checkpoints folder "
                       f"to start again from step 0")
        elif state == "crashed" and not alive:
            if last_state is not None:
                message = f"resume continues from step {last_state.step}"
            elif resumable:
                message = "no checkpoint was saved yet: resume starts the run again from step 0"
            else:
                message = "the run has no config.yaml to resume from: start a new run"
        step = status.step if status else 0
        if state == "starting" and launch and "--resume" in launch.argv and last_state:
            step = last_state.step
        total = status.total if fresh else 0
        total = total or (launch.max_steps if launch and launch.max_steps else 0) or cfg_steps
        device = (status.device if fresh else "") or (launch.device if launch else "")
        pid = status.pid if fresh else (launch.pid if launch and alive else 0)
        if owner:
            pid = owner
        if owner is not None and state not in ACTIVE_STATES:
            message = (f"process {owner or '(unknown pid)'} holds this run (a trainer that is "
                       f"starting or ending, or one started outside the studio)")
        at, resume_to = self._resume_span(run, last_state, cfg_steps) if resumable else (0, 0)
        if state == "completed" and resume_to > max(step, at):
            # it reached the step a resume asked for, short of its schedule: the bar measures
            # the schedule, and the note says how to go on
            total = resume_to
            message = message or (f"stopped at step {step:,}, the step asked for; Resume "
                                  f"trains on to step {resume_to:,}")
        return RunInfo(
            run_id=run.run_id, path=run.root, state=state, step=step, total=total,
            loss=float(status.loss) if fresh and status.loss is not None else None,
            eta_s=float(status.eta_s) if state == "running" and status.eta_s is not None else None,
            description=description, dataset=dataset,
            created=created or (launch.started_at if launch else 0.0),
            last_checkpoint=str(ckpts[-1].path) if ckpts else "",
            last_sample=status.last_sample if status else "", error=error, message=message,
            resumable=resumable, resume_to=resume_to,
            finished=bool(resume_to) and at >= resume_to,
            alive=alive, device=device, pid=pid, owner=owner)
