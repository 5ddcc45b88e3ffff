"""The studio's training worker against real tiny-cpu trainer processes on a small demo
dataset: start, progress, save-now, stop, pause and resume, re-attach from a new Runner,
crash detection after SIGKILL, one run at a time, the compute gate, and run folders that
are damaged or half there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import latest_resumable, step_name
from engine.config import RunConfig, dump_yaml, load_preset, save_config
from engine.demo_data import write_demo_dataset
from engine.distributed import DeviceError
from engine.job import RunDir, Status, pid_alive
from studio import runner as runner_module
from studio.liveness import LAUNCH_FILE, judge, read_launch
from studio.runner import Runner, RunnerError

POSIX = os.name == "posix"
FAST = ["model.patch_layers=2", "train.batch_size=4", "train.log_every=1", "train.save_every=5",
        "train.sample_every=0", "train.val_every=0", "data.val_images=0", "train.cpu_threads=1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", count=48, seed=1)


def fast_config(dataset: Path, *overrides: str) -> RunConfig:
    return load_preset("tiny-cpu", [*FAST, f"data.path={dataset}", *overrides])


def _kill_launched(workspace: Path) -> None:
    """Kill every trainer the studio launched in `workspace`, whatever the runner thinks."""
    for launch in (workspace / "runs").glob(f"*/{LAUNCH_FILE}"):
        try:
            pid = json.loads(launch.read_text())["pid"]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"engine.train" not in f.read():
                    continue
            os.killpg(pid, signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            continue


@pytest.fixture
def runner(tmp_path):
    r = Runner(tmp_path / "ws")
    try:
        yield r
    finally:
        for info in r.runs():
            if info.alive and (info.path / LAUNCH_FILE).exists():
                r.force_stop(info.run_id, grace=0)
        if POSIX:
            _kill_launched(r.workspace)


def wait_for(runner: Runner, run_id: str, pred, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        info = runner.info(run_id)
        if pred(info):
            return info
        if time.monotonic() > deadline:
            pytest.fail(f"{run_id}: no '{what}' after {timeout:.0f} s; last: {info}\n"
                        f"{runner.log_tail(run_id)}")
        time.sleep(0.1)


def loss_steps(runner: Runner, run_id: str) -> list[int]:
    records, _ = runner.metrics(run_id)
    return [r["step"] for r in records if "loss" in r]


def write_status(run: RunDir, **fields) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    (run.status_file).write_text(json.dumps({**Status().__dict__, **fields}))


# ---- Real trainer processes --------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not POSIX, reason="uses POSIX process groups")
def test_start_runs_in_background_saves_on_request_and_a_new_runner_stops_it(runner, dataset):
    cfg = fast_config(dataset, "train.save_every=100000")
    run = runner.start(cfg, "first", device="cpu")

    # just spawned: the trainer has not written its status yet (importing torch takes longer)
    info = runner.info("first")
    assert (info.state, info.alive, info.total) == ("starting", True, cfg.train.max_steps)
    assert not run.status_file.exists()
    launch = json.loads((run.root / LAUNCH_FILE).read_text())
    assert launch["argv"][:5] == [sys.executable, "-m", "engine.train", "--run-dir", str(run.root)]
    assert launch["pid"] == info.pid and (launch["device"], launch["gpus"]) == ("cpu", 1)
    assert os.getpgid(info.pid) == info.pid            # its own session: survives the studio
    assert run.config.read_text() == dump_yaml(cfg)
    assert "studio: " in run.log_tail()

    info = wait_for(runner, "first", lambda i: i.state == "running" and i.step >= 2, "running")
    later = wait_for(runner, "first", lambda i: i.step > info.step, "more steps")
    assert later.loss is not None and later.device == "cpu"

    # one run at a time, and no generation next to a CPU run
    with pytest.raises(RunnerError, match="run 'first' is running"):
        runner.start(cfg, "second", device="cpu")
    assert not (runner.runs_root / "second").exists()
    with pytest.raises(RunnerError, match="training is running on the CPU"):
        with runner.gate.generation():
            pass
    assert not runner.gate.busy
    assert runner.gate.generation_blocked().startswith("training is running on the CPU")
    with pytest.raises(RunnerError, match="stop it before deleting"):
        runner.delete_run("first")

    rid = runner.request("first", "save-now")
    saved = wait_for(runner, "first", lambda i: i.last_checkpoint != "", "a save-now checkpoint")
    assert latest_resumable(run.checkpoints) is not None
    assert not saved.resumable                          # alive: resume is not offered
    wait_for(runner, "first", lambda i: run.read_status().handled.get("save-now") == rid,
             "save-now handled")

    # a studio restart: a fresh Runner finds the run from its folder alone and stops it
    again = Runner(runner.workspace)
    active = again.active()
    assert active is not None and (active.run_id, active.state) == ("first", "running")
    again.request("first", "stop")
    done = wait_for(again, "first", lambda i: i.state == "stopped" and not i.alive, "stopped")
    assert not pid_alive(done.pid)
    assert latest_resumable(run.checkpoints).step == done.step
    assert again.gate.generation_blocked() == ""                 # said before Generate
    assert done.resumable and done.eta_s is None and again.active() is None
    assert loss_steps(again, "first") == list(range(1, done.step + 1))
    _, offset = again.metrics("first")
    assert again.metrics("first", offset) == ([], offset)
    assert f"stopped at step {done.step}" in again.log_tail("first")
    with pytest.raises(RunnerError, match="not running"):
        again.request("first", "pause")

    again.delete_run("first")
    assert not run.root.exists() and again.runs() == []


@pytest.mark.slow
@pytest.mark.skipif(not POSIX, reason="uses POSIX process groups")
def test_pause_then_resume_continues_from_the_paused_step_to_completion(runner, dataset):
    run = runner.start(fast_config(dataset), "p", device="cpu")
    wait_for(runner, "p", lambda i: i.state == "running" and i.step >= 3, "running")
    runner.request("p", "pause")
    paused = wait_for(runner, "p", lambda i: i.state == "paused" and not i.alive, "paused")
    assert paused.resumable and latest_resumable(run.checkpoints).step == paused.step
    end = paused.step + 6

    runner.resume("p", max_steps=end)                     # on the launch's device
    argv = json.loads((run.root / LAUNCH_FILE).read_text())["argv"]
    assert argv[argv.index("--device") + 1] == "cpu" and "--resume" in argv
    assert not (run.control / "pause").exists()          # the old request is gone
    assert runner.info("p").state == "starting"          # not the previous process's "paused"
    done = wait_for(runner, "p", lambda i: i.state == "completed" and not i.alive, "completed")
    # reached the step asked for, short of the schedule: the bar measures the schedule
    assert (done.step, done.total) == (end, fast_config(dataset).train.max_steps)
    assert loss_steps(runner, "p") == list(range(1, end + 1))   # nothing repeated, nothing skipped
    assert f"resumed from step_{paused.step:07d}" in runner.log_tail("p", 200)
    with pytest.raises(RunnerError, match=f"already at step {end}"):
        runner.resume("p", max_steps=end)


@pytest.mark.slow
@pytest.mark.skipif(not POSIX, reason="uses POSIX process groups")
def test_a_killed_trainer_shows_crashed_resumes_and_force_stop_saves(runner, dataset):
    run = runner.start(fast_config(dataset), "c", device="cpu")
    info = wait_for(runner, "c", lambda i: i.step >= 7 and latest_resumable(run.checkpoints),
                    "a checkpoint")
    os.killpg(info.pid, signal.SIGKILL)
    crashed = wait_for(runner, "c", lambda i: i.state == "crashed", "crashed", timeout=20)
    kept = latest_resumable(run.checkpoints).step
    assert not crashed.alive and crashed.resumable and runner.active() is None
    assert "ended without saving" in crashed.error
    assert crashed.message == f"resume continues from step {kept}"

    runner.resume("c")
    wait_for(runner, "c", lambda i: i.state == "running" and i.step > kept + 1, "running again")
    assert f"resumed from step_{kept:07d}" in runner.log_tail("c", 200)
    steps = loss_steps(runner, "c")
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[:restart] == list(range(1, restart + 1))    # the killed process
    assert steps[restart] == kept + 1                           # the resumed one

    runner.force_stop("c", grace=30)
    stopped = runner.info("c")
    assert (stopped.state, stopped.alive) == ("stopped", False)
    assert latest_resumable(run.checkpoints).step == stopped.step


@pytest.mark.slow
@pytest.mark.skipif(not POSIX, reason="uses POSIX process groups")
def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0(runner, dataset):
    """Stopped while it set up (or killed before its first save), a run has its config and
    no checkpoint: the studio offers Resume, which trains it from step 0 as the trainer's
    own --resume does."""
    run = RunDir(runner.runs_root / "early")
    run.create()
    save_config(fast_config(dataset, "train.max_steps=6"), run.config)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_status(run, state="stopped", step=0, pid=gone.pid, heartbeat=time.time(),
                 message="stopped by a stop request before training began")
    info = runner.info("early")
    assert (info.state, info.resumable, info.resume_to, info.finished) == (
        "stopped", True, 6, False)
    runner.resume("early")
    done = wait_for(runner, "early", lambda i: i.state == "completed", "completed")
    assert done.step == 6 and loss_steps(runner, "early") == list(range(1, 7))
    assert "starts again from step 0" in runner.log_tail("early", 200)


# ---- The gate, names and checks before anything is spawned -------------------------------

def test_a_cpu_start_waits_for_a_running_generation(runner, dataset):
    with runner.gate.generation() as note:
        assert note == "" and runner.gate.busy
        with pytest.raises(RunnerError, match="an image is being generated, or a dry run"):
            runner.start(fast_config(dataset), "blocked", device="cpu")
    assert not runner.gate.busy
    assert not (runner.runs_root / "blocked").exists()
    with runner.gate.dry_run():
        assert runner.gate.busy
        with pytest.raises(RunnerError, match="a dry run is running, on the CPU"):
            runner.start(fast_config(dataset), "blocked", device="cpu")
    assert not runner.gate.busy


@pytest.fixture
def sleeper():
    """A live process that is not a trainer (its pid stands in for a trainer's)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_gpu_run_lets_generation_through_with_a_note(runner, dataset, sleeper):
    run = RunDir(runner.runs_root / "gpu")
    run.create()
    (run.config).write_text(dump_yaml(fast_config(dataset)))
    write_status(run, state="running", step=12, total=3000, pid=sleeper, device="cuda:0",
                 heartbeat=time.time())
    active = runner.active()
    assert active is not None
    assert (active.run_id, active.state, active.step) == ("gpu", "running", 12)
    with runner.gate.generation() as note:
        assert "cuda:0" in note and "memory" in note
    # a dry run is a second training step in the studio's process: never beside a run
    with pytest.raises(RunnerError, match=r"training \(gpu\) is running on cuda:0: a dry run"):
        with runner.gate.dry_run():
            pass
    assert not runner.gate.busy
    with pytest.raises(RunnerError, match="one run trains at a time"):
        runner.start(fast_config(dataset), "other", device="cpu")

    # the same pid, no heartbeat for minutes: a hung trainer, or the pid is now another program
    write_status(run, state="running", step=12, total=3000, pid=sleeper, device="cuda:0",
                 heartbeat=time.time() - 600)
    info = runner.info("gpu")
    assert (info.state, info.alive, info.resumable) == ("crashed", False, True)
    assert "stopped reporting" in info.error and runner.active() is None
    # no checkpoint yet: resume starts it again from step 0, as the trainer does
    assert "starts the run again from step 0" in info.message
    assert (info.resume_to, info.finished) == (fast_config(dataset).train.max_steps, False)


@pytest.mark.skipif(not POSIX, reason="uses POSIX process groups")
def test_the_liveness_rule_is_one_answer_for_every_caller(runner, dataset, sleeper):
    """studio.liveness.judge decides state and liveness from status.json, launch.json and
    the processes; RunInfo carries its answer and ensure_stopped refuses by it."""
    run = RunDir(runner.runs_root / "live")
    run.create()
    run.config.write_text(dump_yaml(fast_config(dataset)))
    now = time.time()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()

    def judged(**status):
        if status:
            write_status(run, **status)
        live = judge(run, run.read_status(), read_launch(run), None, now)
        info = runner.info("live")
        assert (info.state, info.alive, info.owner) == (live.state, live.alive, live.owner)
        assert info.error == live.error or "stopped reporting" in live.error   # (its age)
        return live

    assert (judged().state, judged().alive) == ("none", False)     # nothing written yet
    live = judged(state="running", step=3, pid=sleeper, heartbeat=now)
    assert (live.state, live.alive, live.error, live.fresh) == ("running", True, "", True)
    with pytest.raises(RunnerError, match="run 'live' is running; stop it before doing that"):
        runner.ensure_stopped("live", "doing that")
    run.request("pause")
    assert (judged().state, judged().alive) == ("stopping", True)
    run.clear_requests()
    judged(state="starting", step=0, pid=sleeper, heartbeat=now)   # setting up
    run.request("stop")
    assert (judged().state, judged().alive) == ("stopping", True)
    run.clear_requests()
    live = judged(state="running", pid=sleeper, heartbeat=now - 600)   # alive, not beating
    assert (live.state, live.alive) == ("crashed", False)
    assert "stopped reporting 600 s ago" in live.error
    live = judged(state="running", pid=gone.pid, heartbeat=now)         # its process is gone
    assert (live.state, live.alive) == ("crashed", False)
    assert live.error.endswith("ended without saving its state")
    # under torchrun rank 0 is ended when another rank fails: the crash names that error
    with open(run.log_file, "a", encoding="utf-8") as f:
        f.write("step 9 loss 0.5\n[rank 1] error: CUDA out of memory at 512x512; lower "
                "train.batch_size\n")
    assert judged(state="running", pid=gone.pid, heartbeat=now).error.endswith(
        "ended without saving its state")                               # one process: not it
    live = judged(state="running", pid=gone.pid, heartbeat=now, world_size=2)
    assert live.error.endswith("ended without saving its state; rank 1 failed: CUDA out of "
                               "memory at 512x512; lower train.batch_size")
    live = judged(state="failed", pid=gone.pid, heartbeat=now, error="NaN loss")
    assert (live.state, live.alive, live.error) == ("failed", False, "NaN loss")
    assert judged(state="paused", pid=sleeper, heartbeat=now).alive is False
    assert runner.ensure_stopped("live", "doing that").state == "paused"
    # a launch newer than the status: the process the studio started, or its crash
    write_launch(run, gone.pid, "cpu", started_at=now + 1)
    live = judged()
    assert (live.state, live.alive, live.fresh) == ("crashed", False, False)
    assert "before reporting anything" in live.error
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_launch(run, proc.pid, "cpu", started_at=now + 1)
        live = judge(run, run.read_status(), read_launch(run), proc, now)
        assert (live.state, live.alive) == ("starting", True)
    finally:
        proc.kill()
        proc.wait()
    assert judge(run, run.read_status(), read_launch(run), proc, now).state == "crashed"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_force_stop_never_signals_a_process_that_is_not_a_trainer(runner, dataset, sleeper):
    run = RunDir(runner.runs_root / "stranger")
    run.create()
    write_status(run, state="running", pid=sleeper, device="cpu", heartbeat=time.time())
    assert runner.info("stranger").alive
    assert runner.force_stop("stranger", grace=0) is False    # said, not claimed stopped
    assert pid_alive(sleeper)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_force_stop_kills_the_whole_group_of_a_trainer_that_ignores_sigterm(runner):
    """A stand-in trainer (its command line names engine.train) that ignores SIGTERM and
    has a child: after the grace period both are killed."""
    hung = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "print(c.pid, flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", hung, "engine.train"], stdout=subprocess.PIPE,
                            start_new_session=True, text=True)
    try:
        child = int(proc.stdout.readline())
        run = RunDir(runner.runs_root / "hung")
        run.create()
        write_launch(run, proc.pid, "cpu")
        write_status(run, state="running", pid=proc.pid, device="cpu", heartbeat=time.time())
        assert runner.info("hung").alive
        t0 = time.monotonic()
        assert runner.force_stop("hung", grace=1.0) is True
        assert 1.0 <= time.monotonic() - t0 < 10
        assert proc.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while pid_alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(child)
        assert runner.info("hung").state == "crashed"
        assert (run.control / "stop").exists()                # asked politely first
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def stand_in_trainer(monkeypatch):
    """The runner's trainer processes replaced by a sleeping stand-in whose command line
    names engine.train; launch.json still records the argv the runner meant to run."""
    real = subprocess.Popen

    def popen(argv, *args, **kwargs):
        if "engine.train" in argv:
            argv = [sys.executable, "-c", "import time; time.sleep(60)", "engine.train"]
        return real(argv, *args, **kwargs)

    monkeypatch.setattr(runner_module.subprocess, "Popen", popen)


