"""Sample prompts a person can edit: the file's lines and options, the refusals that name
the line and the option, the labelled grid with its `parameters` chunk, and a run that
picks up an edit made while it trains (and keeps its last good prompts after a bad one)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from PIL import Image
from trainhelp import sets

import engine.train as train
from engine.config import ConfigError, load_preset
from engine.demo_data import write_demo_dataset
from engine.job import RunDir
from engine.pngmeta import parse_parameters
from engine.sample_grid import GRID_PAD, LABEL_MIN_WIDTH, grid_image, grid_scale
from engine.sample_prompts import (
    MAX_PROMPTS,
    PromptDefaults,
    PromptsError,
    RunPrompts,
    caption_prompts,
    format_prompts,
    from_config,
    parse_prompts,
    prompt_defaults,
    run_defaults,
    run_prompts_text,
    save_prompts,
    summary,
)

D = PromptDefaults(negative="blurry", width=64, height=48, seed=10, cfg=4.0, steps=30, patch=16,
                   max_side=128)
BACKGROUND = (24, 24, 24)


def test_every_option_is_read():
    (p,) = parse_prompts("a red apple on a table --n dark, noisy --w 128 --h 32 --d 1234 "
                         "--l 4.5 --s 28", D)
    assert (p.prompt, p.negative, p.width, p.height, p.seed, p.cfg, p.steps) == \
        ("a red apple on a table", "dark, noisy", 128, 32, 1234, 4.5, 28)
    assert p.line == 1 and p.given == ("n", "w", "h", "d", "l", "s")


def test_left_out_options_take_the_defaults_and_the_nth_prompt_seed_plus_n():
    text = ("\ufeff# a comment --x 1\r\n\r\na cat\r\n   \n  # indented comment\n"
            "a dog --s 5 --n\na snow--ball -- fight --l 0\n")
    cats = parse_prompts(text, D)
    assert [c.prompt for c in cats] == ["a cat", "a dog", "a snow--ball -- fight"]
    assert [c.line for c in cats] == [3, 6, 7]
    assert [c.seed for c in cats] == [10, 11, 12]            # counted over prompts, not lines
    assert [(c.width, c.height) for c in cats] == [(64, 48)] * 3
    assert [c.negative for c in cats] == ["blurry", "", "blurry"]   # --n alone: unconditional
    assert [c.steps for c in cats] == [30, 5, 30] and cats[2].cfg == 0.0
    assert cats[0].given == () and cats[1].given == ("s", "n")
    assert summary(cats) == "3 prompts · size 64x48 · seeds 10-12"


@pytest.mark.parametrize("line, expected", [
    ("a cat --x 3", "line 2: unknown option --x (known: --n negative prompt, --w width"),
    ("a cat --W 64", "line 2: unknown option --W"),
    ("a cat --w 100", "line 2: --w 100: allowed: a multiple of the patch size 16 from 16 to 128 "
                      "(nearest: 96 or 112)"),
    ("a cat --h 256", "line 2: --h 256: allowed: a multiple of the patch size 16 from 16 to 128"),
    ("a cat --h 0", "line 2: --h 0: allowed: a multiple of the patch size 16"),
    ("a cat --w 64px", "line 2: --w 64px: not a whole number of pixels"),
    ("a cat --d -1", "line 2: --d -1: allowed: a whole number from 0 to"),
    ("a cat --d 1.5", "line 2: --d 1.5: allowed: a whole number"),
    ("a cat --l nan", "line 2: --l nan: allowed: a number >= 0"),
    ("a cat --l -2", "line 2: --l -2: allowed: a number >= 0"),
    ("a cat --l 4,5", "line 2: --l 4,5: allowed: a number >= 0"),
    ("a cat --s 0", "line 2: --s 0: allowed: a whole number from 1 to 1000"),
    ("a cat --s 1001", "line 2: --s 1001: allowed: a whole number from 1 to 1000"),
    ("a cat --s", "line 2: --s (steps) needs a value, e.g. --s 30"),
    ("a cat --w 64 --d 2 --w 32", "line 2: --w is given twice"),
    ("--w 64 --h 64", "line 2: no prompt text before --w"),
], ids=lambda v: v if len(v) < 30 else None)
def test_a_bad_line_is_refused_naming_its_line_and_option(line, expected):
    with pytest.raises(PromptsError) as err:
        parse_prompts(f"a good line --w 32\n{line}\nanother good line\n", D)
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)


def test_a_text_without_prompts_or_with_too_many_is_refused():
    with pytest.raises(PromptsError, match="no prompts: write one prompt per line"):
        parse_prompts("# only a comment\n\n", D)
    lines = "\n".join(f"prompt {i}" for i in range(MAX_PROMPTS + 1))
    with pytest.raises(PromptsError, match=f"line {MAX_PROMPTS + 1}: more than {MAX_PROMPTS}"):
        parse_prompts(lines, D)


def test_captions_as_prompts_take_held_out_images_first_and_only_plain_lines():
    held_out = ["a  red\ncircle", "# a comment", "a red circle"]
    trained = [f"caption {i}" for i in range(12)] + ["photo --ar 16:9", "a red circle"]
    assert caption_prompts(held_out, trained) == [
        "a red circle", "caption 0", "caption 3", "caption 6"]     # spread over the data
    assert caption_prompts([], ["x --w 64", "#y", " "], 4) == []
    assert caption_prompts(["a", "a", "b"], [], 4) == ["a", "b"]
    assert caption_prompts([], trained, 20) == [*trained[:12], "a red circle"]
    # each reads back from a prompts file as itself
    d = prompt_defaults(load_preset("tiny-cpu"))
    lines = caption_prompts(held_out, trained, 6)
    assert [p.prompt for p in parse_prompts(format_prompts(lines, d), d)] == lines


def test_the_config_prompts_go_through_the_file_unchanged():
    cfg = load_preset("tiny-cpu")
    d = prompt_defaults(cfg, {"32x32": 5, "64x64": 2})
    assert (d.width, d.height, d.patch, d.max_side) == (32, 32, 8, 64)   # the most trained
    text, prompts = from_config(cfg, d)
    assert [p.prompt for p in prompts] == cfg.sample.prompts
    assert [p.seed for p in prompts] == [0, 1, 2, 3] and prompts[0].cfg == cfg.sample.cfg
    assert text == format_prompts(cfg.sample.prompts, d) and text.startswith("# ")
    for bad in ("# not a prompt", "a cat --w 32"):
        cfg.sample.prompts = ["fine", bad]
        with pytest.raises(ConfigError, match="sample.prompts: .* cannot be a line"):
            from_config(cfg, d)


def test_cells_of_different_sizes_are_laid_out_whole_and_labelled():
    sizes = [(16, 16), (48, 32), (32, 64), (16, 48), (64, 16)]
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 0, 250), (0, 250, 250)]
    cells = [np.full((h, w, 3), c, np.uint8) for (w, h), c in zip(sizes, colours)]
    labels = [(f"prompt number {i} with a long tail of words", "seed 7" if i == 2 else "")
              for i in range(5)]
    grid = grid_image(cells, labels, columns=4)
    bare = grid_image(cells, [("", "")] * 5, columns=4)
    assert grid.shape[1] == bare.shape[1] and grid.shape[0] > bare.shape[0]   # caption strips
    # any text is drawn (the bitmap font's alphabet is Latin-1); long details wrap
    wrapped = grid_image(cells, labels[:1] + [("a cat 猫 on a mat…", "32x48, seed 7, cfg 2.5, "
                                               "12 steps")] + labels[2:], columns=4)
    assert wrapped.shape[0] == grid.shape[0] + 2 * (11 + 2)   # one more line in each row
    k = grid_scale(cells)
    assert k == LABEL_MIN_WIDTH // 64 == 2   # small cells are enlarged, all by one factor
    boxes = []
    for (w, h), c in zip(sizes, colours):
        ys, xs = np.nonzero(np.all(grid == c, axis=2))
        assert len(ys) == w * h * k * k and np.ptp(ys) + 1 == h * k and np.ptp(xs) + 1 == w * k
        boxes.append((ys.min(), ys.max(), xs.min(), xs.max()))
    # rows of 4: the second starts below the first one's tallest cell and its labels
    first_bottom, second_top = max(b[1] for b in boxes[:4]), boxes[4][0]
    assert second_top > first_bottom + 2 * 11
    assert grid_scale([np.zeros((8, 300, 3), np.uint8)]) == 1
    bands = [grid[first_bottom + 1:second_top]] * 4 + [grid[boxes[4][1] + 1:]]
    for band, (_, _, x0, x1) in zip(bands, boxes):   # each label lies under its cell
        assert np.any(np.all(band[:, x0:x1 + 1] == (225, 225, 225), axis=2))
    assert np.any(np.all(grid == (150, 150, 150), axis=2))            # a second line
    assert not np.any(np.all(bare == (225, 225, 225), axis=2))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", count=16, seed=3)


def grid_of(run, step):
    return json.loads((run / "samples" / f"step_{step:07d}.json").read_text())


EDIT = "a red square --w 32 --h 40 --d 7\n# a note\n\nblue sky at dusk --n dark --l 2 --s 2\n"


def test_a_run_uses_an_edit_made_while_it_trains_and_keeps_it_after_a_bad_one(
        demo, tmp_path, monkeypatch):
    run = tmp_path / "run"
    edits = iter([EDIT, "a red square\na cat --x 1\n"])
    real_save = train.save_sample_grid

    def save_then_edit(run_dir, step, images, cells, cfg):   # a person edits between grids
        path = real_save(run_dir, step, images, cells, cfg)
        text = next(edits, None)
        if text is not None:
            run_dir.sample_prompts.write_text(text)
        return path

    monkeypatch.setattr(train, "save_sample_grid", save_then_edit)
    assert train.main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "6", *sets("train.sample_every=2", "sample.steps=1",
                                                 "sample.prompts=[a red circle, a blue square]",
                                                 "sample.seed=3")]) == 0
    first, edited, after_bad = grid_of(run, 2), grid_of(run, 4), grid_of(run, 6)
    assert first["prompts"] == ["a red circle", "a blue square"] and first["seeds"] == [3, 4]
    assert edited["prompts"] == ["a red square", "blue sky at dusk"]
    square, sky = edited["cells"]
    assert (square["width"], square["height"], square["seed"]) == (32, 40, 7)
    assert (sky["negative"], sky["cfg"], sky["steps"], sky["seed"], sky["line"]) == \
        ("dark", 2.0, 2, 4, 4)
    assert after_bad["cells"] == edited["cells"]
    log = (run / "log.txt").read_text()
    assert "sample prompts: 2 prompts · sizes 32x40, 48x48 · seeds 7, 4 from " \
           "sample_prompts.txt" in log
    assert log.count("line 2: unknown option --x") == 1 and "keeps the last good prompts" in log

    with Image.open(run / "samples" / "step_0000004.png") as im:
        params = parse_parameters(im.text["parameters"])
        grid = np.asarray(im.convert("RGB"))
        assert json.loads(im.text["pixelhdm-grid"])["cells"] == edited["cells"]
    assert (params["prompt"], params["seed"], params["width"], params["height"]) == \
        ("a red square", 7, 32, 40)
    assert params["other"]["Grid"] == "2 cells" and params["checkpoint_step"] == 4
    tallest = 48 * (LABEL_MIN_WIDTH // 48)         # the default size, enlarged
    assert grid.shape[0] > tallest + 20
    strip = grid[GRID_PAD + tallest:-GRID_PAD]     # under the tallest cell: the labels
    assert strip.shape[0] >= 20 and np.any(np.any(strip != BACKGROUND, axis=2))


def test_a_new_run_takes_a_prompts_file_put_in_its_folder_and_refuses_a_bad_one(demo, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "sample_prompts.txt").write_text("a star --w 40 --h 32\na moon --d 9\n")
    assert train.main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "2", *sets("train.sample_every=2", "sample.steps=1")]) == 0
    cells = grid_of(run, 2)["cells"]
    assert [(c["prompt"], c["width"], c["height"], c["seed"]) for c in cells] == \
        [("a star", 40, 32, 0), ("a moon", 48, 48, 9)]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["sample"]["prompts"] == ["a star", "a moon"]   # the config lists them
    # a resume with a file that no longer parses uses the config's prompts, logged
    (run / "sample_prompts.txt").write_text("a star --w 41\n")
    assert train.main(["--run-dir", str(run), "--resume", "--max-steps", "4"]) == 0
    assert grid_of(run, 4)["prompts"] == ["a star", "a moon"]
    assert "line 1: --w 41: allowed: a multiple of the patch size 8" in \
        (run / "log.txt").read_text()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "sample_prompts.txt").write_text("# mine\na star --l loud\n")
    assert train.main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(bad),
                       "--max-steps", "2", *sets()]) == 2
    assert "line 2: --l loud: allowed: a number >= 0" in RunDir(bad).read_status().error


def test_the_command_line_takes_the_prompts_from_the_dataset_on_request(tmp_path, capsys):
    """--prompts-from-data: a run on a person's own data samples its own captions (held-out
    images' first), as the studio's button does, not the preset's demo prompts."""
    data = tmp_path / "photos"
    data.mkdir()
    for i in range(12):
        Image.new("RGB", (48, 48), (20 * i, 90, 200)).save(data / f"p{i:02d}.png")
        (data / f"p{i:02d}.txt").write_text(f"holiday photo number {i}\nat the lake")
    run = tmp_path / "run"
    assert train.main(["--preset", "tiny-cpu", "--data", str(data), "--run-dir", str(run),
                       "--max-steps", "1", "--prompts-from-data", *sets("data.val_images=2")]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())["sample"]["prompts"]
    assert len(saved) == 4 and all(p.startswith("holiday photo number ") and
                                   p.endswith(" at the lake") for p in saved)
    lines = (run / "sample_prompts.txt").read_text().splitlines()
    assert [ln for ln in lines if ln and not ln.startswith("#")] == saved
    assert train.main(["--run-dir", str(run), "--resume", "--max-steps", "2",
                       "--prompts-from-data"]) == 1
    assert "a resumed run keeps its own" in capsys.readouterr().err


