"""Run configuration: dataclasses with documented defaults, the model size table,
preset loading with strict validation, and YAML round trips.

A run is described by one `RunConfig` with six sections (model, text, data, loss,
train, sample). Presets in `presets/*.yaml` hold only the values that differ from the
defaults below. Loading is strict: an unknown key, a value of the wrong type or an
impossible combination raises `ConfigError` naming the file, the key, the value and
what is allowed. `dump_yaml(cfg)` writes every value, and loading that text again gives
an identical config.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.fileio import atomic_write_text
from engine.stages import resolution_stages

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


# Names the config allows, defined once: engine/sampling.py maps SAMPLER_NAMES to its
# samplers, engine/attention.py dispatches on ATTENTION_BACKENDS.
SAMPLER_NAMES = ("euler", "heun", "dpmpp_2m", "ab2", "euler_a", "dpmpp_2m_sde")
MAX_SAMPLER_STEPS = 1000   # the most steps a sampler may be asked for, wherever it is asked


def is_time_interval(span) -> bool:
    """Whether `span` is an interval of flow time (lo, hi) with 0 <= lo < hi <= 1, the
    rule of every guidance and noise interval (the config, the CLI, the sampler)."""
    try:
        lo, hi = span
        return 0.0 <= lo < hi <= 1.0
    except (TypeError, ValueError):
        return False
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "math")


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible."""

