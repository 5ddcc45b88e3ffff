"""The sizes a run really trains at: recorded in its checkpoints, the default of its sample
grids and of generation, shown by the studio, and a size far from them is warned about."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from trainhelp import sets

from engine.checkpoint import list_checkpoints, read_meta
from engine.config import load_preset, most_trained
from engine.generate import Pipeline
from engine.generate import main as generate_main
from engine.generate_io import describe_sizes, size_note, trained_sizes
from engine.train import main as train_main


def test_the_most_trained_size_wins_and_explicit_sample_sizes_stay():
    assert most_trained({"32x32": 640, "48x32": 120}) == (32, 32)
    assert most_trained({"32x32": 5, "48x32": 5}) == (48, 32)          # ties: the larger
    assert most_trained({}) is None and most_trained(None) is None
    cfg = load_preset("tiny-cpu")
    assert cfg.sample_size() == (64, 64)                              # nothing recorded
    assert cfg.sample_size({"32x32": 640, "48x32": 120}) == (32, 32)
    cfg.sample.width = 48
    assert cfg.sample_size({"32x32": 640}) == (48, 32)                 # set by the user


def test_sizes_far_from_the_trained_ones_are_named():
    trained = {"32x32": 640, "48x32": 120}
    assert size_note(trained, 32, 32) == "" and size_note(trained, 48, 48) == ""
    note = size_note(trained, 128, 128)
    assert note.startswith("128x128 is far from the sizes this model was trained at "
                           "(32x32 (640 images), 48x32 (120))") and "32x32 is the size" in note
    assert size_note(trained, 32, 96)                                  # another aspect
    assert size_note({}, 512, 512) == ""                               # nothing known
    assert describe_sizes({f"{8 * i}x8": i for i in range(1, 7)}) == \
        "48x8 (6 images), 40x8 (5), 32x8 (4), 24x8 (3) and 2 more"
    assert trained_sizes({"trained_sizes": {"32x32": 3, "x": 1, "8x8": True}}) == {"32x32": 3}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A run on 32x32 images with a model whose buckets reach 48 px."""
    data = tmp_path_factory.mktemp("data")
    for i, colour in enumerate([(220, 30, 30), (30, 30, 220), (30, 200, 30), (240, 240, 0)]):
        Image.new("RGB", (32, 32), colour).save(data / f"im{i}.png")
        (data / f"im{i}.txt").write_text(f"a flat colour number {i}")
    run = tmp_path_factory.mktemp("run") / "r"
    assert train_main(["--preset", "tiny-cpu", "--data", str(data), "--run-dir", str(run),
                       "--max-steps", "4", *sets("train.batch_size=4", "train.sample_every=2",
                                                  "sample.steps=2",
                                                  "sample.prompts=[a flat colour]")]) == 0
    return run


def test_a_run_records_its_sizes_and_samples_at_the_most_trained(small_run):
    meta = read_meta(list_checkpoints(small_run / "checkpoints")[-1].path)
    assert meta["trained_sizes"] == {"32x32": 4}
    grid = json.loads((small_run / "samples" / "step_0000002.json").read_text())
    assert grid["size"] == [32, 32]                    # not data.max_side (48)


def test_generation_defaults_to_the_trained_size_and_warns_far_from_it(small_run, tmp_path,
                                                                       capsys):
    pipe = Pipeline.load(small_run, device="cpu")
    image = pipe.generate("a flat colour", seed=1, steps=1)[0].image
    assert image.size == (32, 32)
    assert not pipe.notes("a flat colour")
    assert "is far from the sizes this model was trained at" in \
        pipe.notes("a flat colour", width=48 * 2, height=48 * 2)[0]
    assert generate_main(["--checkpoint", str(small_run), "--prompt", "a flat colour",
                          "--steps", "1", "--width", "96", "--height", "96", "--device",
                          "cpu", "--out", str(tmp_path)]) == 0
    assert "note: 96x96 is far from the sizes this model was trained at (32x32 (4 images))" \
        in capsys.readouterr().err


def test_the_studio_shows_the_trained_sizes(small_run):
    from studio.tab_generate import model_markdown
    path = list_checkpoints(small_run / "checkpoints")[-1].path
    meta = read_meta(path)
    from engine.generate_io import checkpoint_config
    _, cfg, _ = checkpoint_config(path)
    text = model_markdown(meta, cfg)
    assert "trained at 32x32 (4 images)" in text and "default size 32x32" in text
