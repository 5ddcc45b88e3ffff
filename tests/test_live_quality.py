"""Live quality figures: the trainer records them with every sample grid (metrics.jsonl
and TensorBoard), a failing evaluation never stops training, and the studio plots them
and picks the best checkpoint by one of them."""

from __future__ import annotations

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from trainhelp import records, sets

from engine import evaluate as evaluate_module
from engine.demo_data import write_demo_dataset
from engine.evaluate import LIVE_KEYS, live_figures
from engine.train import main as train_main
from studio import quality, views


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("live") / "demo", count=30, seed=2)


def train(demo, run, *extra):
    torch.manual_seed(0)
    return train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "4", *sets("train.sample_every=2", "data.val_images=6",
                                                 "sample.steps=2", *extra)])


def test_a_short_run_records_quality_at_each_sample_grid(demo, tmp_path):
    run = tmp_path / "run"
    assert train(demo, run) == 0
    lines = records(run, "q_seconds")
    assert [r["step"] for r in lines] == [2, 4]            # step 2 and the final grid
    for r in lines:
        assert set(LIVE_KEYS) <= set(r)                     # the demo: adherence too
        assert all(math.isfinite(r[k]) for k in (*LIVE_KEYS, "q_seconds"))
        assert 0 <= r["q_adherence"] <= 1 and r["q_fid"] >= 0 and r["q_noise_ratio"] > 0
        assert views.record_kind(r) == "quality"
    log = (run / "log.txt").read_text()
    assert "step 2: quality noise_ratio" in log and "step 4: quality" in log
    tb = EventAccumulator(str(run))
    tb.Reload()
    tags = tb.Tags()["scalars"]
    for k in (*LIVE_KEYS, "q_seconds"):
        assert f"quality/{k[2:]}" in tags
        assert [e.step for e in tb.Scalars(f"quality/{k[2:]}")] == [2, 4]
    assert "train/loss" in tags and not any(t.startswith("train/q_") for t in tags)


