"""Benchmarks, one subcommand each.

    python -m engine.bench sample --preset tiny-cpu --sizes 32x32,64x64 --steps 20
    python -m engine.bench sample --checkpoint workspace/runs/RUN --json
    python -m engine.bench train --preset tiny-cpu --steps 300
    python -m engine.bench network --preset tiny-cpu --sizes 64x64,32x32 [--profile]
    python -m engine.bench overhead --preset tiny-cpu
    python -m engine.bench data --data DIR [--preset home-12gb]
    python -m engine.bench gpu [--quick]
    python -m engine.bench quality --checkpoint RUN [--data DIR] [--prompts wide]
                                   [--n 4 --seeds 4 --steps 10]

`sample` times the sampling core of training samples and the Generate tab
(engine.generate.render): seconds per image per sampler and size, the best of a few
repeats after a warm-up, text encoded once before timing. Without a checkpoint the
network is random from the preset (a frozen Qwen3 gets random tokens of its width).

`train` (engine/bench_runs.py) trains a preset (tiny-cpu by default) for fixed steps on
the demo dataset (or --data): images per second (warm-up excluded), first and last loss,
validation loss and the final sample grid, which shows whether the shapes follow their
prompts (kept with --out DIR; the default temporary folder is removed afterwards).

`network` measures the bare network (engine/perf.py): analytic forward FLOPs per image
by part (engine/flops.py), images and tokens per second of a training step and of an
inference forward pass, achieved FLOP/s and their share of a large matmul's rate on the
same device, peak memory, and seconds per FLOP relative to a plain single-path
transformer of the same width and depth (engine/baseline.py) timed in the same loop;
--profile adds each part's share of a training step and its top operators (the quickest
of three profiles, as system noise lands on whichever operators run at the time).

`overhead` runs `train` (no samples or validation) and times a bare network step of
the same batch shape after each of its steps, in the same process: the ratio is what the
trainer adds (data, text encoder, extra losses, clipping, EMA), over all steps and, when
the run crosses an epoch, over the first epoch and the later ones (which differ when the
crop cache is off, `--set data.disk_cache_gb=0`: the first epoch then decodes every image).

`data` (engine/bench_data.py) times one loader process feeding a dataset's training crops:
decoding the image files against reading the decoded-crop cache, and building that cache.

`gpu` (CUDA only, minutes): the attention kernel that runs, bf16 MFU of pixelhdm-default
at 256/512 px, home presets' memory at their largest bucket, Heun-50 + CFG s per 512 px.

`quality` (engine/quality_cli.py; the measures are in engine/evaluate.py) compares a
checkpoint's images with real ones, with any sampling settings.

A subcommand is a function `add_<name>(subparsers, common)` listed in COMMANDS: it adds
its parser (with `common`'s --device, --dtype and --json) and sets `run` (args -> a
report dict) and `tables` ((report key, title, columns) of each table to print; the
other keys are printed as one header line). A report with "errors" exits with 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Callable

import torch

from engine.attention import flash_attn_func
from engine.bench_data import add_data
from engine.bench_runs import add_overhead, add_train
from engine.checkpoint import CheckpointError
from engine.config import ConfigError, load_preset, parse_wxh
from engine.data import DataError
from engine.distributed import (
    PRECISIONS,
    DeviceError,
    compute_precision,
    release_memory,
    resolve_device,
)
from engine.encoders import BuiltinTextEncoder, EncoderLoadError
from engine.evaluate import EvaluateError
from engine.fileio import readable_output
from engine.flops import PARTS
from engine.generate import (
    GenerateError,
    Pipeline,
    check_size,
    config_render_options,
    for_inference,
    max_side,
    render,
    resolve_precision,
)
from engine.generate_cli import OneLineParser
from engine.model import PixelHDM, TextCond
from engine.perf import (
    attention_kernels,
    dense_peak,
    measure_network,
    peak_memory_mib,
    preset_memory,
    text_width,
    timed,
)
from engine.quality_cli import add_quality
from engine.sampling import SAMPLERS, model_evals
from engine.train import TrainError

# (key, header, format) of a printed table column
Column = tuple[str, str, Callable[[object], str]]


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'32x32,64x48' -> [(32, 32), (64, 48)] as (width, height)."""
    sizes = []
    for item in text.split(","):
        try:
            w, h = parse_wxh(item.strip())
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
        return TextCond(row.expand(n, -1, -1), mask, row[:, -1].expand(n, -1), dense=True)
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
        net = for_inference(PixelHDM(cfg.model, text_dim).to(device), device, precision)
        source = f"preset {args.preset}, random weights"
    if getattr(args, "fp32_weights", False):   # as before for_inference: to compare
        net.matmul_weights_to(torch.float32)
    weights = str(net.patch_in.weight.dtype).removeprefix("torch.")
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
                       steps=n_steps, amp_dtype=amp,
                       **{**config_render_options(cfg, w, h), "sampler": sampler})
            # a warm-up (kernels, allocator, autotuning), then the peak of two steps: each
            # step holds the same
            peak = peak_memory_mib(lambda: run(min(steps, 2)), device)
            best = min(timed(lambda: run(steps), device) for _ in range(args.repeats))
            rows.append({"sampler": sampler, "size": f"{w}x{h}", "steps": steps,
                         "model_evals": model_evals(sampler, steps), "batch": args.batch,
                         "weights": weights, "seconds_per_image": best / args.batch,
                         "peak_mib": peak})
    params = sum(p.numel() for p in net.parameters())
    return {"benchmark": "sample", "model": source, "parameters": params,
            "device": str(device), "precision": precision, "cfg": s.cfg, "rows": rows}


