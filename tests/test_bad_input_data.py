"""The bad-input catalogue, data part: every kind of broken, odd or hostile file and
folder a user may hand the studio, and what each gets from the scan and health report,
from the crop loader during training, and from the trainer. Each answer is one message
that names the file and says what to do; nothing ends in a traceback, and what can still
train (a frame, a converted image) trains with the right pixels."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.buckets import plan_buckets
from engine.config import DataConfig, load_preset
from engine.data import (
    DataError,
    health_report,
    main,
    scan_dataset,
)
from engine.dataset import (
    BucketDataset,
    collate,
    load_crop,
    make_loader,
    validation_batches,
)
from engine.encoders import BuiltinTextEncoder
from engine.images import MAX_PIXELS, ImageTooLarge, to_rgb
from engine.report import token_counter, why_nothing_trains
from engine.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent


def cfg(**kw) -> DataConfig:
    return replace(DataConfig(min_side=32, max_side=64, bucket_step=16, val_images=0,
                              workers=0), **kw)


def noise(size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8))


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def good(path: Path, colour=(200, 30, 30), caption="a red square") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), colour).save(path)
    path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def header_only_png(path: Path, w: int, h: int) -> None:
    """A few hundred bytes whose PNG header declares w x h pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2,
                                                                       0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))


def centre(img: Image.Image, x: int = 32, y: int = 32) -> np.ndarray:
    return np.asarray(img, np.int32)[y, x]


# --------------------------------------------------------------------------------------
# Files that are not (whole) images
# --------------------------------------------------------------------------------------