def test_a_failing_evaluation_logs_a_line_and_training_completes(demo, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no figures\ntoday")
    monkeypatch.setattr(evaluate_module, "evaluate", broken)
    run = tmp_path / "run"
    assert train(demo, run) == 0
    assert records(run, "q_seconds") == []
    log = (run / "log.txt").read_text()
    failed = [line for line in log.splitlines() if "no quality figures" in line]
    assert len(failed) == 2 and "step 2: no quality figures (RuntimeError: no figures today)" \
        in failed[0]
    assert "completed at step 4" in log and (run / "samples" / "step_0000004.png").is_file()
    # the switch turns them off
    off = tmp_path / "off"
    assert train(demo, off, "train.quality=false") == 0
    assert "quality" not in (off / "log.txt").read_text()


def test_live_figures_flatten_an_evaluation_and_leave_out_what_was_not_measured():
    result = {"figures": [
        {"measure": "flat-area noise (levels)", "generated": 6.0, "real": 2.0, "ratio": 3.0},
        {"measure": "seed diversity (levels)", "generated": 4.0, "real": 8.0, "ratio": 0.5},
        {"measure": "Fréchet distance (cheap features)", "generated": 0.25, "real": 0.125,
         "ratio": None}],
        "adherence": [{"attribute": "background", "generated": 100.0},
                      {"attribute": "shape", "generated": 50.0}]}
    assert live_figures(result) == {"q_noise_ratio": 3.0, "q_diversity_ratio": 0.5,
                                    "q_adherence": 0.75, "q_fid": 0.25, "q_fid_real": 0.125}
    result["figures"][0]["ratio"] = None                  # no flat pixels
    result["adherence"] = []                              # not the demo
    result["figures"][2]["real"] = None                   # fewer than 4 real images
    assert live_figures(result) == {"q_diversity_ratio": 0.5, "q_fid": 0.25}


def q(step, **figures):
    return {"step": step, "time": 0.0, **{f"q_{k}": v for k, v in figures.items()},
            "q_seconds": 0.5}


def test_best_checkpoint_by_validation_loss_or_a_quality_figure():
    lines = [q(500, fid=0.9, adherence=0.50, noise_ratio=3.0, diversity_ratio=0.4),
             q(1000, fid=0.4, adherence=0.75, noise_ratio=0.7, diversity_ratio=1.6),
             q(1500, fid=0.6, adherence=0.75, noise_ratio=1.5, diversity_ratio=0.9),
             {"step": 1000, "val_loss": 0.2}]
    figures = quality.figures_by_step(views.fold_records([], lines))
    assert set(figures) == {500, 1000, 1500} and figures[1000]["q_fid"] == 0.4
    steps = [500, 1000, 1500, 1700]                          # 1700: a stop, no figures
    metas = [{"val_loss": 0.30}, {"val_loss": 0.25}, {"val_loss": 0.27}, {}]
    best = {by: quality.best_checkpoint(steps, metas, figures, by) for by in quality.BEST_BY}
    assert best == {"validation loss": 1000, "Fréchet distance": 1000,
                    "prompt adherence": 1000,                 # a tie: the earlier step
                    "flat-area noise (nearest 1x real)": 1000,   # 0.7x beats 1.5x
                    "diversity (nearest 1x real)": 1500}
    assert quality.best_checkpoint([1700], [{}], figures, "Fréchet distance") is None
    # a checkpoint saved between validations (on request, at a stop) records the last
    # loss, of an earlier step: it is not credited with it, and its cell says so
    stale = [{"val_loss": 0.30, "val_step": 500}, {"val_loss": 0.25, "val_step": 1000},
             {"val_loss": 0.20, "val_step": 1500}, {"val_loss": 0.20, "val_step": 1500}]
    assert quality.best_checkpoint(steps, stale, figures, "validation loss") == 1500
    stale[2]["val_step"] = 1400
    assert quality.best_checkpoint(steps, stale, figures, "validation loss") == 1000
    assert views.checkpoint_row(1700, 0.0, 1, stale[3], False, True, False)[4] == \
        "0.2 (at step 1500)"
    assert quality.best_step({1: float("nan"), 2: None}, "low") is None


def test_a_resumed_run_replaces_its_stale_quality_lines_and_the_row_shows_them():
    folded = views.fold_records([], [q(2, fid=0.9), q(4, fid=0.8), q(4, fid=0.5)])
    assert [r["q_fid"] for r in folded] == [0.9, 0.5]
    train, val, _ = views.split_records(folded)
    assert train == [] and val == []                          # quality lines are their own kind
    figures = quality.figures_by_step(folded)
    assert quality.quality_text(figures[4]) == "- · - · - · 0.5"
    text = quality.quality_text({"q_noise_ratio": 1.314, "q_diversity_ratio": 0.62,
                                 "q_adherence": 0.92, "q_fid": 0.4123})
    assert text == "1.31x · 0.62x · 92% · 0.412" and quality.quality_text({}) == ""
    row = quality.checkpoint_row(views.checkpoint_row(4, 0, 2**20, {"val_loss": 0.1}, False,
                                                      True, True), figures[4], True)
    assert len(row) == len(quality.CHECKPOINT_HEADERS)
    assert dict(zip(quality.CHECKPOINT_HEADERS, row))["Validation loss"] == views.fmt_loss(0.1)
    assert row[quality.CHECKPOINT_HEADERS.index("Best")] == "best"
    frame = views.series_frame(folded, quality.QUALITY_SERIES)
    assert list(frame["step"]) == [2, 4] and set(frame["series"]) == {
        "Fréchet distance (cheap features)"}


def test_the_plot_scales_every_figure_so_that_one_is_the_real_images():
    lines = [q(250, noise_ratio=70.0, diversity_ratio=0.05, adherence=0.3, fid=9.0,
               fid_real=1.5),
             q(500, noise_ratio=1.1, diversity_ratio=0.9, adherence=0.97, fid=1.8,
               fid_real=1.5),
             q(750, noise_ratio=1.0),                         # a figure missing is skipped
             {"step": 750, "loss": 0.1, "lr": 1e-3}]          # a training line is not plotted
    frame = views.series_frame(quality.plot_records(views.fold_records([], lines)),
                               quality.PLOT_SERIES)
    got = {(s, n): round(v, 3) for s, n, v in zip(frame["step"], frame["series"],
                                                  frame["value"])}
    assert got == {(250, "flat-area noise"): 4.0, (250, "diversity"): 0.05,       # capped
                   (250, "Fréchet distance"): 4.0, (250, "prompt adherence"): 0.3,
                   (500, "flat-area noise"): 1.1, (500, "diversity"): 0.9,
                   (500, "Fréchet distance"): 1.2, (500, "prompt adherence"): 0.97,
                   (750, "flat-area noise"): 1.0}


def test_no_best_checkpoint_says_why():
    assert "demo dataset only" in quality.no_best_note("prompt adherence")
    assert "train.val_every" in quality.no_best_note("validation loss")
    assert "train.sample_every" in quality.no_best_note("Fréchet distance")
