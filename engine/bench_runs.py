"""The benchmarks that run the trainer (`python -m engine.bench train` and `overhead`;
see engine/bench.py's docstring): a short training run of a preset in a folder of its own,
kept with --out and otherwise a temporary folder removed afterwards."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from engine.config import RunConfig, load_preset
from engine.demo_data import DEFAULT_COUNT, write_demo_dataset
from engine.distributed import compute_precision, resolve_device
from engine.generate import GenerateError, resolve_precision
from engine.job import RunDir
from engine.perf import BareSteps, compile_status, text_width
from engine.train import AfterStep, train

# --------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------

TEMPORARY = "removed with its temporary folder (--out DIR keeps it)"


@contextmanager
def work_folder(args) -> Iterator[Path]:
    """--out, or a temporary folder removed afterwards, also when the run fails or is
    interrupted: a benchmark run with its checkpoints is about 90 MB, and repeated runs
    would otherwise pile up in the system's temporary folder."""
    if args.out:
        yield Path(args.out)
        return
    tmp = Path(tempfile.mkdtemp(prefix="pixelhdm-bench-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_steps(args) -> None:
    if args.steps < 10:
        raise GenerateError("--steps: allowed whole numbers >= 10")


def forget_temporary(report: dict, args) -> dict:
    """The report's paths that pointed into a removed temporary folder say so instead."""
    if not args.out:
        for key in ("run", "sample_grid", *(() if args.data else ("data",))):
            if key in report:
                report[key] = TEMPORARY
    return report


def bench_train(args) -> dict:
    """Train a preset for a fixed number of steps on a dataset (the built-in demo when
    none is given) and report the throughput, the loss and the final sample grid."""
    check_steps(args)
    with work_folder(args) as out:
        return forget_temporary(train_in(out, args), args)


def train_in(out: Path, args, hook: Callable[[RunConfig], AfterStep] | None = None) -> dict:
    """`bench_train`'s run inside the folder `out`; `hook(cfg)`, given the config the run
    trains, returns the trainer's `after_step`."""
    data = Path(args.data) if args.data else out / "demo-data"
    if not args.data and not data.exists():
        write_demo_dataset(data, count=args.count, seed=0)
    run = RunDir(out / "run")
    if run.root.exists():
        raise GenerateError(f"--out {out}: holds a previous benchmark run; choose an empty folder")
    # the demo images' decoded crops stay in the work folder (removed with a temporary one)
    own_data = [] if args.data else [f"data.cache_dir={(out / 'image-crops').resolve()}"]
    overrides = [f"data.path={data.resolve()}", f"train.max_steps={args.steps}",
                 "train.log_every=10", f"train.save_every={args.steps}",
                 f"train.sample_every={args.steps}", f"train.val_every={args.steps}",
                 *own_data, *args.overrides]
    if args.dtype:   # refused where the device would emulate it, as for `network`
        dtype = resolve_precision(args.dtype, resolve_device(args.device))
        overrides.append(f"train.precision={dtype}")
    cfg = load_preset(args.preset, overrides)
    run.create()
    state = train(cfg, run, device_name=args.device, after_step=hook(cfg) if hook else None)
    lines = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    windows = [r for r in lines if "images_s" in r]
    # each metric line averages the steps since the previous one; the first holds warm-up
    counts = [r["step"] - p for r, p in zip(windows, [0] + [w["step"] for w in windows])]
    timed = list(zip(windows, counts))[1:] or list(zip(windows, counts))
    seconds = sum(r["step_s"] * n for r, n in timed)
    images = sum(r["images_s"] * r["step_s"] * n for r, n in timed)
    waited = sum(r["data_wait"] * r["step_s"] * n for r, n in timed)
    val = [r["val_loss"] for r in lines if "val_loss" in r]
    status = run.read_status()
    row = {"steps": status.step, "images_s": images / max(seconds, 1e-9),
           "step_s": seconds / max(sum(n for _, n in timed), 1),
           "data_wait": waited / max(seconds, 1e-9),
           "loss_first": windows[0]["loss"], "loss_last": windows[-1]["loss"],
           "val_loss": val[-1] if val else None}
    return {"benchmark": "train", "preset": args.preset, "state": state,
            "device": status.device,
            "precision": compute_precision(cfg.train.precision, torch.device(status.device))[0],
            "data": str(data), "run": str(run.root), "sample_grid": status.last_sample,
            "rows": [row]}


TRAIN_COLUMNS: list = [
    ("steps", "steps", str), ("images_s", "images/s", lambda v: f"{v:.1f}"),
    ("step_s", "s/step", lambda v: f"{v:.4f}"),
    ("data_wait", "waiting for images", lambda v: f"{v:.1%}"),
    ("loss_first", "loss (first 10)", lambda v: f"{v:.4f}"),
    ("loss_last", "loss (last 10)", lambda v: f"{v:.4f}"),
    ("val_loss", "val loss", lambda v: "-" if v is None else f"{v:.4f}"),
]


def train_arguments(p: argparse.ArgumentParser, steps: int) -> None:
    """The arguments of a short training run (`train` and `overhead`)."""
    p.add_argument("--preset", default="tiny-cpu", help="preset name or YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value")
    p.add_argument("--steps", type=int, default=steps,
                   help=f"optimizer steps (default {steps}, at least 10)")
    p.add_argument("--data", help="dataset folder (default: the built-in demo dataset)")
    p.add_argument("--count", type=int, default=DEFAULT_COUNT, help="demo images without --data")
    p.add_argument("--out", help="folder to keep the run and its samples in (default: a "
                   "temporary folder, removed afterwards)")


def add_train(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", parents=[common],
                       help="images per second of a short training run, and its samples")
    train_arguments(p, steps=300)
    p.set_defaults(run=bench_train, tables=[("rows", "", TRAIN_COLUMNS)])


# --------------------------------------------------------------------------------------
# overhead
# --------------------------------------------------------------------------------------

def bench_overhead(args) -> dict:
    """The trainer's time per image (`train`, without samples and validation) over the
    bare network's at the same batch shapes, a bare step timed after each of the
    trainer's steps in the same process."""
    check_steps(args)
    if args.tokens < 1:
        raise GenerateError("--tokens: allowed whole numbers >= 1")
    with work_folder(args) as out:
        return forget_temporary(overhead_in(out, args), args)


def overhead_in(out: Path, args) -> dict:
    """`bench_overhead`'s measurement, its training run inside the folder `out`."""
    device = resolve_device(args.device)
    pairs: list[tuple[int, tuple, float, float]] = []   # (epoch, shapes, trainer s, bare s)
    blocks = ""

    def hook(cfg: RunConfig) -> AfterStep:
        nonlocal blocks
        blocks = compile_status(cfg, device)
        precision = compute_precision(cfg.train.precision, device)[0]   # as the trainer's
        bare = BareSteps(cfg, text_width(cfg, args), args.tokens, device, precision,
                         blocks == "compiled")

        def after_step(shapes: list[tuple[int, int, int]], seconds: float, epoch: int) -> None:
            times = [bare(s) for s in shapes]
            if None not in times:
                pairs.append((epoch, tuple(shapes), seconds, sum(times)))
        return after_step

    trained = train_in(out, argparse.Namespace(**{**vars(args), "overrides": [
        "train.sample_every=0", "train.val_every=0", *args.overrides]}), hook)
    if not pairs:
        raise GenerateError(f"--steps {args.steps}: every step met a batch shape for the "
                            "first time (a warm-up, not timed); train more steps")
    # with the crop cache off (data.disk_cache_gb=0) the first epoch decodes every image and
    # the later ones read the in-memory cache; with it, both read the stored crops
    first = min(p[0] for p in pairs)
    later = [p for p in pairs if p[0] != first]
    groups = [("all", pairs)] + ([("first", [p for p in pairs if p[0] == first]),
                                  ("later", later)] if later else [])
    rows = [{"epochs": name, **overhead_row(group)} for name, group in groups]
    by_shape: dict[tuple, list[tuple[int, tuple, float, float]]] = {}
    for p in pairs:
        by_shape.setdefault(p[1], []).append(p)
    buckets = [{"size": " + ".join(f"{w}x{h}" for _, w, h in shapes),
                "batch": "+".join(str(b) for b, _, _ in shapes),
                "trainer_step_median_s": statistics.median(p[2] for p in v),
                "bare_step_median_s": statistics.median(p[3] for p in v), **overhead_row(v)}
               for shapes, v in sorted(by_shape.items(), key=lambda kv: -len(kv[1]))]
    return {"benchmark": "overhead", "preset": args.preset, "device": trained["device"],
            "precision": trained["precision"], "blocks": blocks, "text_tokens": args.tokens,
            "data": trained["data"], "run": trained["run"], "rows": rows, "buckets": buckets}


def overhead_row(pairs: list[tuple[int, tuple, float, float]]) -> dict:
    """Steps, seconds per step, images/s and their ratio of (epoch, the step's shapes,
    trainer seconds, bare seconds) pairs."""
    trainer_s, bare_s = sum(p[2] for p in pairs), sum(p[3] for p in pairs)
    images = sum(b for p in pairs for b, _, _ in p[1])
    return {"steps": len(pairs), "trainer_step_s": trainer_s / len(pairs),
            "trainer_images_s": images / trainer_s, "bare_step_s": bare_s / len(pairs),
            "bare_images_s": images / bare_s, "overhead": trainer_s / bare_s}


OVERHEAD_COLUMNS: list = [
    ("epochs", "epochs", str), ("steps", "timed steps", str),
    ("trainer_step_s", "trainer s/step", lambda v: f"{v:.4f}"),
    ("trainer_images_s", "trainer img/s", lambda v: f"{v:.1f}"),
    ("bare_step_s", "bare s/step", lambda v: f"{v:.4f}"),
    ("bare_images_s", "bare img/s", lambda v: f"{v:.1f}"),
    ("overhead", "trainer / bare (s per image)", lambda v: f"{v:.2f}x"),
]
BUCKET_COLUMNS: list = [
    ("size", "size", str), ("batch", "batch", str), ("steps", "timed steps", str),
    ("trainer_step_median_s", "trainer s/step (median)", lambda v: f"{v:.4f}"),
    ("bare_step_median_s", "bare s/step (median)", lambda v: f"{v:.4f}"),
    ("overhead", "trainer / bare", lambda v: f"{v:.2f}x"),
]


def add_overhead(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("overhead", parents=[common],
                       help="full trainer step time over the bare network step time")
    train_arguments(p, steps=60)
    p.add_argument("--tokens", type=int, default=12,
                   help="text tokens per image of the bare steps (default 12: a demo caption)")
    p.add_argument("--text-dim", type=int, default=1024,
                   help="width of the random text tokens for a Qwen3 preset (default 1024)")
    p.set_defaults(run=bench_overhead, tables=[("rows", "", OVERHEAD_COLUMNS),
                                               ("buckets", "by batch shape",
                                                BUCKET_COLUMNS)])
