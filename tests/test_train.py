"""The trainer end to end on the CPU: it learns, resumes exactly (also after SIGKILL),
skips corrupt images, obeys control requests, reports its states, guards against
divergence, and keeps DDP ranks in sync."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainhelp import (
    losses,
    records,
    sets,
    sigkill_when,
    status_step,
    train_cli,
    wait_for,
)

from engine.checkpoint import list_checkpoints, read_meta
from engine.demo_data import write_demo_dataset
from engine.job import RunDir, effective_state
from engine.train import main as train_main


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", count=64, seed=3)


# --------------------------------------------------------------------------------------

def test_loss_falls_on_the_demo_dataset(demo, tmp_path):
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "80", *sets("train.lr=2e-3")]) == 0
    ls = losses(run)
    first = sum(ls[s] for s in range(1, 11)) / 10
    last = sum(ls[s] for s in range(71, 81)) / 10
    assert last < 0.75 * first, (first, last)
    status = RunDir(run).read_status()
    assert status.state == "completed" and status.step == 80
    assert list_checkpoints(run / "checkpoints")[-1].step == 80


def test_a_few_images_are_overfitted(demo, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(demo.glob("*.png"))[:4]:
        shutil.copy(p, few / p.name)
        shutil.copy(p.with_suffix(".txt"), few / p.with_suffix(".txt").name)
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(few), "--run-dir", str(run),
                       "--max-steps", "150", *sets("train.lr=3e-3", "train.batch_size=4",
                                                   "data.caption_dropout=0", "loss.freq_weight=0",
                                                   "train.schedule=constant")]) == 0
    ls = losses(run)
    assert sum(ls[s] for s in range(141, 151)) / 10 < 0.4 * sum(ls[s] for s in range(1, 11)) / 10


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory) -> dict[int, float]:
    """An uninterrupted 24-step run (3 epochs of 8 batches, so resumes cross epochs)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "24", *sets("data.flip=true", "data.crop=random")]) == 0
    return losses(run)


def test_exact_resume_after_stop(demo, tmp_path, reference):
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "11", *sets("data.flip=true", "data.crop=random")]) == 0
    assert train_main(["--run-dir", str(run), "--resume", "--max-steps", "24"]) == 0
    assert losses(run) == reference


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(demo, tmp_path, reference):
    run = tmp_path / "run"
    proc = train_cli("--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                     "--max-steps", "24",
                     *sets("data.flip=true", "data.crop=random", "train.save_every=6"))
    # slow enough to catch it between checkpoints: wait for step 8 (checkpoint at 6)
    sigkill_when(proc, lambda: status_step(run) >= 8, "step 8")
    status = RunDir(run).read_status()
    if status.step < 24:
        assert effective_state(status) == "crashed"
    # how far it got: status.json is written every few seconds, metric lines at every step
    reached = max(status.step, RunDir(run).last_logged_step())
    assert reached >= 8
    assert train_main(["--run-dir", str(run), "--resume", "--max-steps", "24"]) == 0
    assert losses(run) == reference
    if status.step < 24:   # the resume says what happened, in the log and the events
        said = f"the previous trainer (process {status.pid}) ended at step {reached}"
        assert said in (run / "log.txt").read_text()
        assert any(r.get("event") == "crash" for r in records(run, "event"))


def test_a_corrupt_image_is_skipped_and_counted(demo, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo, data)
    png = (data / "shape_0000.png").read_bytes()
    (data / "short.png").write_bytes(png[: len(png) // 3])   # found by the scan: not trained
    (data / "short.txt").write_text("a picture cut short")
    damaged = bytearray(png)   # complete, but its pixel data fails to decode in training
    idat = damaged.index(b"IDAT")
    damaged[idat + 8:idat + 40] = b"\xff" * 32
    (data / "broken.png").write_bytes(bytes(damaged))
    (data / "broken.txt").write_text("a broken picture")
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(data), "--run-dir", str(run),
                       "--max-steps", "20", *sets()]) == 0
    log = (run / "log.txt").read_text()
    assert "data: 1 file(s) not trained (1 truncated): short.png" in log
    # the suggested command runs as it stands: the run's own settings, the folder quoted
    assert (f"`python -m engine.data report {shlex.quote(str(data))} --preset "
            f"{shlex.quote(str(run / 'config.yaml'))}` says why") in log
    assert log.count("skipped unreadable image") == 1 and "broken.png" in log   # named once
    assert records(run, "bad_files")[-1]["bad_files"] >= 1
    assert RunDir(run).read_status().state == "completed"
    # the disk cache of decoded crops: the broken file is named with what to do when the
    # crops are stored, and a later run neither stores nor decodes it again
    assert "image crops: 1 image(s) do not decode" in log and "broken.png" in log
    again = tmp_path / "again"
    assert train_main(["--preset", "tiny-cpu", "--data", str(data), "--run-dir", str(again),
                       "--max-steps", "2", *sets()]) == 0
    log = (again / "log.txt").read_text()
    assert "image crops: decoding" not in log
    found = len(list(data.glob("*.png"))) - 2                   # less short.png and broken.png
    assert f"image crops: {found} of {found + 1} training crops found in" in log