def half(data: bytes) -> bytes:
    return data[:len(data) // 2]


HEIC_HEAD = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(200)

BROKEN = [  # id, file name, its bytes, problem kind, words of the note
    ("truncated-png", "x.png", lambda: half(encoded(noise(), "PNG")), "truncated", "stops early"),
    ("truncated-jpg", "x.jpg", lambda: half(encoded(noise(), "JPEG")), "truncated",
     "stops early"),
    ("truncated-webp", "x.webp", lambda: half(encoded(noise(), "WEBP")), "truncated",
     "stops early"),
    ("zero-byte-png", "x.png", lambda: b"", "unreadable", "empty file (0 bytes)"),
    ("zero-byte-jpg", "x.jpg", lambda: b"", "unreadable", "empty file (0 bytes)"),
    ("zero-byte-webp", "x.webp", lambda: b"", "unreadable", "empty file (0 bytes)"),
    ("text-named-png", "x.png", lambda: b"just some words\n", "unreadable", "plain text"),
    ("html-named-jpg", "x.jpg", lambda: b"<!DOCTYPE html><html>404</html>", "unreadable",
     "HTML or XML text"),
    ("heic-named-jpg", "x.jpg", lambda: HEIC_HEAD, "unreadable", "convert it to PNG or JPEG"),
    ("garbage-named-webp", "x.webp", lambda: bytes(range(256)) * 4, "unreadable",
     "no image format"),
]
ACTIONS = {"truncated": "copy it again from the original or delete it",
           "unreadable": "replace it with a good copy or delete it"}


@pytest.mark.parametrize("name,make,kind,note", [b[1:] for b in BROKEN],
                         ids=[b[0] for b in BROKEN])
def test_broken_file_is_named_skipped_and_told_what_to_do(tmp_path, name, make, kind, note):
    good(tmp_path / "good.png")
    (tmp_path / name).write_bytes(make())
    (tmp_path / name).with_suffix(".txt").write_text("a caption")
    scan = scan_dataset(tmp_path, cfg())
    assert [r.rel for r in scan.records] == ["good.png"]          # skipped, not trained
    naming = [p for p in scan.problems if name in p.files]
    assert len(naming) == 1                                       # one message per file
    (problem,) = naming
    assert (problem.kind, problem.severity) == (kind, "error")
    assert note in problem.files[name]
    assert "skipped" in problem.message and ACTIONS[kind] in problem.message

    # the same bytes in place of a file that was good when training planned it: the
    # sample comes back with the same words, collate leaves it out, the batch goes on
    (tmp_path / "later.png").write_bytes(encoded(Image.new("RGB", (64, 64)), "PNG"))
    (tmp_path / "later.txt").write_text("later")
    plan = plan_buckets(scan_dataset(tmp_path, cfg()).records, cfg(), 8, 4)
    (tmp_path / "later.png").write_bytes(make())
    ds = BucketDataset(plan.images)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch.paths == [str(tmp_path / "good.png")]
    ((path, why),) = batch.failed
    assert path == str(tmp_path / "later.png")
    assert note in why and ACTIONS[kind] in why and "Traceback" not in why


def test_a_damaged_file_with_a_whole_header_is_found_by_the_deep_check(tmp_path):
    good(tmp_path / "good.png")
    data = bytearray(encoded(noise(), "PNG"))
    data[200:260] = bytes(60)                          # pixel data zeroed, file complete
    (tmp_path / "damaged.png").write_bytes(bytes(data))
    (tmp_path / "damaged.txt").write_text("x")
    scan = scan_dataset(tmp_path, cfg())
    assert {r.rel for r in scan.records} == {"good.png", "damaged.png"}
    deep = {p.kind: p for p in health_report(scan, deep=True).problems}["corrupt"]
    assert list(deep.files) == ["damaged.png"] and "delete it" in deep.message
    with pytest.raises(OSError):
        load_crop(str(tmp_path / "damaged.png"), (64, 64))


# --------------------------------------------------------------------------------------
# Decompression bombs
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("side,pil_check,note", [
    (30000, True, "the header declares 900 M pixels, over the limit of 200 M"),
    (15000, True, "15000x15000 = 225 M pixels, over the limit of 200 M"),
    (30000, False, "30000x30000 = 900 M pixels, over the limit of 200 M"),
], ids=["over-PIL-limit", "over-our-limit-only", "PIL-check-disabled"])
def test_decompression_bomb_is_refused_by_our_own_limit(tmp_path, monkeypatch, side,
                                                        pil_check, note):
    if not pil_check:       # the limit must hold without PIL's own check
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert side * side > MAX_PIXELS
    good(tmp_path / "good.png")
    header_only_png(tmp_path / "bomb.png", side, side)
    (tmp_path / "bomb.txt").write_text("a bomb")
    scan = scan_dataset(tmp_path, cfg())
    assert [r.rel for r in scan.records] == ["good.png"]
    problem = {p.kind: p for p in scan.problems}["too_large"]
    assert problem.files == {"bomb.png": note} and problem.severity == "error"
    assert "decompression bomb" in problem.message and "downscale it" in problem.message
    with pytest.raises(ImageTooLarge, match="over the limit of 200 M"):
        load_crop(str(tmp_path / "bomb.png"), (64, 64))


def test_pixel_limit_is_a_parameter_and_holds_while_training(tmp_path):
    good(tmp_path / "a.png")
    good(tmp_path / "b.png")
    scan = scan_dataset(tmp_path, cfg(), max_pixels=64 * 64 - 1)
    assert set({p.kind: p for p in scan.problems}["too_large"].files) == {"a.png", "b.png"}
    plan = plan_buckets(scan_dataset(tmp_path, cfg()).records, cfg(), 8, 4)
    sample = BucketDataset(plan.images, max_pixels=1000)[0]
    assert sample.image is None and "64x64 = 0.0041 M pixels, over the limit of 0.001 M" in \
        sample.error and "downscale it" in sample.error


# --------------------------------------------------------------------------------------
# Tiny images
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(1, 1), (20, 64)], ids=["1x1", "below-min-side"])
def test_small_images_are_reported_and_dropped(tmp_path, size):
    good(tmp_path / "good.png")
    Image.new("RGB", size, (0, 0, 255)).save(tmp_path / "small.png")
    (tmp_path / "small.txt").write_text("a blue dot")
    scan = scan_dataset(tmp_path, cfg())
    problem = {p.kind: p for p in scan.problems}["too_small"]
    assert problem.files == {"small.png": f"{size[0]}x{size[1]} px"}
    assert "data.min_side 32" in problem.message and "lower data.min_side" in problem.message
    plan = plan_buckets(scan.records, cfg(), 8, 4)
    assert [(d.path, d.reason) for d in plan.dropped] == [("small.png", "too_small")]
    # allowed by a lower min_side, it trains upscaled in its own colour
    low = cfg(min_side=1)
    plan = plan_buckets(scan_dataset(tmp_path, low).records, low, 8, 4)
    ds = BucketDataset(plan.images)
    sample = ds[[im.rel for im in plan.images].index("small.png")]
    assert sample.error == "" and (sample.image[2] == 1.0).all() and (sample.image[0] == -1).all()


