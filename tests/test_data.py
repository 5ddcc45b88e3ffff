"""Data pipeline: buckets (upstream-exact), the planner, crops, augmentation, the batch
sampler (epochs, resume, ranks), scanning and the health report, the demo dataset, CLI."""

from __future__ import annotations

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

from engine.buckets import (
    BatchLayout,
    BucketBatchSampler,
    SampleKey,
    assign_bucket,
    batch_layout,
    crop_box,
    make_buckets,
    plan_buckets,
    split_validation,
)
from engine.config import DataConfig
from engine.data import DataError, ImageRecord, health_report, main, scan_dataset
from engine.dataset import BucketDataset, collate, load_crop, make_loader, to_tensor
from engine.demo_data import (
    BAND_COLOURS,
    COLOURS,
    SHAPES,
    SIZES,
    make_caption,
    render,
    sample_item,
    write_demo_dataset,
)
from engine.images import read_header
from engine.model import patch_grid

ROOT = Path(__file__).resolve().parent.parent

UPSTREAM_256_512 = ("256x256 256x384 384x256 272x368 368x272 320x320 288x384 384x288 288x448 "
                    "448x288 256x512 512x256 320x432 432x320 304x464 464x304 288x512 384x384 "
                    "512x288 336x448 448x336 336x512 512x336 384x512 512x384 448x448 512x512")


def rec(rel: str, w: int, h: int, caption: str | None = "a caption") -> ImageRecord:
    return ImageRecord(f"/nowhere/{rel}", rel, w, h, caption, 1000)


def save(path: Path, size=(64, 64), colour=(200, 30, 30), caption: str | None = None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **kw)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def cfg(**kw) -> DataConfig:
    return replace(DataConfig(min_side=32, max_side=64, bucket_step=16, val_images=0), **kw)


# --------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------

def test_upstream_bucket_list_256_512():
    buckets = make_buckets(256, 512, 64, 16, 2.0)
    assert " ".join(f"{w}x{h}" for w, h in buckets) == UPSTREAM_256_512


@pytest.mark.parametrize("size,bucket", [((1920, 1080), (512, 288)), ((800, 600), (512, 384)),
                                         ((3000, 1000), (512, 256)), ((300, 300), (256, 256)),
                                         ((1000, 1000), (512, 512))])
def test_upstream_assignment_256_512(size, bucket):
    assert assign_bucket(*size, make_buckets(256, 512, 64, 16, 2.0)) == bucket


def test_upstream_buckets_256_1024():
    buckets = make_buckets(256, 1024, 64, 16, 2.0)
    assert len(buckets) == 123
    for size, bucket in [((1000, 1000), (960, 960)), ((1920, 1080), (1024, 576)),
                         ((800, 600), (768, 576)), ((640, 480), (640, 480))]:
        assert assign_bucket(*size, buckets) == bucket


def test_buckets_follow_config():
    buckets = make_buckets(32, 64, 16, 8, 2.0)
    assert (32, 32) in buckets and (64, 64) in buckets and (64, 32) in buckets
    for w, h in buckets:
        assert w % 8 == 0 and h % 8 == 0 and 32 <= min(w, h) and max(w, h) <= 64
        assert 0.5 <= w / h <= 2.0
    assert [b[0] * b[1] for b in buckets] == sorted(b[0] * b[1] for b in buckets)
    assert all(max(w, h) / min(w, h) <= 1.5 for w, h in make_buckets(32, 64, 16, 8, 1.5))


def test_crop_box_geometry():
    assert crop_box(1920, 1080, (512, 288)) == pytest.approx((0, 0, 1920, 1080))
    # 1000x1000 into 512x288: scale 0.512, box 1000 x 562.5, centred vertically
    assert crop_box(1000, 1000, (512, 288)) == pytest.approx((0, 218.75, 1000, 781.25))
    assert crop_box(1000, 1000, (512, 288), 0.0, 0.0) == pytest.approx((0, 0, 1000, 562.5))
    assert crop_box(1000, 1000, (512, 288), 1.0, 1.0) == pytest.approx((0, 437.5, 1000, 1000))
    # upscaling: 40x20 into 64x32 keeps the whole image
    assert crop_box(40, 20, (64, 32)) == pytest.approx((0, 0, 40, 20))


