"""The studio's pure view helpers: number formats, override text, plot frames, the bucket
and health tables, crop-box thumbnails, run-state rules and checkpoint rows; plus the
Studio context's name-to-path checks."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import config
from engine.buckets import make_buckets, plan_buckets
from engine.data import HealthReport, ImageRecord, Problem, TokenStats
from studio import gen_settings, views

# --------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------


def test_number_formats():
    assert views.fmt_count(999) == "999"
    assert views.fmt_count(1234) == "1.2 k"
    assert views.fmt_count(1_800_000) == "1.8 M"
    assert views.fmt_count(3.4e9) == "3.4 B"
    assert views.fmt_count(272.872) == "273"
    assert views.fmt_count(None) == "-"
    assert views.fmt_bytes(512) == "512 B"
    assert views.fmt_bytes(3.4 * 2**30) == "3.4 GiB"
    assert views.fmt_bytes(1536) == "1.5 KiB"
    assert views.fmt_loss(0.123456) == "0.1235"
    assert views.fmt_loss(float("nan")) == "-"


# --------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------


def test_override_lines_skip_blanks_and_comments():
    text = "train.lr=3e-4\n\n  # a note\n model.patch_layers = 2 \n"
    assert views.override_lines(text) == ["train.lr=3e-4", "model.patch_layers = 2"]
    assert views.override_values(text) == {"train.lr": "3e-4", "model.patch_layers": "2"}


def test_set_override_replaces_adds_and_removes():
    text = "train.lr=1e-3\ntrain.max_steps=100\ntrain.lr=2e-3"
    text = views.set_override(text, "train.lr", 0.0005)
    assert text == "train.lr=0.0005\ntrain.max_steps=100"
    text = views.set_override(text, "data.drop_last", True)
    assert text.splitlines()[-1] == "data.drop_last=true"
    text = views.set_override(text, "train.max_steps", None)
    assert "max_steps" not in text
    assert views.set_override("", "train.batch_size", 8.0) == "train.batch_size=8"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_browser_merge_of_dataset_settings_matches_set_override():
    """MERGE_OVERRIDES_JS (run in the page when the Dataset tab's settings arrive) edits
    the text as views.set_override does, keeps lines of other keys as typed, and leaves
    the text untouched when the patch changes nothing."""
    from studio.train_setup import MERGE_OVERRIDES_JS

    cases = [
        ("train.nope=1", [["train.batch_size", "train.batch_size=256"],
                          ["data.max_side", None]]),
        ("data.max_side=32\ntrain.batch_size=4\nx.y=1\ntrain.batch_size=8",
         [["train.batch_size", None], ["data.max_side", "data.max_side=48"]]),
        ("\ntrain.lr=1e-3\n", [["train.batch_size", None]]),
        ("", [["data.drop_last", "data.drop_last=true"]]),
    ]
    script = (f"const merge = {MERGE_OVERRIDES_JS};\n"
              f"const cases = {json.dumps(cases)};\n"
              "console.log(JSON.stringify(cases.map(([t, p]) => merge(p, t))));")
    out = json.loads(subprocess.run(["node", "-e", script], capture_output=True, text=True,
                                    check=True, timeout=60).stdout)
    for (text, patch), merged in zip(cases, out):
        expected = text
        for key, line in patch:
            expected = views.set_override(expected, key,
                                          None if line is None else line.split("=", 1)[1])
        changed = any(ln.split("=", 1)[0].strip() == key for ln in text.splitlines()
                      for key, _ in patch) or any(line for _, line in patch)
        assert merged == (expected if changed else text)
    assert out[0] == "train.nope=1\ntrain.batch_size=256"
    assert out[2] == "\ntrain.lr=1e-3\n"


def test_resolve_config_applies_overrides_and_dataset():
    cfg = views.resolve_config("tiny-cpu", "train.max_steps=60\nmodel.patch_layers=2",
                               "/data/shapes")
    assert cfg.train.max_steps == 60 and cfg.model.patch_layers == 2
    assert cfg.data.path == "/data/shapes"
    base = config.load_preset("tiny-cpu")
    diff = views.config_diff(cfg, base)
    assert any(d.startswith("train.max_steps: 3000 -> 60") for d in diff)
    assert any(d.startswith("data.path") for d in diff)
    assert views.resolve_config("tiny-cpu", "").data.path == ""


@pytest.mark.parametrize("line", ["data.path=/etc", " data.path = /etc ", "data.path='/x'"])
def test_resolve_config_refuses_a_data_path_override(line):
    """The dataset folder comes only from the studio's checked choice."""
    for chosen in ("", "/data/shapes"):
        with pytest.raises(config.ConfigError, match="data.path cannot be set by an override"):
            views.resolve_config("tiny-cpu", line, chosen)


@pytest.mark.parametrize("text, fragment", [
    ("train.nope=1", "unknown key 'train.nope'"),
    ("train.lr=-1", "train.lr"),
    ("model.patch_size=7", "multiple of model.patch_size"),
    ("just words", "not of the form section.key=value"),
])
def test_resolve_config_reports_the_engine_message(text, fragment):
    with pytest.raises(config.ConfigError) as e:
        views.resolve_config("tiny-cpu", text)
    assert fragment in str(e.value)


def test_resolve_config_needs_a_preset():
    with pytest.raises(config.ConfigError, match="preset"):
        views.resolve_config("", "")


# --------------------------------------------------------------------------------------
# Bucket plan, health report, thumbnails
# --------------------------------------------------------------------------------------


def _records(sizes, caption="a shape"):
    return [ImageRecord(f"/nowhere/{i}.png", f"{i:03d}.png", w, h, caption, 100)
            for i, (w, h) in enumerate(sizes)]


def _plan(sizes, batch=4, **data):
    d = config.DataConfig(min_side=32, max_side=64, bucket_step=16, max_aspect=2.0,
                          val_images=0, **data)
    return plan_buckets(_records(sizes), d, patch_size=8, batch_size=batch)


def test_bucket_frame_and_rows_match_the_plan():
    plan = _plan([(64, 64)] * 9 + [(128, 64)] * 2)
    frame = views.bucket_frame(plan)
    assert list(frame["bucket"]) == ["64x32", "64x64"]      # by area
    assert list(frame["images"]) == [2, 9]
    rows = views.bucket_rows(plan)
    assert rows[-1][0] == "total" and rows[-1][2] == 11
    row = next(r for r in rows if r[0] == "64x64")
    assert row[3] == 3 and row[4] == 1          # 9 images at batch 4: 3 batches, last of 1
    text = views.plan_summary(plan, 11)
    assert "**11** training images of 11 found" in text
    assert "Warning:" in text                   # the 64x32 bucket is under-filled


def test_plan_summary_counts_dropped_images():
    plan = _plan([(64, 64)] * 4 + [(16, 16)])
    text = views.plan_summary(plan, 5)
    assert "**1** dropped (1 too small)" in text


def test_plan_summary_counts_the_files_the_scan_skipped(tmp_path):
    """A file cut short never becomes an image record, so the plan cannot count it: the
    summary says it was skipped, and an image without a caption stays a dropped image."""
    from engine.data import scan_dataset
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for name in ("a", "b", "cut"):
        Image.fromarray(noise).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("a shape")
    (tmp_path / "cut.txt").write_text("a shape")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    d = config.DataConfig(min_side=32, max_side=64, bucket_step=16, max_aspect=2.0,
                          val_images=0)
    scan = scan_dataset(tmp_path, d)
    assert views.skipped_files(scan) == 1
    text = views.plan_summary(plan_buckets(scan.records, d, 8, 4), len(scan.records),
                              views.skipped_files(scan))
    assert "of 2 found" in text and "(1 no caption)" in text
    assert "**1** more file(s) skipped" in text
    assert "skipped" not in views.plan_summary(plan_buckets(scan.records, d, 8, 4), 2)


def test_the_resume_field_says_where_a_resume_ends():
    assert views.resume_until_info(300, 8000, False) == ("empty: to its end, step 8,000; or "
                                                         "stop at the step given")
    assert "reached its end at step 8,000: give a later step" in \
        views.resume_until_info(8000, 8000, True)
    # a state file that cannot be read gives no target: no made-up step
    assert views.resume_until_info(300, 0, False) == "empty: to its end; or stop at the step given"


def test_planned_order_worst_crop_first_and_bucket_filter():
    plan = _plan([(64, 64), (100, 64), (64, 64), (64, 128)])
    worst = views.planned_order(plan, "worst crop")
    kept = [im.kept for im in worst]
    assert kept == sorted(kept) and kept[0] < 1.0
    only = views.planned_order(plan, "dataset", "64x64")
    assert {views.bucket_name(im.bucket) for im in only} == {"64x64"}


def test_health_rows_errors_first():
    report = HealthReport("/d", 3, [
        Problem("duplicate", "warning", "same file", {"b.png": "same as a.png"}),
        Problem("unreadable", "error", "cannot be read", {"c.png": "truncated"}),
    ], TokenStats("words", 8, 2, 3, 4.5, 6, 9, 1))
    rows = views.health_rows(report)
    assert rows[0][0] == "error" and rows[0][2] == "c.png"
    assert rows[1][2] == "b.png"
    text = views.health_summary(report)
    assert "1 file(s) will not be trained" in text and "limit 8, 1 over" in text
    assert views.health_summary(HealthReport("/d", 3, [], None)) == "No problems in 3 images."


def test_crop_thumbnail_dims_outside_the_box(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (200, 100), (200, 200, 200)).save(path)
    box = (50.0, 0.0, 150.0, 100.0)   # the centre crop of a square bucket
    thumb = views.crop_thumbnail(path, box, size=160)
    assert thumb.size == (160, 80)
    arr = np.asarray(thumb).astype(int)
    assert (arr[40, 80] == 200).all()              # inside: untouched
    assert arr[40, 10].max() < 120                 # outside: shaded
    assert tuple(arr[40, 40]) == (255, 200, 0)     # the outline at x = 50 * 0.8


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims `width` x `height` (CRC right) over a 1x1 image's data."""
    import struct
    import zlib
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]                                   # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


