"""The dataset report: what bucketing makes of a scanned folder, and the `python -m
engine.data demo | report | cache` command line. It sits above engine.data (scanning,
health) and engine.buckets (planning), which both stay free of each other's report needs.

    python -m engine.data demo --out DIR [--count N] [--seed N] [--kind shapes|bands]
    python -m engine.data report DIR --preset P [--set k=v] [--gpus N] [--deep] [--json]
    python -m engine.data cache DIR --preset P [--set k=v] [--workers N]

`cache` decodes a dataset's training crops into the crop cache (engine/crop_cache.py) ahead
of training, every progressive-resolution stage's, with every core: what a run would
otherwise do before its first step and at each stage's start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace

from engine.buckets import BucketPlan, format_plan, plan_buckets, stage_plans
from engine.config import ConfigError, RunConfig, load_preset
from engine.crop_cache import cache_status, stored_crops
from engine.data import DataError, HealthReport, Scan, health_report, scan_dataset
from engine.demo_data import DEFAULT_COUNT, DEMO_KINDS, write_demo_dataset
from engine.fileio import readable_output
from engine.stages import resolution_stages, stage_text


def why_nothing_trains(scan: Scan, plan: BucketPlan) -> str:
    """'' when the plan trains at least one batch an epoch, else why not and what to do."""
    if plan.batches_per_epoch > 0:
        return ""
    if plan.images:
        return (f"no bucket of '{scan.root}' fills a batch of {plan.batch_size} and "
                f"data.drop_last is on: lower train.batch_size or set data.drop_last off")
    counts: dict[str, set[str]] = {}
    for p in scan.problems:
        if p.severity == "error":
            counts.setdefault(p.kind.replace("_", " "), set()).update(p.files)
    files = len(set().union(*counts.values())) if counts else len(scan.records)
    why = ", ".join(f"{len(v)} {k}" for k, v in sorted(counts.items()))
    return (f"none of the {files} image file(s) in '{scan.root}' can be trained ({why}): "
            f"fix or replace the files its health report lists (`python -m engine.data "
            f"report '{scan.root}' --preset <preset>`)")


def token_counter(cfg: RunConfig) -> tuple[Callable[[list[str]], list[int]], str]:
    """The text encoder's own count where it is available offline, else an estimate that
    says so."""
    if cfg.text.encoder == "builtin":
        from engine.encoders import BuiltinTextEncoder
        return BuiltinTextEncoder(cfg.text).count_tokens, "the builtin encoder's words"
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(cfg.text.name_or_path, local_files_only=True)
    except Exception:  # any failure to load it falls back to the labelled estimate
        return (lambda caps: [len(c.split()) for c in caps],
                f"whitespace-separated words (an estimate: the tokenizer of "
                f"'{cfg.text.name_or_path}' is not available offline)")
    return (lambda caps: [len(ids) for ids in tok(caps, add_special_tokens=False)["input_ids"]],
            f"the tokenizer of '{cfg.text.name_or_path}'")


def stage_lines(plan: BucketPlan, cfg: RunConfig) -> list[str]:
    """What each progressive-resolution stage (data.stages) trains: its steps, its buckets
    and its image tokens per sample against the full plan's ([] without stages)."""
    stages = resolution_stages(cfg.data.stages, cfg.data.max_side, plan.patch_size)
    if len(stages) == 1 or not plan.images:
        return []
    full = plan.tokens_per_sample
    lines = []
    for k, p in enumerate(stage_plans(plan, cfg.data, stages)):
        used = [f"{b.size[0]}x{b.size[1]}" for b in p.buckets if b.samples]
        lines.append(f"{'Stages' if k == 0 else '':10}{stage_text(stages, k)}: "
                     f"{p.tokens_per_sample:.1f} image tokens per sample "
                     f"({p.tokens_per_sample / full:.2f}x), buckets {', '.join(used)}")
    return lines


def format_report(scan: Scan, plan: BucketPlan, health: HealthReport, title: str,
                  max_files: int = 8, stages: Sequence[str] = ()) -> str:
    """The human-readable report printed by `python -m engine.data report`."""
    mb = sum(r.file_size for r in scan.records) / 1e6
    lines = [f"Dataset   {scan.root}",
             f"          {len(scan.records)} images ({mb:.1f} MB), "
             f"{sum(r.caption is not None for r in scan.records)} with captions, "
             f"scanned in {scan.seconds:.2f} s",
             f"Settings  {title}", ""]
    found = scan.conventions.lines()
    lines += [f"{'Found' if i == 0 else '':10}{line}" for i, line in enumerate(found)]
    lines += [""] if found else []
    if health.problems:
        lines.append(f"Problems  ({health.errors} file(s) not trained, {health.warnings} to check)")
        for p in health.problems:
            lines.append(f"  {p.severity.upper():7} {p.kind}: {len(p.files)} file(s), {p.message}")
            for rel, note in list(p.files.items())[:max_files]:
                lines.append(f"            {rel}: {note}")
            if len(p.files) > max_files:
                lines.append(f"            ... and {len(p.files) - max_files} more "
                             f"(--json lists all)")
    else:
        lines.append("Problems  none")
    lines += ["", *format_plan(plan), *stages]
    if health.tokens is not None:
        t = health.tokens
        limit = f", limit {t.max_tokens}: {t.over} over" if t.max_tokens is not None else ""
        lines.append(f"Captions  length in {t.counter}: min {t.min}, mean {t.mean:.1f}, "
                     f"95% {t.p95}, max {t.max}{limit}")
    lines += [f"Warning   {w}" for w in plan.warnings]
    if why := why_nothing_trains(scan, plan):
        lines.append(f"Cannot train: {why}")
    return "\n".join(lines)