def test_batch_layout_closed_form():
    assert batch_layout(37, 16) == BatchLayout(3, 5, 0, 0)
    assert batch_layout(37, 16, drop_last=True) == BatchLayout(2, 16, 0, 5)
    assert batch_layout(32, 16, drop_last=True) == BatchLayout(2, 16, 0, 0)
    # 2 ranks: one global batch of 32 and 5 left = 3 per rank, one repeat
    assert batch_layout(37, 16, 2) == BatchLayout(2, 3, 1, 0)
    assert batch_layout(1, 4, 2) == BatchLayout(1, 1, 1, 0)
    assert batch_layout(3, 4, 1, drop_last=True) == BatchLayout(0, 0, 0, 3)


# --------------------------------------------------------------------------------------
# Planner
# --------------------------------------------------------------------------------------

def hand_made_records() -> list[ImageRecord]:
    recs = [rec(f"sq/{i:02d}.png", 128, 128) for i in range(10)]       # -> 64x64
    recs += [rec(f"wide/{i}.png", 128, 64) for i in range(3)]         # -> 64x32
    recs += [rec("tiny.png", 20, 40), rec("nocap.png", 64, 64, None)]
    return recs


def test_plan_counts_leftovers_and_steps():
    plan = plan_buckets(hand_made_records(), cfg(), patch_size=8, batch_size=4)
    by = {b.size: b for b in plan.buckets if b.images}
    assert set(by) == {(64, 64), (64, 32)}
    assert (by[(64, 64)].images, by[(64, 64)].batches, by[(64, 64)].last_batch) == (10, 3, 2)
    assert (by[(64, 32)].images, by[(64, 32)].batches, by[(64, 32)].last_batch) == (3, 1, 3)
    assert by[(64, 32)].tokens == 8 * 4
    assert plan.batches_per_epoch == 4 and plan.steps_per_epoch == 4
    assert {(d.path, d.reason) for d in plan.dropped} == {("tiny.png", "too_small"),
                                                          ("nocap.png", "no_caption")}
    assert any("fewer images than a global batch of 4 (64x32: 3)" in w for w in plan.warnings)
    assert plan.mean_aspect_error == 0.0 and plan.upscaled == 0
    assert [im.rel for im in plan.images] == sorted(im.rel for im in plan.images)
    json.dumps(plan.to_dict())

    dropped = plan_buckets(hand_made_records(), cfg(drop_last=True), 8, 4, grad_accum=2)
    by = {b.size: b for b in dropped.buckets if b.images}
    assert (by[(64, 64)].batches, by[(64, 64)].dropped) == (2, 2)
    assert (by[(64, 32)].batches, by[(64, 32)].dropped) == (0, 3)
    assert dropped.batches_per_epoch == 2 and dropped.steps_per_epoch == 1.0


def test_plan_missing_caption_policy_and_validation():
    recs = [rec(f"{i:02d}.png", 64, 64) for i in range(20)] + [rec("x.png", 64, 64, None)]
    skip = plan_buckets(recs, cfg(), 8, 4)
    assert "x.png" not in {im.rel for im in skip.images}
    default = plan_buckets(recs, cfg(missing_caption="default", default_caption="a shape"), 8, 4)
    assert {im.rel: im.caption for im in default.images}["x.png"] == "a shape"
    held = plan_buckets(recs, cfg(val_images=3), 8, 4)
    assert len(held.val_images) == 3 and len(held.images) == 17
    assert not {im.rel for im in held.val_images} & {im.rel for im in held.images}
    capped = plan_buckets(recs[:10], cfg(val_images=8), 8, 4)   # at most a fifth
    assert len(capped.val_images) == 2 and any("reduced" in w for w in capped.warnings)


def test_split_validation_is_deterministic_and_order_free():
    recs = [rec(f"{i}.png", 64, 64) for i in range(50)]
    train, val = split_validation(recs, 5, seed=0)
    train2, val2 = split_validation(list(reversed(recs)), 5, seed=0)
    assert len(val) == 5 and {r.rel for r in val} == {r.rel for r in val2}
    assert len(train) == 45 and not {r.rel for r in train} & {r.rel for r in val}
    assert {r.rel for r in split_validation(recs, 5, seed=1)[1]} != {r.rel for r in val}