def write_launch(run: RunDir, pid: int, device: str, **changes) -> None:
    """A launch.json as the runner writes it, for a process started a second ago."""
    launch = {"pid": pid, "argv": ["engine.train"], "started_at": time.time() - 1,
              "device": device, "max_steps": None, "gpus": 1, **changes}
    run.root.joinpath(LAUNCH_FILE).write_text(json.dumps(launch))


def saved_run(runner: Runner, name: str, cfg: RunConfig, step: int, stop_at: int | None,
              launch: dict | None = None) -> RunDir:
    """A stopped run with a checkpoint at `step` whose training state records the target
    `stop_at` it was started with."""
    run = RunDir(runner.runs_root / name)
    run.create()
    run.config.write_text(dump_yaml(cfg))
    base = run.checkpoints / step_name(step)
    save_file({"w": torch.zeros(1)}, f"{base}.safetensors")
    save_file({"x": torch.zeros(1)}, f"{base}.state.safetensors",
              metadata={"state": json.dumps({"step": step, "stop_at": stop_at})})
    if launch is not None:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        write_launch(run, gone.pid, **{"started_at": time.time() - 60, "max_steps": stop_at,
                                       **launch})
    write_status(run, state="stopped", step=step, pid=0, heartbeat=time.time())
    return run


