"""Image generation: the sampling core shared with the trainer's sample grids and the
checkpoint-loading pipeline (its command line: engine/generate_cli.py; PNG metadata:
engine/pngmeta.py; checks of checkpoint files and start images: engine/generate_io.py).

    python -m engine.generate --checkpoint RUN_OR_FILE --prompt "a red circle" --n 4

One code path samples for everybody: `render` takes a network, an `encode` function
and per-image prompts and seeds, and returns images in [-1, 1]. The trainer's
`render_samples` and `Pipeline.generate` (the studio's Generate tab and this CLI) both call
it, so a training sample and a generated image with the same settings cannot disagree.

Reproducibility: image i of a request uses seed + i, and its initial noise is drawn
from its own CPU float32 generator, so an image does not depend on the batch it was
made in (up to the rounding of batched matrix kernels, far below one 8-bit level).
Every saved PNG carries its settings twice: a `parameters` text chunk in the
widely-used "prompt / Negative prompt: / Steps: ..., Seed: ..." layout that other tools
read, and a `pixelhdm` JSON chunk with everything. `read_png_parameters` recalls them.

Sampling runs under torch.no_grad, not inference_mode: the trainer calls render_samples
between optimizer steps, and tensors created under inference_mode (e.g. cached text
embeddings) could not be saved for backward afterwards.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch import Tensor

from engine import __version__
from engine.attention import pre_ampere
from engine.checkpoint import CheckpointError, load_weights
from engine.config import MAX_SAMPLER_STEPS, RunConfig, SampleConfig, is_time_interval
from engine.dataset import to_tensor, to_uint8
from engine.distributed import (
    PRECISIONS,
    autocast_to,
    compiler_problem,
    compute_precision,
    resolve_device,
    to_device,
)
from engine.fileio import file_hash
from engine.flow import to_clean
from engine.generate_io import (
    checkpoint_config,
    load_part,
    load_text_part,
    resolve_checkpoint,
    size_note,
    trained_sizes,
    upright_size,
)
from engine.images import upright_rgb
from engine.model import PixelHDM, TextCond
from engine.pngmeta import png_text
from engine.sample_prompts import SamplePrompt, from_config, prompt_defaults
from engine.sampling import (
    SAMPLERS,
    STOCHASTIC,
    NoiseStreams,
    cfg_model,
    img2img_grid,
    noise_image,
    noise_setting,
    sample_shift,
    time_grid,
)

PRECISION_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
SIZE_FACTOR = 4           # largest side = SIZE_FACTOR * data.max_side of the training run
MAX_SEED = 2**63 - 1      # torch generators take 64-bit seeds
DEFAULT_STRENGTH = 0.75

Encode = Callable[[list[str]], TextCond]
Progress = Callable[[int, int, "Image.Image | None"], None]
PREVIEW_SECONDS = 0.5     # at most one live preview per this much time (and the last step's)


class GenerateError(ValueError):
    """A generation request is invalid (size, sampler, seed...); the message says how."""


class Cancelled(Exception):
    """Raise it from a progress callback to stop generating; it propagates to the caller."""


@dataclass
class GeneratedImage:
    image: Image.Image  # RGB, carrying its PNG text chunks in image.info
    params: dict        # every setting, this image's own seed included (png_text layout)


# --------------------------------------------------------------------------------------
# Tensors <-> PIL (on engine.dataset's conversions, which the trainer's batches use)
# --------------------------------------------------------------------------------------

def to_pil(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB images, rounded to the nearest 8-bit level."""
    return [Image.fromarray(a, "RGB") for a in to_uint8(x)]


def from_pil(image: Image.Image) -> Tensor:
    """An RGB image -> (1, 3, H, W) float32 in [-1, 1]; exact inverse of to_pil on 8-bit data."""
    return to_tensor(image.convert("RGB"))[None]


