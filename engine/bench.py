"""Benchmarks, one subcommand each.

    python -m engine.bench sample --preset tiny-cpu --sizes 32x32,64x64 --steps 20
    python -m engine.bench sample --checkpoint workspace/runs/RUN --json
    python -m engine.bench train --preset tiny-cpu --steps 300

`sample` times the sampling core that training samples and the Generate tab share
(engine.generate.render): seconds per image for each sampler at each size, the minimum
over a few repeats after a warm-up run. Text is encoded once before timing (a
generation request encodes its prompts once, whatever the step count). Without a
checkpoint the network is randomly initialised from the preset; a preset whose text
encoder is a frozen Qwen3 then gets random text tokens of the encoder's width, so
nothing is downloaded.

`train` trains a preset (tiny-cpu by default) for a fixed number of steps on the
built-in demo dataset (or --data) and reports images per second (warm-up excluded), the
loss at the start and the end, the validation loss, and the path of the final sample
grid, which shows whether the shapes follow their prompts.

A subcommand is a function `add_<name>(subparsers, common)` listed in COMMANDS: it adds
its parser (with `common`'s --device, --dtype and --json) and sets `run` (args -> a
report dict whose "rows" are printed) and `columns` (how to print the rows).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from engine.checkpoint import CheckpointError
from engine.config import ConfigError, load_preset
from engine.demo_data import write_demo_dataset
from engine.distributed import DeviceError, resolve_device
from engine.encoders import BuiltinTextEncoder, EncoderLoadError
from engine.generate import (
    GenerateError,
    OneLineParser,
    Pipeline,
    check_size,
    max_side,
    render,
    resolve_precision,
)
from engine.job import RunDir
from engine.model import PRECISIONS, PixelHDM, TextCond
from engine.sampling import SAMPLERS, model_evals, sample_shift
from engine.train import TrainError, train

# (key, header, format) of a printed table column
Column = tuple[str, str, Callable[[object], str]]


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'32x32,64x48' -> [(32, 32), (64, 48)] as (width, height)."""
    sizes = []
    for item in text.split(","):
        try:
            w, h = (int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            raise GenerateError(f"--sizes: '{item}' is not WIDTHxHEIGHT (e.g. 64x64)") from None
        sizes.append((w, h))
    return sizes


def parse_samplers(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    for s in names:
        if s not in SAMPLERS:
            raise GenerateError(f"--samplers: unknown sampler '{s}' (allowed: "
                                f"{', '.join(SAMPLERS)})")
    return names


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of fn(), with the GPU's queue drained on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def memoized(encode: Callable[[list[str]], TextCond]) -> Callable[[list[str]], TextCond]:
    """encode() computed once per prompt list, so timings hold sampling only."""
    cache: dict[tuple[str, ...], TextCond] = {}

    def cached(prompts: list[str]) -> TextCond:
        key = tuple(prompts)
        if key not in cache:
            with torch.no_grad():
                cache[key] = encode(list(prompts))
        return cache[key]
    return cached


def random_text(dim: int, tokens: int, device: torch.device) -> Callable[[list[str]], TextCond]:
    """Stand-in conditioning: `tokens` random tokens of width `dim` for every prompt."""
    gen = torch.Generator().manual_seed(0)
    row = torch.randn(1, tokens, dim, generator=gen).to(device)

    def encode(prompts: list[str]) -> TextCond:
        n = len(prompts)
        mask = torch.ones(n, tokens, dtype=torch.bool, device=device)
        return TextCond(row.expand(n, -1, -1), mask, row[:, -1].expand(n, -1))
    return encode


# --------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------

def bench_sample(args) -> dict:
    if args.checkpoint:
        pipe = Pipeline.load(args.checkpoint, ema=True, device=args.device, dtype=args.dtype)
        cfg, net, device, precision = pipe.cfg, pipe.net, pipe.device, pipe.precision
        encode, source = pipe.encode, f"{pipe.path} (step {pipe.step})"
    else:
        if not args.preset:
            raise GenerateError("give --preset NAME (random weights) or --checkpoint PATH")
        cfg = load_preset(args.preset, args.overrides)
        device = resolve_device(args.device)
        precision = resolve_precision(args.dtype, device)
        torch.manual_seed(0)
        if cfg.text.encoder == "builtin":
            enc = BuiltinTextEncoder(cfg.text).to(device).eval()
            encode, text_dim = enc.encode, enc.dim
        else:
            encode, text_dim = random_text(args.text_dim, args.tokens, device), args.text_dim
        net = PixelHDM(cfg.model, text_dim).to(device).eval().requires_grad_(False)
        source = f"preset {args.preset}, random weights"
    encode = memoized(encode)
    steps = args.steps or cfg.sample.steps
    sizes = parse_sizes(args.sizes) if args.sizes else [cfg.sample_size()]
    samplers = parse_samplers(args.samplers)
    for w, h in sizes:
        check_size(w, h, cfg.model.patch_size, max_side(cfg))
    if args.batch < 1 or args.repeats < 1:
        raise GenerateError("--batch and --repeats: allowed whole numbers >= 1")
    s = cfg.sample
    prompts = [s.prompts[0]] * args.batch
    amp = PRECISIONS[precision]
    rows = []
    for w, h in sizes:
        for sampler in samplers:
            def run(n_steps: int) -> None:
                render(net, encode, prompts, s.negative, list(range(args.batch)), w, h,
                       steps=n_steps, sampler=sampler, cfg=s.cfg, rescale=s.cfg_rescale,
                       interval=tuple(s.cfg_interval), shift=sample_shift(cfg, w, h),
                       amp_dtype=amp)
            run(min(steps, 2))  # warm-up: kernels, allocator, autotuning
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            best = min(timed(lambda: run(steps), device) for _ in range(args.repeats))
            peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                    else None)
            rows.append({"sampler": sampler, "size": f"{w}x{h}", "steps": steps,
                         "model_evals": model_evals(sampler, steps), "batch": args.batch,
                         "seconds_per_image": best / args.batch, "peak_mib": peak})
    params = sum(p.numel() for p in net.parameters())
    return {"benchmark": "sample", "model": source, "parameters": params,
            "device": str(device), "precision": precision, "cfg": s.cfg, "rows": rows}


SAMPLE_COLUMNS: list[Column] = [
    ("sampler", "sampler", str), ("size", "size", str), ("steps", "steps", str),
    ("model_evals", "evals", str), ("batch", "batch", str),
    ("seconds_per_image", "s/image", lambda v: f"{v:.4f}"),
    ("peak_mib", "peak MiB", lambda v: "-" if v is None else f"{v:.0f}"),
]


def add_sample(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sample", parents=[common],
                       help="seconds per image of each sampler at each size")
    p.add_argument("--preset", help="preset name or YAML file (random weights)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value, e.g. model.size=small")
    p.add_argument("--checkpoint", help="a checkpoint file or run folder instead of a preset")
    p.add_argument("--sizes", help="WIDTHxHEIGHT list, e.g. 32x32,64x64 (default: the sample size)")
    p.add_argument("--steps", type=int, default=0, help="sampler steps (default: sample.steps)")
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated samplers")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest counts")
    p.add_argument("--text-dim", type=int, default=1024,
                   help="width of the random text tokens for a Qwen3 preset without checkpoint")
    p.add_argument("--tokens", type=int, default=32,
                   help="number of random text tokens for a Qwen3 preset without checkpoint")
    p.set_defaults(run=bench_sample, columns=SAMPLE_COLUMNS)