def test_an_editor_saves_only_good_text_and_reads_only_the_run_folder(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    (run.root / "config.yaml").write_text(yaml.safe_dump(
        {"data": {"min_side": 32, "max_side": 48}, "sample": {"seed": 5}}))
    d = run_defaults(run)
    assert (d.width, d.height, d.seed, d.max_side) == (48, 48, 5, 48)
    with pytest.raises(PromptsError, match="does not exist"):
        run_prompts_text(run)
    with pytest.raises(PromptsError, match="line 1: --w 64: allowed"):
        save_prompts(run, "too big --w 64", d)
    assert not run.sample_prompts.exists()
    assert [p.prompt for p in save_prompts(run, "a cat\na dog --w 32", d)] == ["a cat", "a dog"]
    assert run_prompts_text(run) == "a cat\na dog --w 32\n"
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the browser")
    run.sample_prompts.unlink()
    os.symlink(secret, run.sample_prompts)
    with pytest.raises(PromptsError, match="links out of the run folder"):
        run_prompts_text(run)


class FeatureCache:
    """What the trainer's frozen-encoder cache answers: the captions it has no features for."""

    def __init__(self, known):
        self.known = set(known)

    def missing(self, captions):
        return [c for c in dict.fromkeys(captions) if c and c not in self.known]


def test_a_prompt_without_cached_text_features_waits_for_a_resume(tmp_path):
    path = tmp_path / "sample_prompts.txt"
    path.write_text("a cat\n")
    good = parse_prompts("a cat\n", D)
    prompts, log = RunPrompts(path, good, D), []
    cache = FeatureCache(["a cat", "blurry"])
    path.write_text("a cat\na new idea\n")
    assert prompts.read(log.append, cache) == good
    assert "line 2: 'a new idea' has no cached text features" in log[0]
    assert prompts.read(log.append, cache) == good and len(log) == 1      # logged once
    path.write_text("a cat --n blurry\n")
    assert prompts.read(log.append, cache)[0].negative == "blurry"