def test_a_resume_on_a_changed_dataset_says_so_in_the_log(demo, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(demo, data)
    assert train_main(["--preset", "tiny-cpu", "--data", str(data), "--run-dir", str(run),
                       "--max-steps", "3", *sets("train.val_every=2", "data.val_images=4")]) == 0
    # the final checkpoint (step 3) says where its validation loss was measured
    meta = read_meta(list_checkpoints(run / "checkpoints")[-1].path)
    assert meta["val_step"] == 2 and math.isfinite(meta["val_loss"])
    shutil.copy(data / "shape_0000.png", data / "added.png")
    (data / "added.txt").write_text("an added picture")
    assert train_main(["--run-dir", str(run), "--resume", "--max-steps", "4"]) == 0
    log = (run / "log.txt").read_text()
    said = log.find("resume: the dataset differs from the one this checkpoint was trained on")
    assert 0 <= said < log.rindex("resumed from"), log[-2000:]
    assert "M trained in all, with the text encoder)" in log   # the builtin one trains


@pytest.mark.slow
def test_control_requests_and_states(demo, tmp_path):
    run = tmp_path / "run"
    rd = RunDir(run)
    proc = train_cli("--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                     "--max-steps", "100000", *sets("train.log_every=5"))
    try:
        wait_for(lambda: (s := rd.read_status()) and s.state == "running" and s.step > 2,
                 what="running")
        assert effective_state(rd.read_status()) == "running"
        rid = rd.request("save-now")
        wait_for(lambda: rd.read_status().handled.get("save-now") == rid, what="save-now handled")
        assert list_checkpoints(run / "checkpoints")
        rd.request("pause")
        assert proc.wait(timeout=60) == 0
        status = rd.read_status()
        assert status.state == "paused" and effective_state(status) == "paused"
        paused_at = status.step
        assert list_checkpoints(run / "checkpoints")[-1].step == paused_at
    finally:
        if proc.poll() is None:
            proc.kill()
    # resume: the old pause request must not pause it again (the runner clears control/,
    # and the trainer remembers what it handled)
    proc = train_cli("--run-dir", str(run), "--resume")
    try:
        wait_for(lambda: rd.read_status().state == "running" and rd.read_status().step > paused_at,
                 what="resumed")
        rd.request("stop")
        assert proc.wait(timeout=60) == 0
        assert rd.read_status().state == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert "stopped" in out


@pytest.mark.slow
def test_sigterm_saves_and_stops(demo, tmp_path):
    run = tmp_path / "run"
    proc = train_cli("--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                     "--max-steps", "100000", *sets("train.log_every=5"))
    try:
        wait_for(lambda: status_step(run) > 2, what="running")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    status = RunDir(run).read_status()
    assert status.state == "stopped"
    assert list_checkpoints(run / "checkpoints")[-1].step == status.step


@pytest.mark.slow
def test_failures_are_one_line_with_a_status(tmp_path, demo):
    run = tmp_path / "run"
    proc = train_cli("--preset", "tiny-cpu", "--data", str(tmp_path / "missing"), "--run-dir",
                     str(run), *sets())
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert out.strip().splitlines()[-1].startswith("error: dataset folder")
    status = RunDir(run).read_status()
    assert status.state == "failed" and "does not exist" in status.error
    # config errors: exit code 2, one line naming the key
    proc = train_cli("--preset", "tiny-cpu", "--data", str(demo), "--run-dir",
                     str(tmp_path / "r2"), "--set", "train.lr=-1")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "train.lr = -1.0" in out
    # a run that failed to start holds no config.yaml: the same command can be retried
    assert not (run / "config.yaml").exists()
    # an existing run is not overwritten; resuming nothing or past the end is explained
    done = tmp_path / "done"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(done),
                       "--max-steps", "2", *sets()]) == 0
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(done)]) == 1
    assert train_main(["--run-dir", str(done), "--resume", "--max-steps", "2"]) == 1
    assert RunDir(done).read_status().state == "completed"      # refusals leave the run alone
    assert train_main(["--run-dir", str(tmp_path / "empty"), "--resume"]) == 1