def test_a_full_disk_is_a_runner_error_and_leaves_no_half_run(runner, dataset, monkeypatch):
    """Both tabs that start, resume or ask a run show a RunnerError as a message; a full disk
    was an OSError that only one of them caught (the other showed Gradio's bare "Error")."""
    import errno

    import studio.runner as runner_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(runner_module, "save_config", full)
        with pytest.raises(RunnerError, match="No space left on device.*free some disk"):
            runner.start(fast_config(dataset), "full")
    assert not (runner.runs_root / "full").exists()
    run = saved_run(runner, "stopped", fast_config(dataset), 2, None)
    with monkeypatch.context() as m:
        m.setattr(RunDir, "clear_requests", full)
        with pytest.raises(RunnerError, match="free some disk"):
            runner.resume("stopped")
    assert not (run.root / LAUNCH_FILE).exists()


def test_a_run_whose_every_checkpoint_is_damaged_is_not_offered_a_resume(runner, dataset):
    """Resume from step 0 was offered, then refused by the trainer: the tab says why now."""
    run = saved_run(runner, "broken", fast_config(dataset), 2, None)
    for p in run.checkpoints.glob("*.safetensors"):
        p.write_bytes(p.read_bytes()[:40])
    info = runner.info("broken")
    assert not info.resumable
    assert info.message.startswith("no checkpoint can be resumed from (step_0000002")
    assert "move them out of its checkpoints folder" in info.message