def test_panoramas_and_upscaled_images_are_named_with_what_they_lose(tmp_path):
    """An image far wider or taller than any bucket keeps only its middle: named with the
    share it keeps, validation images too; upscaled images are named with their scale."""
    good(tmp_path / "good.png")
    for name, size in (("pano.png", (640, 64)), ("tower.png", (64, 512)), ("dot.png", (2, 2))):
        Image.new("RGB", size, (0, 0, 255)).save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text("a blue picture")
    low = cfg(min_side=1)   # the dot is trained, at the smallest bucket's size
    plan = plan_buckets(scan_dataset(tmp_path, low).records, low, 8, 4)
    cut = next(w for w in plan.warnings if "lose more than 40%" in w)
    assert cut.startswith("2 image(s)") and "pano.png (keeps 20%)" in cut
    assert "tower.png (keeps 25%)" in cut and "raise data.max_aspect" in cut
    assert cut.index("pano.png") < cut.index("tower.png")           # the worst first
    up = next(w for w in plan.warnings if "upscaled" in w)
    assert up.startswith("1 image(s) upscaled") and "dot.png (4.00x)" in up


# --------------------------------------------------------------------------------------
# Colour modes, bit depths, transparency, animation
# --------------------------------------------------------------------------------------

def halves(mode: str, left, right) -> Image.Image:
    img = Image.new(mode, (64, 64), left)
    img.paste(Image.new(mode, (32, 64), right), (32, 0))
    return img


def palette_alpha(path: Path) -> None:
    img = Image.new("P", (64, 64), 0)
    img.paste(1, (32, 0, 64, 64))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.save(path, transparency=1)          # index 1 (blue) is fully transparent


def frames(path: Path, **kw) -> None:
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    red.save(path, save_all=True, append_images=[blue], duration=100, **kw)


MODES = [  # id, file name, writer, (left, right) expected RGB, tolerance, animated
    ("grey-L", "x.png", lambda p: halves("L", 128, 30).save(p),
     ((128, 128, 128), (30, 30, 30)), 0, False),
    ("cmyk-jpeg", "x.jpg", lambda p: halves("CMYK", (0, 128, 255, 0), (0, 0, 0, 128)).save(
        p, quality=95), ((255, 127, 0), (127, 127, 127)), 10, False),
    ("16-bit-png", "x.png", lambda p: Image.fromarray(
        np.where(np.arange(64) < 32, 0x8080, 0xFFFF).astype(np.uint16)[None].repeat(64, 0)
    ).save(p), ((128, 128, 128), (255, 255, 255)), 0, False),
    ("palette-alpha-png", "x.png", palette_alpha, ((255, 0, 0), (255, 255, 255)), 0, False),
    ("LA-png", "x.png", lambda p: halves("LA", (50, 255), (50, 0)).save(p),
     ((50, 50, 50), (255, 255, 255)), 0, False),
    ("RGBA-png", "x.png", lambda p: halves("RGBA", (0, 255, 0, 255), (0, 0, 0, 0)).save(p),
     ((0, 255, 0), (255, 255, 255)), 0, False),
    ("animated-gif", "x.gif", frames, ((255, 0, 0), (255, 0, 0)), 0, True),
    ("animated-webp", "x.webp", lambda p: frames(p, lossless=True),
     ((255, 0, 0), (255, 0, 0)), 0, True),
    ("animated-png", "x.png", frames, ((255, 0, 0), (255, 0, 0)), 0, True),
]


@pytest.mark.parametrize("name,write,expected,tol,animated", [m[1:] for m in MODES],
                         ids=[m[0] for m in MODES])
def test_every_colour_mode_trains_as_the_right_rgb(tmp_path, name, write, expected, tol,
                                                   animated):
    write(tmp_path / name)
    (tmp_path / name).with_suffix(".txt").write_text("an image")
    scan = scan_dataset(tmp_path, cfg(), cache_path=tmp_path / "index.json")
    again = scan_dataset(tmp_path, cfg(), cache_path=tmp_path / "index.json")   # from the cache
    assert (again.records, again.problems) == (scan.records, scan.problems)
    (record,) = scan.records
    assert (record.rel, record.width, record.height) == (name, 64, 64)
    assert not [p for p in scan.problems if p.severity == "error"]
    anim = [p for p in scan.problems if p.kind == "animated"]
    assert bool(anim) == animated
    if animated:
        assert anim[0].files == {name: "animated: the first frame is trained"}
        assert "only its first frame is trained" in anim[0].message
    plan = plan_buckets(scan.records, cfg(), 8, 4)
    sample = BucketDataset(plan.images)[0]
    pixels = ((sample.image.permute(1, 2, 0) + 1) * 127.5).round().to(torch.int32).numpy()
    for x, want in zip((12, 52), expected):     # away from the seam Lanczos blurs
        assert np.abs(pixels[32, x] - np.array(want)).max() <= tol, (x, pixels[32, x], want)