def test_divergence_guard_skips_rolls_back_and_gives_up(demo, tmp_path):
    run = tmp_path / "run"
    # a threshold below the running average flags every batch after the first 20 steps
    code = train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "40", *sets("train.spike_factor=0.1", "train.max_bad_steps=2",
                                                  "train.save_every=10")])
    assert code == 1
    events = records(run, "event")
    kinds = [r["event"] for r in events]
    assert kinds.count("skipped-batch") == 8 and kinds.count("rollback") == 3
    rollbacks = [r["message"] for r in events if r["event"] == "rollback"]
    assert "step_0000020" in rollbacks[0] and "x0.5" in rollbacks[0] and "x0.125" in rollbacks[2]
    skipped = next(r for r in events if r["event"] == "skipped-batch")
    assert skipped["files"] and skipped["files"][0].endswith(".png")
    status = RunDir(run).read_status()
    assert status.state == "failed" and "keeps diverging" in status.error
    assert "Lower train.lr" in status.error


def test_divergence_guard_learns_a_new_stages_loss_level_afresh(demo, tmp_path):
    """The loss of a new resolution stage has a level of its own (a 32 -> 48 px switch raised
    it about 8x on the demo, and the guard rolled back until the run failed). With a threshold that
    flags every batch once the guard has seen 20 steps, a run that switches at step 20 only
    completes if the switch starts the guard's count again."""
    run = tmp_path / "run"
    code = train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "40", *sets("train.spike_factor=0.1", "train.max_bad_steps=2",
                                                  "data.stages=[24 until 20]", "train.max_steps=40",
                                                  "train.save_every=10")])
    assert code == 0
    assert not [r for r in records(run, "event") if r["event"] == "skipped-batch"]
    assert RunDir(run).read_status().state == "completed"


def test_train_benchmark_reports_throughput_and_samples(tmp_path, capsys):
    from engine.bench import main as bench_main
    code = bench_main(["train", "--steps", "20", "--count", "24", "--out", str(tmp_path / "b"),
                       "--json", *sets("train.sample_every=20")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    row = report["rows"][0]
    assert report["state"] == "completed" and row["steps"] == 20
    assert row["images_s"] > 0 and row["loss_last"] < row["loss_first"]
    assert 0 < row["data_wait"] < 0.5     # decoding 24 small PNGs: a sliver of the time
    assert Path(report["sample_grid"]).is_file()


def test_a_compiled_run_trains_validates_samples_and_says_so(demo, tmp_path, traced_compile):
    """train.compile end to end: training, validation, sample grids and live quality under
    torch's default limit on compiled variants (the limit that once stopped a run is
    tested in test_model); the log names the compiled blocks. Traced only
    (`traced_compile`); code generation is checked in test_model."""
    from engine.distributed import compiler_problem
    if problem := compiler_problem(torch.device("cpu")):
        pytest.skip(f"torch.compile cannot run on this machine: {problem}")
    from engine.train_io import compile_seconds
    compiled_before = compile_seconds()
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "4",
                       *sets("train.compile=true", "train.val_every=2", "data.val_images=4",
                             "train.sample_every=2")]) == 0
    log = (run / "log.txt").read_text()
    assert "blocks compiled (slower while it compiles" in log
    # the trainer counted its compiles, which its ETA leaves out
    assert compile_seconds() > compiled_before
    assert "validation loss" in log and (run / "samples" / "step_0000004.png").is_file()
    assert RunDir(run).read_status().state == "completed"


def test_compile_falls_back_to_eager_with_one_log_line(demo, tmp_path, monkeypatch):
    """Where torch.compile cannot run (no C++ compiler, no Triton), the run trains
    uncompiled and says so once in its log."""
    import engine.train as train_module
    monkeypatch.setattr(train_module, "compiler_problem",
                        lambda device: "CppCompileError: no C++ compiler found")
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "3", *sets("train.compile=true")]) == 0
    log = (run / "log.txt").read_text()
    assert log.count("torch.compile cannot run here (CppCompileError: no C++ compiler") == 1
    assert RunDir(run).read_status().state == "completed"