SAMPLE_COLUMNS: list[Column] = [
    ("sampler", "sampler", str), ("size", "size", str), ("steps", "steps", str),
    ("model_evals", "evals", str), ("batch", "batch", str), ("weights", "weights", str),
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
    p.add_argument("--fp32-weights", action="store_true",
                   help="keep the matmul weights in fp32 under bf16/fp16 autocast on a GPU "
                        "(cast at every step, as before they were stored in the compute "
                        "dtype): to compare")
    p.set_defaults(run=bench_sample, tables=[("rows", "", SAMPLE_COLUMNS)])


# --------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------

def si(v: float | None, unit: str = "") -> str:
    """3 significant digits with an SI prefix: 4.25e12 -> '4.25 T'."""
    if v is None:
        return "-"
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}".rstrip()


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.3g}%"


def num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"



def device_info(device: torch.device) -> dict:
    info = {"device": str(device)}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def bench_network(args) -> dict:
    cfg = load_preset(args.preset, args.overrides)
    device = resolve_device(args.device)
    precision = resolve_precision(args.dtype, device)
    sizes = parse_sizes(args.sizes) if args.sizes else [cfg.sample_size()]
    for w, h in sizes:
        check_size(w, h, cfg.model.patch_size)
    batch = args.batch or cfg.train.batch_size
    if min(batch, args.steps, args.tokens) < 1:
        raise GenerateError("--batch, --steps and --tokens: allowed whole numbers >= 1")
    result = measure_network(cfg, text_width(cfg, args), sizes, batch, args.tokens, args.steps,
                             device, precision, profile_steps=2 if args.profile else 0)
    return {"benchmark": "network", "preset": args.preset, **device_info(device),
            "precision": precision, "grad_checkpointing": cfg.train.grad_checkpointing,
            "blocks": result["blocks"], "prediction": cfg.model.prediction,
            "text_dim": text_width(cfg, args),
            "parameters": result["parameters"],
            "baseline_parameters": result["baseline_parameters"], "rows": result["rows"],
            "flops": result["flops"], "profile": result["profile"]}