def test_plan_matches_sampler():
    recs = [rec(f"a{i}.png", 128, 128) for i in range(23)] + [rec(f"b{i}.png", 128, 64)
                                                            for i in range(9)]
    for world, drop in [(1, False), (1, True), (2, False), (3, True), (3, False)]:
        plan = plan_buckets(recs, cfg(drop_last=drop), 8, 4, world_size=world)
        for rank in range(world):
            sampler = BucketBatchSampler.from_plan(plan, seed=0, rank=rank)
            batches = list(sampler)
            assert len(sampler) == len(batches) == plan.batches_per_epoch
        assert plan.samples_per_epoch == sum(
            len(b) for r in range(world)
            for b in BucketBatchSampler.from_plan(plan, seed=0, rank=r))


# --------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------

def two_buckets(n_a=40, n_b=40):
    return [(64, 64)] * n_a + [(64, 32)] * n_b


def test_sampler_same_bucket_shuffled_per_epoch_and_interleaved():
    buckets = two_buckets()
    s = BucketBatchSampler(buckets, 4, seed=7)
    e0 = [[k.index for k in b] for b in s]
    for b in e0:
        assert len({buckets[i] for i in b}) == 1
    assert sorted(i for b in e0 for i in b) == list(range(80))
    s.set_epoch(1)
    e1 = [[k.index for k in b] for b in s]
    assert e1 != e0 and sorted(i for b in e1 for i in b) == list(range(80))
    s.set_epoch(0)
    assert [[k.index for k in b] for b in s] == e0
    runs = [buckets[b[0]] for b in e0]
    switches = sum(a != b for a, b in zip(runs, runs[1:]))
    assert switches > 4     # not all batches of one bucket back to back


def test_sampler_resume_mid_epoch():
    s = BucketBatchSampler(two_buckets(37, 22), 4, seed=3)
    s.set_epoch(5)
    it = iter(s)
    seen = [next(it) for _ in range(6)]
    state = s.state_dict()
    assert state["epoch"] == 5 and state["position"] == 6 and seen[-1][0].position == 6
    rest = list(it)
    fresh = BucketBatchSampler(two_buckets(37, 22), 4, seed=3)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert list(fresh) == rest
    fresh.set_epoch(6)       # after the resumed epoch, the next starts from its beginning
    assert len(list(fresh)) == len(s)
    other = BucketBatchSampler(two_buckets(37, 23), 4, seed=3)
    with pytest.raises(ValueError, match="different data"):
        other.load_state_dict(state)


def test_sampler_two_ranks():
    buckets = two_buckets(37, 22)
    r0, r1 = (BucketBatchSampler(buckets, 4, seed=1, rank=r, world_size=2, drop_last=True)
              for r in range(2))
    b0, b1 = [[k.index for k in b] for b in r0], [[k.index for k in b] for b in r1]
    assert len(b0) == len(b1) == len(r0)
    i0, i1 = {i for b in b0 for i in b}, {i for b in b1 for i in b}
    assert not i0 & i1 and len(i0) == len(i1) == 4 * len(b0)
    assert len(i0 | i1) == 32 + 16        # 37 -> 32, 22 -> 16 with drop_last
    p0, p1 = (BucketBatchSampler(buckets, 4, seed=1, rank=r, world_size=2) for r in range(2))
    b0, b1 = [[k.index for k in b] for b in p0], [[k.index for k in b] for b in p1]
    assert len(b0) == len(b1)
    for x, y in zip(b0, b1):   # step in step: same bucket and size on both ranks
        assert len(x) == len(y) and buckets[x[0]] == buckets[y[0]]
        assert all(buckets[i] == buckets[x[0]] for i in x + y)
    assert {i for b in b0 + b1 for i in b} == set(range(59))


# --------------------------------------------------------------------------------------
# Pixels: crops, flips, augmentation
# --------------------------------------------------------------------------------------

