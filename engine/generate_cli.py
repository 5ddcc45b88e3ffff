"""The generator's command line: options, one-line errors with exit codes, and saving.

    python -m engine.generate --checkpoint RUN_OR_FILE --prompt "a red circle" --n 4

The sampling options (`add_sampling_options`) are shared with `python -m engine.bench
quality`, and `OneLineParser` with `python -m engine.bench`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from PIL import Image

from engine.checkpoint import CheckpointError
from engine.distributed import PRECISIONS, DeviceError
from engine.encoders import EncoderLoadError
from engine.fileio import readable_output
from engine.generate import DEFAULT_STRENGTH, PRECISION_ALIASES, GenerateError, Pipeline
from engine.images import BROKEN_FILE_ERRORS, upright_rgb
from engine.pngmeta import save_png
from engine.sampling import SAMPLERS


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line on stderr, with exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not LO,HI (e.g. 0,0.75)") from None
    return lo, hi


def add_sampling_options(p) -> None:
    """The sampler and guidance options (unset = the checkpoint's sample settings), the
    same for generating and for the quality figures."""
    p.add_argument("--sampler", choices=list(SAMPLERS))
    p.add_argument("--cfg", type=float, help="guidance scale (1 = off)")
    p.add_argument("--rescale", type=float, help="CFG rescale phi, 0 to 1")
    p.add_argument("--interval", type=_interval, metavar="LO,HI",
                   help="apply guidance only for t in [LO, HI] (t = 0 is noise)")
    p.add_argument("--ramp", type=float, help="guidance grows from none at t = 0 to full at "
                   "t = RAMP (0 = full throughout the interval)")
    p.add_argument("--pag", type=float, help="perturbed-attention guidance scale (0 = off): "
                   "one coherent layout per image, applied near noise (sample.pag_interval)")
    p.add_argument("--cfg-coarse", type=float, dest="coarse", metavar="SCALE",
                   help="guidance scale of the coarse part of the guidance update (where and "
                   "how large things are; 0 = --cfg for all): lower than --cfg keeps small "
                   "shapes small while their outlines get the full scale")
    p.add_argument("--cfg-coarse-blur", type=float, dest="coarse_sigma", metavar="PX",
                   help="pixels of the Gaussian blur that divides the coarse part of the "
                   "guidance update from the fine rest (with --cfg-coarse; default: the "
                   "checkpoint's sample.cfg_coarse_sigma)")
    p.add_argument("--noise-interval", type=_interval, metavar="LO,HI",
                   help="euler_a and dpmpp_2m_sde: fresh noise only on the steps inside "
                   "[LO, HI], deterministic steps elsewhere")
    p.add_argument("--shift", type=float, help="time shift (0 = the default for the size)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m engine.generate",
                description="Generate images from a PixelHDM checkpoint. Unset options take "
                            "the checkpoint's sample settings.")
    p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint or a run folder "
                   "(its newest checkpoint)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt (repeat for several prompts)")
    p.add_argument("--negative", help="negative prompt ('' = unconditional)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    add_sampling_options(p)
    p.add_argument("--seed", type=int, help="seed of the first image; image i gets seed + i "
                   "(-1 = random)")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=0, help="images per forward (0 = all)")
    p.add_argument("--init", type=Path, metavar="IMAGE", help="init image for img2img")
    p.add_argument("--strength", type=float, help=f"img2img strength, 0 (keep the image) to 1 "
                   f"(ignore it); default {DEFAULT_STRENGTH}")
    p.add_argument("--out", type=Path, default=Path("workspace/outputs"),
                   help="output folder (default workspace/outputs)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--text-encoder", metavar="FOLDER_OR_HUB_ID", help="a Qwen3 text encoder to "
                   "use instead of the one the checkpoint names (e.g. for an exported model)")
    p.add_argument("--compile", action="store_true",
                   help="compile the network first (slower first image, faster after; pays "
                        "off for many images or many steps)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=list(PRECISIONS) + list(PRECISION_ALIASES),
                   help="autocast precision (default: bf16 on a GPU, fp32 on the CPU)")
    return p


def _unwritable(out: Path) -> str:
    """Why images cannot be saved under `out` ('' when they can), found without creating it."""
    p = out.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"'{p}' is a file"
    return "" if os.access(p, os.W_OK) else f"'{p}' is not writable"


def main(argv: list[str] | None = None) -> int:
    """Exit code 0; 2 for a bad argument (values, --device, an --out that cannot be
    written); 1 for a file that cannot be used (checkpoint, text encoder, init image) or
    images that could not be saved. One line on stderr says which and why."""
    readable_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.strength is not None and args.init is None:
        parser.error("--strength needs --init IMAGE")

    def fail(message: str, code: int) -> int:
        print(f"{parser.prog}: error: {' '.join(message.split())}", file=sys.stderr)
        return code

    if problem := _unwritable(args.out):
        return fail(f"--out '{args.out}': {problem}; choose a folder you can write to", 2)
    init = None
    if args.init is not None:
        try:
            with Image.open(args.init) as im:
                init = upright_rgb(im)
        except BROKEN_FILE_ERRORS as e:
            return fail(f"--init: cannot read the image '{args.init}' ({e}); give a PNG, JPEG "
                        f"or WebP file", 1)
    try:
        pipe = Pipeline.load(args.checkpoint, ema=not args.no_ema, device=args.device,
                             dtype=args.dtype, text_encoder=args.text_encoder)
        if args.compile and (problem := pipe.compile()):
            print(f"note: --compile: torch.compile cannot run here ({problem}); generating "
                  f"uncompiled", file=sys.stderr)
        for note in pipe.notes(args.prompt, args.negative, args.width, args.height,
                               init_image=init):
            print(f"note: {note}", file=sys.stderr)
        results = pipe.generate(args.prompt, args.negative, args.width, args.height, args.steps,
                                args.sampler, args.cfg, args.rescale, args.interval, args.shift,
                                args.seed, args.n, init_image=init, strength=args.strength,
                                batch_size=args.batch_size, ramp=args.ramp, pag=args.pag,
                                noise_interval=args.noise_interval, coarse=args.coarse,
                                coarse_sigma=args.coarse_sigma)
    except (GenerateError, DeviceError) as e:
        return fail(str(e), 2)
    except (CheckpointError, EncoderLoadError) as e:
        return fail(str(e), 1)
    except torch.OutOfMemoryError:
        return fail("out of memory while generating: lower --batch-size (e.g. 1), --n or "
                    "--width/--height", 1)
    for i, r in enumerate(results):
        try:
            print(save_png(r.image, r.params, args.out), flush=True)
        except OSError as e:
            return fail(f"cannot save into --out '{args.out}' ({e.strerror or e}); {i} of "
                        f"{len(results)} images were saved: free some space or choose "
                        f"another folder", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
