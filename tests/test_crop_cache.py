"""The disk cache of decoded training crops (engine/crop_cache.py): the stored crops are
exactly the decoded ones, are decoded once for every worker, epoch and later run, follow
changed files, keep to their disk budget and never stop a run that cannot use them."""

from __future__ import annotations

import os
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trainhelp import sets

import engine.crop_cache as crop_cache
from engine.buckets import SampleKey, plan_buckets
from engine.config import DataConfig, load_preset
from engine.crop_cache import CropCache, crop_cache_root, stored_crops
from engine.data import scan_dataset
from engine.dataset import BucketDataset, StoredCrops, load_crop, make_loader, to_tensor
from engine.demo_data import write_demo_dataset
from engine.train import main as train_main


def make_images(folder: Path, n: int, seed: int = 0, size=(80, 48), ext="png") -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            folder / f"{i:02d}.{ext}")
        (folder / f"{i:02d}.txt").write_text(f"image {i}")


def cfg(**kw) -> DataConfig:
    return replace(DataConfig(min_side=32, max_side=64, bucket_step=16, val_images=0,
                              workers=0), **kw)


def plan_of(folder: Path, c: DataConfig):
    return plan_buckets(scan_dataset(folder, c).records, c, 8, 4)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PIXELHDM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "image-crops"


def test_stored_crops_are_the_decoded_ones_and_are_decoded_once(tmp_path, cache_dir):
    make_images(tmp_path / "data", 5)
    c = cfg(flip=True)
    plan = plan_of(tmp_path / "data", c)
    logs: list[str] = []
    rng = torch.random.get_rng_state()
    stored = stored_crops(plan.images, c, logs.append)
    assert stored is not None and stored.count == 5
    # a run's random numbers do not depend on whether it decoded crops first
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert any("decoding 5 training crops" in m for m in logs), logs
    assert crop_cache_root() == cache_dir and str(cache_dir) in "".join(logs)
    fresh = BucketDataset(plan.images, flip=True, seed=2)
    ds = BucketDataset(plan.images, flip=True, seed=2, stored=stored)
    for epoch in range(3):
        for i in range(5):
            key = SampleKey(i, epoch, 0)
            torch.testing.assert_close(ds[key].image, fresh[key].image, rtol=0, atol=0)
    assert not ds._cache                            # no memory budget: the disk serves
    kept = BucketDataset(plan.images, flip=True, seed=2, stored=stored, cache_bytes=2**20)
    for i in range(5):
        torch.testing.assert_close(kept[SampleKey(i, 1, 0)].image, fresh[SampleKey(i, 1, 0)].image,
                                   rtol=0, atol=0)
    assert len(kept._cache) == 5                    # later epochs: a dictionary lookup

    logs.clear()
    again = stored_crops(plan.images, c, logs.append)
    folder = CropCache(crop_cache_root(), str(tmp_path / "data")).folder
    assert folder.parent == cache_dir
    assert logs == [f"image crops: 5 of 5 training crops found in {folder}"]
    for p in (tmp_path / "data").glob("*.png"):     # the stored crops need no file
        p.unlink()
    later = BucketDataset(plan.images, stored=again)
    for i, im in enumerate(plan.images):
        assert later[i].error == ""
        assert later[i].image.shape == (3, im.bucket[1], im.bucket[0])