def test_32_bit_grey_mode_is_scaled_not_clipped():
    img = Image.fromarray(np.array([[0, 0x8080, 0xFFFF, 70000]], np.int32))
    assert img.mode == "I"
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 128, 255, 255]
    transparent = Image.fromarray(np.array([[5, 0x8080]], np.uint16))
    transparent.info["transparency"] = 5
    assert np.asarray(to_rgb(transparent))[0, :, 0].tolist() == [255, 128]


# --------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------

CAPTIONS = [  # id, bytes of x.txt (None: no file), caption, problem kind, note, action
    ("latin-1", b"caf\xe9 au lait", None, "caption_unreadable",
     "x.txt is not UTF-8 text (byte 3 is 0xE9)", "save it again as UTF-8"),
    ("empty", b"  \n\t ", None, "empty_caption", "x.txt is empty", "write the caption into it"),
    ("missing", None, None, "missing_caption", "no x.txt", "add a .txt of the same name"),
    ("utf-16-with-bom", "a caf\xe9 cup".encode("utf-16"), "a caf\xe9 cup", "", "", ""),
    ("utf-8-with-bom", "\ufeffa red cup\n".encode(), "a red cup", "", "", ""),
]


@pytest.mark.parametrize("raw,caption,kind,note,action", [c[1:] for c in CAPTIONS],
                         ids=[c[0] for c in CAPTIONS])
def test_caption_files(tmp_path, raw, caption, kind, note, action):
    good(tmp_path / "x.png")
    (tmp_path / "x.txt").unlink()
    if raw is not None:
        (tmp_path / "x.txt").write_bytes(raw)
    scan = scan_dataset(tmp_path, cfg())
    assert scan.records[0].caption == caption
    problems = {p.kind: p for p in scan.problems}
    if not kind:
        assert not problems
        return
    problem = problems[kind]
    assert problem.files == {"x.png": note} and problem.severity == "error"
    assert "skipped (data.missing_caption = skip)" in problem.message and action in problem.message
    assert plan_buckets(scan.records, cfg(), 8, 4).images == []
    lenient = cfg(missing_caption="default", default_caption="a thing")
    scan = scan_dataset(tmp_path, lenient)
    problem = {p.kind: p for p in scan.problems}[kind]
    assert problem.severity == "warning" and "default caption 'a thing'" in problem.message
    assert [im.caption for im in plan_buckets(scan.records, lenient, 8, 4).images] == ["a thing"]


def test_long_caption_is_reported_with_the_length_it_is_cut_to(tmp_path):
    run_cfg = load_preset("tiny-cpu")
    limit = run_cfg.text.max_tokens
    words = " ".join(f"w{i}" for i in range(limit + 36))
    good(tmp_path / "long.png", caption=words)
    good(tmp_path / "short.png", caption="a short one")
    counter, name = token_counter(run_cfg)
    health = health_report(scan_dataset(tmp_path, cfg()), count_tokens=counter,
                           max_tokens=limit, counter_name=name)
    problem = {p.kind: p for p in health.problems}["long_caption"]
    assert problem.files == {"long.png": f"{limit + 36} tokens, will be cut to {limit}"}
    assert "raise text.max_tokens" in problem.message and problem.severity == "warning"
    # the encoder does cut it there
    assert len(BuiltinTextEncoder(run_cfg.text).words(words)) == limit


# --------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [[], ["README.txt", "notes.txt"]],
                         ids=["empty-folder", "captions-but-no-images"])