def test_half_precision_a_cpu_would_emulate_trains_in_fp32_and_says_so(demo, tmp_path,
                                                                        monkeypatch):
    """On a CPU without bf16 arithmetic a bf16 run would be emulated (the pixelhdm-default
    benchmark: over 600 s against 62 s in fp32), so it computes in fp32, says so once, and
    keeps the config as written."""
    import engine.distributed as distributed
    monkeypatch.setattr(distributed, "native_half", lambda precision: False)
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "2", *sets("train.precision=bf16")]) == 0
    log = (run / "log.txt").read_text()
    assert log.count("train.precision = bf16: this CPU has no bf16 arithmetic") == 1
    assert "training in fp32" in log and ", fp32, 1 process(es)" in log
    assert "precision: bf16" in (run / "config.yaml").read_text()
    assert RunDir(run).read_status().state == "completed"


def test_compute_precision_keeps_what_the_device_computes():
    import engine.distributed as distributed
    from engine.distributed import compute_precision
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native, expect in ((True, "bf16"), (None, "bf16"), (False, "fp32")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(distributed, "native_half", lambda precision, n=native: n)
            assert compute_precision("bf16", cpu)[0] == expect
            assert compute_precision("fp32", cpu) == ("fp32", "")
            assert compute_precision("bf16", cuda) == ("bf16", "")
    assert distributed.native_half("bf16") in (True, False, None)


def test_tf32_keeps_the_legacy_precision_flags_readable():
    """Enabling TF32 must leave torch.get_float32_matmul_precision() and the legacy
    allow_tf32 flags readable (Inductor's autotuning and other libraries read them; set
    through the per-backend flags alone they raise), and the CPU's matmuls unchanged.
    In a subprocess: the flags are process-wide."""
    code = ("import torch\n"
            "from engine.distributed import allow_tf32\n"
            "cpu = torch.backends.mkldnn.matmul.fp32_precision\n"
            "allow_tf32()\n"
            "assert torch.backends.cuda.matmul.fp32_precision == 'tf32'\n"
            "assert torch.backends.cudnn.conv.fp32_precision == 'tf32'\n"
            "assert torch.backends.mkldnn.matmul.fp32_precision == cpu\n"
            "assert torch.get_float32_matmul_precision() == 'high'\n"
            "assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_several_gpus_use_nccl_only_where_torch_has_it(monkeypatch):
    """Windows builds of torch have no NCCL: DDP between their GPUs goes through gloo."""
    import engine.distributed as distributed
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(distributed.dist, "is_nccl_available", lambda: True)
    assert distributed.process_group_backend(cuda) == "nccl"
    assert distributed.process_group_backend(cpu) == "gloo"
    monkeypatch.setattr(distributed.dist, "is_nccl_available", lambda: False)
    assert distributed.process_group_backend(cuda) == "gloo"


def test_compiler_probe_names_what_failed(monkeypatch):
    from engine.distributed import compiler_problem

    def broken(*args, **kwargs):
        raise RuntimeError("Compiler: cl is not found.\nmore detail")
    monkeypatch.setattr(torch, "compile", broken)
    assert compiler_problem(torch.device("cpu")) == "RuntimeError: Compiler: cl is not found."


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(demo, tmp_path,
                                                                      reference):
    run = tmp_path / "run"
    proc = train_cli("--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                     "--max-steps", "24", *sets("data.flip=true", "data.crop=random",
                                                "train.save_every=1000"))
    sigkill_when(proc, lambda: status_step(run) >= 3, "step 3")
    assert not list_checkpoints(run / "checkpoints")
    assert train_main(["--run-dir", str(run), "--resume", "--max-steps", "24"]) == 0
    assert "starts again from step 0 with its saved config" in (run / "log.txt").read_text()
    assert losses(run) == reference    # the same run as one never interrupted


@pytest.mark.slow
def test_a_second_trainer_of_a_running_run_is_refused(demo, tmp_path, capsys):
    from engine.job import run_owner
    run = tmp_path / "run"
    proc = train_cli("--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                     "--max-steps", "100000", *sets("train.save_every=5"))
    try:
        wait_for(lambda: status_step(run) >= 6, what="step 6")
        assert run_owner(RunDir(run)) == proc.pid
        before = RunDir(run).read_status()
        assert train_main(["--run-dir", str(run), "--resume"]) == 1
        err = capsys.readouterr().err
        assert f"being trained by process {proc.pid}" in err and "kill" in err
        after = RunDir(run).read_status()
        assert after.pid == proc.pid and after.state == "running" and after.step >= before.step
        assert proc.poll() is None                   # the first one trains on
        os.kill(proc.pid, signal.SIGKILL)            # the OS frees the lock with the process
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert run_owner(RunDir(run)) is None
    step = list_checkpoints(run / "checkpoints")[-1].step
    assert train_main(["--run-dir", str(run), "--resume", "--max-steps", str(step + 2)]) == 0
    assert RunDir(run).read_status().state == "completed"


def test_resume_with_preset_and_data_names_the_flags_to_drop(demo, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "2", *sets()]) == 0
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"drop --preset tiny-cpu and --data {demo}" in err and "add --resume" not in err


@pytest.mark.slow
def test_a_crash_loses_no_more_than_save_minutes_of_work(demo, tmp_path, reference):
    """With step checkpoints far apart, the time-based resume point is what a resume after
    SIGKILL continues from, exactly."""
    run = tmp_path / "run"
    proc = train_cli("--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                     "--max-steps", "24", *sets("data.flip=true", "data.crop=random",
                                                "train.save_every=1000",
                                                "train.save_minutes=0.0005"))
    sigkill_when(proc, lambda: list((run / "checkpoints").glob("latest_*.state.safetensors"))
                 and status_step(run) >= 8, "a resume point and step 8")
    assert not list_checkpoints(run / "checkpoints")          # no step checkpoint yet
    assert train_main(["--run-dir", str(run), "--resume", "--max-steps", "24"]) == 0
    assert "resumed from latest_" in (run / "log.txt").read_text()
    assert losses(run) == reference
    assert not list((run / "checkpoints").glob("latest_*"))   # the final step supersedes it


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                    reason="the resident high-water mark is reset on Linux only")
def test_fp16_overflows_are_not_steps(demo, tmp_path, monkeypatch):
    """In fp16 (GPUs older than Ampere) the gradient scaler starts high and overflows in
    the first steps: those updates are skipped and the scale halved. They must not count as
    steps, move the EMA or log an infinite gradient norm."""
    import engine.train as train_module
    monkeypatch.setattr(train_module, "compute_precision", lambda precision, device: ("fp16", ""))
    scales, calls, Real = [], [], torch.amp.GradScaler

    class Scaler(Real):
        def unscale_(self, optimizer):   # the first two steps overflow, as fp16's would
            calls.append(1)
            if len(calls) <= 2:
                optimizer.param_groups[0]["params"][0].grad.view(-1)[0] = float("inf")
            super().unscale_(optimizer)

        def update(self, new_scale=None):
            super().update(new_scale)
            scales.append(self.get_scale())
    monkeypatch.setattr(torch.amp, "GradScaler", Scaler)
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "6", *sets("train.log_every=1",
                                                 "train.precision=fp16")]) == 0
    lines = RunDir(run).log_file.read_text().splitlines()
    overflows = [m for m in lines if "fp16 gradients overflowed" in m]
    assert overflows and "the scale is halved" in overflows[0], lines
    norms = [r["grad_norm"] for r in records(run, "grad_norm")]
    assert len(norms) == 6 and all(0 < n < 1e6 for n in norms), norms
    # every overflow (the two made here, and any of fp16's own) took a batch, not a step
    assert RunDir(run).read_status().step == 6 and len(calls) == 6 + len(overflows)
    assert scales[-1] == 2.0 ** 16 / 2 ** len(overflows)   # each halved it once, no growth

    # gradients that stay non-finite are not an overflow once the scale is down to 1: the
    # divergence guard takes them, and the run ends instead of halving the scale forever
    class Broken(Real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "init_scale": 4.0})

        def unscale_(self, optimizer):   # every step's gradients hold a NaN
            optimizer.param_groups[0]["params"][0].grad.view(-1)[0] = float("nan")
            super().unscale_(optimizer)
    monkeypatch.setattr(torch.amp, "GradScaler", Broken)
    broken = tmp_path / "broken"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(broken),
                       "--max-steps", "6", *sets("train.precision=fp16",
                                                 "train.max_bad_steps=2")]) == 1
    status = RunDir(broken).read_status()
    assert status.state == "failed" and "keeps diverging" in status.error
    kinds = [r["event"] for r in records(broken, "event")]
    assert "skipped-batch" in kinds and "rollback" in kinds