def test_crop_thumbnails_survive_broken_and_hostile_files(tmp_path):
    from studio import tab_dataset

    good, garbage, truncated = tmp_path / "good.png", tmp_path / "garbage.png", tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (200, 0, 0)).save(good)
    garbage.write_bytes(b"not an image at all")
    Image.new("RGB", (64, 64), (0, 200, 0)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    bomb, big = tmp_path / "bomb.png", tmp_path / "big.png"
    _png_header_only(bomb, 40_000, 40_000)             # PIL refuses to open it
    _png_header_only(big, 15_000, 15_000)              # opens; over engine.data.MAX_PIXELS
    with pytest.raises(Image.DecompressionBombError):
        views.crop_thumbnail(bomb, (0, 0, 1, 1))
    with pytest.raises(ValueError, match="over the limit"):
        views.crop_thumbnail(big, (0, 0, 1, 1))

    plan = _plan([(64, 64)] * 5)
    for im, path in zip(plan.images, (good, garbage, truncated, bomb, big)):
        im.record.path = str(path)
    gallery, page, text = tab_dataset.thumbnails(plan, "dataset", "all", 1)
    assert page == 1 and len(gallery) == 5
    assert "4 on this page cannot be read" in text
    shown = dict((caption.split(" · ")[0], image) for image, caption in gallery)
    assert np.asarray(shown["000.png"])[32, 32, 0] == 200           # the real thumbnail
    assert all("cannot be shown" in caption for _, caption in gallery[1:])
    assert all(image.size == (tab_dataset.THUMB_SIZE,) * 2 for image, _ in gallery[1:])


def test_crop_thumbnail_uses_displayed_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6                               # stored 100x50, displayed 50x100
    Image.new("RGB", (100, 50), (90, 90, 90)).save(path, exif=exif)
    thumb = views.crop_thumbnail(path, (0.0, 25.0, 50.0, 75.0), size=100)
    assert thumb.size == (50, 100)


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------

RECORDS = [
    {"step": 10, "loss": 2.0, "loss_v": 1.5, "lr": 1e-4, "grad_norm": 3.0,
     "loss_t": [1.0, None, 0.5, 0.25]},
    {"step": 20, "val_loss": 1.7},
    {"step": 20, "loss": 1.0, "loss_v": 0.8, "lr": 2e-4, "grad_norm": 2.0, "images_s": 40.0,
     "tokens_s": 2560.0, "step_s": 0.1, "mem_mb": 512.0, "skipped_batches": 1,
     "loss_t": [0.9, None, 0.4, 0.2]},
    {"step": 21, "event": "skipped-batch", "message": "loss 9 > 5 x 1", "time": 0,
     "files": ["a.png", "b.png", "c.png", "d.png"]},
]


def test_split_records():
    train, val, events = views.split_records(RECORDS)
    assert [r["step"] for r in train] == [10, 20]
    assert val == [RECORDS[1]] and events == [RECORDS[3]]


def _lines(steps, key="loss"):
    return [{"step": s, key: float(s)} for s in steps]


def test_fold_records_drops_the_stale_tail_after_a_resume():
    """Killed after step 8 with a checkpoint at 6: the resumed process logs 7, 8, 9...
    again; its lines replace the lost process's 7 and 8 instead of going back."""
    first = _lines(range(1, 9)) + _lines([4, 8], "val_loss")
    event = {"step": 8, "event": "note", "message": "x"}
    folded = views.fold_records([], first + [event])
    folded = views.fold_records(folded, _lines([7, 8]))          # arrives across two polls
    folded = views.fold_records(folded, _lines([9, 10]) + _lines([8], "val_loss"))
    train, val, events = views.split_records(folded)
    assert [r["step"] for r in train] == list(range(1, 11))
    assert [r["step"] for r in val] == [4, 8] and val[-1] is folded[-1]
    assert events == [event]                                       # events are a history
    # in one batch, and a resume at the very first step
    assert [r["step"] for r in views.fold_records([], _lines([1, 2, 3, 2, 3]))] == [1, 2, 3]
    assert [r["step"] for r in views.fold_records(_lines([1, 2]), _lines([1]))] == [1]
    assert views.fold_records(_lines([1, 2]), []) == _lines([1, 2])


def test_smooth_closed_forms():
    assert views.smooth([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    assert views.smooth([5.0] * 4, 0.9) == pytest.approx([5.0] * 4)  # debiased: no ramp
    out = views.smooth([0.0, 1.0], 0.5)
    assert out == pytest.approx([0.0, (0.5 * 0.0 * 0.5 + 0.5) / 0.75])
    assert views.smooth([1.0, None, 3.0], 0.0) == [1.0, None, 3.0]
    with pytest.raises(ValueError):
        views.smooth([1.0], 1.0)


def test_thin_keeps_the_last_point():
    idx = views.thin(1000, 100)
    assert len(idx) <= 101 and idx[0] == 0 and idx[-1] == 999
    assert views.thin(5, 100) == [0, 1, 2, 3, 4]


def test_series_frame_long_format():
    train, _, _ = views.split_records(RECORDS)
    frame = views.series_frame(train, views.LOSS_SERIES)
    assert set(frame["series"]) == {"total", "velocity"}
    total = frame[frame["series"] == "total"]
    assert list(total["step"]) == [10, 20] and list(total["value"]) == [2.0, 1.0]
    empty = views.series_frame(train, {"loss_repa": "iREPA"})
    assert len(empty) == 0 and list(empty.columns) == ["step", "value", "series"]


def test_loss_t_frame_skips_empty_bins():
    frame = views.loss_t_frame(RECORDS[2])
    assert list(frame["t"]) == ["0.0-0.2", "0.5-0.8", "0.8-1.0"]
    assert list(frame["loss"]) == [0.9, 0.4, 0.2]
    assert len(views.loss_t_frame(None)) == 0


def test_event_rows_and_latest_numbers():
    train, val, events = views.split_records(RECORDS)
    rows = views.event_rows(events)
    assert rows[0][0] == 21 and rows[0][2] == "skipped-batch"
    assert rows[0][4] == "a.png, b.png, c.png (+1)"
    line = views.latest_numbers(train, val)
    assert "loss 1" in line and "40.0 img/s" in line and "validation 1.7" in line
    assert "1 skipped batches" in line and "peak memory 512.0 MiB" in line
    assert "memory" not in views.latest_numbers([{**train[-1], "mem_mb": 0.0}], [])   # unknown
    assert views.latest_numbers([], []) == "No metrics yet."
    assert "waiting" not in line                      # none logged (a run of an older version)
    assert "waiting" not in views.latest_numbers([{**train[-1], "data_wait": 0.04}], [])
    assert "0.50 s/step (23% of it waiting for images)" in views.latest_numbers(
        [{**train[-1], "step_s": 0.5, "data_wait": 0.234}], [])


# --------------------------------------------------------------------------------------
# Run state
# --------------------------------------------------------------------------------------


def test_progress_html():
    text = views.progress_html("running", 250, 1000, 723, 0.5, "step 3: <rollback>")
    assert "25.0%" in text and "ETA 12:03" in text and "loss 0.5" in text
    assert "&lt;rollback&gt;" in text and "<rollback>" not in text
    assert 'style="width:25.00%"' in text
    done = views.progress_html("completed", 1000, 1000, 0, 0.1)
    assert "ETA" not in done and "100.0%" in done and "<b>Completed</b>" in done
    # a resume's own target, reached short of the schedule, is not the run's completion
    short = views.progress_html("completed", 500, 1000, None, 0.1)
    assert "<b>Reached the step asked for</b>" in short and "50.0%" in short


def test_a_crashed_run_says_where_a_resume_goes_on_from():
    """Not "from the last good checkpoint" for a run that saved none: it starts again."""
    none = views.died_message("killed by SIGKILL.", "no checkpoint was saved yet: resume "
                              "starts the run again from step 0", True)
    assert none == ("**The training process died:** killed by SIGKILL. Press Resume (no "
                    "checkpoint was saved yet: resume starts the run again from step 0).")
    assert "from step 40" in views.died_message("x", "resume continues from step 40", True)
    assert views.died_message("x", "", False).endswith(
        "No checkpoint with training state was saved.")


@pytest.mark.parametrize("state, resumable, enabled", [
    ("running", False, {"stop", "pause", "save", "sample", "force"}),
    ("starting", False, {"stop", "force"}),
    ("stopping", False, {"force"}),
    ("paused", True, {"resume"}),
    ("crashed", True, {"resume"}),
    ("crashed", False, set()),
    ("completed", True, {"resume"}),
])
def test_control_states(state, resumable, enabled):
    can = views.control_states(state, resumable)
    assert {k for k, v in can.items() if v} == enabled


# --------------------------------------------------------------------------------------
# Checkpoints and generation
# --------------------------------------------------------------------------------------


def test_a_damaged_checkpoint_is_not_called_resumable():
    row = views.checkpoint_row(4, 0, 1, {}, False, True, False, "step_0000004.safetensors "
                               "is damaged (incomplete)")
    assert row[6] == "no: step_0000004.safetensors is damaged (incomplete)"


def test_checkpoint_row():
    row = views.checkpoint_row(1200, 0, 3 * 2**20, {"has_ema": True, "val_loss": 0.123456},
                               pinned=True, resumable=False, has_sample=True)
    assert row == [1200, "-", "3.0 MiB", "yes", "0.1235", "pinned", "weights only", "yes"]


def test_retention_preview_matches_the_rule():
    from engine.checkpoint import retention_victims

    # the next save adds a newer step: the newest keep_last - 1 existing ones stay
    assert views.retention_preview([10, 20, 30, 40], 3, {10}) == [20]
    assert views.retention_preview([40, 10, 30, 20], 1, set()) == [10, 20, 30, 40]
    assert views.retention_preview([10], 5, set()) == []
    assert views.retention_preview([], 2, set()) == []
    # exactly the engine's rule once the next step exists
    for steps, keep_last, keep in (([5, 10, 15, 20, 25], 2, {10}), ([5, 10], 3, set()),
                                   ([5, 10, 15], 1, {15}), ([5, 10, 15], 0, set())):
        assert views.retention_preview(steps, keep_last, keep) == \
            [s for s in retention_victims([*steps, 30], keep_last, keep) if s != 30]


def test_size_choices_are_the_model_buckets():
    cfg = config.load_preset("tiny-cpu")
    d = cfg.data
    expected = make_buckets(d.min_side, d.max_side, d.bucket_step, cfg.model.patch_size,
                            d.max_aspect)
    sizes = views.size_choices(cfg)
    assert [config.parse_wxh(v) for _, v in sizes] == expected
    # the sizes a run trained at come first, most images first, with their count
    sizes = views.size_choices(cfg, {"48x32": 5, "32x32": 640})
    assert sizes[:2] == [("32x32 · trained, 640 images", "32x32"),
                         ("48x32 · trained, 5 images", "48x32")]
    assert sorted(config.parse_wxh(v) for _, v in sizes) == sorted(expected)


def test_parse_seed():
    assert gen_settings.parse_seed("") is None and gen_settings.parse_seed(" -1 ") is None
    assert gen_settings.parse_seed(" 42 ") == 42
    with pytest.raises(ValueError, match="whole number"):
        gen_settings.parse_seed("4.5")
    with pytest.raises(ValueError, match="negative"):
        gen_settings.parse_seed("-3")


def test_recall_values_keep_only_usable_settings():
    good = {"prompt": "a cat", "negative": "", "sampler": "heun", "steps": 30, "cfg": 4.0,
            "rescale": 0.5, "interval": [0.1, 0.9], "ramp": 0.3, "pag": 1.5, "coarse": 2.0,
            "coarse_sigma": 2.5, "noise_interval": [0.1, 0.5], "shift": 2.0, "width": 64,
            "height": 32, "seed": 7, "strength": 0.6}
    assert gen_settings.recall_values(good) == ["a cat", "", "heun", 30, 4.0, 0.5, 0.1, 0.9,
                                                0.3, 1.5, 2.0, 2.5, 0.1, 0.5, 2.0, 64, 32, "7",
                                                0.6]
    # an image made without coarse guidance names no blur: the field is left as it is
    assert gen_settings.recall_values(good | {"coarse_sigma": None})[11] is None
    # an image of ours made before the guidance ramp, PAG or coarse guidance existed had
    # none; another tool's image says nothing about them, and the controls are left as
    # they are
    for key, i in (("ramp", 8), ("pag", 9), ("coarse", 10)):
        without = {k: v for k, v in good.items() if k != key}
        assert gen_settings.recall_values(without | {"engine_version": "0.9"})[i] == 0.0
        assert gen_settings.recall_values(without)[i] is None
    # ... and before the fresh-noise interval: a stochastic sampler drew it at every step;
    # a deterministic sampler's image (None, or nothing) leaves the controls as they are
    old = {k: v for k, v in good.items() if k != "noise_interval"} | {"engine_version": "0.9"}
    assert gen_settings.recall_values(old | {"sampler": "euler_a"})[12:14] == [0.0, 1.0]
    assert gen_settings.recall_values(old)[12:14] == [None, None]
    assert gen_settings.recall_values(good | {"noise_interval": None})[12:14] == [None, None]
    hostile = {"prompt": ["x"], "negative": 5, "sampler": "ancestral", "steps": "many",
               "cfg": float("nan"), "rescale": 7, "interval": 5, "ramp": 2.0, "pag": -1.0,
               "coarse": 16.0, "coarse_sigma": 0.0, "shift": -1, "width": 2.5, "height": True,
               "seed": -4, "strength": {"a": 1}, "noise_interval": [-1, "x"]}
    assert gen_settings.recall_values(hostile) == [None] * 19
    assert gen_settings.recall_values({"interval": "ab", "steps": 1e9}) == [None] * 19
    assert gen_settings.recall_values([]) == [None] * 19


def test_recall_reports_unreadable_images(tmp_path):
    import json

    from PIL.PngImagePlugin import PngInfo

    from studio import tab_generate

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    text, params = tab_generate.recall(str(junk))
    assert text.startswith("**Cannot read the settings") and params == {}
    text, params = tab_generate.recall(str(tmp_path / "gone.png"))
    assert text.startswith("**Cannot read") and params == {}
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    assert tab_generate.recall(str(plain)) == ("This PNG carries no generation settings.", {})
    odd = tmp_path / "odd.png"
    info = PngInfo()
    info.add_text("pixelhdm", json.dumps({"prompt": "<b>x</b>", "interval": 3, "steps": "s"}))
    Image.new("RGB", (4, 4)).save(odd, pnginfo=info)
    text, params = tab_generate.recall(str(odd))
    assert "&lt;b&gt;" in text and gen_settings.recall_values(params)[0] == "<b>x</b>"
    assert gen_settings.recall_values(params)[1:] == [None] * 18


def test_params_markdown():
    text = gen_settings.params_markdown({"prompt": "a red | circle", "seed": 7, "negative": ""})
    assert "| Seed | 7 |" in text and "Negative prompt" not in text
    assert gen_settings.params_markdown({}).startswith("No parameters")


# --------------------------------------------------------------------------------------
# The Studio context: names from the browser never become arbitrary paths
# --------------------------------------------------------------------------------------


def test_studio_names_stay_inside_the_workspace(tmp_path):
    from studio.paths import PathError
    from studio.runner import RunnerError
    from studio.workspace import Studio

    studio = Studio(tmp_path / "ws")
    (studio.datasets_dir / "shapes").mkdir()
    (studio.datasets_dir / ".hidden").mkdir()
    assert studio.dataset_names() == ["shapes"]
    assert studio.dataset_dir("shapes") == (studio.datasets_dir / "shapes").resolve()
    for bad in ("../..", "a/b", ".hidden"):
        with pytest.raises(PathError):
            studio.dataset_dir(bad)
    for cid in ("run/../../etc/1", "model/../x.safetensors", "/etc/passwd", "run/x/abc"):
        with pytest.raises((PathError, RunnerError)):
            studio.checkpoint_path(cid)
    assert studio.checkpoint_choices() == []
    # a run's dataset as "Train from this" chooses it: by name, by folder, or not at all
    (studio.workspace / "mine").mkdir()
    assert studio.own_dataset(str(studio.datasets_dir / "shapes")) == ("shapes", "")
    mine = str((studio.workspace / "mine").resolve())
    assert studio.own_dataset(str(studio.workspace / "mine")) == (None, mine)
    assert studio.own_dataset(str(studio.workspace / "gone")) is None
    assert studio.own_dataset(str(tmp_path)) is None       # outside the workspace


def test_demo_creation_runs_once_at_a_time(tmp_path, monkeypatch):
    """The first-start banner and the Dataset tab's button may be pressed together: the
    second request is told, and the folder is written once."""
    import threading

    from studio import tab_dataset
    from studio.workspace import Studio

    studio = Studio(tmp_path / "ws")
    started, release, writes = threading.Event(), threading.Event(), []

    def slow_write(target):
        writes.append(target)
        started.set()
        release.wait(10)
        target.mkdir()

    monkeypatch.setattr(tab_dataset, "write_demo_dataset", slow_write)
    results = []
    first = threading.Thread(target=lambda: results.append(tab_dataset.create_demo(studio)))
    first.start()
    assert started.wait(10)
    with pytest.raises(tab_dataset.DemoBusy, match="being created"):
        tab_dataset.create_demo(studio)
    release.set()
    first.join(10)
    assert results == [True] and len(writes) == 1
    assert tab_dataset.create_demo(studio) is False           # there now: nothing to write
    assert studio.dataset_names() == [tab_dataset.DEMO_NAME] and len(writes) == 1


def test_an_older_demo_folder_is_kept_and_the_user_told_how_to_get_the_current_one(tmp_path):
    from engine.demo_data import write_demo_dataset
    from studio import tab_dataset
    from studio.workspace import Studio

    studio = Studio(tmp_path / "ws")
    folder = write_demo_dataset(studio.datasets_dir / tab_dataset.DEMO_NAME, count=12, seed=3)
    assert tab_dataset.old_demo_warning(studio) is None
    readme = folder / "README.txt"
    current = readme.read_text()
    assert "radius 0.16 and 0.22 of the shorter side" in current
    # what the version with small shapes of 0.12 wrote: no radii
    readme.write_text(current.replace(" (radius 0.16 and 0.22 of the shorter side)", ""))
    warning = tab_dataset.old_demo_warning(studio)
    assert "older version" in warning and "delete it and press the button again" in warning
    assert tab_dataset.create_demo(studio) is False and readme.read_text() != current
    readme.unlink()
    assert "no readable README.txt" in tab_dataset.old_demo_warning(studio)


def test_dropping_the_loaded_pipeline_hands_its_memory_back(monkeypatch):
    """The Generate tab's pipeline cache returns a dropped model's memory to the system
    (the CPU keeps freed memory for reuse otherwise)."""
    from studio import tab_generate
    calls = []
    monkeypatch.setattr(tab_generate, "release_memory", lambda *a: calls.append(1))
    cache = tab_generate.PipelineCache()
    cache._pipe, cache._loaded = object(), ("a.safetensors", 1, True, None)
    cache.keep_only(Path("b.safetensors"))
    assert cache._pipe is None and calls == [1]


def test_generation_beside_a_gpu_run_is_refused_when_the_card_lacks_room(tmp_path, monkeypatch):
    """Loading a model beside a run training on the same GPU could take the memory the run
    needs next and stop the run. With too little free memory the Generate tab says so and
    loads nothing; with room, or a model already loaded, or no run on a GPU, it goes on."""
    import torch

    from studio import tab_generate
    from tests.test_generate import build, save, tiny_cfg, weights
    cfg = tiny_cfg()
    path = save(tmp_path / "run-a", cfg, weights(*build(cfg)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    free = {"gib": 0.5}
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda device=None: (free["gib"] * 2 ** 30, 12 * 2 ** 30))
    why = tab_generate.gpu_room(path, "cuda:0")
    assert why.startswith("the GPU (cuda:0) has 0.5 of 12.0 GiB free beside the training run")
    assert "pause the run (Train tab) to generate" in why
    assert tab_generate.gpu_room(path, "cpu") == "" and tab_generate.gpu_room(path, None) == ""
    free["gib"] = 8.0
    assert tab_generate.gpu_room(path, "cuda:0") == ""
    cache, freed = tab_generate.PipelineCache(), []
    monkeypatch.setattr(tab_generate, "release_memory", lambda *a: freed.append(1))
    assert not cache.drop_unless(path, True) and not freed      # nothing loaded
    cache._pipe, cache._loaded = object(), cache.key(path, True)
    assert cache.drop_unless(path, True) and cache._pipe is not None
    # another choice drops the loaded model first: its memory counts as free
    assert not cache.drop_unless(path, False) and cache._pipe is None and freed == [1]


def test_a_description_is_shortened_to_its_first_clause_for_a_table():
    long = ("Trains visibly on two CPU cores in minutes: 32-64 px, a 2.2 M-parameter network "
            "with a small builtin text encoder")
    assert views.first_words(long) == "Trains visibly on two CPU cores in minutes"
    assert views.first_words("my run") == "my run"
    cut = views.first_words("x" * 80)
    assert len(cut) == 60 and cut.endswith("…")


def test_messages_keep_the_backslashes_of_windows_paths():
    """Markdown reads a backslash before punctuation as an escape: C:\\Users\\me\\.cache
    would show as C:\\Users\\me.cache. Code spans keep theirs as written."""
    shown = views.md(r"cannot read C:\Users\me\.cache (`C:\x\y`)")
    assert shown == r"cannot read C:\\Users\\me\\.cache (`C:\x\y`)"
    assert views.md(ValueError("plain")) == "plain"
