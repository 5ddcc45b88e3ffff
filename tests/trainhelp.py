"""What the trainer tests share: a smaller tiny-cpu config, the trainer CLI in a
subprocess, and readers of a run's metrics and status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tiny import LEARNER, as_sets

from engine.job import RunDir

ROOT = Path(__file__).resolve().parent.parent

# a smaller tiny-cpu: each step takes a few milliseconds
FAST = [*LEARNER, "text.builtin_dim=64", "text.builtin_layers=1",
        "train.batch_size=8", "train.log_every=1", "train.sample_every=0", "train.val_every=0",
        "train.warmup_steps=5", "train.save_every=1000", "data.val_images=0",
        "data.min_side=32", "data.max_side=48", "train.cpu_threads=1"]


def sets(*extra: str) -> list[str]:
    return as_sets([*FAST, *extra])


def losses(run: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (re-done after a crash) keeps its last value."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def records(run: Path, key: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def ends_with_parent():
    """preexec_fn for a subprocess that must not outlive the tests (None off Linux): the
    kernel sends the child SIGTERM when the test process's thread that started it ends, in
    any way, SIGKILL included, so a killed test run leaves no trainer (or torchrun, which
    ends its ranks on SIGTERM) computing for hours."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl   # resolved here, not in the child
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM)                   # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:                 # the parent ended before the call
            os._exit(1)
    return preexec


def train_cli(*args: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "engine.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=ends_with_parent())


def wait_for(predicate, timeout=90.0, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def sigkill_when(proc: subprocess.Popen, predicate, what: str) -> None:
    """SIGKILL a trainer process once `predicate()` holds."""
    try:
        wait_for(predicate, what=what)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def status_step(run: Path) -> int:
    s = RunDir(run).read_status()
    return s.step if s else -1