def _report(args) -> int:
    cfg = load_preset(args.preset, args.set or ())
    scan = scan_dataset(args.dir, cfg.data)
    plan = plan_buckets(scan.records, cfg.data, cfg.model.patch_size, cfg.train.batch_size,
                        args.gpus, cfg.train.grad_accum)
    counter, counter_name = token_counter(cfg)
    health = health_report(scan, count_tokens=counter, max_tokens=cfg.text.max_tokens,
                           counter_name=counter_name, deep=args.deep)
    if args.json:
        print(json.dumps({"scan": scan.to_dict(), "plan": plan.to_dict(),
                          "health": health.to_dict()}, indent=1))
        return 0
    d = cfg.data
    title = (f"{args.preset}: buckets {d.min_side}-{d.max_side} step {d.bucket_step}, patch "
             f"{cfg.model.patch_size}, aspect <= {d.max_aspect:g}, crop {d.crop}, flip "
             f"{'on' if d.flip else 'off'}, batch {cfg.train.batch_size} x {args.gpus} GPU(s) "
             f"x accum {cfg.train.grad_accum}, drop_last {'on' if d.drop_last else 'off'}")
    print(format_report(scan, plan, health, title, stages=stage_lines(plan, cfg)))
    if status := cache_status(plan.images, cfg.data):
        print(status)
    return 0


def _cache(args) -> int:
    cfg = load_preset(args.preset, args.set or ())
    scan = scan_dataset(args.dir, cfg.data)
    plan = plan_buckets(scan.records, cfg.data, cfg.model.patch_size, cfg.train.batch_size,
                        1, cfg.train.grad_accum)
    if why := why_nothing_trains(scan, plan):
        raise DataError(why)
    if cfg.data.crop != "center" or cfg.data.disk_cache_gb <= 0:
        raise DataError(f"nothing to store: {cache_status(plan.images, cfg.data)}")
    data = replace(cfg.data, workers=args.workers if args.workers is not None
                   else max(1, os.cpu_count() or 1))
    stages = resolution_stages(cfg.data.stages, cfg.data.max_side, plan.patch_size)
    for k, stage_plan in enumerate(stage_plans(plan, cfg.data, stages)):
        if len(stages) > 1:
            print(f"stage {stage_text(stages, k)}")
        stored_crops(stage_plan.images, data, log=print)
        print(cache_status(stage_plan.images, cfg.data))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    readable_output()
    ap = argparse.ArgumentParser(prog="python -m engine.data",
                                 description="Dataset tools: a demo dataset, the bucket plan "
                                             "plus health report of a folder, and its crop "
                                             "cache.")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write the built-in captioned shapes dataset")
    demo.add_argument("--out", required=True, help="new or empty folder to write")
    demo.add_argument("--count", type=int, default=DEFAULT_COUNT, help="number of images")
    demo.add_argument("--seed", type=int, default=0, help="same seed, same files")
    demo.add_argument("--kind", choices=DEMO_KINDS, default="shapes",
                      help="shapes (the demo) or bands (flat colour bands, to judge grain)")
    rep = sub.add_parser("report", help="bucket plan and health report of a dataset folder")
    rep.add_argument("dir", help="dataset folder (images with .txt captions)")
    rep.add_argument("--preset", required=True, help="preset name or YAML file")
    rep.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                     help="override a config value (repeatable)")
    rep.add_argument("--gpus", type=int, default=1, help="world size to plan for")
    rep.add_argument("--deep", action="store_true", help="also decode every image (slow)")
    rep.add_argument("--json", action="store_true", help="machine-readable output")
    cache = sub.add_parser("cache", help="decode the training crops into the crop cache now")
    cache.add_argument("dir", help="dataset folder (images with .txt captions)")
    cache.add_argument("--preset", required=True, help="preset name or YAML file")
    cache.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override a config value (repeatable)")
    cache.add_argument("--workers", type=int, help="decoding processes (default: one per core)")
    args = ap.parse_args(argv)
    try:
        if args.command == "demo":
            if args.count < 1:
                raise DataError(f"--count must be at least 1, got {args.count}")
            out = write_demo_dataset(args.out, args.count, args.seed, args.kind)
            print(f"wrote {args.count} images with captions to {out}")
            return 0
        if args.command == "cache":
            if args.workers is not None and args.workers < 0:
                raise DataError(f"--workers must be 0 or more, got {args.workers}")
            return _cache(args)
        if args.gpus < 1:
            raise DataError(f"--gpus must be at least 1, got {args.gpus}")
        return _report(args)
    except (ConfigError, DataError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