def launched_argv(run: RunDir) -> tuple[list, int, str]:
    launch = json.loads((run.root / LAUNCH_FILE).read_text())
    return launch["argv"], launch["gpus"], launch["device"]


@pytest.mark.skipif(not POSIX, reason="uses POSIX process groups")
def test_resume_reuses_the_launch_gpus_and_device(runner, dataset, stand_in_trainer):
    run = saved_run(runner, "multi", fast_config(dataset), 5, 60,
                    launch={"device": "cpu", "gpus": 2})
    runner.resume("multi")
    argv, gpus, device = launched_argv(run)
    assert (gpus, device) == (2, "cpu")
    assert "--nproc_per_node=2" in argv and argv[argv.index("--device") + 1] == "cpu"
    assert argv[-len(["--resume", "--device", "cpu"]):] == ["--resume", "--device", "cpu"]
    runner.force_stop("multi", grace=0)

    runner.resume("multi", gpus=1)                      # given: it wins, and is recorded
    argv, gpus, device = launched_argv(run)
    assert gpus == 1 and argv[:3] == [sys.executable, "-m", "engine.train"]
    runner.force_stop("multi", grace=0)
    runner.resume("multi")                              # the latest launch counts
    assert launched_argv(run)[1] == 1
    runner.force_stop("multi", grace=0)

    with pytest.raises(DeviceError):
        runner.resume("multi", device="nonsense")
    with pytest.raises(RunnerError, match="at least 1"):
        runner.resume("multi", gpus=0)


