"""The command line of the quality figures: `python -m engine.bench quality` (the measures
themselves, and what each means, are in engine/evaluate.py). Besides the checkpoint's own
sample settings it takes the sampler and guidance options of the generator, so sampling
settings can be compared on one checkpoint with every other option fixed."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from engine.config import RunConfig
from engine.demo_data import parse_caption, probe_captions
from engine.encoders import DinoTeacher
from engine.evaluate import EvaluateError, Progress, RealImages, evaluate, run_prompts
from engine.generate import Pipeline, check_options, check_size
from engine.generate_cli import add_sampling_options
from engine.sample_prompts import SamplePrompt, prompt_defaults
from engine.sampling import STOCHASTIC


def tty_progress(stream=sys.stderr) -> Progress | None:
    """A one-line progress bar on `stream` when it is a terminal, else None."""
    if not stream.isatty():
        return None

    def show(done: int, total: int, what: str) -> None:
        bar = "#" * round(20 * done / total)
        end = "\n" if done == total else ""
        stream.write(f"\rquality [{bar:<20}] {done}/{total} {what[:40]:<40}{end}")
        stream.flush()
    return show


def quality_report(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    n = args.n if args.n is not None else (4 if args.prompts == "sample" else None)
    if (n is not None and n < 1) or args.steps < 1 or args.seeds < 2:
        raise EvaluateError("--n and --steps: allowed whole numbers >= 1; --seeds: >= 2")
    pipe = Pipeline.load(args.checkpoint, ema=True, device=args.device, dtype=args.dtype)
    cfg = with_sampling(pipe.cfg, args)
    width, height = cfg.sample_size(pipe.trained)
    check_size(width, height, cfg.model.patch_size)
    real = RealImages.of(cfg, args.data)
    if args.prompts == "wide":
        if not real.demo:
            raise EvaluateError(f"--prompts wide scores the demo's captions from pixels; "
                                f"{real.what} are not the demo dataset: leave out --prompts, "
                                f"or give the demo folder with --data")
        d = prompt_defaults(cfg, pipe.trained)
        prompts = [SamplePrompt(c, d.negative, d.width, d.height, d.seed + i, d.cfg, d.steps)
                   for i, c in enumerate(probe_captions()[:n])]
    else:
        prompts = run_prompts(cfg, pipe.path, pipe.trained)[:n]
    if args.cfg is not None:
        prompts = [replace(p, cfg=args.cfg) for p in prompts]
    folder = Path(cfg.loss.repa_teacher).expanduser() if cfg.loss.repa_teacher else None
    teacher = DinoTeacher(str(folder), pipe.device) if folder and folder.is_dir() else None
    result = evaluate(pipe.net, pipe.encode, cfg, pipe.device, pipe.precision, prompts, real,
                      seeds=args.seeds, steps=args.steps, width=width, height=height,
                      teacher=teacher, progress=tty_progress())
    result["adherence"] += open_place_rows(result["per_prompt"], args.seeds)
    if folder and teacher is None:
        result["notes"].append(f"no DINOv3 distance: loss.repa_teacher '{folder}' is not a "
                               f"folder here")
    return {"benchmark": "quality", "checkpoint": f"{pipe.path} (step {pipe.step}, "
            f"{pipe.weights} weights)", "device": str(pipe.device),
            "size": f"{width}x{height}", "prompts": len(prompts), "seeds": args.seeds,
            "steps": args.steps, "sampling": sampling_text(cfg, prompts), "real": real.what,
            **result,
            "seconds": round(time.perf_counter() - start, 1)}


def open_place_rows(rows: list[dict], seeds: int) -> list[dict]:
    """Adherence rows for the prompts that leave the place open (where a model that
    cannot settle on one place draws the shape twice), pooled from the per-prompt shares;
    none when every prompt names its place or none names it."""
    open_ = [r for r in rows if r["by_attribute"] and not parse_caption(r["prompt"])["position"]]
    if not open_ or len(open_) == len(rows):
        return []
    out = []
    for attribute in ("shape", "size"):
        shares = [r["by_attribute"][attribute] for r in open_ if attribute in r["by_attribute"]]
        if shares:
            out.append({"attribute": f"{attribute}, place left open",
                        "scored": len(shares) * seeds, "generated": sum(shares) / len(shares),
                        "real": None})
    return out


# option -> sample config field
SAMPLING_ARGS = {"sampler": "sampler", "rescale": "cfg_rescale", "interval": "cfg_interval",
                 "ramp": "cfg_ramp", "pag": "pag", "shift": "shift",
                 "noise_interval": "noise_interval", "coarse": "cfg_coarse",
                 "coarse_sigma": "cfg_coarse_sigma"}


def with_sampling(cfg: RunConfig, args: argparse.Namespace) -> RunConfig:
    """The checkpoint's config with the sampling options given on the command line
    (checked as the generator checks them), the rest as it trained."""
    given = {field: getattr(args, k) for k, field in SAMPLING_ARGS.items()
             if getattr(args, k) is not None}
    for key in ("cfg_interval", "noise_interval"):
        if key in given:
            given[key] = list(given[key])
    s = replace(cfg.sample, **given)
    check_options(args.steps, s.sampler, s.cfg if args.cfg is None else args.cfg,
                  s.cfg_rescale, tuple(s.cfg_interval), s.shift or 1.0, s.cfg_ramp, s.pag,
                  tuple(s.noise_interval), s.cfg_coarse, s.cfg_coarse_sigma)
    return replace(cfg, sample=s)


def sampling_text(cfg: RunConfig, prompts: list[SamplePrompt]) -> str:
    """How the images were sampled, in one line of the report."""
    s = cfg.sample
    scales = sorted({p.cfg for p in prompts})
    lo, hi = s.cfg_interval
    text = s.sampler
    if s.sampler in STOCHASTIC and tuple(s.noise_interval) != (0.0, 1.0):
        text += " (fresh noise for t in [{:g}, {:g}])".format(*s.noise_interval)
    text += f", cfg {'/'.join(f'{v:g}' for v in scales)}"
    if s.cfg_coarse:
        text += f" (coarse {s.cfg_coarse:g}, blur {s.cfg_coarse_sigma:g} px)"
    if (lo, hi) != (0.0, 1.0):
        text += f" for t in [{lo:g}, {hi:g}]"
    if s.cfg_ramp:
        text += f", full from t = {s.cfg_ramp:g}"
    if s.cfg_rescale:
        text += f", rescale {s.cfg_rescale:g}"
    if s.pag:
        lo, hi = s.pag_interval
        text += (f", PAG {s.pag:g} (blocks {','.join(map(str, s.pag_layers))}) for t in "
                 f"[{lo:g}, {hi:g}]")
    return text + (f", shift {s.shift:g}" if s.shift else "")


def _num(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _times(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0f}%"


def _missed(shares) -> str:
    """The attributes of one prompt drawn right in under 100 % of its images (one
    decimal, so that 99.6 % does not read as 100 %)."""
    if shares is None:
        return "-"
    return ", ".join(f"{name} {share:.1f}%" for name, share in shares.items()
                     if share < 100.0) or "none"


FIGURE_COLUMNS = [("measure", "measure", str), ("generated", "generated", _num),
                  ("real", "real", _num), ("ratio", "ratio", _times), ("note", "", str)]
PROMPT_COLUMNS = [("prompt", "prompt", lambda v: v[:48]), ("spread", "spread", _num),
                  ("real_spread", "real spread", _num), ("ratio", "ratio", _times),
                  ("reference", "real reference", str), ("noise", "noise", _num),
                  ("adherence", "adherence", _pct), ("by_attribute", "under 100 %", _missed)]
ADHERENCE_COLUMNS = [("attribute", "attribute", str), ("scored", "images", str),
                     ("generated", "generated", _pct), ("real", "real (scorer check)", _pct)]


def add_quality(sub, common: argparse.ArgumentParser) -> None:
    """engine.bench's `quality` subcommand (see this module's docstring)."""
    p = sub.add_parser("quality", parents=[common],
                       help="flat-area noise, seed diversity, prompt adherence and Fréchet "
                            "distance of a checkpoint against real images")
    p.add_argument("--checkpoint", required=True, help="a checkpoint file or run folder")
    p.add_argument("--data", help="compare with images of this folder (default: the run's "
                                  "held-out validation images)")
    p.add_argument("--prompts", choices=("sample", "wide"), default="sample",
                   help="sample: the run's sample prompts; wide (demo models): every shape "
                        "at every place and in every size, also with the place or size "
                        "left out, 90 captions")
    p.add_argument("--n", type=int, help="prompts used: the first N (default: 4 sample "
                                         "prompts, or all 90 wide ones)")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--steps", type=int, default=10, help="sampler steps (default 10)")
    add_sampling_options(p.add_argument_group("sampling (default: the checkpoint's sample "
                                              "settings)"))
    p.set_defaults(run=quality_report, tables=[
        ("figures", "", FIGURE_COLUMNS), ("per_prompt", "per prompt", PROMPT_COLUMNS),
        ("adherence", "prompt adherence (demo captions, from pixels)", ADHERENCE_COLUMNS)])
