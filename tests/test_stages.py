"""Progressive resolution (data.stages): the config entries, the plan of a stage, which
stage trains which step, and a trainer that switches stages and still resumes exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from trainhelp import losses, records, sets

from engine.buckets import plan_buckets, stage_data, stage_plans
from engine.config import ConfigError, load_preset
from engine.data import scan_dataset
from engine.demo_data import write_demo_dataset
from engine.stages import resolution_stages, stage_index, steps_left
from engine.train import main as train_main


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", count=64, seed=3)


# --------------------------------------------------------------------------------------
# The config entries
# --------------------------------------------------------------------------------------

def test_entries_read_as_side_and_step_and_close_with_the_full_size():
    cfg = load_preset("tiny-cpu", ["data.stages=[16 until 100, 32px until 4500]"])
    assert resolution_stages(cfg.data.stages, 64, 8) == [(16, 100), (32, 4500), (64, None)]
    assert resolution_stages([], 64, 8) == [(64, None)]


@pytest.mark.parametrize("value, says", [
    ("[32]", "expected a text string"),
    ("[32 px]", "not 'SIDE until STEP'"),
    ("[32 until soon]", "not 'SIDE until STEP'"),
    ("[30 until 100]", "multiples of model.patch_size 8"),
    ("[64 until 100]", "below data.max_side 64"),
    ("[0 until 100]", "from 8"),
    ("[32 until 0]", "must rise"),
    ("[16 until 100, 16 until 200]", "must rise"),
    ("[16 until 100, 32 until 50]", "must rise"),
    ("[32:30]", "expected a text string"),   # YAML 1.1 reads 32:30 as the number 1950
])
def test_a_wrong_entry_names_the_key_and_what_is_allowed(value, says):
    with pytest.raises(ConfigError) as e:
        load_preset("tiny-cpu", [f"data.stages={value}"])
    assert "data.stages" in str(e.value) and says in str(e.value), str(e.value)


@pytest.mark.parametrize("step, stage", [(0, 0), (99, 0), (100, 1), (4499, 1), (4500, 2),
                                         (10**6, 2)])
def test_the_stage_of_a_step_is_the_one_that_trains_the_next_step(step, stage):
    assert stage_index([(16, 100), (32, 4500), (64, None)], step) == stage


# --------------------------------------------------------------------------------------
# The plan of a stage
# --------------------------------------------------------------------------------------

def test_a_stage_trains_the_same_images_at_their_aspect_on_fewer_pixels(demo):
    cfg = load_preset("tiny-cpu", [f"data.path={demo}"])
    full = plan_buckets(scan_dataset(demo, cfg.data).records, cfg.data, 8, 16)
    d = stage_data(cfg.data, 32, 8)
    assert (d.min_side, d.max_side, d.bucket_step) == (16, 32, 8)
    low = stage_plans(full, cfg.data, [(32, 100), (64, None)])[0]
    assert [im.rel for im in low.images] == [im.rel for im in full.images]
    assert [im.rel for im in low.val_images] == [im.rel for im in full.val_images]
    for a, b in zip(full.images, low.images):
        assert max(b.bucket) <= 32 and min(b.bucket) >= 16
        assert abs(math.log(a.bucket[0] / a.bucket[1]) - math.log(b.bucket[0] / b.bucket[1])) \
            < 0.1, (a.rel, a.bucket, b.bucket)
    assert low.batches_per_epoch == full.batches_per_epoch


def test_a_stage_leaves_out_the_images_its_smaller_buckets_would_admit(tmp_path):
    """An image below data.min_side stays out of every stage, so each trains one set."""
    write_demo_dataset(tmp_path / "d", count=12, seed=1)
    cfg = load_preset("tiny-cpu", [f"data.path={tmp_path / 'd'}", "data.min_side=112",
                                   "data.max_side=128", "data.val_images=0"])
    records = scan_dataset(tmp_path / "d", cfg.data).records
    full = plan_buckets(records, cfg.data, 8, 4)
    low, same = stage_plans(full, cfg.data, [(64, 100), (128, None)])
    assert same is full
    assert stage_data(cfg.data, 64, 8).min_side == 56    # would admit the 96 px sides
    short = [r for r in records if min(r.width, r.height) < 112]
    assert short and len(full.dropped) == len(short) and not low.dropped
    assert {im.rel for im in low.images} == {im.rel for im in full.images}


# --------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------

STAGED = ("data.stages=[24 until 6]", "train.save_every=3", "data.flip=true",
          "data.crop=random")


def _tokens_per_image(run: Path) -> dict[int, float]:
    return {r["step"]: round(r["tokens_s"] / r["images_s"], 3) for r in records(run, "tokens_s")}


@pytest.fixture(scope="module")
def staged_reference(demo, tmp_path_factory) -> Path:
    """12 steps, the first 6 up to 24 px and the rest up to 48 px, uninterrupted."""
    run = tmp_path_factory.mktemp("staged") / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "12", *sets(*STAGED)]) == 0
    return run


def test_the_first_stage_trains_small_buckets_and_the_next_the_full_ones(staged_reference):
    per_image = _tokens_per_image(staged_reference)
    assert sorted(per_image) == list(range(1, 13))
    assert all(per_image[s] <= 9 for s in range(1, 7)), per_image     # 24 px, patch 8: 3x3
    assert all(per_image[s] >= 16 for s in range(7, 13)), per_image   # min_side 32: >= 4x4
    log = (staged_reference / "log.txt").read_text()
    assert "progressive resolution (data.stages): up to 24 px for steps 1-6; up to 48 px " \
           "from step 7" in log
    assert "begins at step 6: stage 2 of 2, up to 48 px from step 7" in log


@pytest.mark.parametrize("stop", [4, 6])   # inside the first stage, and at its last step
def test_a_staged_run_resumes_exactly_on_either_side_of_the_switch(demo, tmp_path, stop,
                                                                   staged_reference):
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", str(stop), *sets(*STAGED)]) == 0
    assert train_main(["--run-dir", str(run), "--resume", "--max-steps", "12"]) == 0
    assert losses(run) == losses(staged_reference)


def test_the_dataset_report_says_what_each_stage_trains(demo, capsys):
    from engine.report import main as report_main
    assert report_main(["report", str(demo), "--preset", "tiny-cpu", "--set",
                        "data.stages=[32 until 4500]", "--set", "train.max_steps=6000"]) == 0
    out = capsys.readouterr().out
    assert "Stages    up to 32 px for steps 1-4500: " in out and "(1.00x)" not in out.split(
        "from step 4501")[0]
    assert "          up to 64 px from step 4501: " in out and "(1.00x), buckets" in out
    assert report_main(["report", str(demo), "--preset", "tiny-cpu"]) == 0
    assert "Stages" not in capsys.readouterr().out


@pytest.mark.parametrize("step, stop_at, left", [
    (0, 12, 6 + 6 * 4),     # the later stage's steps cost 4 of the first stage's
    (4, 12, 2 + 6 * 4),
    (6, 12, 6),             # in the last stage: plain steps
    (3, 5, 2),              # stopping inside the first stage
    (10, 12, 2)])
def test_the_eta_counts_a_later_stage_s_steps_at_their_cost(step, stop_at, left):
    assert steps_left([(24, 6), (48, None)], [9.0, 36.0], step, stop_at) == left


@pytest.fixture
def reporter(tmp_path, monkeypatch):
    """(a trainer's JobReporter, its run folder, the clock it reads: [seconds], to move)."""
    from engine import train_io
    from engine.job import RunDir
    run = RunDir(tmp_path / "run")
    clock = [1000.0]
    monkeypatch.setattr(train_io.time, "time", lambda: clock[0])
    rep = train_io.JobReporter(run, main=True, world=1, device="cpu")
    yield rep, run, clock
    rep.close()


def eta_after(rep, run, step: int, stop_at: int) -> float:
    import torch
    rep.metrics(step, 0, 1e-3, {"loss": 1.0, "images_s": 4.0}, stop_at, torch.device("cpu"))
    return run.read_status().eta_s


def test_the_reporter_s_eta_is_the_steps_left_at_the_speed_since_the_stage_began(reporter):
    rep, run, clock = reporter
    rep.speed_span = 50
    rep.start(0, 12, 0, {})
    clock[0] += 30.0
    rep.restart_speed(4)       # a stage began at step 4 ...
    clock[0] += 10.0           # ... 10 s ago, and 5 steps went by since: 0.5 steps/s
    rep.steps_left = lambda step, stop_at: 100.0 if (step, stop_at) == (9, 12) else 0.0
    assert eta_after(rep, run, 9, 12) == pytest.approx(200.0)


def test_the_eta_forgets_slow_first_steps_once_a_speed_window_has_passed(reporter):
    """Slow first steps (a cold disk cache, memory touched for the first time): an ETA at
    the mean speed since the start would stay off for a long while. The speed is taken
    over the last `speed_span` steps (the longest periodic event, so validation and
    sample time stay in it) once that many have run."""
    rep, run, clock = reporter
    rep.speed_span = 20
    rep.start(0, 1000, 0, {})
    etas = {}
    for step in range(10, 101, 10):   # 120 s for the first 10 steps, then 10 in 5 s ...
        clock[0] += 120.0 if step == 10 else 5.0
        if step % 20 == 0:            # ... and validation every 20 steps: 4 s more
            clock[0] += 4.0
        etas[step] = eta_after(rep, run, step, 1000)
    assert etas[20] == pytest.approx(980 * 129 / 20)    # the compile is in the window
    # one window later it has left it: the speed is 20 steps in 14 s, validation included
    for step in (40, 60, 100):
        assert etas[step] == pytest.approx((1000 - step) * 14 / 20), step


def test_the_eta_leaves_out_the_time_spent_compiling(reporter):
    """Compiled blocks take minutes at the first steps, at a new size and at the first
    validation: a ten-minute demo run read ETAs of 10 hours, 2 hours and 40 minutes in
    its first minutes. The time spent compiling is not speed."""
    rep, run, clock = reporter
    compiled = [0.0]
    rep.compile_seconds = lambda: compiled[0]
    rep.speed_span = 20
    rep.start(0, 1000, 0, {})
    etas = {}
    for step in range(10, 101, 10):   # 10 steps in 5 s, with 120 s of compiling at the
        clock[0] += 5.0               # first steps and 30 s at step 50 (a new size)
        if step in (10, 50):
            compiled[0] += 120.0 if step == 10 else 30.0
            clock[0] += 120.0 if step == 10 else 30.0
        if step % 20 == 0:            # validation every 20 steps: 4 s more
            clock[0] += 4.0
        etas[step] = eta_after(rep, run, step, 1000)
    assert etas[10] == pytest.approx(990 * 5 / 10)
    for step in (20, 40, 60, 100):
        assert etas[step] == pytest.approx((1000 - step) * 14 / 20), step


def test_the_eta_leaves_out_a_save_and_grid_asked_for_once(reporter):
    """A grid and a save the studio asks for right after a resume fell in a window of a few
    steps: the ETA read 5 h 20 min where it had read 10 min. Work done once on request is
    not the speed of the steps to come."""
    rep, run, clock = reporter
    rep.speed_span = 50
    rep.start(20, 1000, 0, {})            # resumed at step 20
    clock[0] += 5.0                       # 10 steps in 5 s ...
    rep.one_off(30.0)                     # ... and a 30 s grid and save asked for
    clock[0] += 30.0
    assert eta_after(rep, run, 30, 1000) == pytest.approx(970 * 5 / 10)


def beating(tmp_path, monkeypatch, world: int = 1):
    """A trainer's JobReporter whose heartbeat beats every 20 ms; the compile clock's
    [seconds compiled] and [seconds since the last compile], to set; and a reader of the
    status message after a few beats."""
    import time

    from engine import train_io
    from engine.job import RunDir
    monkeypatch.setattr(train_io, "HEARTBEAT_SECONDS", 0.02)
    run = RunDir(tmp_path / "run")
    rep = train_io.JobReporter(run, main=True, world=world, device="cpu")
    compiled, quiet = [0.0], [math.inf]
    rep.compile_seconds = lambda: compiled[0]
    rep.compile_quiet_for = lambda: quiet[0]

    def message_after_beats() -> str:
        time.sleep(0.2)
        return run.read_status().message
    return rep, run, compiled, quiet, message_after_beats


def test_the_status_says_so_while_the_blocks_compile(tmp_path, monkeypatch):
    """A compiled run stands at its first step for a minute or more: the heartbeat's
    status message says it compiles, and goes once the compile is over; an event's
    message is left alone."""
    rep, run, compiled, quiet, message_after_beats = beating(tmp_path, monkeypatch)
    try:
        rep.start(0, 100, 0, {})
        compiled[0], quiet[0] = 42.4, 0.0             # compiling now
        assert message_after_beats().startswith("compiling the network's blocks, 42 s so far")
        quiet[0] = 3.0                                 # between a forward and a backward
        assert message_after_beats().startswith("compiling the network's blocks, 42 s so far")
        quiet[0] = 30.0                                # training
        assert message_after_beats() == ""
        rep.event(5, "skipped_batch", "skipped batch")
        assert message_after_beats() == "step 5: skipped batch"
        quiet[0] = 0.0                                 # the last sample grid compiles ...
        assert message_after_beats().startswith("compiling")
        rep.finish("completed", 100)                   # ... and the run ends
        assert run.read_status().message == ""
    finally:
        rep.close()


@pytest.mark.parametrize("world", [1, 2])
def test_a_run_that_makes_no_step_for_long_says_so_until_it_moves(tmp_path, monkeypatch, world):
    """A hung GPU, driver, dataset drive or (DDP) rank stops the steps, not the heartbeat:
    after STALL_SECONDS without a step (or STALL_STEPS of its last step's time) the
    status says so, with what to do; a step clears it; a compile is not a stall."""
    from engine import train_io
    rep, run, _, quiet, message_after_beats = beating(tmp_path, monkeypatch, world)
    try:
        rep.start(7, 100, 0, {})
        rep.progress(2.0)
        assert message_after_beats() == ""
        rep.progress_at -= train_io.STALL_SECONDS + 60          # 11 minutes without a step
        text = message_after_beats()
        assert text.startswith("no step for 11 min after step 7: the trainer may be stuck")
        assert "Force stop" in text and "Resume" in text
        assert ("another one" in text) == (world == 2)
        quiet[0] = 0.0                                           # compiling: not stuck
        assert message_after_beats().startswith("compiling")
        quiet[0] = math.inf
        rep.progress(2.0)                                        # a step
        assert message_after_beats() == ""
        rep.progress(60.0)                                       # slow steps: 20 of them
        rep.progress_at -= train_io.STALL_SECONDS + 60
        assert message_after_beats() == ""
        rep.progress_at -= 20 * 60.0
        assert message_after_beats().startswith("no step for 31 min")
    finally:
        rep.close()


def test_the_compile_clock_counts_compiling_and_nothing_else():
    import torch

    from engine.distributed import compiler_problem
    from engine.train_io import compile_quiet_for, compile_seconds, start_compile_clock

    start_compile_clock()
    f = torch.compile(lambda x: torch.sin(x) * 2.0 + 1.0, backend="eager", fullgraph=True)
    x = torch.randn(4)
    before = compile_seconds()
    f(x)
    compiled = compile_seconds()
    assert compiled > before
    for _ in range(3):
        f(x)
    assert compile_seconds() == compiled
    # the probe for a working compiler resets dynamo, which drops every compile callback
    assert compiler_problem(torch.device("cpu")) == ""
    probed = compile_seconds()
    g = torch.compile(lambda x: torch.cos(x) - 1.0, backend="eager", fullgraph=True)
    g(x)
    assert compile_seconds() > probed
    assert 0.0 < compile_quiet_for() < 60.0   # none in progress, one a moment ago


def test_a_run_from_a_staged_checkpoint_trains_at_the_full_size_from_its_first_step(
        demo, tmp_path, staged_reference):
    run = tmp_path / "next"
    assert train_main(["--init-from", str(staged_reference), "--data", str(demo),
                       "--run-dir", str(run), "--max-steps", "2"]) == 0
    assert "stages: []" in (run / "config.yaml").read_text()
    assert all(v >= 16 for v in _tokens_per_image(run).values())


def test_a_low_stage_samples_and_records_the_size_it_trains(demo, tmp_path):
    """Grids, quality figures and checkpoints of the 24 px stage are at 24 px (what the
    model has learned there), those of the full stage at 48 px, except a prompt line's own
    size; the validation loss is measured on the same full-size images throughout."""
    from engine.checkpoint import list_checkpoints, read_meta
    run = tmp_path / "run"
    run.mkdir()   # a prompt line that sets its own size keeps it
    (run / "sample_prompts.txt").write_text("a red circle on a white background\n"
                                            "a blue square --w 40 --h 16\n")
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "8",
                       *sets("data.stages=[24 until 4]", "train.sample_every=2",
                             "train.save_every=2", "train.keep_last=10", "sample.steps=2",
                             "train.val_every=4", "data.val_images=4")]) == 0
    import json
    sizes = {s: {tuple((c["width"], c["height"])) for c in json.loads(
        (run / "samples" / f"step_{s:07d}.json").read_text())["cells"]} for s in (2, 4, 6)}
    assert sizes == {2: {(24, 24), (40, 16)}, 4: {(24, 24), (40, 16)}, 6: {(48, 48), (40, 16)}}
    quality = {r["step"] for r in records(run, "q_seconds")}
    assert {2, 4, 6} <= quality
    trained = {c.step: read_meta(c.path)["trained_sizes"] for c in
               list_checkpoints(run / "checkpoints")}
    assert all(max(map(int, k.split("x"))) <= 24 for k in trained[4]), trained[4]
    assert any(max(map(int, k.split("x"))) == 48 for k in trained[8]), trained[8]
    vals = {r["step"]: r["val_loss"] for r in records(run, "val_loss")}
    assert set(vals) == {4, 8} and all(v > 0 for v in vals.values())