@pytest.mark.skipif(not POSIX, reason="uses POSIX process groups")
def test_resume_asks_the_trainer_rule_whether_steps_are_left(runner, dataset, stand_in_trainer):
    """engine.train.resume_point decides: the target is what was asked, else the larger
    of the target the run was started with and train.max_steps (engine.job.resume_target)."""
    cfg = fast_config(dataset, "train.max_steps=10")
    # started with --max-steps 20 and stopped at 12: it continues to 20, past max_steps
    run = saved_run(runner, "longer", cfg, 12, 20)
    runner.resume("longer")
    argv, _, _ = launched_argv(run)
    assert "--resume" in argv and "--max-steps" not in argv
    runner.force_stop("longer", grace=0)
    with pytest.raises(RunnerError, match="already at step 12"):
        runner.resume("longer", max_steps=12)
    saved_run(runner, "done", cfg, 10, None)
    # the Train tab offers a later step for a run at its end, by the same rule
    assert runner.info("done").finished and runner.info("done").resume_to == 10
    assert not runner.info("longer").finished and runner.info("longer").resume_to == 20
    with pytest.raises(RunnerError, match="already at step 10.*'Resume until step'"):
        runner.resume("done")
    runner.resume("done", max_steps=11)
    assert not runner.info("done").finished      # alive: nothing to resume
    runner.force_stop("done", grace=0)
    # resumed until step 6 of 10 and completed there: the bar measures the schedule
    short = saved_run(runner, "short", cfg, 6, 6)
    write_status(short, state="completed", step=6, total=6, pid=0, heartbeat=time.time())
    info = runner.info("short")
    assert (info.state, info.total, info.resume_to, info.finished) == ("completed", 10, 10, False)
    assert "step asked for; Resume trains on to step 10" in info.message
    damaged = saved_run(runner, "damaged", cfg, 4, None)
    (damaged.checkpoints / f"{step_name(4)}.state.safetensors").write_bytes(b"not a state")
    with pytest.raises(RunnerError, match="damaged"):
        runner.resume("damaged")