def cover_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Lanczos-resize so the image (any mode: engine.images.upright_rgb) covers width x
    height, then crop the centre."""
    image = upright_rgb(image)
    w0, h0 = image.size
    if (w0, h0) == (width, height):
        return image
    scale = max(width / w0, height / h0)
    w1, h1 = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    image = image.resize((w1, h1), Image.Resampling.LANCZOS)
    left, top = (w1 - width) // 2, (h1 - height) // 2
    return image.crop((left, top, left + width, top + height))


def preview_grid(x: Tensor) -> Image.Image:
    """A batch (B, 3, H, W) tiled into one near-square image, for live previews."""
    B, C, H, W = x.shape
    cols = math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    x = torch.cat([x.detach().float().cpu(), x.new_full((rows * cols - B, C, H, W), -1.0).cpu()])
    x = x.view(rows, cols, C, H, W).permute(2, 0, 3, 1, 4)                 # (C, rows, H, cols, W)
    return to_pil(x.reshape(1, C, rows * H, cols * W))[0]


# --------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------

def max_side(cfg: RunConfig) -> int:
    """Largest image side the generator accepts: SIZE_FACTOR times the training max_side
    (the model has seen nothing bigger; far beyond it the output is meaningless)."""
    return SIZE_FACTOR * cfg.data.max_side


def check_size(width: int, height: int, patch: int, limit: int | None = None) -> None:
    """Each side a multiple of the patch size, from one patch up to `limit` (None = no
    upper bound)."""
    top = limit if limit is not None else math.inf
    span = f"from {patch} to {limit}" if limit is not None else f"of at least {patch}"
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise GenerateError(f"{name} = {v!r} is not allowed: use a whole number of pixels, "
                                f"a multiple of the patch size {patch} {span}")
        if v % patch or not patch <= v <= top:
            near = sorted({min(max(patch, m * patch), top) for m in (v // patch, -(-v // patch))})
            raise GenerateError(f"{name} = {v!r} is not allowed: use a multiple of the patch size "
                                f"{patch} {span} (nearest: {' or '.join(map(str, near))})")


def fit_size(width: int, height: int, patch: int, limit: int) -> tuple[int, int]:
    """An image size scaled down to fit `limit` and rounded to patch multiples (the default
    output size for an init image)."""
    scale = min(1.0, limit / max(width, height))
    return tuple(min(limit, max(patch, round(v * scale / patch) * patch)) for v in (width, height))


# --------------------------------------------------------------------------------------
# The sampling core
# --------------------------------------------------------------------------------------

_SAMPLE = SampleConfig()   # render's and check_options' defaults are the config's


def check_options(steps: int, sampler: str, cfg: float, rescale: float,
                  interval: tuple[float, float], shift: float, ramp: float = 0.0,
                  pag: float = 0.0, noise_interval: tuple[float, float] = (0.0, 1.0),
                  coarse: float = 0.0, coarse_sigma: float = _SAMPLE.cfg_coarse_sigma) -> None:
    if (isinstance(steps, bool) or not isinstance(steps, int)
            or not 1 <= steps <= MAX_SAMPLER_STEPS):
        raise GenerateError(f"steps = {steps!r}: allowed a whole number from 1 to "
                            f"{MAX_SAMPLER_STEPS}")
    if sampler not in SAMPLERS:
        raise GenerateError(f"sampler = {sampler!r}: allowed {', '.join(SAMPLERS)}")
    if not (math.isfinite(cfg) and cfg >= 0.0):
        raise GenerateError(f"cfg = {cfg!r}: allowed a number >= 0 (1 = no guidance)")
    if not 0.0 <= rescale <= 1.0:
        raise GenerateError(f"rescale = {rescale!r}: allowed 0 (plain guidance) to 1")
    if not is_time_interval(interval):
        raise GenerateError(f"interval = {list(interval)!r}: allowed [lo, hi] with "
                            f"0 <= lo < hi <= 1 (t = 0 is noise)")
    if not 0.0 <= ramp <= 1.0:
        raise GenerateError(f"ramp = {ramp!r}: allowed 0 (full guidance throughout the "
                            f"interval) to 1")
    if not (math.isfinite(shift) and shift > 0.0):
        raise GenerateError(f"shift = {shift!r}: allowed a number > 0 (1 = no shift)")
    if not (math.isfinite(pag) and pag >= 0.0):
        raise GenerateError(f"pag = {pag!r}: allowed a number >= 0 (0 = no perturbed-attention "
                            f"guidance)")
    if not is_time_interval(noise_interval):
        raise GenerateError(f"noise_interval = {list(noise_interval)!r}: allowed [lo, hi] with "
                            f"0 <= lo < hi <= 1 (the steps of euler_a and dpmpp_2m_sde that "
                            f"draw fresh noise)")
    if not (math.isfinite(coarse) and coarse >= 0.0):
        raise GenerateError(f"cfg_coarse = {coarse!r}: allowed a number >= 0 (0 = the CFG scale "
                            f"for the coarse part too)")
    if not (math.isfinite(coarse_sigma) and 0.1 <= coarse_sigma <= 64.0):
        raise GenerateError(f"cfg_coarse_sigma = {coarse_sigma!r}: allowed 0.1 to 64 pixels")


def for_inference(net: PixelHDM, device: torch.device, precision: str) -> PixelHDM:
    """A network that only generates, ready for it: on a GPU in bf16 or fp16, its matmul
    weights stored in that dtype (PixelHDM.matmul_weights_to: the same images, without
    casting every weight at every step, in half the memory). On the CPU the trainer's
    fp32 sampling (render_samples) may run the same network, so it stays as it is."""
    net.eval().requires_grad_(False)
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        net.matmul_weights_to(PRECISIONS[precision])
    return net


class SelfCondState:
    """The previous clean estimates of a self-conditioned network in sampling, one per
    guidance branch: cfg_model evaluates the conditional branch alone (batch B) or both
    at once as [cond; uncond] (batch 2B), and each branch is fed its own last estimate
    (none before its first evaluation). Feeding the guided estimate to both instead drew
    fewer right shapes (README, "Self-conditioning")."""

    def __init__(self, batch: int):
        self.batch = batch
        self.branches: list[Tensor | None] = [None, None]   # cond, uncond

    def previous(self, z: Tensor) -> Tensor | None:
        parts = self._split(z)
        if all(b is None for b in self.branches[:len(parts)]):
            return None
        return torch.cat([b if b is not None else torch.zeros_like(part)
                          for b, part in zip(self.branches, parts)])

    def update(self, x_hat: Tensor) -> None:
        for i, part in enumerate(self._split(x_hat)):
            self.branches[i] = part

    def _split(self, batch: Tensor) -> tuple[Tensor, ...]:
        if batch.shape[0] not in (self.batch, 2 * self.batch):
            raise ValueError(f"self-conditioning: a batch of {batch.shape[0]} for "
                             f"{self.batch} images")
        return batch.split(self.batch)



def render(net: PixelHDM, encode: Encode, prompts: list[str], negative: str, seeds: list[int],
           width: int, height: int, *, steps: int, sampler: str, cfg: float, rescale: float,
           interval: tuple[float, float], shift: float, ramp: float = 0.0,
           pag: float = 0.0, pag_layers: Sequence[int] = tuple(_SAMPLE.pag_layers),
           pag_interval: tuple[float, float] = tuple(_SAMPLE.pag_interval),
           noise_interval: tuple[float, float] = tuple(_SAMPLE.noise_interval),
           coarse: float = 0.0, coarse_sigma: float = _SAMPLE.cfg_coarse_sigma,
           amp_dtype: torch.dtype | None = None,
           init: Tensor | None = None, strength: float = 1.0,
           callback: Callable[[int, int, Tensor], None] | None = None) -> Tensor:
    """Images (B, 3, H, W) float32 on the CPU in [-1, 1], one per (prompts[i], seeds[i]).

    The unconditional branch of guidance is encode([negative]) ('' = the unconditional
    input), with its own mask. With `init` (1 or B, 3, H, W) in [-1, 1] sampling starts
    from the init image noised to t = 1 - strength (strength 0 returns it, 1 ignores it).
    callback(step, total, x_hat) is the samplers' progress callback. A network with
    model.self_cond sees, in each branch of guidance, that branch's own previous clean
    estimate (SelfCondState). With pag > 0, perturbed-attention guidance at scale `pag`
    for t in `pag_interval`, with the attention of patch blocks `pag_layers` (1-based)
    the identity in the perturbed branch (engine.sampling.cfg_model). The stochastic
    samplers draw fresh noise only on the steps inside `noise_interval`. With coarse > 0
    the coarse part of the guidance update (a Gaussian blur of `coarse_sigma` pixels) is
    guided at `coarse`, the fine rest at `cfg`."""
    if len(prompts) != len(seeds) or not prompts:
        raise GenerateError(f"render: {len(prompts)} prompts for {len(seeds)} seeds")
    check_size(width, height, net.cfg.patch_size)
    check_options(steps, sampler, cfg, rescale, interval, shift, ramp, pag, noise_interval,
                  coarse, coarse_sigma)
    if pag and not all(1 <= n <= net.cfg.patch_layers for n in pag_layers):
        raise GenerateError(f"pag_layers = {list(pag_layers)}: allowed patch blocks 1 to "
                            f"{net.cfg.patch_layers}")
    perturbed_layers = frozenset(pag_layers)
    device = next(net.parameters()).device
    prediction = net.cfg.prediction

    unique = list(dict.fromkeys(prompts))
    cond = encode(unique).select([unique.index(p) for p in prompts]).to(device)
    uncond = encode([negative]).select([0] * len(prompts)).to(device)

    state = SelfCondState(len(prompts)) if net.cfg.self_cond else None

    def denoise(z: Tensor, t: Tensor, text: TextCond, perturbed: bool = False) -> Tensor:
        t = t.to(device, non_blocking=True)   # the samplers' times are on the CPU
        with autocast_to(amp_dtype, device):
            # the perturbed branch reads the conditional branch's estimate and keeps none
            pred = net(z, t, text, prev=None if state is None else state.previous(z),
                       perturb=perturbed_layers if perturbed else ())
        x_hat = to_clean(pred.float(), z, t, prediction)
        if state is not None and not perturbed:
            state.update(x_hat)
        return x_hat

    model_fn = cfg_model(denoise, cond, uncond, cfg, rescale, tuple(interval), ramp,
                         pag, tuple(pag_interval), coarse, coarse_sigma)
    streams = NoiseStreams(seeds, width, height)
    noise = to_device(streams.draw(), device)
    if init is None:
        ts, x = time_grid(steps, shift), noise
    else:
        ts = img2img_grid(steps, strength, shift)
        x = noise_image(init.to(device, torch.float32).expand_as(noise), noise, float(ts[0]))
    fresh = ({"noise": lambda _: to_device(streams.draw(), device),
              "noise_interval": tuple(noise_interval)} if sampler in STOCHASTIC else {})
    x = SAMPLERS[sampler](model_fn, x, ts, callback, **fresh)
    return x.float().clamp(-1.0, 1.0).cpu()


def sample_options(s: SampleConfig, pag: float | None = None,
                   noise_interval: tuple[float, float] | None = None,
                   coarse: float | None = None, coarse_sigma: float | None = None) -> dict:
    """render's perturbed-attention guidance, fresh-noise and coarse-guidance arguments
    from a sample config (`pag`, `noise_interval`, `coarse` and `coarse_sigma` instead of
    the config's when given)."""
    return {"pag": s.pag if pag is None else pag, "pag_layers": tuple(s.pag_layers),
            "pag_interval": tuple(s.pag_interval),
            "noise_interval": tuple(s.noise_interval if noise_interval is None
                                    else noise_interval),
            "coarse": s.cfg_coarse if coarse is None else coarse,
            "coarse_sigma": s.cfg_coarse_sigma if coarse_sigma is None else coarse_sigma}


def config_render_options(cfg: RunConfig, width: int, height: int) -> dict:
    """Every render keyword a run's config decides at a size (sampler, guidance and its
    interval, rescale, ramp and shift, and sample_options'), as the sample grids use
    them; a caller overrides what it varies."""
    s = cfg.sample
    return {"sampler": s.sampler, "cfg": s.cfg, "rescale": s.cfg_rescale,
            "interval": tuple(s.cfg_interval), "shift": sample_shift(cfg, width, height),
            "ramp": s.cfg_ramp, **sample_options(s)}


def render_grid(net: PixelHDM, encode: Encode, cfg: RunConfig, device: torch.device | str,
                precision: str, trained: dict[str, int] | None = None) -> Tensor:
    """(N, 3, H, W): render_samples of cfg.sample.prompts, each with every default."""
    cells = from_config(cfg, prompt_defaults(cfg, trained))[1]
    return torch.stack(render_samples(net, encode, cells, cfg, device, precision))


def render_samples(net: PixelHDM, encode: Encode, cells: list[SamplePrompt], cfg: RunConfig,
                   device: torch.device | str, precision: str) -> list[Tensor]:
    """The trainer's sample grid: an image (3, H, W) in [-1, 1] per cell, with the cell's
    prompt, negative, size, seed, guidance and steps (engine/sample_prompts.py), the rest
    from cfg.sample; one batch per cells alike but for prompt and seed. Autocast in
    `precision` on CUDA only; `device` is where `net` lives."""
    amp = PRECISIONS[precision] if torch.device(device).type == "cuda" else None
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(cells):
        groups.setdefault((c.negative, c.width, c.height, c.steps, c.cfg), []).append(i)
    out: dict[int, Tensor] = {}
    for (negative, w, h, steps, guidance), members in groups.items():
        images = render(net, encode, [cells[i].prompt for i in members], negative,
                        [cells[i].seed for i in members], w, h, steps=steps, amp_dtype=amp,
                        **{**config_render_options(cfg, w, h), "cfg": guidance})
        out.update(zip(members, images))
    return [out[i] for i in range(len(cells))]


# --------------------------------------------------------------------------------------
# Loading a checkpoint
# --------------------------------------------------------------------------------------

def resolve_precision(dtype: str | None, device: torch.device) -> str:
    """fp32 / bf16 / fp16 (aliases float32, bfloat16, float16); default bf16 on a GPU that
    supports it, fp16 on older GPUs, fp32 on the CPU."""
    if dtype in (None, "", "auto"):
        if device.type != "cuda":
            return "fp32"
        return "fp16" if pre_ampere(device) else "bf16"
    name = PRECISION_ALIASES.get(dtype, dtype)
    if name not in PRECISIONS:
        raise GenerateError(f"dtype = {dtype!r}: allowed {', '.join(PRECISIONS)}")
    if why := compute_precision(name, device)[1]:
        if device.type == "cuda":   # (the trainer falls back to fp16; asked for, say so)
            raise GenerateError(f"dtype = {dtype}: this GPU has no bf16 arithmetic, which "
                                f"needs an Ampere or newer GPU; use fp16, this GPU's "
                                f"default, or fp32")
        raise GenerateError(f"dtype = {dtype}: {why}; use fp32, the CPU's default")
    return name


class Pipeline:
    """A trained network with its text encoder, ready to generate. Build it with
    Pipeline.load(path)."""

    def __init__(self, net: PixelHDM, text_encoder, cfg: RunConfig, meta: dict, path: Path,
                 device: torch.device, precision: str, weights: str):
        self.net, self.text_encoder, self.cfg, self.meta = net, text_encoder, cfg, meta
        self.trained = trained_sizes(meta)   # 'WxH' -> images the run trained at
        self.path, self.device, self.precision, self.weights = path, device, precision, weights

    @classmethod
    def load(cls, path: str | os.PathLike, ema: bool = True, device: str | None = None,
             dtype: str | None = None, text_encoder: str | None = None) -> "Pipeline":
        """Load a checkpoint file or a run folder's newest checkpoint, EMA weights when `ema`
        and present; `text_encoder`: a Qwen3 folder or hub id instead of the checkpoint's.
        Raises CheckpointError (the file), EncoderLoadError (load_text_part), GenerateError."""
        path = resolve_checkpoint(path)
        dev = resolve_device(device)
        precision = resolve_precision(dtype, dev)
        _, cfg, text_dim = checkpoint_config(path)
        weights, meta = load_weights(path, ema=ema)
        parts = {part: {k[len(part) + 1:]: v for k, v in weights.items()
                        if k.startswith(part + ".")} for part in ("net", "text")}
        net = load_part(PixelHDM(cfg.model, text_dim), parts["net"], "network", "net", path,
                        CheckpointError).to(dev)
        for_inference(net, dev, precision)
        enc, cfg = load_text_part(cfg, meta, path, text_dim, parts["text"], dev,
                                  PRECISIONS[precision], text_encoder)
        used = "ema" if ema and meta.get("has_ema") else meta.get("exported_weights", "raw")
        return cls(net, enc, cfg, meta, path, dev, precision, used)

    def compile(self) -> str:
        """Compile the network's blocks (torch.compile, see PixelHDM.compile_blocks); the
        first image of each new size then takes a while, the rest run faster. Returns ''
        or why compilation cannot run here (the pipeline then stays uncompiled)."""
        problem = compiler_problem(self.device)
        if not problem:
            self.net.compile_blocks()
        return problem

    # ---------------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return str(self.meta.get("run_id", self.path.stem))

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    @property
    def max_side(self) -> int:
        return max_side(self.cfg)

    @cached_property
    def checkpoint_hash(self) -> str:
        return file_hash(self.path)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextCond:
        return self.text_encoder.encode(list(prompts))

    def generate(self, prompts: str | list[str], negative: str | None = None,
                 width: int | None = None, height: int | None = None, steps: int | None = None,
                 sampler: str | None = None, cfg: float | None = None,
                 rescale: float | None = None, interval: tuple[float, float] | None = None,
                 shift: float | None = None, seed: int | None = None, n: int = 1, *,
                 init_image: Image.Image | None = None, strength: float | None = None,
                 callback: Progress | None = None, batch_size: int = 0,
                 ramp: float | None = None, pag: float | None = None,
                 noise_interval: tuple[float, float] | None = None,
                 coarse: float | None = None,
                 coarse_sigma: float | None = None) -> list[GeneratedImage]:
        """n images per prompt, prompt by prompt; image i of the request has seed seed + i.

        None takes the value from the checkpoint's `sample` config (size: the init image's
        size rounded to patch multiples, when there is one); shift None or 0 is the
        size-dependent default; seed None or -1 draws a random seed. img2img: `init_image`
        is cover-resized and centre-cropped to the size; `strength` (default 0.75) from 0
        (the init image back) to 1 (the same as text-to-image). callback(step, total,
        preview) runs after each step with a tiled preview of the current clean
        estimates, or None where the last preview is too recent (`_chunk_progress`);
        raise Cancelled in it to stop. batch_size > 0 caps images per forward pass."""
        s, p = self.cfg.sample, self.cfg.model.patch_size
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(q, str) for q in prompts):
            raise GenerateError("prompts: give one prompt or a non-empty list of prompts")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise GenerateError(f"n = {n!r}: allowed a whole number >= 1 (images per prompt)")
        negative = s.negative if negative is None else negative
        width, height = self._size(width, height, init_image)
        check_size(width, height, p, self.max_side)
        steps = s.steps if steps is None else steps
        sampler = s.sampler if sampler is None else sampler
        cfg = s.cfg if cfg is None else float(cfg)
        rescale = s.cfg_rescale if rescale is None else float(rescale)
        interval = tuple(float(v) for v in (s.cfg_interval if interval is None else interval))
        shift = sample_shift(self.cfg, width, height) if not shift else float(shift)
        ramp = s.cfg_ramp if ramp is None else float(ramp)
        pag = s.pag if pag is None else float(pag)
        noise_interval = tuple(float(v) for v in (s.noise_interval if noise_interval is None
                                                  else noise_interval))
        coarse = s.cfg_coarse if coarse is None else float(coarse)
        coarse_sigma = s.cfg_coarse_sigma if coarse_sigma is None else float(coarse_sigma)
        check_options(steps, sampler, cfg, rescale, interval, shift, ramp, pag, noise_interval,
                      coarse, coarse_sigma)
        count = len(prompts) * n
        if seed is None or seed == -1:
            seed = secrets.randbelow(2**32)
        top = MAX_SEED - count + 1   # the last image's seed is seed + count - 1
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= top:
            raise GenerateError(f"seed = {seed!r}: allowed a whole number from 0 to {top}, or "
                                f"-1 (or empty) for a random seed")
        init = None
        if init_image is not None:
            strength = DEFAULT_STRENGTH if strength is None else float(strength)
            if not 0.0 <= strength <= 1.0:
                raise GenerateError(f"strength = {strength!r}: allowed 0 (keep the init image) "
                                    f"to 1 (ignore it)")
            init = from_pil(cover_resize(init_image, width, height))
        per_image = [q for q in prompts for _ in range(n)]
        seeds = [seed + i for i in range(count)]
        size = batch_size if batch_size > 0 else count
        chunks = [range(a, min(a + size, count)) for a in range(0, count, size)]

        done, shown = [], [-math.inf]   # when the last preview was made (the request's)
        precision = [self.precision] * count   # each image's, as its PNG records it
        for c, idx in enumerate(chunks):
            def chunk(amp: str, c=c, idx=idx) -> Tensor:
                return render(
                    self.net, self.encode, [per_image[i] for i in idx], negative,
                    [seeds[i] for i in idx], width, height, steps=steps, sampler=sampler,
                    cfg=cfg, rescale=rescale, interval=interval, shift=shift, ramp=ramp,
                    **sample_options(s, pag, noise_interval, coarse, coarse_sigma),
                    amp_dtype=PRECISIONS[amp], init=init,
                    strength=strength if init is not None else 1.0,
                    callback=_chunk_progress(callback, c, len(chunks), shown))
            x = chunk(self.precision)
            if self.precision == "fp16" and torch.isnan(x).any():
                # fp16 (GPUs before Ampere) reaches 65504, bf16 and fp32 about 3e38: a
                # model trained in bf16 may overflow it. Those images are made in fp32
                x = chunk("fp32")
                for i in idx:
                    precision[i] = "fp32"
            if torch.isnan(x).any():
                raise GenerateError(
                    f"the network gave NaN (not a number) for seed {seeds[idx[0]]} in "
                    f"{precision[idx[0]]}: its weights in {self.path.name} hold or produce "
                    f"non-numbers. Generate from an earlier checkpoint of the run, or with its "
                    f"raw weights instead of the EMA (--no-ema)")
            done.append(x)
        images = to_pil(torch.cat(done))
        out = []
        for i, image in enumerate(images):
            params = {
                "prompt": per_image[i], "negative": negative, "width": width, "height": height,
                "steps": steps, "sampler": sampler, "cfg": cfg, "rescale": rescale,
                "interval": list(interval), "ramp": ramp, "pag": pag, "shift": shift,
                "coarse": coarse, "coarse_sigma": coarse_sigma if coarse else None,
                "noise_interval": noise_setting(sampler, noise_interval),
                "seed": seeds[i],
                "strength": strength if init is not None else None,
                "run_id": self.run_id, "checkpoint": self.path.name,
                "checkpoint_step": self.step, "checkpoint_hash": self.checkpoint_hash,
                "weights": self.weights, "prediction": self.cfg.model.prediction,
                "dtype": precision[i], "device": self.device.type,
                "engine_version": __version__,
            }
            image.info.update(png_text(params))
            out.append(GeneratedImage(image, params))
        return out


    def _size(self, width: int | None, height: int | None,
              init_image: Image.Image | None) -> tuple[int, int]:
        """The requested size; None takes the upright init image's size rounded to patch
        multiples (within max_side), else the checkpoint's sample size."""
        if init_image is not None:
            dw, dh = fit_size(*upright_size(init_image), self.cfg.model.patch_size, self.max_side)
        else:
            dw, dh = self.cfg.sample_size(self.trained)
        return dw if width is None else width, dh if height is None else height

    def notes(self, prompts: str | list[str], negative: str | None = None,
              width: int | None = None, height: int | None = None, *,
              init_image: Image.Image | None = None) -> list[str]:
        """What a request to generate() will do that its author may not expect, one
        sentence each: an empty prompt gives an unconditional image, a prompt longer than
        text.max_tokens is cut there, a start image of another shape is cropped."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        negative = self.cfg.sample.negative if negative is None else negative
        named = [(f"prompt {i + 1}" if len(prompts) > 1 else "the prompt", q)
                 for i, q in enumerate(prompts)]
        named += [("the negative prompt", negative)] if negative else []
        if not all(isinstance(q, str) for _, q in named):
            return []   # generate() says what is wrong
        limit, out = self.cfg.text.max_tokens, []
        for (name, _), n in zip(named, self.text_encoder.count_tokens([q for _, q in named])):
            if n == 0 and name != "the negative prompt":
                out.append(f"{name} is empty: the image is unconditional (what the model draws "
                           f"without a caption); type a prompt to describe the image")
            elif n > limit:
                out.append(f"{name} is {n} tokens long; the model reads only the first {limit} "
                           f"(text.max_tokens of its training run) and ignores the rest: "
                           f"shorten it to steer all of the image")
        w, h = self._size(width, height, init_image)
        if isinstance(w, int) and isinstance(h, int) and (note := size_note(self.trained, w, h)):
            out.append(note)
        if init_image is not None:
            w0, h0 = upright_size(init_image)
            if isinstance(w, int) and isinstance(h, int) and abs(w0 * h - h0 * w) > 0.01 * w0 * h:
                out.append(f"the start image ({w0}x{h0}) has another shape than {w}x{h}: it is "
                           f"scaled to cover it and its centre is cropped")
        return out


def _chunk_progress(callback: Progress | None, chunk: int, chunks: int, shown: list[float]):
    """The samplers' callback for batch `chunk` of `chunks`: steps counted over the whole
    request; the clean estimates tiled into one preview image at the first step, then at
    most every PREVIEW_SECONDS (`shown[0]`: when the last was made) and at the last step,
    None in between. A preview copies the batch from the GPU (a sync) and is encoded for
    the browser: at every step of a fast GPU both would cost more than the step."""
    if callback is None:
        return None

    def progress(step: int, total: int, x_hat: Tensor) -> None:
        now, last = time.monotonic(), chunk == chunks - 1 and step == total
        preview = None
        if last or now - shown[0] >= PREVIEW_SECONDS:
            preview, shown[0] = preview_grid(x_hat), now
        callback(chunk * total + step, chunks * total, preview)
    return progress


# --------------------------------------------------------------------------------------
# Command line (engine/generate_cli.py)
# --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """The command line (engine/generate_cli.py)."""
    from engine.generate_cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