def test_workers_decode_the_store_and_read_it(tmp_path, cache_dir):
    """Two loader processes decode the missing crops; a loader with two workers (its
    dataset pickled with the stored crops, no open files) trains the same batches as one
    decoding in the trainer's process."""
    make_images(tmp_path / "data", 6, seed=1)
    c = cfg()
    plan = plan_of(tmp_path / "data", c)
    stored = stored_crops(plan.images, replace(c, workers=2), lambda _: None)
    assert stored.count == 6
    stored.read(0, plan.images[0].bucket)           # opens a shard in this process
    copy = pickle.loads(pickle.dumps(stored))
    assert copy._slices == {} and (copy.where == stored.where).all()
    plain, _ = make_loader(plan, replace(c, disk_cache_gb=0), seed=4)
    workers, _ = make_loader(plan, replace(c, workers=2), seed=4, stored=stored)
    a = [b.images for b in plain]
    b = [b.images for b in workers]
    assert len(a) == len(b) > 1
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_a_changed_file_is_decoded_again(tmp_path, cache_dir):
    """Even when its size stays the same (BMP: the size is the dimensions')."""
    make_images(tmp_path / "data", 3, ext="bmp")
    c = cfg()
    plan = plan_of(tmp_path / "data", c)
    stored_crops(plan.images, c, lambda _: None)
    target = tmp_path / "data" / "01.bmp"
    size = target.stat().st_size
    Image.new("RGB", (80, 48), (10, 200, 30)).save(target)
    assert target.stat().st_size == size
    os.utime(target, ns=(1, 1))                      # a different modification time for sure
    plan = plan_of(tmp_path / "data", c)
    logs: list[str] = []
    stored = stored_crops(plan.images, c, logs.append)
    assert any("decoding 1 training crops" in m for m in logs), logs
    i = [im.record.path for im in plan.images].index(str(target))
    got = BucketDataset(plan.images, stored=stored)[i].image
    torch.testing.assert_close(got, to_tensor(load_crop(str(target), plan.images[i].bucket)),
                               rtol=0, atol=0)


def test_the_store_keeps_to_its_budget(tmp_path, cache_dir, monkeypatch):
    """Crops past data.disk_cache_gb are not stored (the log says so) and are decoded by
    the dataset as before; a build that needs room deletes shards of crops the plan does
    not train first, and keeps those it trains."""
    monkeypatch.setattr(crop_cache, "KEEP_FREE_BYTES", 0)
    make_images(tmp_path / "data", 4, seed=3)
    c = cfg()
    plan = plan_of(tmp_path / "data", c)
    crop = plan.images[0].bucket[0] * plan.images[0].bucket[1] * 3
    logs: list[str] = []
    small = replace(c, disk_cache_gb=(2.5 * crop + 2000) / 2**30)   # two crops and headers
    stored = stored_crops(plan.images, small, logs.append)
    assert stored.count == 2
    assert any("2 of 4 crops do not fit" in m and "data.disk_cache_gb" in m for m in logs), logs
    ds = BucketDataset(plan.images, stored=stored)
    fresh = BucketDataset(plan.images)
    for i in range(4):
        torch.testing.assert_close(ds[i].image, fresh[i].image, rtol=0, atol=0)

    # another dataset size: the old crops are no longer trained, so they make room
    bigger = replace(small, max_side=48, min_side=32)
    plan2 = plan_of(tmp_path / "data", bigger)
    assert plan2.images[0].bucket != plan.images[0].bucket
    logs.clear()
    stored2 = stored_crops(plan2.images, bigger, logs.append)
    assert any("deleting 1 shard(s)" in m for m in logs), logs
    assert stored2.count >= 2
    cache = CropCache(crop_cache_root(), str(tmp_path / "data"), lambda _: None)
    assert sum(s["bytes"] for s in cache._read_index()["shards"]) <= bigger.disk_cache_gb * 2**30


def test_a_damaged_shard_is_decoded_again(tmp_path, cache_dir):
    make_images(tmp_path / "data", 3)
    c = cfg()
    plan = plan_of(tmp_path / "data", c)
    stored = stored_crops(plan.images, c, lambda _: None)
    shard = Path(stored.files[0])
    shard.write_bytes(shard.read_bytes()[:-10])
    logs: list[str] = []
    again = stored_crops(plan.images, c, logs.append)
    assert any("damaged" in m and shard.name in m for m in logs), logs
    assert any("decoding 3 training crops" in m for m in logs), logs
    assert again.count == 3 and not shard.exists()


def test_an_unreadable_shard_while_training_falls_back_to_decoding(tmp_path, cache_dir):
    make_images(tmp_path / "data", 2)
    c = cfg()
    plan = plan_of(tmp_path / "data", c)
    stored = stored_crops(plan.images, c, lambda _: None)
    Path(stored.files[0]).unlink()                  # e.g. another run made room meanwhile
    ds = BucketDataset(plan.images, stored=stored)
    fresh = BucketDataset(plan.images)
    torch.testing.assert_close(ds[1].image, fresh[1].image, rtol=0, atol=0)
    assert (stored.where[:, 0] == -1).sum() >= 1


