"""`python -m engine.bench data --data DIR [--preset P]`: what feeding a dataset's images
costs one loader process, decoding the files (what each epoch did before the crop cache,
and what random crops always do) against reading the decoded-crop cache
(engine/crop_cache.py), with the time to build that cache. Timed on the first --images
training images of the preset's plan, in a temporary cache folder: the user's own cache
is neither read nor changed."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from engine.buckets import plan_buckets
from engine.config import ConfigError, load_preset
from engine.crop_cache import CropCache, crop_keys, dataset_name
from engine.data import scan_dataset
from engine.dataset import BucketDataset


def _seconds_for_all(ds: BucketDataset, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        ds[i]
    return time.perf_counter() - start


def bench_data(args) -> dict:
    cfg = load_preset(args.preset, [f"data.path={args.data}", *args.overrides])
    c = cfg.data
    scan = scan_dataset(args.data, c)
    plan = plan_buckets(scan.records, c, cfg.model.patch_size, cfg.train.batch_size)
    images = plan.images[:args.images]
    if not images:
        raise ConfigError(f"--data {args.data}: no trainable images (`python -m engine.data "
                          f"report {args.data}` says why)")
    n = len(images)
    sizes = sorted({f"{w}x{h}" for w, h in (im.bucket for im in images)})
    with tempfile.TemporaryDirectory(prefix="pixelhdm-bench-crops-") as tmp:
        decoded = _seconds_for_all(BucketDataset(images), n)      # no cache: decode each time
        cache = CropCache(Path(tmp), dataset_name(images), log=lambda _: None)
        keys = crop_keys(images)
        start = time.perf_counter()
        stored_n = cache.add(images, keys, cap_bytes=2**62, workers=0)
        built = time.perf_counter() - start
        ds = BucketDataset(images, stored=cache.stored(images, keys))
        _seconds_for_all(ds, n)                                    # opens the shards
        read = _seconds_for_all(ds, n)
        stored_bytes = sum(s["bytes"] for s in cache._read_index()["shards"])

    def row(source: str, seconds: float) -> dict:
        return {"source": source, "ms_per_image": 1000 * seconds / n, "images_s": n / seconds}

    return {"benchmark": "data", "data": str(args.data), "images": n, "stored": stored_n,
            "sizes": ", ".join(sizes), "stored_mb": round(stored_bytes / 2**20, 1),
            "read_speedup": round(decoded / max(read, 1e-9), 1),
            "rows": [row("decoding the files", decoded), row("building the crop cache", built),
                     row("reading the crop cache", read)]}


DATA_COLUMNS = [
    ("source", "one loader process", str),
    ("ms_per_image", "ms/image", lambda v: f"{v:.3f}"),
    ("images_s", "images/s", lambda v: f"{v:.0f}"),
]


def add_data(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("data", parents=[common],
                       help="images/s of one loader process: decoding vs the crop cache")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--preset", default="tiny-cpu", help="preset name or YAML file (its buckets)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value, e.g. data.max_side=512")
    p.add_argument("--images", type=int, default=200, help="training images timed")
    p.set_defaults(run=bench_data, tables=[("rows", "", DATA_COLUMNS)])
