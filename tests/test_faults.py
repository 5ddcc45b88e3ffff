"""Faults injected into real trainer processes (tests/faultinject.py): SIGKILL at random
and at chosen moments, a full disk, and NaN/inf in the middle of a run. After each, the
run's files are whole and loadable, and `--resume` carries on as if nothing happened."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors import safe_open
from trainhelp import ROOT, losses, records, sets

from engine.checkpoint import list_checkpoints, load_state, load_weights
from engine.demo_data import write_demo_dataset
from engine.job import RunDir, effective_state
from engine.train import main as train_main

STEPS = 150
SAVES = ("data.flip=true", "data.crop=random", "train.save_every=8")
# the time-based resume point every 0.3 s, from the second start on (the first start is
# killed before any checkpoint, however slow the machine)
OFTEN = ("--set", "train.save_minutes=0.005")
# each: (fault, argument); the kills come in this order, the first ones at chosen moments
CHOSEN = [("after-step", "3"),                                 # before the first checkpoint
          ("mid-write", "step_0000008.state.safetensors"),     # half a training-state file
          ("before-rename", "step_0000008.safetensors"),       # state in place, weights not
          ("mid-write", "step_0000008.safetensors"),           # half a weights file
          ("mid-metrics", "12"),                               # half a metrics line
          ("mid-write", "latest_*.safetensors")]               # the time-based resume point
# every save restarts the time-based clock, so on a fast machine 8 steps can take less than
# its 0.3 s and no resume point would ever fall due: that start saves by time alone
ONLY_BY_TIME = {"latest_*.safetensors": ("--set", "train.save_every=1000")}
RANDOM_KILLS = 6


class Reference(NamedTuple):
    losses: dict[int, float]
    seconds: float


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", count=64, seed=3)


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory) -> Reference:
    """The same run, never interrupted: its losses, and its wall time on this machine."""
    run = tmp_path_factory.mktemp("ref") / "run"
    began = time.monotonic()
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", str(STEPS), *sets(*SAVES)]) == 0
    return Reference(losses(run), time.monotonic() - began)


def faulty(fault: str, arg: str, *train_args: str) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "faultinject.py"), fault, arg,
                           "--", *train_args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def assert_whole(run: Path) -> None:
    """Every checkpoint file there is complete and loads; every metrics line but a last
    one cut short parses."""
    for info in list_checkpoints(run / "checkpoints"):
        for ema in (False, True):
            weights, _ = load_weights(info.path, ema=ema)
            assert all(torch.isfinite(v).all() for v in weights.values())
        load_state(info.state_path)
    for p in (run / "checkpoints").glob("*.safetensors"):
        if not p.name.startswith("."):   # unfinished temporary files are hidden until tidied
            with safe_open(str(p), "pt") as f:
                for k in f.keys():
                    f.get_tensor(k)
    text = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
    for line in text.split("\n")[:-1]:   # (after a kill, the part after the last "\n")
        json.loads(line)


@pytest.mark.slow
def test_sigkills_at_chosen_and_random_moments_lose_and_corrupt_nothing(demo, tmp_path,
                                                                        reference):
    run = tmp_path / "run"
    rng = random.Random(20261130)
    # random moments within the first quarter of the uninterrupted run's time on this machine
    # (fixed seconds would let a fast machine finish the run before the last kills)
    faults = CHOSEN + [("timer", f"{rng.uniform(0.03, 0.23) * reference.seconds:.2f}")
                       for _ in range(RANDOM_KILLS)]
    new = ["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
           *sets(*SAVES, "train.save_minutes=0")]
    kills = 0
    for i, (fault, arg) in enumerate(faults):
        args = new if i == 0 else ["--run-dir", str(run), "--resume", *OFTEN,
                                   *ONLY_BY_TIME.get(arg, ())]
        proc = faulty(fault, arg, *args, "--max-steps", str(STEPS))
        assert proc.returncode in (-9, 0), proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        if proc.returncode == 0:   # a random moment after the end: nothing to kill
            break
        kills += 1
        status = RunDir(run).read_status()
        assert status is None or effective_state(status) in ("crashed", "starting")
        assert_whole(run)
        if i == 0:
            assert not list_checkpoints(run / "checkpoints")
    assert kills >= 10, f"only {kills} kills landed"
    assert train_main(["--run-dir", str(run), "--resume", "--max-steps", str(STEPS)]) == 0
    log = (run / "log.txt").read_text()
    assert "starts again from step 0" in log
    assert "recovery: removed the unfinished file .step_0000008." in log
    assert "recovery: removed step_0000008.state.safetensors: its weights file" in log
    assert "recovery: metrics.jsonl: dropped a last line cut short" in log
    assert_whole(run)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    # every step's loss, re-done ones included, equals the uninterrupted run's
    assert losses(run) == reference.losses


@pytest.mark.slow
@pytest.mark.parametrize("target, failing, kept", [
    ("step_0000016.safetensors", "step_0000016.safetensors", [8]),
    ("step_0000016.png", "step_0000016.png", [8, 16]),   # (the checkpoint comes first)
    ("metrics.jsonl@12", "metrics.jsonl", [8])], ids=["checkpoint", "sample", "metrics"])
def test_a_full_disk_fails_the_run_by_name_and_a_resume_continues(demo, tmp_path, target,
                                                                  failing, kept):
    run = tmp_path / "run"
    proc = faulty("disk-full", target, "--preset", "tiny-cpu", "--data", str(demo), "--run-dir",
                  str(run), "--max-steps", "24",
                  *sets("train.save_every=8", "train.sample_every=8", "sample.steps=2",
                        "sample.prompts=[a red circle]"))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    folder = run / ("checkpoints" if failing.endswith(".safetensors") else
                    "samples" if failing.endswith(".png") else "")
    assert last.startswith(f"error: the disk holding {str(folder).rstrip('/')} is full (")
    assert f"while writing {failing}" in last and "free space on that disk, then resume" in last
    status = RunDir(run).read_status()
    assert status.state == "failed" and "is full" in status.error
    assert [c.step for c in list_checkpoints(run / "checkpoints")] == kept   # intact
    assert_whole(run)
    assert not [p for p in run.rglob(".*") if p.is_file()]   # no half-written leftovers
    assert train_main(["--run-dir", str(run), "--resume", "--max-steps", "24"]) == 0
    assert RunDir(run).read_status().state == "completed"
    assert sorted(losses(run)) == list(range(1, 25))


def test_a_full_disk_before_the_first_step_is_one_line_without_traceback(demo, tmp_path,
                                                                          monkeypatch, capsys):
    """The lock's owner file, then status.json itself, on a full disk: one line each, as for
    every other failure (they were tracebacks)."""
    import errno

    import engine.train_cli as cli
    from engine.fileio import DiskFull

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    run = tmp_path / "run"
    args = ["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
            "--max-steps", "1"]
    with monkeypatch.context() as m:
        m.setattr(cli.RunLock, "acquire", full)
        assert train_main(args) == 1
    err = capsys.readouterr().err
    assert "error: cannot take the run's lock" in err and "free some disk space" in err
    assert "Traceback" not in err

    def no_room(run_dir, *args, **kwargs):
        raise DiskFull(Path(run_dir) / "status.json", 0, 100)
    with monkeypatch.context() as m:   # the run ends on a full disk, which status.json is on
        m.setattr(cli, "train", lambda cfg, run_dir, **kw: no_room(run_dir.root))
        m.setattr(cli.JobReporter, "record_end", lambda run_dir, *a: no_room(run_dir.root))
        assert train_main(args) == 1
    err = capsys.readouterr().err
    assert "error: the disk holding" in err and "while writing status.json" in err
    assert "note: could not record this in" in err and "Traceback" not in err


@pytest.mark.skipif(os.name == "nt", reason="sends itself SIGINT")
def test_a_stop_while_a_checkpoint_loads_is_a_stop_not_a_damaged_file(demo, tmp_path,
                                                                       monkeypatch, capsys):
    """Ctrl+C landing inside safetensors' reading came back as its own error, and the
    resume called a good checkpoint damaged (and the user would delete it)."""
    import signal

    import engine.train as train_module
    from engine.checkpoint import CheckpointError
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "2", *sets("train.save_every=2",
                                                 "train.sample_every=0")]) == 0

    def interrupted(*args, **kwargs):   # the signal arrives inside a library's C code,
        try:                            # which raises its own error instead
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except BaseException:
            raise CheckpointError("training state 'x' is damaged or missing (could not "
                                  "determine the shape of object type 'UntypedStorage')") from None
    monkeypatch.setattr(train_module, "restore", interrupted)
    assert train_main(["--run-dir", str(run), "--resume", "--max-steps", "4"]) == 0
    err = capsys.readouterr().err
    assert "stopped: stopped by signal SIGINT before training began" in err
    assert "damaged" not in err
    assert RunDir(run).read_status().state == "stopped"
    assert [c.step for c in list_checkpoints(run / "checkpoints")] == [2]


@pytest.mark.parametrize("damage", ["cut short", "garbage", "empty"])
def test_a_damaged_config_is_completed_from_the_checkpoint_on_resume(demo, tmp_path, capsys,
                                                                    damage):
    """config.yaml cut at a line end resumed on the defaults of every setting past the cut
    (a tenth of the learning rate, bf16, compiled...) and wrote them back; a config that
    did not read could not be resumed at all. The checkpoint holds a copy."""
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "2", *sets("train.save_every=2", "train.sample_every=0",
                                                 "train.lr=3e-3")]) == 0
    path = run / "config.yaml"
    whole = path.read_text()
    lines = whole.splitlines(keepends=True)
    path.write_bytes({"cut short": "".join(lines[:len(lines) // 2]).encode(),
                      "garbage": b"\x00\xff" * 50, "empty": b""}[damage])
    assert train_main(["--run-dir", str(run), "--resume", "--max-steps", "4"]) == 0
    err = capsys.readouterr().err
    assert ("looks cut short" if damage == "cut short" else "restored from the copy in "
            "checkpoint step 2") in err
    assert path.read_text() == whole            # written whole again, the run's own values
    assert sorted(losses(run)) == [1, 2, 3, 4]


def test_a_damaged_newest_checkpoint_is_passed_over_by_name(demo, tmp_path, capsys):
    """A cut-short newest checkpoint blocked every resume with "pick another checkpoint",
    which neither the command line nor the studio can do: the resume goes on from the
    newest whole one and names the other; with none whole it says what to do."""
    from engine.checkpoint import latest_resumable
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "4", *sets("train.save_every=2", "train.sample_every=0",
                                                 "train.keep_last=5")]) == 0
    newest = run / "checkpoints" / "step_0000004.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    assert latest_resumable(run / "checkpoints").step == 2     # (what the studio shows)
    assert train_main(["--run-dir", str(run), "--resume", "--max-steps", "6"]) == 0
    err = capsys.readouterr().err
    assert "warning: checkpoint step 4 cannot be resumed from (step_0000004.safetensors is " \
           "damaged" in err and "resuming from step 2" in err
    assert [r["step"] for r in records(run, "loss")][-4:] == [3, 4, 5, 6]
    for c in list_checkpoints(run / "checkpoints"):
        c.path.write_bytes(b"garbage")
    assert train_main(["--run-dir", str(run), "--resume", "--max-steps", "8"]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint of" in err and "to start the run again from step 0" in err


def test_tensorboard_shows_each_step_once_after_steps_are_trained_again(demo, tmp_path):
    """A resume from an earlier checkpoint trains some steps again: TensorBoard hides the
    first trainer's values of them (the studio's plots fold them the same way)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    # adamw8bit falls back to adamw here with a note, the trainer's first metric line
    common = sets("train.save_every=2", "train.sample_every=0", "train.log_every=1",
                  "train.keep_last=5", "train.optimizer=adamw8bit")
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "4", *common]) == 0
    for p in (run / "checkpoints").glob("step_0000004*"):
        p.unlink()                                  # as if killed just before saving step 4
    assert train_main(["--run-dir", str(run), "--resume", "--max-steps", "6"]) == 0
    tb = EventAccumulator(str(run))
    tb.Reload()
    assert [e.step for e in tb.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def poison_steps(monkeypatch, steps: set[int], times: int) -> list[int]:
    """Make the loss (and so every gradient) NaN for the first `times` batches tried at
    the given steps."""
    from engine.trainable import Trainable
    real, hits = Trainable.forward, []

    def forward(self, x, captions, t, eps, cfg, step, *rest, **kw):
        terms, per_sample = real(self, x, captions, t, eps, cfg, step, *rest, **kw)
        if step in steps and len(hits) < times:
            hits.append(step)
            terms = {k: v * float("nan") for k, v in terms.items()}
        return terms, per_sample
    monkeypatch.setattr(Trainable, "forward", forward)
    return hits


def test_nan_batches_are_skipped_then_rolled_back_and_training_goes_on(demo, tmp_path,
                                                                       monkeypatch):
    hits = poison_steps(monkeypatch, {10}, times=3)
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "24", *sets("train.save_every=8",
                                                   "train.max_bad_steps=3")]) == 0
    assert hits == [10, 10, 10]
    kinds = [r["event"] for r in records(run, "event")]
    assert kinds == ["skipped-batch"] * 3 + ["rollback"]
    rollback = records(run, "event")[-1]["message"]
    assert "step_0000008" in rollback and "x0.5" in rollback
    assert RunDir(run).read_status().state == "completed"
    assert_whole(run)


def test_weights_gone_non_finite_are_never_saved(demo, tmp_path, monkeypatch):
    """An optimizer step that leaves inf in the weights right before a checkpoint: that
    checkpoint is not written, the guard rolls back to the last good one, and no file of
    the run ever holds a non-finite value."""
    import engine.train as train_mod
    real, calls = train_mod.clip_gradients, []

    def clip(params, *a):
        calls.append(1)
        if len(calls) == 8:   # the update that makes step 8, which is saved
            with torch.no_grad():
                params[0].fill_(float("inf"))
        return real(params, *a)
    monkeypatch.setattr(train_mod, "clip_gradients", clip)
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "20", *sets("train.save_every=4",
                                                   "train.max_bad_steps=2")]) == 0
    events = records(run, "event")
    assert events[0]["event"] == "not-saved" and events[0]["step"] == 8
    assert [e["event"] for e in events[1:]] == ["skipped-batch"] * 2 + ["rollback"]
    assert "step_0000004" in events[-1]["message"]
    assert [c.step for c in list_checkpoints(run / "checkpoints")][-1] == 20
    assert 8 not in [c.step for c in list_checkpoints(run / "checkpoints")]
    assert_whole(run)