def test_a_run_killed_before_its_first_step_checkpoint_resumes_from_its_time_based_point(
        runner, dataset):
    """train.save_minutes writes a rotating resume point between step checkpoints: a run
    killed after one is resumable from it, as the trainer would resume it."""
    run = RunDir(runner.runs_root / "early")
    run.create()
    run.config.write_text(dump_yaml(fast_config(dataset, "train.max_steps=100")))
    base = run.checkpoints / step_name(42, "latest")
    save_file({"w": torch.zeros(1)}, f"{base}.safetensors")
    save_file({"x": torch.zeros(1)}, f"{base}.state.safetensors",
              metadata={"state": json.dumps({"step": 42, "stop_at": None})})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_status(run, state="running", step=45, total=100, pid=gone.pid,
                 heartbeat=time.time() - 600)
    info = runner.info("early")
    assert (info.state, info.resumable, info.resume_to, info.finished) == (
        "crashed", True, 100, False)
    assert info.message == "resume continues from step 42"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_waiting_for_an_exiting_run_leaves_the_runner_free(runner, dataset, monkeypatch):
    """A run that reported its end but whose process is still there is waited for
    (EXIT_WAIT_SECONDS) without holding the runner's lock: generations and other calls
    go on meanwhile."""
    monkeypatch.setattr(runner_module, "EXIT_WAIT_SECONDS", 3.0)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "engine.train"], start_new_session=True)
    try:
        run = RunDir(runner.runs_root / "exiting")
        run.create()
        write_launch(run, proc.pid, "cuda")
        write_status(run, state="stopped", pid=proc.pid, device="cuda", heartbeat=time.time())
        assert runner.info("exiting").alive
        errors = []

        def start():
            try:
                runner.start(fast_config(dataset), "next", device="cpu")
            except RunnerError as e:
                errors.append(str(e))

        waiter = threading.Thread(target=start)
        waiter.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        with runner.gate.generation() as note:
            assert "cuda" in note
        runner.new_run_id("x")
        assert time.monotonic() - t0 < 1.0 and waiter.is_alive()
        waiter.join(10)
        assert errors and "one run trains at a time" in errors[0]
        assert not (runner.runs_root / "next").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_new_run_ids_are_dated_unique_and_safe(runner):
    a, b = runner.new_run_id("tiny-cpu"), runner.new_run_id("tiny-cpu")
    assert a != b and b == f"{a}-2"
    assert a.endswith("-tiny-cpu") and a[:8].isdigit() and a[8] == "-" and a[9:15].isdigit()
    odd = runner.new_run_id("../My Preset!.yaml")
    assert odd.endswith("-My-Preset") and "/" not in odd
    assert runner.new_run_id("///").endswith("-run")