def test_sample_grids_and_validation_run_without_the_steps_gradients(demo, tmp_path,
                                                                      monkeypatch):
    """The gradients of the last step are freed before the validation and the sample grid
    that follow it: on a small GPU they are memory that sampling needs."""
    import engine.generate as generate
    real, held = generate.render_samples, []

    def render(net, *args, **kwargs):
        held.append(any(p.grad is not None for p in net.parameters()))
        return real(net, *args, **kwargs)
    monkeypatch.setattr(generate, "render_samples", render)
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "4", *sets("train.sample_every=2")]) == 0
    assert held and not any(held), held


def test_a_run_slowed_by_its_images_logs_the_wait_and_what_to_do(demo, tmp_path, monkeypatch):
    from engine.dataset import BucketDataset
    real = BucketDataset.__getitem__

    def slow(self, key):
        time.sleep(0.02)
        return real(self, key)
    monkeypatch.setattr(BucketDataset, "__getitem__", slow)
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "3", *sets()]) == 0
    waits = [r["data_wait"] for r in records(run, "data_wait")]
    assert len(waits) == 3 and min(waits) > 0.3, waits
    log = (run / "log.txt").read_text()
    assert log.count("of the training time went to waiting for images") == 1
    assert "step 2: " in log
    assert "(data.workers = 0); every crop already comes from the crop cache" in log