def test_a_cache_that_cannot_be_written_does_not_stop_training(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PIXELHDM_CACHE_DIR", str(blocker))
    make_images(tmp_path / "data", 2)
    c = cfg()
    plan = plan_of(tmp_path / "data", c)
    logs: list[str] = []
    stored = stored_crops(plan.images, c, logs.append)
    assert stored is None or stored.count == 0
    assert any("cannot write the crop cache" in m and "decoded every epoch" in m
               for m in logs), logs


def test_random_crops_and_a_zero_budget_store_nothing(tmp_path, cache_dir):
    make_images(tmp_path / "data", 2)
    for c in (cfg(crop="random"), cfg(disk_cache_gb=0)):
        assert stored_crops(plan_of(tmp_path / "data", c).images, c, print) is None
    assert not cache_dir.exists()
    stored = StoredCrops([], np.full((2, 2), -1))
    ds = BucketDataset(plan_of(tmp_path / "data", cfg()).images, crop="random", stored=stored)
    assert ds.stored is None


def test_other_datasets_make_room_least_recently_used_first(tmp_path, cache_dir, monkeypatch):
    """Past data.disk_cache_gb (all datasets together), a build deletes the store of the
    dataset used longest ago, and keeps a store being written by another process."""
    monkeypatch.setattr(crop_cache, "KEEP_FREE_BYTES", 0)
    c = cfg()
    folders = []
    for n in range(3):
        make_images(tmp_path / f"data{n}", 2, seed=n)
        stored_crops(plan_of(tmp_path / f"data{n}", c).images, c, lambda _: None)
        folders.append(CropCache(crop_cache_root(), str(tmp_path / f"data{n}")).folder)
    for n, folder in enumerate(folders):               # data1 used longest ago, then data0
        os.utime(folder / "index.json", (100 + [10, 0, 20][n],) * 2)
    size = sum(p.stat().st_size for p in folders[0].iterdir() if p.is_file())
    make_images(tmp_path / "data3", 2, seed=3)
    logs: list[str] = []
    cap = replace(c, disk_cache_gb=(3.5 * size) / 2**30)   # room for three datasets' crops
    stored = stored_crops(plan_of(tmp_path / "data3", cap).images, cap, logs.append)
    assert stored.count == 2
    assert [f.exists() for f in folders] == [True, False, True]
    assert any("another dataset" in m and str(folders[1]) in m for m in logs), logs

    # data0 is now the least recently used, but another process is writing it: data2 goes
    from filelock import FileLock
    make_images(tmp_path / "data4", 2, seed=4)
    with FileLock(str(folders[0] / ".lock")):
        os.utime(folders[0] / "index.json", (1, 1))
        stored_crops(plan_of(tmp_path / "data4", cap).images, cap, lambda _: None)
    assert [f.exists() for f in folders] == [True, False, False]


def test_the_wait_hint_says_why_crops_are_decoded_every_epoch(tmp_path, cache_dir):
    from engine.crop_cache import uncached_advice
    make_images(tmp_path / "data", 2)
    c = cfg()
    images = plan_of(tmp_path / "data", c).images
    assert uncached_advice(c, stored_crops(images, c, print), 2) == ""
    assert "data.crop = random" in uncached_advice(cfg(crop="random"), None, 2)
    assert "crop cache is off" in uncached_advice(cfg(disk_cache_gb=0), None, 2)
    partial = StoredCrops([], np.array([[0, 0], [-1, -1]]))
    assert uncached_advice(c, partial, 2).startswith("1 of 2 training crops are not in the ")
    assert uncached_advice(c, None, 2).startswith("2 of 2 training crops")


def test_the_dataset_tab_says_what_the_crop_cache_holds(tmp_path, cache_dir):
    from studio import tab_dataset
    make_images(tmp_path / "data", 3)
    run_cfg = load_preset("tiny-cpu", ["data.val_images=0"])
    status = lambda: tab_dataset.plan_status(                        # noqa: E731
        tmp_path / "data", tab_dataset.preview(tmp_path / "data", run_cfg, 1, tmp_path / "s"))
    assert "Crop cache: 0 of 3 training crops decoded already; the next run decodes the " \
           "other 3 once" in status()
    assert not cache_dir.exists()                      # the preview writes nothing
    plan = plan_buckets(scan_dataset(tmp_path / "data", run_cfg.data).records, run_cfg.data,
                        run_cfg.model.patch_size, run_cfg.train.batch_size)
    stored_crops(plan.images[:2], run_cfg.data, lambda _: None)
    assert "Crop cache: 2 of 3 training crops decoded already" in status()
    stored_crops(plan.images, run_cfg.data, lambda _: None)
    assert "Crop cache: all 3 training crops are decoded already" in status()
    random = load_preset("tiny-cpu", ["data.val_images=0", "data.crop=random"])
    assert "not used with random crops" in tab_dataset.plan_status(
        tmp_path / "data", tab_dataset.preview(tmp_path / "data", random, 1, tmp_path / "s"))


def test_the_cache_command_decodes_every_stage_ahead_of_training(tmp_path, cache_dir, capsys):
    from engine.data import main
    make_images(tmp_path / "data", 3)
    data = str(tmp_path / "data")
    sets = ["--set", "data.val_images=0", "--set", "data.stages=['32 until 10']"]
    assert main(["report", data, "--preset", "tiny-cpu", *sets]) == 0
    assert "Crop cache: 0 of 3 training crops decoded already" in capsys.readouterr().out
    assert main(["cache", data, "--preset", "tiny-cpu", "--workers", "0", *sets]) == 0
    out = capsys.readouterr().out
    assert "stage up to 32 px for steps 1-10" in out, out
    assert out.count("image crops: decoding 3 training crops") == 2        # both sizes
    assert out.count("Crop cache: all 3 training crops are decoded already") == 2
    assert main(["report", data, "--preset", "tiny-cpu", *sets]) == 0
    assert "Crop cache: all 3 training crops are decoded already" in capsys.readouterr().out
    assert main(["cache", data, "--preset", "tiny-cpu", "--set", "data.crop=random"]) == 2
    assert "nothing to store: Crop cache: not used with random crops" in capsys.readouterr().err


def test_only_crop_stores_are_deleted_to_make_room(tmp_path, monkeypatch):
    """data.cache_dir may be any folder: what else lies in it, even a folder with an
    index.json, is never deleted, however full the budget."""
    monkeypatch.setattr(crop_cache, "KEEP_FREE_BYTES", 0)
    root = tmp_path / "crops"
    keep = [root / "notes", root / "other-app"]
    keep[0].mkdir(parents=True)
    (keep[0] / "index.json").write_text('{"identity": {"format": 1, "dataset": "x"}}')
    keep[1].mkdir()
    (keep[1] / "index.json").write_text("[1, 2]")
    (keep[1] / "data.bin").write_bytes(b"x" * 100_000)
    make_images(tmp_path / "data", 2)
    c = cfg(cache_dir=str(root), disk_cache_gb=1e-9)                # room for nothing
    stored_crops(plan_of(tmp_path / "data", c).images, c, lambda _: None)
    assert all(k.exists() for k in keep)


def test_decoding_crops_is_progress_not_a_stall(tmp_path, monkeypatch):
    """Each progress line of the crop build (at the start, or at a stage switch inside the
    loop) tells the heartbeat the trainer moves on: a long build is not 'no step'."""
    import engine.shard_store as shard_store
    from engine.train_io import JobReporter
    monkeypatch.setattr(shard_store, "PROGRESS_SECONDS", 0.0)
    data = write_demo_dataset(tmp_path / "data", count=24, seed=5)   # none of it stored yet
    run = tmp_path / "run"
    seen, real = [], JobReporter.progress

    def spy(self, step_seconds=None):
        log = (run / "log.txt").read_text() if (run / "log.txt").exists() else ""
        seen.append(log.count("crops decoded ("))    # the build's progress lines so far
        return real(self, step_seconds)
    monkeypatch.setattr(JobReporter, "progress", spy)
    assert train_main(["--preset", "tiny-cpu", "--data", str(data), "--run-dir", str(run),
                       "--max-steps", "1", *sets()]) == 0
    assert seen[-1] > 2 and seen[0] < seen[-1], seen


def test_a_file_that_does_not_decode_is_named_and_not_decoded_again(tmp_path, cache_dir,
                                                                     monkeypatch):
    """A file whose header reads but whose pixels do not (damaged data, a complete file)
    is named once with what to do, and no later build or epoch decodes it again until it
    changes; the Dataset tab's line says it is left out, not that a run will decode it."""
    from engine.crop_cache import cache_status
    make_images(tmp_path / "data", 3)
    bad = tmp_path / "data" / "01.png"
    damaged = bytearray(bad.read_bytes())
    at = damaged.index(b"IDAT")
    damaged[at + 8:at + 40] = b"\xff" * 32
    bad.write_bytes(bytes(damaged))
    c = cfg()
    images = plan_of(tmp_path / "data", c).images
    logs: list[str] = []
    stored = stored_crops(images, c, logs.append)
    assert stored.count == 2 and list(stored.failed) == [1]
    assert any("1 image(s) do not decode" in m and str(bad) in m and "delete it" in m
               for m in logs), logs
    status = cache_status(images, c)
    assert "all 2 training crops are decoded already" in status
    assert "1 image(s) did not decode" in status and "replace or delete them" in status

    decoded: list[str] = []
    real = crop_cache.load_crop
    monkeypatch.setattr(crop_cache, "load_crop", lambda p, *a, **k: (decoded.append(p),
                                                                      real(p, *a, **k))[1])
    again = stored_crops(images, c, logs.append)            # a later run: nothing to decode
    assert decoded == [] and again.failed == stored.failed
    import engine.dataset as dataset
    monkeypatch.setattr(dataset, "load_crop", lambda *a, **k: pytest.fail("decoded again"))
    ds = BucketDataset(images, stored=pickle.loads(pickle.dumps(again)))   # as in a worker
    sample = ds[SampleKey(1, 3, 0)]
    assert sample.image is None and sample.error == stored.failed[1]
    assert ds[SampleKey(0, 3, 0)].image is not None

    # another size of the same files (a stage, other settings) leaves the entry alone
    small = cfg(max_side=48)
    assert list(stored_crops(plan_of(tmp_path / "data", small).images, small, print).failed) \
        == [1]
    assert stored_crops(images, c, logs.append).failed == stored.failed
    assert decoded.count(str(bad)) == 1                     # once for the new size only

    make_images(tmp_path / "data", 3, seed=9)               # the file replaced: decoded
    images = plan_of(tmp_path / "data", c).images
    decoded.clear()
    fixed = stored_crops(images, c, logs.append)
    assert fixed.count == 3 and not fixed.failed and len(decoded) == 3


def test_a_file_the_system_could_not_read_this_time_is_tried_again(tmp_path, cache_dir,
                                                                   monkeypatch):
    """A locked, offline or unreadable-for-now file (an error with an errno) is not taken
    for a broken one: the next build tries it again."""
    make_images(tmp_path / "data", 2)
    c = cfg()
    images = plan_of(tmp_path / "data", c).images
    real = crop_cache.load_crop

    def locked(path, *args, **kwargs):
        if path.endswith("01.png"):
            raise PermissionError(13, "Permission denied", path)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(crop_cache, "load_crop", locked)
    first = stored_crops(images, c, print)
    assert first.count == 1 and not first.failed
    monkeypatch.setattr(crop_cache, "load_crop", real)
    assert stored_crops(images, c, print).count == 2


def test_crops_of_an_older_decoding_are_deleted_first(tmp_path, cache_dir, monkeypatch):
    """A version that decodes differently (CROPS_FORMAT) keys its crops apart: the same
    dataset's store of the older format is deleted when the new one is built, and other
    datasets' old stores go before any current one when room is needed."""
    make_images(tmp_path / "data", 2)
    make_images(tmp_path / "other", 2, seed=1)
    c = cfg()
    monkeypatch.setattr(crop_cache, "CROPS_FORMAT", crop_cache.CROPS_FORMAT - 1)
    stored_crops(plan_of(tmp_path / "data", c).images, c, lambda _: None)
    stored_crops(plan_of(tmp_path / "other", c).images, c, lambda _: None)
    old = sorted(cache_dir.iterdir())
    assert len(old) == 2
    monkeypatch.undo()
    monkeypatch.setenv("PIXELHDM_CACHE_DIR", str(tmp_path / "cache"))
    logs: list[str] = []
    stored = stored_crops(plan_of(tmp_path / "data", c).images, c, logs.append)
    assert stored.count == 2
    gone = [f for f in old if not f.exists()]
    assert len(gone) == 1 and crop_cache.store_identity(
        next(f for f in old if f.exists()))["dataset"].endswith("other")
    assert any("decoded by an older version" in m for m in logs), logs
    cache = CropCache(cache_dir, "x", lambda _: None)
    first = cache._others()[0]
    assert not first.current and first.dataset.endswith("other")   # the old store first
