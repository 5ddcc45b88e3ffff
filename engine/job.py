"""The job directory: the only channel between a training process and the studio.

    <runs>/<run-id>/
      config.yaml      fully resolved config, written once by whoever starts the run
      status.json      trainer only, replaced atomically: state, step, loss, heartbeat...
      metrics.jsonl    trainer only, appended: one JSON object per logged step
      events.out.tfevents.*   the same scalars for TensorBoard
      log.txt          the trainer's log (and, when the studio starts it, stdout/stderr)
      samples/         fixed-prompt, fixed-seed sample grids (step_NNNNNNN.png + .json)
      sample_prompts.txt   the grids' prompts, one a line with options such as --w 64 --d 7
                       (engine/sample_prompts.py): written when the run starts (from
                       config.sample), then a person's to edit (the studio's editor or any
                       text editor) at any time; the trainer reads it before every grid
      checkpoints/     step_NNNNNNN.safetensors (+ .state.safetensors), keep.txt (studio)
      control/         studio only: one file per request kind (stop, pause, save-now,
                       sample-now) holding a request id; the trainer acts on an id it has
                       not handled yet and records it in status.json's `handled`.

Liveness is derived from the pid and the heartbeat age, so a process that died in a
non-final state shows as crashed instead of running forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from filelock import FileLock, Timeout

from engine.fileio import append_line, atomic_write_text

STATES = ("starting", "running", "stopping", "paused", "stopped", "completed", "failed")
FINAL_STATES = ("paused", "stopped", "completed", "failed")
REQUESTS = ("stop", "pause", "save-now", "sample-now")
HEARTBEAT_SECONDS = 5.0
# a temporary file of engine.fileio.atomic_target (".<name>.<8 random characters>"), or one
# that safetensors' own writer makes beside its target (".tmp<6 random characters>")
_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}$|^\.tmp[A-Za-z0-9]{6}$")
STALE_SECONDS = 90.0


@dataclass
class Status:
    state: str = "starting"
    step: int = 0
    total: int = 0
    epoch: int = 0
    loss: float | None = None
    lr: float | None = None
    it_s: float | None = None          # optimizer steps per second
    images_s: float | None = None
    eta_s: float | None = None
    last_checkpoint: str = ""
    last_sample: str = ""
    error: str = ""
    message: str = ""                  # latest notable event (rollback, skipped batch...)
    pid: int = 0
    world_size: int = 1
    device: str = ""
    started_at: float = 0.0
    heartbeat: float = 0.0
    handled: dict = field(default_factory=dict)   # request kind -> id acted upon


_OPTIONAL = {f for f, v in Status.__dataclass_fields__.items() if v.default is None}
_TYPES = {float: (int, float), type(None): (int, float)}   # JSON numbers may lose their '.0'


# how the studio's line in log.txt before each launch of a trainer begins, after the time
LAUNCH_MARK = " studio: "


class RunDir:
    """Paths of one run and the small readers/writers of its files."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # paths -----------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.root.name

    config = property(lambda self: self.root / "config.yaml")
    status_file = property(lambda self: self.root / "status.json")
    metrics_file = property(lambda self: self.root / "metrics.jsonl")
    log_file = property(lambda self: self.root / "log.txt")
    samples = property(lambda self: self.root / "samples")
    sample_prompts = property(lambda self: self.root / "sample_prompts.txt")
    checkpoints = property(lambda self: self.root / "checkpoints")
    control = property(lambda self: self.root / "control")

    def create(self) -> None:
        for d in (self.root, self.samples, self.checkpoints, self.control):
            d.mkdir(parents=True, exist_ok=True)

    def recover(self) -> list[str]:
        """Tidy what a killed trainer left behind; only the holder of the run lock calls
        this. Removes unfinished temporary files and training-state files whose weights
        file was never written, and cuts a metrics line that was cut short. Returns one
        note per thing done."""
        notes, freed = [], 0
        for folder in (self.root, self.checkpoints, self.samples):
            for p in folder.glob(".*"):
                if _TEMP_FILE.match(p.name) and p.is_file():
                    freed += p.stat().st_size
                    p.unlink(missing_ok=True)
                    notes.append(f"removed the unfinished file {p.name} of an interrupted write")
        for p in self.checkpoints.glob("*.state.safetensors"):
            if not p.with_name(p.name.replace(".state.", ".")).exists():
                freed += p.stat().st_size
                p.unlink(missing_ok=True)
                notes.append(f"removed {p.name}: its weights file is not there (never written, "
                             f"or deleted), and a training state resumes nothing without it")
        try:
            with open(self.metrics_file, "r+b") as f:
                size = f.seek(0, os.SEEK_END)
                start = f.seek(max(0, size - (1 << 16)))
                data = f.read()
                end = start + data.rfind(b"\n") + 1   # metric lines are far below 64 KB
                if end < size:
                    f.truncate(end)
                    notes.append(f"metrics.jsonl: dropped a last line cut short "
                                 f"({size - end} bytes)")
        except FileNotFoundError:
            pass
        if freed:
            notes.append(f"{freed / 2**20:.1f} MB freed")
        return notes

    # status ----------------------------------------------------------------------
    def write_status(self, status: Status) -> None:
        atomic_write_text(self.status_file, json.dumps(asdict(status), indent=1))

    def read_status(self) -> Status | None:
        """The last status written, or None when there is none or it is damaged (not
        JSON, not an object, an unknown state or a field of the wrong type). Unknown keys
        are ignored."""
        try:
            raw = json.loads(self.status_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(raw, dict):
            return None
        defaults = Status()
        values = {}
        for f in fields(Status):
            if f.name not in raw:
                continue
            v, default = raw[f.name], getattr(defaults, f.name)
            if isinstance(v, bool) or (v is None and default is not None and f.name not in
                                       _OPTIONAL):
                return None
            if v is not None and not isinstance(v, _TYPES.get(type(default), type(default))):
                return None
            numeric = isinstance(default, float) or f.name in _OPTIONAL
            values[f.name] = float(v) if numeric and v is not None else v
        status = Status(**values)
        return status if status.state in STATES else None

    # metrics ---------------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        append_line(self.metrics_file, json.dumps(record, separators=(",", ":")))

    def read_metrics(self, offset: int = 0) -> tuple[list[dict], int]:
        """Complete metric lines after byte `offset`, and the offset to continue from
        (a line still being written is left for the next call)."""
        try:
            with open(self.metrics_file, "rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError:
            return [], offset
        end = data.rfind(b"\n") + 1
        records = []
        for line in data[:end].splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records, offset + end

    def last_logged_step(self) -> int:
        """The step the last trainer's metric lines reached (0 when there are none): how
        far it got, where its status.json, written every few seconds, may lag. The file
        holds every trainer's lines; the last one's begin where the step goes down."""
        try:
            with open(self.metrics_file, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 16 * 1024))
                data = f.read()
        except OSError:
            return 0
        steps = []
        for line in data.splitlines()[1:] if len(data) >= 16 * 1024 else data.splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                step = json.loads(line).get("step")
                if isinstance(step, int):
                    steps.append(step)
        reached = 0
        for step in steps:   # the highest step since the last time it went down
            reached = step if step < reached else max(reached, step)
        return reached

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        # Windows writes \r\n; a lone \r (a progress line redrawn) ends a line too
        return "\n".join(text.replace("\r\n", "\n").replace("\r", "\n").splitlines()[-lines:])

    def rank_error(self) -> str:
        """The error that a torchrun rank other than 0 wrote to the log since the studio's
        latest launch ('' when none): rank 0 alone writes status.json, and torchrun ends it
        when another rank fails. (The ranks' output reaches log.txt in studio runs.)"""
        tail = self.log_tail(400)
        since = tail[max(tail.rfind(LAUNCH_MARK), 0):]
        found = re.findall(r"\[rank (\d+)\] error: (.+)", since)
        return f"rank {found[-1][0]} failed: {found[-1][1].strip()}" if found else ""

    # control requests ---------------------------------------------------------------
    def request(self, kind: str) -> str:
        """Studio side: ask the trainer for `kind`; returns the request id."""
        if kind not in REQUESTS:
            raise ValueError(f"unknown request {kind!r} (allowed: {', '.join(REQUESTS)})")
        rid = uuid.uuid4().hex
        atomic_write_text(self.control / kind, json.dumps({"id": rid, "at": time.time()}))
        return rid

    def clear_requests(self) -> None:
        """Studio side, before (re)starting a process: forget old requests."""
        for kind in REQUESTS:
            try:
                (self.control / kind).unlink()
            except FileNotFoundError:
                pass

    def pending_requests(self, handled: dict) -> dict[str, str]:
        """Trainer side: request kind -> id for every request not handled yet."""
        out = {}
        for kind in REQUESTS:
            try:
                rid = json.loads((self.control / kind).read_text(encoding="utf-8"))["id"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if handled.get(kind) != rid:
                out[kind] = rid
        return out


def resume_target(saved_total: int | None, max_steps: int, requested: int | None) -> int:
    """The step a resumed run trains to: what was asked for (--max-steps), else the
    larger of the target it was started with and train.max_steps (so raising
    train.max_steps extends a run, and a run started with a larger --max-steps keeps it)."""
    if requested is not None:
        return requested
    return max(saved_total or 0, max_steps)


# --------------------------------------------------------------------------------------
# Liveness
# --------------------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # pragma: no cover - Windows
        import ctypes
        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def process_image(pid: int) -> str | None:
    """The full path of the program a Windows process runs (None elsewhere, or when the
    process cannot be asked): after a crash its pid may belong to another program."""
    if os.name != "nt" or pid <= 0:
        return None
    import ctypes  # pragma: no cover - Windows
    from ctypes import wintypes
    k32 = ctypes.WinDLL("kernel32", use_last_error=True)
    k32.OpenProcess.restype = wintypes.HANDLE
    k32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    k32.QueryFullProcessImageNameW.restype = wintypes.BOOL
    k32.QueryFullProcessImageNameW.argtypes = [wintypes.HANDLE, wintypes.DWORD, wintypes.LPWSTR,
                                               ctypes.POINTER(wintypes.DWORD)]
    k32.CloseHandle.argtypes = [wintypes.HANDLE]
    handle = k32.OpenProcess(0x1000, False, pid)    # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return None
    try:
        buf = ctypes.create_unicode_buffer(32768)
        size = wintypes.DWORD(len(buf))
        ok = k32.QueryFullProcessImageNameW(handle, 0, buf, ctypes.byref(size))
        return buf.value if ok else None
    finally:
        k32.CloseHandle(handle)


def effective_state(status: Status | None, now: float | None = None) -> str:
    """The state to show: the trainer's own state, or `crashed` when it claims to be
    active but its process is gone or its heartbeat is stale, or `none`."""
    if status is None:
        return "none"
    if status.state in FINAL_STATES:
        return status.state
    now = time.time() if now is None else now
    if not pid_alive(status.pid) or now - status.heartbeat > STALE_SECONDS:
        return "crashed"
    return status.state


# --------------------------------------------------------------------------------------
# One trainer per run: an OS-level lock held for the trainer's whole life
# --------------------------------------------------------------------------------------

LOCK_FILE, OWNER_FILE = "trainer.lock", "trainer.json"


class RunBusy(RuntimeError):
    """Another live process trains this run."""


class RunLock:
    """The trainer's exclusive lock on its run folder (flock on Linux and macOS,
    LockFileEx on Windows). The operating system releases it when the process ends in any
    way, SIGKILL included, so a dead trainer never leaves a stale lock. The holder's pid
    goes to trainer.json beside it, for the message a second starter gets."""

    def __init__(self, run: RunDir):
        self.run = run
        self._lock = FileLock(run.root / LOCK_FILE, is_singleton=False)

    def acquire(self, wait: float = 10.0) -> None:
        """Take the lock, or raise RunBusy naming the process that holds it. It waits up to
        `wait` seconds: a look by `run_owner` holds the lock for an instant, and the
        data-loading workers of a trainer that was just killed hold it (inherited) until
        they notice and exit."""
        self.run.root.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=wait)
        except Timeout:
            pid = read_owner(self.run)
            who = f"process {pid}" if pid else "another process"
            raise RunBusy(f"'{self.run.root}' is being trained by {who} right now; a run has "
                          f"one trainer at a time. Stop that one first (the studio's Stop "
                          f"button, or `kill {pid or 'PID'}`) or let it finish, then resume"
                          ) from None
        atomic_write_text(self.run.root / OWNER_FILE,
                          json.dumps({"pid": os.getpid(), "since": time.time()}))

    def release(self) -> None:
        self._lock.release()


def read_owner(run: RunDir) -> int | None:
    """The pid the last lock holder wrote, or None."""
    try:
        pid = json.loads((run.root / OWNER_FILE).read_text(encoding="utf-8")).get("pid")
    except (OSError, ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) else None


def run_owner(run: RunDir) -> int | None:
    """The pid of the process that trains the run now (0 when it cannot be told), or
    None when no process holds the run's lock."""
    if not (run.root / LOCK_FILE).exists():
        return None
    probe = FileLock(run.root / LOCK_FILE, is_singleton=False)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return read_owner(run) or 0
    except OSError:   # a lock file that cannot be opened (permissions): no trainer could either
        return None
    probe.release()
    return None


def wait_for_owner_exit(run: RunDir, seconds: float = 10.0) -> int | None:
    """`run_owner`, given up to `seconds` to become None: a trainer that was just killed
    may still be ending (its data-loading workers hold the inherited lock until they
    notice). Returns the owner that stayed, or None."""
    end = time.monotonic() + seconds
    while (owner := run_owner(run)) is not None and time.monotonic() < end:
        time.sleep(0.2)
    return owner