def test_folder_without_images_is_refused_in_one_line(tmp_path, capsys, content):
    data = tmp_path / "data"
    data.mkdir()
    for name in content:
        (data / name).write_text("text")
    with pytest.raises(DataError, match="no images in .* put the images there"):
        scan_dataset(data, cfg())
    assert main(["report", str(data), "--preset", "tiny-cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(data) in err and ".png" in err
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(data), "--run-dir", str(run),
                       "--max-steps", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no images in") and len(err.strip().splitlines()) == 1
    assert json.loads((run / "status.json").read_text())["state"] == "failed"


def test_single_image_folder_trains(tmp_path, capsys):
    good(tmp_path / "data" / "only.png")
    scan = scan_dataset(tmp_path / "data", cfg())
    plan = plan_buckets(scan.records, cfg(val_images=4), 8, 16)
    assert [im.rel for im in plan.images] == ["only.png"] and plan.val_images == []
    assert plan.batches_per_epoch == 1 and why_nothing_trains(scan, plan) == ""
    assert any("validation set reduced to 0" in w for w in plan.warnings)
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(tmp_path / "data"), "--run-dir",
                       str(run), "--max-steps", "2", "--set", "train.sample_every=0"]) == 0
    assert "completed" in capsys.readouterr().err
    assert json.loads((run / "status.json").read_text())["step"] == 2


def test_symlink_loops_end_and_count_each_file_once(tmp_path):
    outside = tmp_path / "outside"
    good(outside / "not-in-the-dataset.png")
    root = outside / "data"
    good(root / "a.png")
    good(root / "sub" / "b.png")
    try:
        os.symlink("..", root / "up")                      # the dataset's parent
        os.symlink("..", root / "sub" / "loop")            # the dataset itself
        os.symlink("sub", root / "alias")                  # a second name for sub/
    except OSError:
        pytest.skip("this file system has no symlinks")
    scan = scan_dataset(root, cfg())
    assert [r.rel for r in scan.records] == ["a.png", "sub/b.png"]
    loops = {p.kind: p for p in scan.problems}["folder_loop"]
    assert loops.files == {"up/": f"links to {outside}", "sub/loop/": f"links to {root}"}
    assert "not followed" in loops.message and "remove the link" in loops.message
    assert loops.severity == "warning"
    assert [p.kind for p in scan.problems] == ["folder_loop"]


def test_nothing_trains_is_explained(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16)).save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text("tiny")
    (tmp_path / "c.png").write_bytes(b"")
    scan = scan_dataset(tmp_path, cfg())
    why = why_nothing_trains(scan, plan_buckets(scan.records, cfg(), 8, 4))
    assert why.startswith("none of the 3 image file(s)") and "2 too small, 1 unreadable" in why
    good(tmp_path / "d.png")
    scan = scan_dataset(tmp_path, cfg(drop_last=True))
    why = why_nothing_trains(scan, plan_buckets(scan.records, cfg(drop_last=True), 8, 4))
    assert "lower train.batch_size or set data.drop_last off" in why


def damaged_dataset(root: Path, n: int = 2) -> Path:
    data = bytearray(encoded(noise(), "PNG"))
    data[200:260] = bytes(60)
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"{i}.png").write_bytes(bytes(data))
        (root / f"{i}.txt").write_text(f"image {i}")
    return root