# --------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------

def bench_train(args) -> dict:
    """Train a preset for a fixed number of steps on a dataset (the built-in demo when
    none is given) and report the throughput, the loss and the final sample grid."""
    if args.steps < 10:
        raise GenerateError("--steps: allowed whole numbers >= 10")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="pixelhdm-bench-"))
    data = Path(args.data) if args.data else out / "demo-data"
    if not args.data and not data.exists():
        write_demo_dataset(data, count=args.count, seed=0)
    run = RunDir(out / "run")
    if run.root.exists():
        raise GenerateError(f"--out {out}: holds a previous benchmark run; choose an empty folder")
    overrides = [f"data.path={data.resolve()}", f"train.max_steps={args.steps}",
                 "train.log_every=10", f"train.save_every={args.steps}",
                 f"train.sample_every={args.steps}", f"train.val_every={args.steps}",
                 *args.overrides]
    if args.dtype:
        overrides.append(f"train.precision={args.dtype}")
    cfg = load_preset(args.preset, overrides)
    run.create()
    state = train(cfg, run, device_name=args.device)
    lines = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    windows = [r for r in lines if "images_s" in r]
    # each metric line averages the steps since the previous one; the first holds warm-up
    counts = [r["step"] - p for r, p in zip(windows, [0] + [w["step"] for w in windows])]
    timed = list(zip(windows, counts))[1:] or list(zip(windows, counts))
    seconds = sum(r["step_s"] * n for r, n in timed)
    images = sum(r["images_s"] * r["step_s"] * n for r, n in timed)
    val = [r["val_loss"] for r in lines if "val_loss" in r]
    status = run.read_status()
    row = {"steps": status.step, "images_s": images / max(seconds, 1e-9),
           "step_s": seconds / max(sum(n for _, n in timed), 1),
           "loss_first": windows[0]["loss"], "loss_last": windows[-1]["loss"],
           "val_loss": val[-1] if val else None}
    return {"benchmark": "train", "preset": args.preset, "state": state,
            "device": status.device, "precision": cfg.train.precision,
            "data": str(data), "run": str(run.root), "sample_grid": status.last_sample,
            "rows": [row]}


TRAIN_COLUMNS: list[Column] = [
    ("steps", "steps", str), ("images_s", "images/s", lambda v: f"{v:.1f}"),
    ("step_s", "s/step", lambda v: f"{v:.4f}"),
    ("loss_first", "loss (first 10)", lambda v: f"{v:.4f}"),
    ("loss_last", "loss (last 10)", lambda v: f"{v:.4f}"),
    ("val_loss", "val loss", lambda v: "-" if v is None else f"{v:.4f}"),
]


def add_train(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", parents=[common],
                       help="images per second of a short training run, and its samples")
    p.add_argument("--preset", default="tiny-cpu", help="preset name or YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--data", help="dataset folder (default: the built-in demo dataset)")
    p.add_argument("--count", type=int, default=600, help="demo images when --data is not given")
    p.add_argument("--out", help="folder for the run (default: a new temporary folder)")
    p.set_defaults(run=bench_train, columns=TRAIN_COLUMNS)


COMMANDS = (add_sample, add_train)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

def format_table(rows: list[dict], columns: list[Column]) -> str:
    cells = [[header for _, header, _ in columns]]
    cells += [[fmt(row[key]) for key, _, fmt in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m engine.bench", description="PixelHDM benchmarks")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    common.add_argument("--dtype", choices=list(PRECISIONS),
                        help="autocast precision (default: bf16 on a GPU, fp32 on the CPU)")
    common.add_argument("--json", action="store_true", help="print the report as JSON")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = args.run(args)
    except (GenerateError, ConfigError, CheckpointError, EncoderLoadError, DeviceError,
            TrainError) as e:
        print(f"{parser.prog} {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        head = {k: v for k, v in report.items() if k != "rows"}
        print(", ".join(f"{k}: {v}" for k, v in head.items()))
        print(format_table(report["rows"], args.columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
