"""Whether a run's trainer is alive, and the state the studio shows for it: the one rule
every part of the studio goes by. The runner applies it (`judge`) to every run it reads;
the tabs and the workspace layer take its answer from RunInfo.state / RunInfo.alive and
refuse what needs a stopped run through Runner.ensure_stopped.

Three witnesses, read from the run folder and the process table:

    status.json   the trainer's own report; engine.job.effective_state turns an active
                  state whose pid is gone or whose heartbeat is stale into "crashed"
    launch.json   the latest process the studio started for the run (studio.runner
                  writes it): until the trainer reports, a live one means "starting"
                  and a dead one "crashed"
    the run lock  held by a trainer for its whole life, whatever it reports
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import PureWindowsPath

from engine.job import (
    FINAL_STATES,
    STALE_SECONDS,
    RunDir,
    Status,
    effective_state,
    pid_alive,
    process_image,
    run_owner,
)

LAUNCH_FILE = "launch.json"
ACTIVE_STATES = ("starting", "running", "stopping")


@dataclass
class Launch:
    """The contents of launch.json."""
    pid: int
    argv: list
    started_at: float
    device: str             # where it runs ("cpu", "cuda", "cuda:1"...)
    max_steps: int | None
    gpus: int               # processes torchrun started (1: no torchrun)


@dataclass(frozen=True)
class Liveness:
    """The rule's answer for one run."""
    state: str              # starting|running|stopping|paused|stopped|completed|failed|crashed|none
    alive: bool             # a process of this run is alive (also while it exits)
    error: str              # why it crashed or failed ("" when it did not)
    owner: int | None       # the pid holding the run's lock (0: unknown), None when free
    fresh: bool             # status.json was written by the latest launched process


def read_launch(run: RunDir) -> Launch | None:
    """launch.json; None when it is missing or damaged (never an exception)."""
    try:
        raw = json.loads((run.root / LAUNCH_FILE).read_text(encoding="utf-8"))
        launch = Launch(**{f.name: raw[f.name] for f in fields(Launch)})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    ok = (isinstance(launch.pid, int) and isinstance(launch.argv, list)
          and isinstance(launch.started_at, (int, float)) and isinstance(launch.device, str)
          and (launch.max_steps is None or isinstance(launch.max_steps, int))
          and isinstance(launch.gpus, int) and launch.gpus >= 1)
    return launch if ok else None


def ps_command(pid: int) -> bytes | None:
    """A process's command line as `ps` shows it (macOS and the BSDs, which have no
    /proc); None when ps cannot tell."""
    try:
        out = subprocess.run(["ps", "-o", "command=", "-p", str(int(pid))],
                             capture_output=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def looks_like_trainer(pid: int) -> bool:
    """False when the pid now belongs to some other program: Linux tells from the command
    line (an exiting process has an empty one), macOS from the one `ps` shows, Windows
    from the program, which for a trainer is a Python interpreter (the venv's python.exe,
    torchrun's ranks); elsewhere the heartbeat has to."""
    image = process_image(pid)
    if image is not None:
        return PureWindowsPath(image).name.lower().startswith("python")
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        cmdline = ps_command(pid) if sys.platform == "darwin" else None
        if cmdline is None:
            return True
    return not cmdline or b"engine.train" in cmdline


def judge(run: RunDir, status: Status | None, launch: Launch | None,
          proc: subprocess.Popen | None, now: float) -> Liveness:
    """The state and liveness of `run` at time `now` from its status.json, its launch.json,
    the launched process when this studio holds it (`proc`) and the run's lock."""
    # status.json counts when the latest launched process wrote it (or, without a
    # launch.json, whoever ran the trainer), not an earlier one
    fresh = status is not None and (launch is None or status.heartbeat >= launch.started_at)
    # the trainer's liveness before the launched process's: a process seen dead stays
    # dead, so the two answers cannot disagree
    state = effective_state(status, now) if fresh else "none"
    if proc is not None and (launch is None or proc.pid == launch.pid):
        # poll() reaps it; pid_alive also sees a leader that is a zombie while its other
        # threads are still being torn down (not yet reapable)
        launched = proc.poll() is None and pid_alive(proc.pid)
    else:   # launch.json's pid while it is a trainer (a final state written long ago:
        # the pid has been reused since)
        launched = (launch is not None and pid_alive(launch.pid)
                    and looks_like_trainer(launch.pid)
                    and not (fresh and status.state in FINAL_STATES
                             and now - status.heartbeat > STALE_SECONDS))
    owner = run_owner(run)
    if owner and not pid_alive(owner):   # the holder died; its children are letting go
        owner = None
    alive = launched or owner is not None
    if not fresh:
        if launched:
            return Liveness("starting", True, "", owner, fresh)
        # (a damaged status.json leaves the state unknown rather than crashed)
        if launch is not None and (status is not None or not run.status_file.exists()):
            return Liveness("crashed", alive, "the training process ended before reporting "
                            "anything; the log says why", owner, fresh)
        return Liveness("none", alive, "", owner, fresh)
    # the trainer acts on a stop while it sets up, and on a pause when its loop begins
    if (state in ("starting", "running")
            and {"stop", "pause"} & run.pending_requests(status.handled).keys()):
        state = "stopping"
    error = status.error
    if state != "crashed":
        alive = alive or state in ACTIVE_STATES
    elif not error:
        error = (f"the training process (pid {status.pid}) stopped reporting "
                 f"{now - status.heartbeat:.0f} s ago (hung, or the pid is now another "
                 f"program's)" if pid_alive(status.pid) else
                 f"the training process (pid {status.pid}) ended without saving its state")
        if status.world_size > 1 and (why := run.rank_error()):
            error += f"; {why}"   # torchrun ended rank 0 because another rank failed
    return Liveness(state, alive, error, owner, fresh)