def test_a_dataset_whose_every_image_fails_stops_instead_of_spinning(tmp_path):
    root = damaged_dataset(tmp_path / "data", 3)
    plan = plan_buckets(scan_dataset(root, cfg()).records, cfg(), 8, 2)
    loader, sampler = make_loader(plan, cfg(), seed=0)
    with pytest.raises(DataError, match="none of the 3 images could be decoded"):
        for epoch in range(3):
            sampler.set_epoch(epoch)
            list(loader)
    # held out for validation, broken images are left out without stopping anything
    five = damaged_dataset(tmp_path / "five", 5)
    held = plan_buckets(scan_dataset(five, cfg(val_images=1)).records, cfg(val_images=1), 8, 2)
    assert len(held.val_images) == 1 and validation_batches(held, cfg(), 0, "cpu") == []
    # one good image among them: the broken ones are only skipped
    good(root / "ok.png")
    plan = plan_buckets(scan_dataset(root, cfg()).records, cfg(), 8, 2)
    loader, sampler = make_loader(plan, cfg(), seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(loader)
        assert sum(len(b) for b in batches) == 1 and sum(len(b.failed) for b in batches) == 3


@pytest.mark.slow
def test_trainer_stops_with_one_line_when_no_image_decodes(tmp_path):
    root = damaged_dataset(tmp_path / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "engine.train", "--run-dir", str(tmp_path / "r"),
                           "--preset", "tiny-cpu", "--data", str(root), "--max-steps", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: none of the 2 images could be decoded")
    assert str(root) in last and "--deep" in last and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------
# The whole catalogue at once: the CLI report and the studio's Dataset tab
# --------------------------------------------------------------------------------------

def catalogue(root: Path) -> dict[str, str]:
    """A folder holding one of each bad case next to good images; file -> note."""
    good(root / "good1.png")
    good(root / "good2.png", colour=(10, 200, 10))
    expected = {}
    for case_id, name, make, _, note in BROKEN:
        rel = f"{case_id}{Path(name).suffix}"
        (root / rel).write_bytes(make())
        expected[rel] = note
    header_only_png(root / "bomb.png", 30000, 30000)
    expected["bomb.png"] = "over the limit of 200 M"
    Image.new("RGB", (1, 1)).save(root / "dot.png")
    expected["dot.png"] = "1x1 px"
    frames(root / "anim.gif")
    expected["anim.gif"] = "the first frame is trained"
    for rel in expected:
        (root / rel).with_suffix(".txt").write_text("a caption")
    good(root / "latin.png", colour=(1, 2, 3))
    (root / "latin.txt").write_bytes(b"na\xefve")
    expected["latin.png"] = "not UTF-8 text"
    return expected


def test_report_cli_names_every_bad_file(tmp_path, capsys):
    expected = catalogue(tmp_path)
    assert main(["report", str(tmp_path), "--preset", "tiny-cpu", "--deep"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "Traceback" not in out
    lines = out.splitlines()
    for rel, note in expected.items():
        assert any(line.strip().startswith(f"{rel}: ") and note in line for line in lines), rel
    assert "Training  3 images" in out     # good1, good2 and the first frame of anim.gif


def test_studio_dataset_tab_shows_every_bad_file(tmp_path):
    from studio import tab_dataset, views
    expected = catalogue(tmp_path / "data")
    run_cfg = load_preset("tiny-cpu")
    pv = tab_dataset.preview(tmp_path / "data", run_cfg, 1, tmp_path / "cache")
    rows = {row[2]: row for row in views.health_rows(pv.health)}
    assert len(rows) == len(views.health_rows(pv.health))          # one row per file
    for rel, note in expected.items():
        assert note in rows[rel][3], rel
    assert "delete it" in rows["truncated-png.png"][1]
    assert "Nothing would train" not in tab_dataset.plan_status(tmp_path / "data", pv)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images in"):
        tab_dataset.preview(empty, run_cfg, 1, tmp_path / "cache")
    small = tmp_path / "small"
    small.mkdir()
    Image.new("RGB", (8, 8)).save(small / "a.png")
    (small / "a.txt").write_text("tiny")
    status = tab_dataset.plan_status(small, tab_dataset.preview(small, run_cfg, 1,
                                                                tmp_path / "cache"))
    assert "**Nothing would train:** none of the 1 image file(s)" in status


def test_images_in_formats_not_read_are_named_with_what_to_do(tmp_path, capsys):
    """A TIFF (or HEIC, RAW ...) beside its caption is not an orphaned caption: the note
    names the image and says to convert it; a folder of nothing but such images says so
    instead of "no images"."""
    data = tmp_path / "data"
    data.mkdir()
    rgb = (np.arange(48 * 64 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)
    Image.fromarray(rgb).save(data / "scan.tif")
    (data / "photo.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + bytes(64))
    for stem in ("scan", "photo"):
        (data / f"{stem}.txt").write_text("a picture")
    (data / "lonely.txt").write_text("no image at all")
    with pytest.raises(DataError, match=r"no images this program reads in .* but 2 in other "
                                        r"formats \(photo.HEIC \.\.\.\): convert them to PNG"):
        scan_dataset(data, cfg())
    Image.fromarray(rgb).save(data / "kept.png")
    (data / "kept.txt").write_text("a kept picture")
    notes = {p.kind: p for p in scan_dataset(data, cfg()).problems}["orphan_caption"].files
    assert notes["scan.txt"].startswith("scan.tif is not in a format this program reads")
    assert notes["photo.txt"].endswith("convert it to PNG or JPEG")
    assert notes["lonely.txt"] == "no image with this name"