def test_start_and_resume_check_their_input_before_spawning(runner, dataset, tmp_path):
    cfg = fast_config(dataset)
    with pytest.raises(RunnerError, match="no dataset chosen"):
        runner.start(fast_config(dataset, "data.path="), "a")
    with pytest.raises(RunnerError, match="does not exist"):
        runner.start(fast_config(dataset, f"data.path={tmp_path / 'missing'}"), "a")
    with pytest.raises(RunnerError, match="run name"):
        runner.start(cfg, "../escape")
    with pytest.raises(RunnerError, match="at least 1"):
        runner.start(cfg, "a", gpus=0)
    (runner.runs_root / "taken").mkdir()
    with pytest.raises(RunnerError, match="already exists"):
        runner.start(cfg, "taken")
    with pytest.raises(RunnerError, match="no run 'ghost'"):
        runner.resume("ghost")
    empty = RunDir(runner.runs_root / "empty")
    empty.create()
    empty.config.write_text(dump_yaml(cfg))
    with pytest.raises(RunnerError, match="unknown request"):
        runner.request("empty", "explode")
    with pytest.raises(RunnerError, match="not running"):
        runner.request("empty", "stop")
    assert [r.state for r in runner.runs()] == ["none"]      # "taken" has no run files


def test_damaged_and_partial_run_folders_never_break_the_listing(runner, dataset):
    root = runner.runs_root
    good = dump_yaml(fast_config(dataset))

    def folder(name: str, config: str | None = good, status: str | None = None) -> RunDir:
        run = RunDir(root / name)
        run.create()
        if config is not None:
            run.config.write_text(config)
        if status is not None:
            run.status_file.write_text(status)
        return run

    folder("not-json", status="{half a status")
    folder("a-list", status="[1, 2, 3]")
    folder("bad-types", status=json.dumps({"state": "running", "pid": "abc", "heartbeat": "x"}))
    folder("bad-yaml", config="::: [", status=json.dumps({"state": "completed", "step": 9}))
    folder("no-config", config=None, status=json.dumps({"state": "stopped", "step": 7}))
    folder("died", status=json.dumps({"state": "running", "step": 3, "pid": 2 ** 22 + 12345,
                                      "heartbeat": time.time()}))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    launched = folder("never-reported")
    write_launch(launched, gone.pid, "cpu", argv=["x"], started_at=time.time())
    (root / "stray-file.txt").write_text("not a run")
    (root / ".hidden").mkdir()
    (root / "deleted").mkdir()

    states = {r.run_id: (r.state, r.alive) for r in runner.runs()}
    assert states == {
        "not-json": ("none", False), "a-list": ("none", False), "bad-types": ("none", False),
        "bad-yaml": ("completed", False), "no-config": ("stopped", False),
        "died": ("crashed", False), "never-reported": ("crashed", False)}
    assert "damaged" in runner.info("not-json").message
    assert runner.info("bad-yaml").description == ""
    assert runner.info("no-config").step == 7
    assert runner.info("died").message.startswith("no checkpoint")
    assert "before reporting" in runner.info("never-reported").error
    assert runner.info("not-json").description == fast_config(dataset).description
    assert runner.info("not-json").dataset == Path(dataset).name      # the Runs table's
    assert runner.info("bad-yaml").dataset == ""
    assert runner.active() is None

    (root / "deleted").rmdir()
    for bad in ("deleted", "stray-file.txt", ".hidden", "..", "../ws", "a/b", ""):
        with pytest.raises(RunnerError):
            runner.info(bad)
    assert runner.metrics("deleted") == ([], 0) and runner.log_tail("deleted") == ""
    runner.delete_run("died")
    assert "died" not in {r.run_id for r in runner.runs()}