NETWORK_COLUMNS: list[Column] = [
    ("size", "size", str), ("batch", "batch", str),
    ("gflop_image", "GFLOP/img", lambda v: f"{v:.4g}"),
    ("train_images_s", "train img/s", num), ("train_tokens_s", "train tok/s", num),
    ("train_flops_s", "train FLOP/s", si), ("train_util", "util", pct),
    ("train_vs_baseline", "s/FLOP vs base", lambda v: f"{v:.2f}x"),
    ("infer_images_s", "infer img/s", num), ("infer_tokens_s", "infer tok/s", num),
    ("infer_flops_s", "infer FLOP/s", si), ("infer_util", "util", pct),
    ("infer_vs_baseline", "s/FLOP vs base", lambda v: f"{v:.2f}x"),
    ("matmul_peak_flops", "matmul peak", si), ("peak_mib", "peak MiB", num),
]
FLOP_COLUMNS: list[Column] = [("size", "size", str), ("network", "network", str)] + [
    (part, part, si) for part in (*PARTS, "total")]
PROFILE_COLUMNS: list[Column] = [
    ("size", "size", str), ("part", "part", str), ("share", "share", pct),
    ("ms_per_step", "ms/step", lambda v: f"{v:.1f}"),
    ("top_ops", "top ops (share of the part)",
     lambda ops: ", ".join(f"{o['op']} {o['share']:.0%}" for o in ops)),
]