def _f(default, doc: str, *, choices=None, lo=None, hi=None, lo_open=False):
    """A dataclass field with a docstring and its allowed range (checked on load)."""
    meta = {"doc": doc, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------
# Model size table (data): `model.size` applies one row; keys beside it override the row.
# --------------------------------------------------------------------------------------

MODEL_SIZES: dict[str, dict] = {
    # about 2.2 M parameters: trains visibly on two CPU cores in minutes
    "tiny": dict(hidden_dim=128, pixel_dim=16, patch_layers=4, pixel_layers=2,
                 num_heads=4, num_kv_heads=2, mrope_split=[8, 12, 12]),
    # about 52 M parameters (with a 1024-wide text encoder)
    "small": dict(hidden_dim=512, pixel_dim=16, patch_layers=8, pixel_layers=2,
                  num_heads=8, num_kv_heads=2, mrope_split=[16, 24, 24]),
    # about 160 M parameters
    "base": dict(hidden_dim=768, pixel_dim=16, patch_layers=12, pixel_layers=3,
                 num_heads=12, num_kv_heads=4, mrope_split=[16, 24, 24]),
    # the upstream default network: 358 M parameters (356.4 M upstream + text projections)
    "default": dict(hidden_dim=1024, pixel_dim=16, patch_layers=16, pixel_layers=4,
                    num_heads=16, num_kv_heads=4, mrope_split=[16, 24, 24]),
    # about 680 M parameters
    "large": dict(hidden_dim=1152, pixel_dim=16, patch_layers=26, pixel_layers=4,
                  num_heads=16, num_kv_heads=4, mrope_split=[16, 28, 28]),
}


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    size: str = _f("", "row of the size table applied before the keys below ('' = none)",
                   choices=("",) + tuple(MODEL_SIZES))
    hidden_dim: int = _f(1024, "width D of the patch path and of the compacted pixel tokens", lo=8)
    pixel_dim: int = _f(16, "width of each pixel token in the pixel path", lo=1)
    patch_size: int = _f(16, "side p of a patch in pixels", lo=1, hi=64)
    patch_layers: int = _f(16, "number N of patch-path transformer blocks", lo=1)
    pixel_layers: int = _f(4, "number M of pixel-path blocks", lo=1)
    num_heads: int = _f(16, "query heads (head_dim = hidden_dim / num_heads)", lo=1)
    num_kv_heads: int = _f(4, "key/value heads for grouped-query attention", lo=1)
    mlp_ratio: float = _f(3.0, "SwiGLU hidden width as a multiple of the input width (both paths)",
                          lo=0.0, lo_open=True)
    bottleneck_dim: int = _f(0, "patch-embedding bottleneck width (0 = p*p/4, the best value "
                             "found upstream and by JiT)", lo=0)
    mrope_split: list[int] = _f([16, 24, 24], "head_dim split over the 3 mRoPE axes "
                                "(sequence, row, column); each even, summing to head_dim")
    rope_theta: float = _f(10000.0, "RoPE base frequency", lo=1.0)
    rope_grid: int = _f(0, "0 = image tokens rotate by their row and column; N = by the "
                        "places of their centres on an N x N grid over the image, at any size "
                        "(position interpolation), so a place keeps its angle across "
                        "resolutions and data.stages", lo=0)
    rope_grid_aspect: str = _f("stretch", "with model.rope_grid: 'stretch' fits rows and columns "
                               "to N positions each, so a wide image's shapes are squeezed "
                               "along its width; 'keep' scales both axes by one factor, so "
                               "the image covers N x N grid cells in area, centred, and a "
                               "circle stays round at every aspect ratio",
                               choices=("stretch", "keep"))
    place_embed: bool = _f(False, "add to each patch token a fixed sin-cos code of where it is in "
                           "the image (fractions of height and width)")
    self_cond: bool = _f(False, "self-conditioning (Chen et al. 2022): the network also sees its "
                         "own previous clean estimate, clamped and without its per-channel mean, "
                         "as three more input channels (zeros at the first sampling step); "
                         "training feeds it on a share loss.self_cond_p of the micro-batches")
    gate: str = _f("headwise", "sigmoid output gate of attention: one scalar per head, "
                   "one per channel, or none", choices=("headwise", "elementwise", "none"))
    residual_k: float = _f(2.0, "every residual branch is scaled by 1/sqrt(k * blocks in its "
                           "path); 2 = two branches per block", lo=0.0, lo_open=True)
    time_embed_dim: int = _f(256, "width of the sinusoidal time features", lo=2)
    prediction: str = _f("v", "what the network predicts: velocity v = x - noise, or the "
                         "clean image x (JiT); the loss is on v either way", choices=("v", "x"))
    attention: str = _f("auto", "attention kernel: auto = flash-attn on CUDA in fp16/bf16 when "
                        "installed, else PyTorch SDPA; math = explicit reference",
                        choices=ATTENTION_BACKENDS)

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def in_channels(self) -> int:
        """Channels the network reads per pixel: the noisy image, and with self_cond the
        previous clean estimate beside it."""
        return 6 if self.self_cond else 3

    @property
    def bottleneck(self) -> int:
        return self.bottleneck_dim or max(1, self.patch_size * self.patch_size // 4)


@dataclass
class TextConfig:
    encoder: str = _f("qwen3", "qwen3 = a frozen Qwen3 model from the hub or a folder; builtin = "
                      "a small word-level encoder trained with the model (offline)",
                      choices=("qwen3", "builtin"))
    name_or_path: str = _f("Qwen/Qwen3-0.6B", "hub id or local folder of the Qwen3 encoder")
    max_tokens: int = _f(256, "prompts longer than this are truncated; batches are padded only "
                         "to their longest prompt", lo=1, hi=8192)
    builtin_dim: int = _f(256, "width of the builtin encoder (a multiple of 32)", lo=32)
    builtin_layers: int = _f(2, "transformer layers of the builtin encoder", lo=0, hi=24)
    builtin_word_skip: bool = _f(False, "add each word's own (normalised) embedding to the "
                                 "builtin encoder's output, so that words the context layers "
                                 "map alike (circle, square) stay apart")
    cache_dir: str = _f("", "folder of the precomputed qwen3 text features, one subfolder per "
                        "encoder (its files, max_tokens and dtype), reused by every run and "
                        "resume; '' = $PIXELHDM_CACHE_DIR/text-features when that variable is "
                        "set, else ~/.cache/pixelhdm/text-features")


@dataclass
class DataConfig:
    path: str = _f("", "dataset folder (set by --data or the studio; presets leave it empty)")
    min_side: int = _f(256, "shortest bucket side in pixels (smaller images are skipped)", lo=1)
    max_side: int = _f(512, "longest bucket side in pixels", lo=1)
    bucket_step: int = _f(64, "step between base bucket sizes in pixels", lo=1)
    stages: list[str] = _f([], "progressive resolution: 'SIDE until STEP' entries, rising in "
                           "both, e.g. ['32 until 4500']: up to SIDE px (every bucket side "
                           "scaled by SIDE / max_side) until optimizer step STEP, then the "
                           "next entry, then max_side; [] = max_side throughout")
    max_aspect: float = _f(2.0, "largest bucket aspect ratio (long side / short side)", lo=1.0)
    crop: str = _f("center", "crop after the cover-resize", choices=("center", "random"))
    flip: bool = _f(False, "random horizontal flips")
    drop_last: bool = _f(False, "drop each bucket's incomplete last batch")
    missing_caption: str = _f("skip", "image without a caption: skip it, or train it with "
                              "default_caption", choices=("skip", "default"))
    default_caption: str = _f("", "caption used for uncaptioned images when missing_caption "
                              "= default ('' = unconditional)")
    include_reg: bool = _f(False, "train folders named like regularisation or class sets (reg, "
                           "regularization, class_images, N_reg...) as ordinary images; off: "
                           "they are left out and the health report names them")
    caption_dropout: float = _f(0.1, "probability of training a sample unconditionally (for CFG)",
                                lo=0.0, hi=1.0)
    val_images: int = _f(4, "images held out for the validation loss", lo=0)
    workers: int = _f(2, "data-loading worker processes (0 = in the trainer process)", lo=0, hi=64)
    cache_mb: int = _f(1024, "MiB of decoded training crops kept in memory (per loading "
                       "process) when they are the same every epoch (centre crops; a flip "
                       "mirrors the kept crop) and not in the disk cache (0 = none)", lo=0)
    disk_cache_gb: float = _f(20.0, "GiB of disk for the decoded-crop cache, all datasets "
                              "together: each training image's centre crop is decoded once "
                              "before training and read by every worker, epoch, resume and "
                              "later run instead of the image; past the limit, crops no longer "
                              "trained and then other datasets' (least recently used first) "
                              "make room (0 = off)", lo=0.0)
    cache_dir: str = _f("", "folder of the decoded-crop cache, one subfolder per dataset "
                        "folder; '' = $PIXELHDM_CACHE_DIR/image-crops when that variable is "
                        "set, else ~/.cache/pixelhdm/image-crops")


@dataclass
class LossConfig:
    p_mean: float = _f(0.0, "mean of the logit-normal time distribution")
    p_std: float = _f(1.0, "std of the logit-normal time distribution", lo=0.0, lo_open=True)
    t_uniform: float = _f(0.0, "share of training times drawn uniformly on (0, 1) instead",
                          lo=0.0, hi=1.0)
    t_eps: float = _f(0.05, "x-prediction: 1 - t is clamped at t_eps when the clean estimate is "
                      "turned into a velocity (JiT); also the margin of the validation time grid",
                      lo=0.0, hi=0.49)
    time_shift: float = _f(1.0, "time shift s: t' = t / (t + (1 - t) s); s > 1 spends more time "
                           "near noise", lo=0.0, lo_open=True)
    shift_reference: int = _f(0, "0 = constant shift; else the image side at which the shift "
                              "equals time_shift, scaling with sqrt(pixels)", lo=0)
    freq_weight: float = _f(1.0, "weight of the JPEG-weighted block-DCT loss (0 = off)", lo=0.0)
    freq_quality: int = _f(90, "JPEG quality whose quantisation tables weight the DCT loss",
                           lo=1, hi=100)
    freq_ycbcr: bool = _f(True, "compute the frequency loss in YCbCr instead of RGB")
    repa_teacher: str = _f("", "local folder of a DINOv3 model for iREPA ('' = iREPA off)")
    repa_weight: float = _f(0.5, "weight of the iREPA cosine loss", lo=0.0)
    repa_layer: int = _f(8, "patch block (1-based) whose image tokens are aligned", lo=1)
    repa_until: int = _f(250000, "iREPA stops at this optimizer step", lo=0)
    repa_zscore_alpha: float = _f(1.0, "teacher tokens minus alpha * their spatial mean, over "
                                  "their spatial std (iREPA)", lo=0.0, hi=1.0)
    sra_weight: float = _f(0.0, "weight of self-representation alignment (SRA; 0 = off): "
                           "patch block sra_layer's tokens, through a small MLP, follow block "
                           "sra_target_layer of the EMA network at less noise", lo=0.0)
    sra_layer: int = _f(0, "SRA: patch block (1-based) whose image tokens are aligned (0 = "
                        "2/7 of the patch blocks, as the paper's 8 of 28)", lo=0)
    sra_target_layer: int = _f(0, "SRA: patch block of the EMA network that gives the target "
                               "(0 = 5/7 of the patch blocks, as the paper's 20 of 28)", lo=0)
    sra_dt: float = _f(0.2, "SRA: the EMA network sees each image at t + U(0, sra_dt) (less "
                       "noise; clamped at 1)", lo=0.0, hi=1.0)
    gamma_l2: float = _f(1e-4, "L2 penalty on the pixel-path AdaLN scales", lo=0.0)
    self_cond_p: float = _f(0.5, "with model.self_cond: share of the micro-batches that first "
                            "estimate the clean image without gradients (one more forward) and "
                            "feed that estimate back; the others feed zeros", lo=0.0, hi=1.0)


@dataclass
class TrainConfig:
    batch_size: int = _f(16, "images per micro-batch (per GPU)", lo=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", lo=1)
    max_steps: int = _f(100000, "optimizer steps of the run", lo=1)
    optimizer: str = _f("adamw", "adamw (fused where available) or adamw8bit (bitsandbytes, CUDA)",
                        choices=("adamw", "adamw8bit"))
    lr: float = _f(1e-4, "peak learning rate", lo=0.0, lo_open=True)
    min_lr: float = _f(1e-5, "floor of the cosine schedules", lo=0.0)
    betas: list[float] = _f([0.9, 0.95], "AdamW betas (beta2 0.95 as in JiT: fewer loss spikes)")
    eps: float = _f(1e-8, "AdamW epsilon", lo=0.0, lo_open=True)
    weight_decay: float = _f(0.01, "decoupled weight decay (never on norms, biases, embeddings)",
                             lo=0.0)
    schedule: str = _f("cosine", "learning-rate schedule after warm-up",
                       choices=("constant", "cosine", "cosine_restarts"))
    warmup_steps: int = _f(1000, "linear warm-up steps", lo=0)
    restart_every: int = _f(10000, "cycle length in steps for cosine_restarts", lo=1)
    restart_decay: float = _f(0.9, "peak multiplier per cycle for cosine_restarts", lo=0.0, hi=1.0)
    precision: str = _f("bf16", "autocast precision (fp16 uses a gradient scaler)",
                        choices=("fp32", "bf16", "fp16"))
    grad_clip: float = _f(1.0, "hard gradient-norm cap (0 = none)", lo=0.0)
    zclip: bool = _f(True, "adaptive z-score gradient clipping (ZClip)")
    zclip_z: float = _f(2.5, "ZClip z-score threshold", lo=0.0, lo_open=True)
    zclip_alpha: float = _f(0.97, "ZClip EMA factor of the grad-norm statistics",
                            lo=0.0, hi=1.0, lo_open=True)
    zclip_warmup: int = _f(25, "steps of plain statistics before ZClip clips", lo=1)
    ema_decay: float = _f(0.999, "EMA decay of the weights used for samples (0 = no EMA)",
                          lo=0.0, hi=1.0)
    ema_warmup: bool = _f(True, "EMA decay ramps as min(decay, (1+n)/(10+n))")
    grad_checkpointing: bool = _f(False, "recompute block activations in backward (less memory)")
    compile: bool = _f(True, "compile each transformer block with torch.compile (faster steps "
                       "after a warm-up; falls back to eager with one log line where no "
                       "compiler is available)")
    seed: int = _f(42, "seed of weights, data order, noise and times", lo=0)
    log_every: int = _f(10, "optimizer steps between metric lines", lo=1)
    save_every: int = _f(1000, "optimizer steps between checkpoints", lo=1)
    save_minutes: float = _f(10.0, "minutes between time-based resume points: one rotating "
                             "'latest' entry outside keep_last, so a crash loses at most this "
                             "much work (0 = off)", lo=0.0)
    keep_last: int = _f(3, "step checkpoints kept (named keeps are never deleted)", lo=1)
    sample_every: int = _f(500, "optimizer steps between sample grids (0 = never)", lo=0)
    val_every: int = _f(500, "optimizer steps between validation losses (0 = never)", lo=0)
    quality: bool = _f(True, "image-quality figures (engine/evaluate.py) at each sample grid")
    spike_factor: float = _f(5.0, "a loss above this multiple of its running average skips the "
                             "batch (0 = off)", lo=0.0)
    max_bad_steps: int = _f(3, "consecutive skipped batches before rolling back to the last "
                            "good state with half the learning rate", lo=1)
    cpu_threads: int = _f(0, "torch CPU threads (0 = torch's default)", lo=0)
    init_from: str = _f("", "start a new run from the weights of this checkpoint file or run "
                        "folder (its newest checkpoint); the optimizer and schedule start "
                        "fresh, the network and text encoder must be the same ('' = random "
                        "initialisation)")
    init_weights: str = _f("ema", "which weights train.init_from takes", choices=("ema", "raw"))


@dataclass
class SampleConfig:
    prompts: list[str] = _f(["a photo of a cat", "a red apple on a wooden table",
                             "a lighthouse at sunset", "a bowl of soup"],
                            "prompts of the training sample grid (a new run writes them to "
                            "its sample_prompts.txt, where they can be edited with per-prompt "
                            "options, also while it trains)")
    negative: str = _f("", "negative prompt ('' = unconditional)")
    seed: int = _f(0, "seed of the first image; image i uses seed + i", lo=0)
    steps: int = _f(30, "sampler steps", lo=1, hi=MAX_SAMPLER_STEPS)
    sampler: str = _f("heun", "sampler (euler_a, dpmpp_2m_sde: fresh noise in noise_interval)",
                      choices=SAMPLER_NAMES)
    noise_interval: list[float] = _f([0.0, 1.0], "euler_a, dpmpp_2m_sde: fresh noise only on "
                                     "the steps inside [lo, hi], deterministic steps elsewhere")
    cfg: float = _f(4.0, "classifier-free guidance scale (1 = off)", lo=0.0)
    cfg_rescale: float = _f(0.0, "CFG rescale phi (0 = plain CFG)", lo=0.0, hi=1.0)
    cfg_interval: list[float] = _f([0.1, 0.9], "guidance only for t in [lo, hi] (t = 0 noise)")
    cfg_ramp: float = _f(0.0, "guidance grows linearly from none at t = 0 to full at t = "
                         "cfg_ramp (0 = full throughout cfg_interval)", lo=0.0, hi=1.0)
    cfg_coarse: float = _f(0.0, "guidance scale of the coarse part of the guidance update "
                           "(what a blur of cfg_coarse_sigma keeps: where and how large "
                           "things are); the fine rest keeps cfg (0 = cfg for all)", lo=0.0)
    cfg_coarse_sigma: float = _f(1.5, "pixels of the Gaussian blur that divides coarse from "
                                 "fine", lo=0.1, hi=64.0)
    pag: float = _f(0.0, "perturbed-attention guidance scale (0 = off): away from the "
                    "estimate with pag_layers' attention the identity", lo=0.0)
    pag_layers: list[int] = _f([2], "patch blocks (1-based) perturbed in that estimate")
    pag_interval: list[float] = _f([0.1, 0.3], "perturbed-attention guidance only for t "
                                   "in [lo, hi] (near noise, where the layout is decided)")
    shift: float = _f(0.0, "sampling time shift (0 = the training shift for the image size)",
                      lo=0.0)
    width: int = _f(0, "sample width (0 = max_side)", lo=0)
    height: int = _f(0, "sample height (0 = max_side)", lo=0)


@dataclass
class RunConfig:
    description: str = _f("", "one line shown next to the preset's name")
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def sample_size(self, trained: dict[str, int] | None = None) -> tuple[int, int]:
        """(width, height) of training samples and the default generation size:
        sample.width/height when set, else the size the model trained most images at
        (`trained`: 'WxH' -> images, as a checkpoint records it), else data.max_side."""
        top = most_trained(trained)
        w, h = top if top else (self.data.max_side, self.data.max_side)
        return self.sample.width or w, self.sample.height or h


def parse_wxh(text: str) -> tuple[int, int]:
    w, _, h = str(text).lower().partition("x")
    return int(w), int(h)


def most_trained(trained: dict[str, int] | None) -> tuple[int, int] | None:
    """The (width, height) with the most images in `trained` ('WxH' -> images, as
    engine.generate_io.trained_sizes checks them); ties go to the larger size."""
    if not trained:
        return None
    return max(map(parse_wxh, trained), key=lambda s: (trained[f"{s[0]}x{s[1]}"], s[0] * s[1]))


SECTIONS = ("model", "text", "data", "loss", "train", "sample")


# --------------------------------------------------------------------------------------
# Dict <-> dataclass with type and range checks
# --------------------------------------------------------------------------------------

def sra_layers(lo: LossConfig, patch_layers: int) -> tuple[int, int]:
    """Self-alignment's (student, target) patch blocks, 1-based: the configured ones, or
    for 0 the paper's share of the depth (8 and 20 of 28 blocks)."""
    student = lo.sra_layer or max(1, round(patch_layers * 2 / 7))
    target = lo.sra_target_layer or max(student, round(patch_layers * 5 / 7))
    return student, target


def _fail(source: str, key: str, value, reason: str) -> ConfigError:
    return ConfigError(f"{source}: {key} = {value!r}: {reason}")


def _allowed(f: dataclasses.Field) -> str:
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(repr(c) for c in m["choices"])
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and hi is not None:
        return f"{'>' if m.get('lo_open') else '>='} {lo} and <= {hi}"
    if lo is not None:
        return f"{'>' if m.get('lo_open') else '>='} {lo}"
    if hi is not None:
        return f"<= {hi}"
    return ""


_LIST_OF = {int: "whole numbers, e.g. [16, 24, 24]", float: "numbers, e.g. [0.9, 0.95]",
            str: "texts, e.g. [a cat, a dog]"}


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def _coerce(value, tp, source: str, key: str):
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _fail(source, key, value, f"expected a list of {_LIST_OF[inner]}")
        return [_coerce(v, inner, source, key) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(source, key, value, "expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(source, key, value, "expected a whole number, e.g. 4")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as text
            try:
                value = float(value)
            except ValueError:
                raise _fail(source, key, value, "expected a number, e.g. 0.5 or 3e-4") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(source, key, value, "expected a number, e.g. 0.5 or 3e-4")
        if not math.isfinite(value):
            raise _fail(source, key, value, "expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(source, key, value, "expected a text string (put it in quotes when it "
                                            "reads as a number, true/false or a list)")
        return value
    raise TypeError(f"unsupported config type {tp}")


def _check_range(f: dataclasses.Field, value, source: str, key: str) -> None:
    m = f.metadata
    items = value if isinstance(value, list) else [value]
    for v in items:
        if m.get("choices") is not None and v not in m["choices"]:
            raise _fail(source, key, value, f"allowed: {_allowed(f)}")
        lo, hi = m.get("lo"), m.get("hi")
        if lo is not None and (v < lo or (m.get("lo_open") and v == lo)):
            raise _fail(source, key, value, f"allowed: {_allowed(f)}")
        if hi is not None and v > hi:
            raise _fail(source, key, value, f"allowed: {_allowed(f)}")


def _build_section(cls, raw: dict, source: str, prefix: str):
    if not isinstance(raw, dict):
        raise _fail(source, prefix, raw, "expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}.{unknown[0]}': "
                          f"{_did_you_mean(str(unknown[0]), fields)}(known keys of '{prefix}': "
                          f"{', '.join(fields)})")
    values = {}
    if cls is ModelConfig and raw.get("size"):
        size = raw["size"]
        if size not in MODEL_SIZES:
            raise _fail(source, "model.size", size, f"allowed: {_allowed(fields['size'])}")
        values.update(MODEL_SIZES[size])
    values.update(raw)
    out = {}
    for name, value in values.items():
        key = f"{prefix}.{name}"
        v = _coerce(value, hints[name], source, key)
        _check_range(fields[name], v, source, key)
        out[name] = v
    return cls(**out)


def config_from_dict(raw: dict, source: str = "<config>") -> RunConfig:
    """Build and validate a RunConfig from a plain dict (as read from YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {', '.join(SECTIONS)}")
    known = set(SECTIONS) | {"description"}
    unknown = sorted(set(raw) - known, key=str)
    if unknown:
        raise ConfigError(f"{source}: unknown section '{unknown[0]}': "
                          f"{_did_you_mean(str(unknown[0]), known)}(known: description, "
                          f"{', '.join(SECTIONS)})")
    hints = typing.get_type_hints(RunConfig)
    kwargs = {}
    if "description" in raw:
        kwargs["description"] = _coerce(raw["description"], str, source, "description")
    for name in SECTIONS:
        section = raw.get(name)
        kwargs[name] = _build_section(hints[name], {} if section is None else section, source,
                                      name)
    cfg = RunConfig(**kwargs)
    validate(cfg, source)
    return cfg


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------
# Cross-field validation
# --------------------------------------------------------------------------------------

def _near(v: int, p: int) -> str:
    """The multiples of p next to v, for messages."""
    lo = max(p, v // p * p)
    return f"{lo} or {lo + p}" if lo < v else str(lo)


def validate(cfg: RunConfig, source: str = "<config>") -> None:
    """Raise ConfigError for combinations that cannot build or train."""
    m, d, lo, tr, s = cfg.model, cfg.data, cfg.loss, cfg.train, cfg.sample
    if m.hidden_dim % m.num_heads:
        divisors = [h for h in range(1, 65) if m.hidden_dim % h == 0]
        raise _fail(source, "model.num_heads", m.num_heads,
                    f"hidden_dim {m.hidden_dim} is not divisible by it (allowed: a divisor of "
                    f"hidden_dim such as {', '.join(map(str, divisors[-4:]))})")
    if m.num_heads % m.num_kv_heads:
        raise _fail(source, "model.num_kv_heads", m.num_kv_heads,
                    f"num_heads {m.num_heads} is not divisible by it (allowed: a divisor of "
                    f"num_heads)")
    if m.time_embed_dim % 2:
        raise _fail(source, "model.time_embed_dim", m.time_embed_dim,
                    "allowed: an even number (sine and cosine halves)")
    hd = m.head_dim
    if hd % 8:
        # the GPU attention kernels (flash, memory-efficient, cuDNN) take head sizes that
        # are multiples of 8 only: another size would run nowhere fast on a GPU
        good = [h for h in range(1, m.hidden_dim + 1)
                if m.hidden_dim % h == 0 and (m.hidden_dim // h) % 8 == 0]
        raise _fail(source, "model.num_heads", m.num_heads,
                    f"head_dim = {m.hidden_dim}/{m.num_heads} = {hd} must be a multiple of 8 "
                    f"for the GPU attention kernels (allowed with this hidden_dim: "
                    f"{', '.join(map(str, good[-4:])) or 'none; choose a multiple of 8'})")
    if len(m.mrope_split) != 3 or sum(m.mrope_split) != hd or any(a % 2 or a < 0
                                                                   for a in m.mrope_split):
        raise _fail(source, "model.mrope_split", m.mrope_split,
                    f"allowed: three even numbers summing to head_dim {hd}")
    p = m.patch_size
    for key in ("min_side", "max_side", "bucket_step"):
        v = getattr(d, key)
        if v % p:
            raise _fail(source, f"data.{key}", v,
                        f"must be a multiple of model.patch_size {p} (nearest: {_near(v, p)})")
    if d.min_side > d.max_side:
        raise _fail(source, "data.min_side", d.min_side,
                    f"larger than data.max_side {d.max_side} (allowed: <= {d.max_side})")
    try:
        resolution_stages(d.stages, d.max_side, p)
    except ValueError as e:
        raise _fail(source, "data.stages", d.stages, str(e)) from None
    if lo.repa_teacher and lo.repa_layer > m.patch_layers:
        raise _fail(source, "loss.repa_layer", lo.repa_layer,
                    f"allowed: 1 to model.patch_layers = {m.patch_layers}")
    if lo.sra_weight > 0:
        if lo.sra_target_layer > m.patch_layers:
            raise _fail(source, "loss.sra_target_layer", lo.sra_target_layer,
                        f"allowed: 1 to model.patch_layers = {m.patch_layers}, or 0 (auto)")
        student, target = sra_layers(lo, m.patch_layers)
        if student > target:
            raise _fail(source, "loss.sra_layer", lo.sra_layer,
                        f"allowed: 1 to the target block {target} (loss.sra_target_layer), "
                        f"or 0 (auto)")
        if tr.ema_decay <= 0:
            raise _fail(source, "loss.sra_weight", lo.sra_weight,
                        "self-alignment learns from the EMA weights: set train.ema_decay > 0 "
                        "or loss.sra_weight=0")
    if len(tr.betas) != 2 or not all(0.0 <= b < 1.0 for b in tr.betas):
        raise _fail(source, "train.betas", tr.betas, "allowed: two numbers in [0, 1)")
    if tr.min_lr > tr.lr:
        raise _fail(source, "train.min_lr", tr.min_lr, f"allowed: <= train.lr {tr.lr}")
    for key in ("cfg_interval", "pag_interval", "noise_interval"):
        span = getattr(s, key)
        if not is_time_interval(span):
            raise _fail(source, f"sample.{key}", span, "allowed: [lo, hi] with 0 <= lo < hi <= 1")
    # blocks past the network's depth matter only once the guidance is on
    top = m.patch_layers if s.pag else math.inf
    if not (s.pag_layers and all(1 <= n <= top for n in s.pag_layers)):
        raise _fail(source, "sample.pag_layers", s.pag_layers,
                    f"allowed: patch blocks 1 to model.patch_layers = {m.patch_layers}")
    for key in ("width", "height"):
        v = getattr(s, key)
        if v % p:
            raise _fail(source, f"sample.{key}", v,
                        f"must be 0 or a multiple of model.patch_size {p} (nearest: "
                        f"{_near(v, p)})")
    if not s.prompts:
        raise _fail(source, "sample.prompts", s.prompts, "allowed: at least one prompt")
    if cfg.text.builtin_dim % 32:
        raise _fail(source, "text.builtin_dim", cfg.text.builtin_dim,
                    "allowed: a multiple of 32 (the builtin encoder uses 32-wide heads)")


# --------------------------------------------------------------------------------------
# Presets, overrides and files
# --------------------------------------------------------------------------------------

def list_presets() -> list[str]:
    """Names of the presets shipped in presets/, sorted."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve a preset name (`tiny-cpu`) or a YAML path to an existing file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if p.is_dir():
            raise ConfigError(f"{p}: is a folder; give a preset name or a .yaml file")
        if not p.is_file():
            raise ConfigError(f"{p}: no such config file; give a preset name (available: "
                              f"{', '.join(list_presets())}) or the path of a .yaml file")
        return p
    q = PRESETS_DIR / f"{name_or_path}.yaml"
    if not q.is_file():
        raise ConfigError(f"unknown preset '{name_or_path}' (available: "
                          f"{', '.join(list_presets())}; or give a path to a .yaml file)")
    return q


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a YAML text file (byte {e.start} is not UTF-8); give "
                          f"a preset .yaml file") from e
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)}); fix that line") from e


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what and where."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}"


def apply_overrides(raw: dict, overrides, source: str = "--set") -> dict:
    """Apply `section.key=value` strings to a raw dict; values are parsed as YAML."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: '{item}' is not of the form section.key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: {key} = {text!r}: not a valid value "
                              f"({_yaml_problem(e)}); quote text, write lists as [a, b]") from e
        if key == "description":
            raw["description"] = value if value is not None else ""
            continue
        if "." not in key:
            raise ConfigError(f"{source}: '{key}' must name a section and a key, e.g. "
                              f"train.lr=3e-4")
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{section}' in '{key}': "
                              f"{_did_you_mean(section, SECTIONS)}(known: {', '.join(SECTIONS)})")
        sec = raw.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"{source}: section '{section}' is not a mapping")
        if section == "model" and name == "size":
            # a new size row replaces the architecture keys the old row had set
            for k in MODEL_SIZES.get(sec.get("size", ""), {}):
                sec.pop(k, None)
        sec[name] = value
    return raw


def load_preset(name_or_path: str | os.PathLike, overrides=()) -> RunConfig:
    """Load a preset name or YAML file, apply `section.key=value` overrides, validate."""
    path = preset_path(name_or_path)
    raw = read_yaml(path)
    source = str(path)
    if overrides:
        raw = apply_overrides(raw, overrides, source=f"{path} (--set)")
        source = f"{path} with --set {' '.join(overrides)}"
    return config_from_dict(raw, source)


def dump_yaml(cfg: RunConfig) -> str:
    """Every value of `cfg` as YAML; loading it again yields an identical config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True, width=100)


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write `cfg` to `path` atomically, unless the file already says exactly that: a run's
    config.yaml keeps the time it was written (the studio's "Created") through resumes
    that change nothing."""
    text = dump_yaml(cfg)
    try:
        if Path(path).read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(Path(path), text)


def field_docs() -> dict[str, str]:
    """`section.key` -> one-line description, for help texts in the CLI and the studio."""
    docs = {"description": "one line shown next to the preset's name"}
    hints = typing.get_type_hints(RunConfig)
    for name in SECTIONS:
        for f in dataclasses.fields(hints[name]):
            allowed = _allowed(f)
            docs[f"{name}.{f.name}"] = f.metadata["doc"] + (f" ({allowed})" if allowed else "")
    return docs