def thirds(path: Path, size=(300, 100)):
    """Vertical thirds red | green | blue."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    t = size[0] // 3
    arr[:, :t, 0] = 255
    arr[:, t:2 * t, 1] = 255
    arr[:, 2 * t:, 2] = 255
    Image.fromarray(arr).save(path)
    return path


def test_load_crop_follows_the_box(tmp_path):
    p = str(thirds(tmp_path / "t.png"))
    # the box is the middle third; Lanczos reads a few pixels past its edges, as a
    # resize-then-crop would, so only the inner columns are pure
    centre = np.asarray(load_crop(p, (32, 32)), np.int32)[:, 4:-4]
    assert (centre[..., 1] > 250).all() and (centre[..., [0, 2]] < 5).all()
    left = np.asarray(load_crop(p, (32, 32), fx=0.0), np.int32)
    assert (left[:, :28, 0] > 250).all() and (left[:, :28, 1] < 5).all()
    flipped = np.asarray(load_crop(p, (96, 32), flip=True), np.int32)
    assert (flipped[:, :28, 2] > 250).all() and (flipped[:, -28:, 0] > 250).all()
    t = to_tensor(load_crop(p, (96, 32)))
    assert t.shape == (3, 32, 96) and t.min() == -1.0 and t.max() == 1.0


def test_load_crop_jpeg_draft_and_exif_orientation(tmp_path):
    arr = np.zeros((512, 1024, 3), np.uint8)
    arr[:, :512, 0] = 255
    arr[:, 512:, 2] = 255
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=95)
    small = np.asarray(load_crop(str(tmp_path / "big.jpg"), (64, 32)), np.float32)
    with Image.open(tmp_path / "big.jpg") as im:
        ref = np.asarray(im.convert("RGB").resize((64, 32), Image.Resampling.LANCZOS), np.float32)
    assert np.abs(small - ref).mean() < 4.0
    exif = Image.Exif()
    exif[0x0112] = 6        # stored 1024x512, shown rotated 90 degrees clockwise
    Image.fromarray(arr).save(tmp_path / "rot.jpg", quality=95, exif=exif)
    assert read_header(str(tmp_path / "rot.jpg")) == (512, 1024)
    up = np.asarray(load_crop(str(tmp_path / "rot.jpg"), (32, 64)), np.int32)
    assert (up[:28, :, 0] > 200).all() and (up[-28:, :, 2] > 200).all()   # red on top


def test_transparent_png_on_white(tmp_path):
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (np.asarray(load_crop(str(tmp_path / "clear.png"), (32, 32))) == 255).all()


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    for i in range(4):
        thirds(tmp_path / f"{i}.png", (300 + 10 * i, 100))
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    c = cfg(crop="random", flip=True)
    plan = plan_buckets(scan_dataset(tmp_path, c).records, c, 8, 2)
    a = BucketDataset(plan.images, crop="random", flip=True, seed=5)
    b = BucketDataset(plan.images, crop="random", flip=True, seed=5)
    assert a.augmentation(1, 3) == b.augmentation(1, 3)
    assert len({a.augmentation(1, e) for e in range(6)}) == 6
    assert len({a.augmentation(1, e)[2] for e in range(20)}) == 2      # flips happen
    assert BucketDataset(plan.images, seed=5).augmentation(1, 3)[:2] == (0.5, 0.5)
    box, _ = a.crop_at(1, 3)
    im = plan.images[1]
    assert box == crop_box(im.record.width, im.record.height, im.bucket, *a.augmentation(1, 3)[:2])
    assert box != im.box and BucketDataset(plan.images, seed=5).crop_at(1, 3) == (im.box, False)
    loader, sampler = make_loader(plan, c, seed=5)
    sampler.set_epoch(2)
    serial = [(bt.paths, bt.images) for bt in loader]
    workers, wsampler = make_loader(plan, replace(c, workers=2), seed=5)
    wsampler.set_epoch(2)
    parallel = [(bt.paths, bt.images) for bt in workers]
    assert [p for p, _ in serial] == [p for p, _ in parallel]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(serial, parallel))


# --------------------------------------------------------------------------------------
# Scanning, failures, health
# --------------------------------------------------------------------------------------

def png_header_only(path: Path, w: int, h: int):
    """A PNG whose header claims w x h pixels (a decompression-bomb shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_scan_finds_images_captions_and_problems(tmp_path):
    save(tmp_path / "a.PNG", caption="  a red square \n")
    save(tmp_path / "sub" / "deep" / "b.JpG", caption="b")
    save(tmp_path / "c.webp", caption="")
    save(tmp_path / "d.bmp")
    save(tmp_path / "e.png", caption=None)
    (tmp_path / "e.txt").write_bytes(b"caf\xe9 bad")
    save(tmp_path / "small.png", size=(16, 64), caption="small")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    png_header_only(tmp_path / "bomb.png", 30000, 30000)
    (tmp_path / "orphan.txt").write_text("no image")
    (tmp_path / "README.txt").write_text("about this folder")
    save(tmp_path / ".hidden" / "x.png", caption="x")
    save(tmp_path / "._y.png", caption="y")
    scan = scan_dataset(tmp_path, cfg())
    by = {r.rel: r for r in scan.records}
    assert set(by) == {"a.PNG", "sub/deep/b.JpG", "c.webp", "d.bmp", "e.png", "small.png"}
    assert by["a.PNG"].caption == "a red square" and by["sub/deep/b.JpG"].caption == "b"
    assert (by["a.PNG"].width, by["a.PNG"].height) == (64, 64)
    assert by["c.webp"].caption is None and by["d.bmp"].caption is None
    problems = {p.kind: p for p in scan.problems}
    assert set(problems["unreadable"].files) == {"broken.png"}
    assert set(problems["too_large"].files) == {"bomb.png"}
    assert set(problems["too_small"].files) == {"small.png"}
    assert set(problems["missing_caption"].files) == {"d.bmp"}
    assert set(problems["empty_caption"].files) == {"c.webp"}
    assert set(problems["caption_unreadable"].files) == {"e.png"}
    assert set(problems["orphan_caption"].files) == {"orphan.txt"}
    assert problems["missing_caption"].severity == "error"
    lenient = scan_dataset(tmp_path, cfg(missing_caption="default"))
    assert {p.kind: p.severity for p in lenient.problems}["missing_caption"] == "warning"
    strict = scan_dataset(tmp_path, cfg(), max_pixels=1000)
    assert "a.PNG" in {p.kind: p for p in strict.problems}["too_large"].files
    json.dumps(scan.to_dict())
    with pytest.raises(DataError, match="does not exist"):
        scan_dataset(tmp_path / "nope", cfg())


def test_scan_cache_skips_unchanged_headers(tmp_path, monkeypatch):
    for i in range(3):
        save(tmp_path / "data" / f"{i}.png", caption=f"c{i}")
    cache = tmp_path / "index.json"
    first = scan_dataset(tmp_path / "data", cfg(), cache_path=cache)
    assert cache.is_file()
    import engine.data as data_module
    calls = []
    monkeypatch.setattr(data_module, "inspect_image", lambda *a: calls.append(a) or (1, 1, False))
    again = scan_dataset(tmp_path / "data", cfg(), cache_path=cache)
    assert calls == [] and again.records == first.records


def test_corrupt_file_during_training_is_skipped_and_reported(tmp_path):
    for i in range(4):
        save(tmp_path / f"{i}.png", caption=f"image {i}")
    c = cfg()
    plan = plan_buckets(scan_dataset(tmp_path, c).records, c, 8, 4)
    (tmp_path / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    loader, _ = make_loader(plan, c, seed=0)
    (batch,) = list(loader)
    assert len(batch) == 3 and batch.images.shape == (3, 3, 64, 64)
    assert [Path(p).name for p, _ in batch.failed] == ["2.png"] and batch.failed[0][1]
    assert str(tmp_path / "2.png") not in batch.paths and patch_grid(batch.images, 8) == (8, 8)
    ds = BucketDataset(plan.images)
    only_bad = collate([ds[2]])
    assert only_bad.images.shape == (0, 3, 64, 64) and len(only_bad.failed) == 1


def test_health_report_duplicates_tokens_and_deep_check(tmp_path):
    save(tmp_path / "a.png", caption="one two three four five")
    save(tmp_path / "copy.png", caption="one")
    save(tmp_path / "other.png", colour=(0, 0, 255), caption="one two")
    raw = (tmp_path / "damaged.png")   # whole, but with a run of zeros in its pixel data
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(raw)
    data = bytearray(raw.read_bytes())
    data[200:260] = bytes(60)
    raw.write_bytes(bytes(data))
    raw.with_suffix(".txt").write_text("x")
    scan = scan_dataset(tmp_path, cfg())
    assert "damaged.png" in {r.rel for r in scan.records}     # the header reads
    report = health_report(scan, count_tokens=lambda caps: [len(c.split()) for c in caps],
                           max_tokens=3, counter_name="words", deep=True)
    problems = {p.kind: p for p in report.problems}
    assert problems["duplicate"].files == {"copy.png": "same content as a.png"}
    assert set(problems["long_caption"].files) == {"a.png"}
    assert list(problems["corrupt"].files) == ["damaged.png"]
    assert problems["corrupt"].files["damaged.png"].startswith("damaged image data")
    assert report.tokens.max == 5 and report.tokens.over == 1 and report.tokens.counter == "words"
    assert report.errors == 1
    json.dumps(report.to_dict())


# --------------------------------------------------------------------------------------
# Demo dataset and CLI
# --------------------------------------------------------------------------------------

def test_demo_dataset_is_deterministic_and_captioned(tmp_path):
    a = write_demo_dataset(tmp_path / "a", count=12, seed=3)
    b = write_demo_dataset(tmp_path / "b", count=12, seed=3)
    c = write_demo_dataset(tmp_path / "c", count=12, seed=4)
    names = sorted(p.name for p in a.iterdir())
    assert len(names) == 25 and "README.txt" in names
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert any((a / n).read_bytes() != (c / n).read_bytes() for n in names if n != "README.txt")
    for txt in a.glob("shape_*.txt"):
        cap = txt.read_text().strip()
        assert cap.startswith(("a ", "an ")) and cap.endswith(" background")
        assert any(s in cap for s in SHAPES) and any(f" {k} " in cap for k in COLOURS)
    sizes = {Image.open(p).size for p in a.glob("*.png")}
    assert len({round(w / h, 2) for w, h in sizes}) >= 3
    with pytest.raises(FileExistsError):
        write_demo_dataset(a, count=2)


def test_the_demo_run_trains_every_image_at_least_24_px_on_its_shorter_side(tmp_path):
    """At the demo run's 32 px a 2:1 image would be 32 x 16, where a shape is 4-8 px across
    and its outline cannot be told; the demo's images are square or 4:3, and none of them
    is cut or squeezed by its bucket. A small shape is at least 7 px across in every one."""
    from engine.config import load_preset
    from studio.tab_dataset import DEFAULT_PRESET, DEMO_OVERRIDES
    root = write_demo_dataset(tmp_path / "d", count=40, seed=5)
    cfg = load_preset(DEFAULT_PRESET, [*DEMO_OVERRIDES, f"data.path={root}"])
    plan = plan_buckets(scan_dataset(root, cfg.data).records, cfg.data,
                        cfg.model.patch_size, cfg.train.batch_size)
    buckets = {im.bucket for im in plan.images + plan.val_images}
    assert buckets == {(32, 32), (32, 24), (24, 32)} and not plan.dropped
    assert all(im.aspect_error == 0.0 for im in plan.images + plan.val_images)
    assert 2 * SIZES["small"] * min(min(b) for b in buckets) >= 7.0


def test_bands_kind_draws_the_colours_its_caption_names_in_order(tmp_path):
    a = write_demo_dataset(tmp_path / "a", count=16, seed=2, kind="bands")
    b = write_demo_dataset(tmp_path / "b", count=16, seed=2, kind="bands")
    assert all(p.read_bytes() == (b / p.name).read_bytes() for p in a.iterdir())
    assert "bands" in (a / "README.txt").read_text()
    kinds = set()
    for png in sorted(a.glob("band_*.png")):
        cap = png.with_suffix(".txt").read_text().strip()
        way, _, names = cap.partition(" bands of ")
        colours = names.replace(" and ", ", ").split(", ")
        assert way in ("horizontal", "vertical") and 2 <= len(colours) <= 3
        kinds.add((way, len(colours)))
        pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
        line = pixels[:, 0] if way == "horizontal" else pixels[0, :]     # across the bands
        along = pixels[0, :] if way == "horizontal" else pixels[:, 0]   # within the first band
        assert np.abs(along - along[0]).max() == 0                       # flat along a band
        pure = [tuple(int(v) for v in c) for c in line
                if tuple(int(v) for v in c) in BAND_COLOURS.values()]   # not a border pixel
        runs = [c for i, c in enumerate(pure) if i == 0 or c != pure[i - 1]]
        assert runs == [BAND_COLOURS[c] for c in colours]
    assert len(kinds) >= 3
    with pytest.raises(ValueError, match="unknown demo kind"):
        write_demo_dataset(tmp_path / "c", count=2, kind="stripes")


def test_demo_pixels_match_the_caption():
    assert (make_caption("circle", "orange", None, "center", "white")
            == "an orange circle in the center on a white background")
    rng = np.random.default_rng(0)
    for _ in range(200):
        item = sample_item(rng)
        img = np.asarray(render(item), np.int32)
        cx, cy = int(item.center[0]), int(item.center[1])
        assert np.abs(img[cy, cx] - COLOURS[item.colour]).max() < 12
        assert item.colour in item.caption and item.shape in item.caption
        assert item.background in item.caption


def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "engine.data", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_demo_and_report(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "--out", str(out), "--count", "20", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert len(list(out.glob("*.png"))) == 20
    r = run_cli("report", str(out), "--preset", "tiny-cpu", "--json",
                "--set", "data.val_images=2")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["scan"]["images"] == 20
    assert len(data["plan"]["images"]) == 18 and len(data["plan"]["val_images"]) == 2
    assert data["health"]["errors"] == 0
    assert data["health"]["tokens"]["counter"].startswith("the builtin encoder's words")
    assert data["health"]["tokens"]["max"] <= 13
    r = run_cli("report", str(tmp_path / "missing"), "--preset", "tiny-cpu")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "does not exist" in r.stderr
    r = run_cli("demo", "--out", str(tmp_path / "bands"), "--count", "3", "--kind", "bands")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "bands").glob("band_*.png"))) == 3