def add_network(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("network", parents=[common],
                       help="FLOPs, throughput and utilisation of the bare network")
    p.add_argument("--preset", default="tiny-cpu", help="preset name or YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value, e.g. model.size=small")
    p.add_argument("--sizes", help="WIDTHxHEIGHT list, e.g. 64x64,32x32 (default: the sample size)")
    p.add_argument("--batch", type=int, default=0,
                   help="images per step (default: train.batch_size)")
    p.add_argument("--tokens", type=int, default=32, help="text tokens per image (default 32)")
    p.add_argument("--text-dim", type=int, default=1024,
                   help="width of the random text tokens for a Qwen3 preset (default 1024)")
    p.add_argument("--steps", type=int, default=5,
                   help="timed steps per measurement after a warm-up; the median counts")
    p.add_argument("--profile", action="store_true",
                   help="also profile two training steps: each part's share and top operators")
    p.set_defaults(run=bench_network, tables=[("rows", "throughput", NETWORK_COLUMNS),
                                              ("flops", "forward FLOPs per image", FLOP_COLUMNS),
                                              ("profile", "where a training step's time goes",
                                               PROFILE_COLUMNS)])


# --------------------------------------------------------------------------------------
# gpu
# --------------------------------------------------------------------------------------

# home presets and the GPU memory (GiB) each is meant for
GPU_MEMORY = (("home-8gb", 8), ("home-12gb", 12), ("home-24gb", 24))


def bench_gpu(args) -> dict:
    """Attention kernels, bf16 training MFU, the home presets' memory and Heun-50 + CFG
    sampling on one CUDA GPU; a part that fails is reported and the others still run."""
    device = resolve_device(args.device)
    if device.type != "cuda":
        raise DeviceError(f"gpu needs a CUDA GPU and PyTorch {torch.__version__} sees none "
                          f"here; run it on a machine with an NVIDIA GPU")
    name = torch.cuda.get_device_name(device)
    peak = dense_peak(name)
    steps, repeats = (3, 1) if args.quick else (10, 3)
    default = load_preset("pixelhdm-default")
    # bf16, or fp16 on a GPU older than Ampere, which has no bf16 arithmetic (its only
    # attention kernel, the memory-efficient one, takes no bf16 there either)
    precision = compute_precision("bf16", device)[0]
    report = {"benchmark": "gpu", "device": str(device), "device_name": name,
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "date": datetime.now().astimezone().isoformat(timespec="seconds"),
              "quick": args.quick, "precision": precision,
              "flash_attn": flash_attn_func is not None,
              "dense_bf16_peak": peak, "errors": []}

    def part(key: str, measure: Callable[[], list[dict]]) -> None:
        try:
            report[key] = measure()
        except Exception as e:  # one failed measurement must not hide the others
            report[key] = []
            report["errors"].append(f"{key}: {type(e).__name__}: {' '.join(str(e).split())}")
        release_memory(device)

    def throughput() -> list[dict]:
        rows = measure_network(default, 1024, [(256, 256), (512, 512)],
                               default.train.batch_size, 64, steps, device, precision)["rows"]
        for row in rows:
            row["mfu"] = row["train_flops_s"] / peak if peak else None
        return rows

    sample_args = argparse.Namespace(
        checkpoint=None, preset="pixelhdm-default", overrides=[], device=str(device),
        dtype=precision, sizes="512x512", steps=50, samplers="heun", batch=1, repeats=repeats,
        text_dim=1024, tokens=64)
    # the weights stored in the compute dtype (as generation runs), then in fp32 to compare
    fp32_args = argparse.Namespace(**{**vars(sample_args), "fp32_weights": True})
    part("kernels", lambda: attention_kernels(default, 512, 512, 64, 2, device, precision))
    part("throughput", throughput)
    part("memory", lambda: [preset_memory(name, load_preset(name), gib, device)
                            for name, gib in GPU_MEMORY])
    part("sampling", lambda: bench_sample(sample_args)["rows"]
         + bench_sample(fp32_args)["rows"])
    return report


def gib(v: float | None) -> str:
    return "OOM" if v is None else f"{v:.2f}"


KERNEL_COLUMNS: list[Column] = [
    ("call", "call", str), ("seq", "tokens", str), ("backend", "model.attention", str),
    ("kernel", "kernel", str), ("top_kernels", "top kernels by GPU time",
                                lambda names: "; ".join(n[:60] for n in names)),
]
GPU_THROUGHPUT_COLUMNS: list[Column] = [
    ("size", "size", str), ("batch", "batch", str), ("train_images_s", "train img/s", num),
    ("train_tokens_s", "train tok/s", num), ("train_flops_s", "train FLOP/s", si),
    ("mfu", "MFU (data sheet)", lambda v: "unknown" if v is None else pct(v)),
    ("train_util", "MFU (matmul peak)", pct),
    ("matmul_peak_flops", "matmul peak", si),
    ("train_vs_baseline", "s/FLOP vs base", lambda v: f"{v:.2f}x"),
    ("peak_mib", "peak MiB", num),
]
MEMORY_COLUMNS: list[Column] = [
    ("preset", "preset", str), ("size", "size", str), ("batch", "batch", str),
    ("grad_checkpointing", "grad ckpt", str), ("precision", "precision", str),
    ("step_peak_gib", "step peak GiB", gib),
    ("with_ema_gib", "+ EMA GiB", gib),
    ("reserved_gib", "reserved + EMA GiB", gib),
    ("budget_gib", "budget GiB (90%)", lambda v: f"{v:.1f}"),
    ("fits", "fits", lambda v: "yes" if v else "NO"),
]


def add_gpu(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("gpu", parents=[common],
                       help="attention kernels, MFU, preset memory and sampling on a CUDA GPU")
    p.add_argument("--quick", action="store_true", help="fewer timed steps and repeats")
    p.set_defaults(run=bench_gpu, tables=[
        ("kernels", "attention kernels (512x512, 64 text tokens)", KERNEL_COLUMNS),
        ("throughput", "pixelhdm-default training", GPU_THROUGHPUT_COLUMNS),
        ("memory", "training step memory of the home presets at their largest bucket "
         "(eager blocks)", MEMORY_COLUMNS),
        ("sampling", "Heun-50 + CFG, pixelhdm-default, random weights", SAMPLE_COLUMNS)])


COMMANDS = (add_sample, add_train, add_network, add_overhead, add_data, add_gpu, add_quality)


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
    readable_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = args.run(args)
    except (GenerateError, ConfigError, CheckpointError, EncoderLoadError, DeviceError,
            TrainError, EvaluateError, DataError) as e:
        print(f"{parser.prog} {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        keys = {key for key, _, _ in args.tables}
        head = {k: v for k, v in report.items() if k not in keys}
        print(", ".join(f"{k}: {v}" for k, v in head.items()))
        for key, title, columns in args.tables:
            if report.get(key):
                if title:
                    print(f"\n{title}")
                print(format_table(report[key], columns))
    return 1 if report.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
