"""The quality figures (engine/evaluate.py) on images whose answer is known, and
`python -m engine.bench quality` on a tiny model trained for a few steps."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trainhelp import sets

from engine.bench import main as bench_main
from engine.demo_data import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    DemoItem,
    items_for_caption,
    make_caption,
    parse_caption,
    probe_captions,
    render,
    sample_item,
    write_demo_dataset,
)
from engine.encoders import DinoTeacher
from engine.evaluate import (
    cheap_features,
    dino_features,
    drawn_spread,
    flat_noise,
    frechet_distance,
    ratio,
    reference_group,
    score_demo,
    seed_spread,
)
from engine.train import main as train_main

DATA = Path(__file__).parent / "data"


def noisy(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).round().astype(np.uint8)


def demo_images(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    items = []
    while len(items) < n:
        item = sample_item(rng)
        if (item.width, item.height) == (96, 96):
            items.append(item)
    return np.stack([np.asarray(render(i)) for i in items]), [i.caption for i in items]


def test_flat_noise_tracks_sigma_and_ignores_edges():
    flat = np.full((3, 32, 32, 3), 128, np.uint8)
    assert flat_noise(flat) == (0.0, 1.0)
    measured = [flat_noise(noisy(flat, s))[0] for s in (2, 4, 8, 16, 32)]
    assert measured == sorted(measured)
    for s, m in zip((2, 4, 8, 16, 32), measured):   # E|x - median| of Gaussian grain
        assert 0.55 * s < m < 0.85 * s
    shapes, _ = demo_images(6)
    clean, share = flat_noise(shapes)
    assert clean < 0.2 and 0.8 < share < 1.0    # anti-aliased edges are not counted as grain
    assert flat_noise(noisy(shapes, 8))[0] == pytest.approx(flat_noise(noisy(flat, 8))[0],
                                                            rel=0.15)


def test_seed_spread_is_zero_for_identical_images_and_exact_otherwise():
    a = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    assert seed_spread(np.stack([a, a, a])) == 0.0
    two = np.stack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 10, np.uint8)])
    assert seed_spread(two) == pytest.approx(np.sqrt(50))         # std (n - 1) of {0, 10}
    assert ratio(4.0, 8.0) == 0.5 and ratio(0.5, 0.0) == 0.5      # at least one level


def test_reference_group_same_caption_then_most_similar_words():
    pool = [("a.png", "a red circle on a white background"),
            ("b.png", "A red circle on a white background."),
            ("c.png", "a large red circle at the top left on a white background"),
            ("d.png", "a red square on a white background"),
            ("e.png", "a small red circle in the center on a white background")]
    assert reference_group("a red circle on a white background", pool, 4) == (
        ["a.png", "b.png"], "same caption")
    # without a second copy: the captions holding every word of the prompt come first
    paths, kind = reference_group("a red circle on a white background", pool[2:], 2)
    assert kind == "similar captions" and sorted(paths) == ["c.png", "e.png"]


def test_a_demo_caption_is_drawn_as_the_dataset_draws_it():
    rng = np.random.default_rng(0)
    items = items_for_caption("A red circle on a  white background", 48, 32, 200, rng)
    assert {(i.shape, i.colour, i.background, i.width, i.height) for i in items} == {
        ("circle", "red", "white", 48, 32)}
    assert {i.position for i in items} == set(POSITIONS) and {i.size for i in items} == set(SIZES)
    fixed = items_for_caption("a large red circle at the top left on a white background",
                              64, 64, 50, rng)
    assert {(i.size, i.position) for i in fixed} == {("large", "top left")}
    assert all(abs(i.center[0] / 64 - 0.27) <= 0.03 and 0.9 * 0.22 * 64 <= i.radius
               <= 1.1 * 0.22 * 64 for i in fixed)                   # the dataset's jitter
    for i in fixed[:5]:
        assert all(score_demo(np.asarray(render(i)), i.caption).values())
    with pytest.raises(ValueError, match="not a demo caption"):
        items_for_caption("a photo of a cat", 64, 64, 2, rng)


def test_a_captions_true_spread_grows_with_what_it_leaves_open():
    open_, kind = drawn_spread("a red circle on a white background", 6, 64, 64)
    placed, _ = drawn_spread("a red circle at the top left on a white background", 6, 64, 64)
    fixed, _ = drawn_spread("a large red circle at the top left on a white background", 6, 64,
                            64)
    assert kind == "demo drawings (8 x 6)"
    assert open_ > 3 * placed > 3 * fixed > 0       # five places, then two sizes, then jitter
    assert drawn_spread("A red circle on a white background.", 6, 64, 64)[0] == open_


def test_a_drawn_demo_image_scores_every_attribute_it_names():
    images, captions = demo_images(12, seed=3)
    for image, caption in zip(images, captions):
        scores = score_demo(image, caption)
        assert all(scores.values()) and {"background", "colour", "shape"} <= set(scores)
        assert ("size" in scores) == (parse_caption(caption)["size"] is not None)
    assert score_demo(images[0], "a photo of a cat") == {}


def test_a_wrong_attribute_scores_zero_for_that_attribute_only():
    item = DemoItem(64, 64, "star", "red", "large", "top right", "white", (47.0, 17.0), 14.0,
                    "")
    image = np.asarray(render(item))
    right = score_demo(image, make_caption("star", "red", "large", "top right", "white"))
    assert right == {"background": True, "colour": True, "shape": True, "size": True,
                     "position": True}
    for wrong, attribute in (
            (make_caption("star", "red", "small", "top right", "white"), "size"),
            (make_caption("star", "green", None, "top right", "white"), "colour"),
            (make_caption("star", "red", None, "top right", "black"), "background"),
            (make_caption("cross", "red", None, "top right", "white"), "shape"),
            (make_caption("star", "red", None, "bottom left", "white"), "position")):
        scores = score_demo(image, wrong)
        assert not scores[attribute] and sum(scores.values()) == len(scores) - 1, wrong
    blank = np.full((64, 64, 3), 245, np.uint8)       # no shape at all
    assert score_demo(blank, make_caption("star", "red", "small", "center", "white")) == {
        "background": True, "colour": False, "shape": False, "size": False, "position": False}


def test_two_drawings_are_not_a_shape_but_a_speck_or_grain_leaves_it_one():
    """A model unsure where to put an open-position shape may draw two half-shapes; a
    person does not call that "a star". A stray pixel or grain does not change the shape."""
    caption = make_caption("star", "red", "small", None, "white")
    left = DemoItem(32, 32, "star", "red", "small", "top left", "white", (9.0, 9.0), 5.0, "")
    right = replace(left, center=(23.0, 22.0))
    one = np.asarray(render(left))
    two = np.minimum(one, np.asarray(render(right)))        # red on white: the darker wins
    assert score_demo(one, caption)["shape"] and not score_demo(two, caption)["shape"]
    speck = one.copy()
    speck[27, 27] = (220, 40, 40)
    grain = np.clip(one + np.random.default_rng(0).normal(0, 6, one.shape), 0, 255)
    assert score_demo(speck, caption) == score_demo(one, caption) == {
        "background": True, "colour": True, "shape": True, "size": True}
    assert score_demo(grain.astype(np.uint8), caption)["shape"]


def test_a_speck_brighter_than_the_shape_does_not_stand_for_it():
    """A one-pixel white speck beside a green triangle on black stands out of the
    background twice as far as the triangle; the shape's colour, outline, size and place
    must still come from the triangle (seen in generated images: a bright speck at a
    corner)."""
    caption = make_caption("triangle", "green", "large", "top left", "black")
    item = DemoItem(32, 32, "triangle", "green", "large", "top left", "black", (8.6, 8.6),
                    7.0, "")
    image = np.asarray(render(item)).copy()
    assert all(score_demo(image, caption).values())
    # at the tip, at the two lower corners, and apart from the shape
    for speck in ((1, 8), (2, 8), (15, 2), (15, 15), (17, 16), (2, 30), (30, 2)):
        specked = image.copy()
        specked[speck] = (240, 240, 240)
        assert all(score_demo(specked, caption).values()), speck
    two = specked.copy()          # a speck of two pixels is a speck as well
    two[29, 2] = (240, 240, 240)
    assert all(score_demo(two, caption).values())
    # a white blob (3 x 3) is something drawn, and stands for the shape: no green triangle
    blob = image.copy()
    blob[24:27, 24:27] = (240, 240, 240)
    assert not score_demo(blob, caption)["colour"]


def test_the_shape_score_agrees_with_a_persons_eye_on_generated_images():
    """192 drawings of three demo models (tests/data/shapes_by_eye.*), each judged by a
    person: does it show the caption's shape, as one drawing? The score must agree with the
    eye on nearly all of them and give each model about the eye's share, so the adherence
    the Train tab plots is what a person sees in the grids (it agreed on 154 of 172)."""
    doc = json.loads((DATA / "shapes_by_eye.json").read_text(encoding="utf-8"))
    atlas = np.asarray(Image.open(DATA / "shapes_by_eye.png").convert("RGB"))
    tiles = atlas.reshape(-1, 32, 8, 32, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 32, 32, 3)
    judged = [(score_demo(tile, row["caption"])["shape"], row["eye"] == "y", row["model"])
              for tile, row in zip(tiles, doc["images"]) if row["eye"] != "?"]
    assert len(tiles) == len(doc["images"]) == 192 and len(judged) == 172
    assert sum(score == eye for score, eye, _ in judged) >= 150
    share = {}
    for model in dict.fromkeys(m for _, _, m in judged):
        rows = [(score, eye) for score, eye, m in judged if m == model]
        share[model] = (np.mean([s for s, _ in rows]), np.mean([e for _, e in rows]))
        assert abs(share[model][0] - share[model][1]) <= 0.10, (model, share[model])
    early, *finished = sorted(share.values())
    assert all(early[0] + 0.3 < s for s, _ in finished)   # an unfinished model scores far lower


def test_frechet_distance_zero_for_the_same_set_and_grows_with_a_shift():
    images, _ = demo_images(10, seed=1)
    a = cheap_features(images)
    assert a.shape == (10, 136) and np.array_equal(a, cheap_features(images))
    assert frechet_distance(a, a) < 1e-9
    darker = [frechet_distance(a, cheap_features((images * f).astype(np.uint8)))
              for f in (0.9, 0.7, 0.4)]
    assert 0 < darker[0] < darker[1] < darker[2]
    other, _ = demo_images(10, seed=2)
    assert frechet_distance(a, cheap_features(other)) < darker[2]   # same kind of pictures


def test_dino_features_frechet_on_the_tiny_teacher(tiny_dinov3):
    images, _ = demo_images(4, seed=4)
    small = np.stack([np.asarray(Image.fromarray(i).resize((32, 32))) for i in images])
    f = dino_features(small, DinoTeacher(str(tiny_dinov3)), patch=8)
    assert f.shape == (4, 64)
    assert frechet_distance(f, f) < 1e-9
    assert frechet_distance(f, dino_features(noisy(small, 60), DinoTeacher(str(tiny_dinov3)),
                                             8)) > 0


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    demo = write_demo_dataset(root / "demo", count=30, seed=5)
    run = root / "run"
    torch.manual_seed(0)
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "4", *sets("data.val_images=6")]) == 0
    return run, demo


def snapshot(*folders) -> dict:
    return {str(p): p.stat().st_mtime_ns for f in folders for p in sorted(f.rglob("*"))}


def test_quality_command_reports_every_figure_and_writes_nothing(trained, capsys):
    run, demo = trained
    before = snapshot(run, demo)
    args = ["quality", "--checkpoint", str(run), "--n", "2", "--seeds", "3", "--steps", "2",
            "--device", "cpu"]
    assert bench_main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["benchmark"] == "quality" and report["seeds"] == 3
    assert "6 held-out images" in report["real"] and "validation split" in report["real"]
    figures = {f["measure"]: f for f in report["figures"]}
    assert set(figures) == {"flat-area noise (levels)", "seed diversity (levels)",
                            "Fréchet distance (cheap features)"}
    noise = figures["flat-area noise (levels)"]
    assert noise["generated"] > 0 and noise["real"] < 1     # an untrained model is grain
    assert noise["ratio"] == pytest.approx(noise["generated"] / max(noise["real"], 1.0))
    assert figures["Fréchet distance (cheap features)"]["generated"] > 0
    assert [p["prompt"] for p in report["per_prompt"]] == [
        "a red circle on a white background", "a blue square on a yellow background"]
    assert all(p["spread"] > 0 and p["real_spread"] > 0 for p in report["per_prompt"])
    assert {p["reference"] for p in report["per_prompt"]} == {"demo drawings (8 x 3)"}
    attributes = {a["attribute"]: a for a in report["adherence"]}
    assert set(attributes) == {"background", "colour", "shape"}   # the prompts name no position
    assert all(a["scored"] == 6 and 0 <= a["generated"] <= 100 for a in attributes.values())
    assert attributes["background"]["real"] == 100.0
    # each prompt's share per attribute, which the table shows where it is under 100 %
    for row in report["per_prompt"]:
        assert set(row["by_attribute"]) == {"background", "colour", "shape"}
        assert row["adherence"] == pytest.approx(np.mean(list(row["by_attribute"].values())))
    pooled = {name: np.mean([row["by_attribute"][name] for row in report["per_prompt"]])
              for name in attributes}
    assert pooled == pytest.approx({n: a["generated"] for n, a in attributes.items()})
    assert bench_main(args) == 0
    text = capsys.readouterr().out
    assert "flat-area noise (levels)" in text and "prompt adherence" in text
    assert "under 100 %" in text
    for row in report["per_prompt"]:
        line = next(x for x in text.splitlines() if x.startswith(row["prompt"]))
        missed = [name for name, share in row["by_attribute"].items() if share < 100]
        assert all(f"{name} {row['by_attribute'][name]:.1f}%" in line for name in missed)
    assert snapshot(run, demo) == before


def test_quality_command_takes_the_generators_sampling_options(trained, capsys):
    """Sampling settings compare on one checkpoint: the options reach the sampler (a
    different guidance gives different images), the report names them, bad ones exit 2."""
    run, _ = trained
    args = ["quality", "--checkpoint", str(run), "--n", "1", "--seeds", "2", "--steps", "2",
            "--device", "cpu", "--json"]
    assert bench_main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["sampling"] == ("dpmpp_2m_sde (fresh noise for t in [0.1, 0.5]), cfg 5 "
                                 "(coarse 2, blur 1.5 px) for t in [0.1, 0.8]")
    assert bench_main([*args, "--sampler", "euler", "--cfg", "2", "--interval", "0,0.7",
                       "--rescale", "0.5", "--shift", "2"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["sampling"] == ("euler, cfg 2 (coarse 2, blur 1.5 px) for t in [0, 0.7], "
                                 "rescale 0.5, shift 2")
    assert other["per_prompt"][0]["spread"] != plain["per_prompt"][0]["spread"]
    assert bench_main([*args, "--noise-interval", "0,1"]) == 0
    everywhere = json.loads(capsys.readouterr().out)
    assert everywhere["sampling"] == ("dpmpp_2m_sde, cfg 5 (coarse 2, blur 1.5 px) for t in "
                                      "[0.1, 0.8]")
    assert everywhere["per_prompt"][0]["spread"] != plain["per_prompt"][0]["spread"]
    assert bench_main([*args, "--cfg-coarse", "0"]) == 0   # the preset's CFG 5 throughout
    five = json.loads(capsys.readouterr().out)
    assert five["sampling"] == ("dpmpp_2m_sde (fresh noise for t in [0.1, 0.5]), cfg 5 for t "
                                "in [0.1, 0.8]")
    assert five["per_prompt"][0]["spread"] != plain["per_prompt"][0]["spread"]
    assert bench_main([*args, "--cfg-coarse-blur", "3"]) == 0
    blur = json.loads(capsys.readouterr().out)
    assert "(coarse 2, blur 3 px)" in blur["sampling"]
    assert blur["per_prompt"][0]["spread"] != plain["per_prompt"][0]["spread"]
    for bad in (["--interval", "0.8,0.2"], ["--cfg", "-1"], ["--rescale", "2"],
                ["--shift", "-1"], ["--noise-interval", "0.5,0.5"], ["--cfg-coarse", "-1"],
                ["--cfg-coarse-blur", "0"]):
        assert bench_main([*args, *bad]) == 2
        assert "allowed" in capsys.readouterr().err


def test_a_prompt_that_is_no_demo_caption_has_no_adherence_row(trained, tmp_path, capsys):
    run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "sample_prompts.txt").write_text("a red circle on a white background\n"
                                             "a photo of a cat\n")
    args = ["quality", "--checkpoint", str(copy), "--n", "2", "--seeds", "2", "--steps", "1"]
    assert bench_main([*args, "--json"]) == 0
    circle, cat = json.loads(capsys.readouterr().out)["per_prompt"]
    assert set(circle["by_attribute"]) == {"background", "colour", "shape"}
    assert cat["prompt"] == "a photo of a cat"
    assert cat["adherence"] is None and cat["by_attribute"] is None
    assert bench_main(args) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("a photo"))
    assert line.split()[-2:] == ["-", "-"]                 # no adherence, nothing "missed"


def test_quality_on_another_folder_omits_adherence_with_a_note(trained, tmp_path, capsys):
    run, _ = trained
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("a photo of noise")
    assert bench_main(["quality", "--checkpoint", str(run), "--data", str(tmp_path), "--n", "1",
                       "--seeds", "2", "--steps", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adherence"] == [] and "not the demo" in report["notes"][0]
    assert report["per_prompt"][0]["reference"] == "similar captions (2)"
    assert report["per_prompt"][0]["adherence"] is None
    assert report["per_prompt"][0]["by_attribute"] is None
    assert report["real"].startswith(f"4 images of {tmp_path}")
    # the table, as a user reads it, for a folder of their own
    assert bench_main(["quality", "--checkpoint", str(run), "--data", str(tmp_path), "--n", "1",
                       "--seeds", "2", "--steps", "1"]) == 0
    text = capsys.readouterr().out
    assert "seed diversity" in text and "a red circle on a white background" in text
    assert "prompt adherence (demo captions" not in text
    assert bench_main(["quality", "--checkpoint", str(run), "--data",
                       str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_wide_probe_names_every_shape_place_and_size_and_leaves_each_open():
    captions = probe_captions()
    parsed = [parse_caption(c) for c in captions]
    assert len(set(captions)) == 90 and None not in parsed
    combos = {(p["shape"], p["position"], p["size"]) for p in parsed}
    assert combos == {(a, b, c) for a in SHAPES for b in [*POSITIONS, None]
                      for c in [*SIZES, None]}
    assert all(p["colour"] != p["background"] for p in parsed)
    assert {p["colour"] for p in parsed} == set(COLOURS)
    assert {p["background"] for p in parsed} == set(BACKGROUNDS)


def test_quality_command_scores_the_wide_probe_and_the_open_place_apart(trained, tmp_path,
                                                                         capsys):
    run, _ = trained
    args = ["quality", "--checkpoint", str(run), "--seeds", "2", "--steps", "1", "--json"]
    # the first 18 wide captions: circles at the five places, then with the place left open
    assert bench_main([*args, "--prompts", "wide", "--n", "18"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["per_prompt"]
    assert [r["prompt"] for r in rows] == probe_captions()[:18]
    adherence = {a["attribute"]: a for a in report["adherence"]}
    assert adherence["position"]["scored"] == 15 * 2 and adherence["size"]["scored"] == 12 * 2
    open_rows = [r for r in rows if not parse_caption(r["prompt"])["position"]]
    assert len(open_rows) == 3
    shape = adherence["shape, place left open"]
    assert shape["scored"] == 3 * 2 and shape["real"] is None
    assert shape["generated"] == pytest.approx(
        np.mean([r["by_attribute"]["shape"] for r in open_rows]))
    assert adherence["size, place left open"]["scored"] == 2 * 2   # one of the 3 names no size
    # the run's own sample prompts: three of the four leave the place open
    assert bench_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["per_prompt"]) == 4
    assert {a["attribute"]: a["scored"] for a in report["adherence"]}[
        "shape, place left open"] == 3 * 2
    # a folder that is not the demo is refused with what to do
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("a photo of noise")
    assert bench_main([*args, "--prompts", "wide", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--prompts wide" in err and "not the demo" in err and "--data" in err
    for bad in ("0", "-1"):
        assert bench_main([*args, "--prompts", "wide", "--n", bad]) == 2
        assert "--n and --steps" in capsys.readouterr().err