def test_cli_errors_and_text_report(tmp_path, capsys):
    write_demo_dataset(tmp_path / "d", count=6, seed=0)
    assert main(["report", str(tmp_path / "d"), "--preset", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset" in err and len(err.strip().splitlines()) == 1
    assert main(["demo", "--out", str(tmp_path / "d")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "d"), "--preset", "tiny-cpu"]) == 0
    text = capsys.readouterr().out
    assert "Buckets" in text and "Epoch" in text and "total" in text


def test_fixed_crops_are_decoded_once_and_kept_within_the_budget(tmp_path):
    """Centre crops without flips are the same every epoch: they are decoded once, kept
    as uint8 within the byte budget, and give exactly the pixels of a fresh decode."""
    for i in range(3):
        save(tmp_path / f"{i}.png", colour=(40 * i, 90, 200), caption=f"image {i}")
    c = cfg()
    plan = plan_buckets(scan_dataset(tmp_path, c).records, c, 8, 4)
    fresh = BucketDataset(plan.images)
    cached = BucketDataset(plan.images, cache_bytes=2 * 64 * 64 * 3)   # room for two
    first = [cached[i].image for i in range(3)]
    for i in range(3):
        torch.testing.assert_close(first[i], fresh[i].image, rtol=0, atol=0)
        (tmp_path / f"{i}.png").unlink()           # the cached ones no longer need the file
    again = [cached[i] for i in range(3)]
    assert [s.error == "" for s in again] == [True, True, False]
    for i in range(2):
        torch.testing.assert_close(again[i].image, first[i], rtol=0, atol=0)
    random = BucketDataset(plan.images, crop="random", cache_bytes=2**30)
    assert random.cache_bytes == 0


def test_flipped_centre_crops_are_the_kept_crop_mirrored(tmp_path):
    """With flips, the unflipped centre crop is kept and mirrored when an epoch flips it:
    the pixels are exactly those of decoding the flipped crop."""
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    c = cfg()
    plan = plan_buckets(scan_dataset(tmp_path, c).records, c, 8, 4)
    flipped = BucketDataset(plan.images, flip=True, seed=1, cache_bytes=2**30)
    flips = set()
    for epoch in range(6):
        for i, im in enumerate(plan.images):
            _, _, flip = flipped.augmentation(i, epoch)
            flips.add(flip)
            want = to_tensor(load_crop(im.record.path, im.bucket, flip=flip))
            got = flipped[SampleKey(i, epoch, 0)].image
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert flips == {True, False} and len(flipped._cache) == 2