def test_logged_memory_is_the_trainings_not_the_setups(demo, tmp_path, monkeypatch):
    """The text encoder fills its feature cache and is unloaded before training: what it
    held then is not the run's memory. The logged peak starts when the training does."""
    import engine.train as train_module
    from engine.distributed import peak_rss_mb
    real, seen = train_module.load_text_encoder, {}

    def heavy_setup(*args, **kwargs):
        blob = torch.ones(2 ** 28)   # 1 GiB, touched, then handed back
        seen["peak"] = peak_rss_mb()
        del blob
        return real(*args, **kwargs)
    monkeypatch.setattr(train_module, "load_text_encoder", heavy_setup)
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "3", *sets()]) == 0
    logged = max(r["mem_mb"] for r in records(run, "mem_mb"))
    assert 0 < logged < seen["peak"] - 600, (logged, seen)


def test_a_stop_request_during_setup_stops_at_once(demo, tmp_path, monkeypatch):
    """Setup can take minutes (a large text encoder, the feature cache). A stop request
    made meanwhile ends the run within a second as stopped, without waiting for the loop,
    and without the SIGTERM that the studio has no way to send on Windows."""
    import time

    import engine.train as train_module
    real, done = train_module.load_text_encoder, []
    run = tmp_path / "run"

    def slow_setup(*args, **kwargs):
        RunDir(run).request("stop")
        end = time.monotonic() + 30
        while time.monotonic() < end:   # a Python loop, as the feature cache's batches are
            time.sleep(0.02)
        done.append(True)
        return real(*args, **kwargs)
    monkeypatch.setattr(train_module, "load_text_encoder", slow_setup)
    start = time.monotonic()
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "3", *sets()]) == 0
    assert time.monotonic() - start < 10 and not done
    status = RunDir(run).read_status()
    assert status.state == "stopped" and "stop request" in status.message, status
    assert not (run / "metrics.jsonl").exists() or not records(run, "loss")


def test_irepa_trains_until_repa_until_then_unloads_its_teacher(demo, tmp_path, tiny_dinov3):
    """A run with a DINOv3 teacher aligns its patch tokens to the teacher's until
    loss.repa_until, then trains on without it, its memory given back."""
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "6",
                       *sets(f"loss.repa_teacher={tiny_dinov3}", "loss.repa_layer=1",
                             "loss.repa_until=3")]) == 0
    lines = records(run, "loss")
    assert [r["step"] for r in lines if "loss_repa" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss_repa"]) and r["loss_repa"] > 0 for r in lines[:3])
    log = (run / "log.txt").read_text()
    assert "iREPA on" in log and "step 3: iREPA ends here" in log
    assert RunDir(run).read_status().state == "completed"