@pytest.mark.skipif(not POSIX, reason="uses POSIX process groups")
def test_a_run_without_a_checkpoint_can_be_resumed(runner, dataset, stand_in_trainer):
    """A run that died before its first checkpoint is resumed, not refused: the trainer
    starts it again from step 0 with its saved config (engine/train.py)."""
    run = RunDir(runner.runs_root / "early")
    run.create()
    run.config.write_text(dump_yaml(fast_config(dataset)))
    write_status(run, state="running", step=3, pid=0, heartbeat=time.time() - 600)
    runner.resume("early")
    argv, _, _ = launched_argv(run)
    assert "--resume" in argv


def test_resume_is_refused_while_another_process_holds_the_run(runner, dataset):
    """A trainer that stopped reporting (shown as crashed) but still lives holds the run's
    lock: resuming would start a second trainer, so the runner refuses, naming the pid."""
    run = RunDir(runner.runs_root / "held")
    run.create()
    run.config.write_text(dump_yaml(fast_config(dataset)))
    write_status(run, state="running", step=3, pid=0, heartbeat=time.time() - 600)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from engine.job import RunDir, RunLock; "
         "lock = RunLock(RunDir(sys.argv[1])); lock.acquire(); print('held', flush=True); "
         "time.sleep(60)",
         str(run.root)], cwd=runner_module.PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunnerError, match=f"being trained by process {holder.pid}"):
            runner.resume("held")
        info = runner.info("held")   # the studio shows the run as owned by that process
        assert info.owner == holder.pid and info.pid == holder.pid and info.alive
        assert not info.resumable and f"process {holder.pid} holds this run" in info.message
        from studio.tab_train import run_choices
        assert run_choices([info])[0][0].endswith(f"· pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert runner.info("held").owner is None
