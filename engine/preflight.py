"""Before a run: what a config will cost (parameters, memory, FLOPs, step time) and a dry
run that measures one real training step at the largest bucket, so an out-of-memory
error shows up in seconds instead of hours into a run.

The estimate is analytic: FLOPs from the layer shapes (one multiply-add = 2 FLOPs),
memory from the parameter count, the optimizer and the activations a step keeps, and the
step time from this device's measured matrix-multiply speed at an assumed efficiency.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from engine.buckets import make_buckets
from engine.config import RunConfig, TextConfig
from engine.distributed import (
    PRECISIONS,
    autocast_for,
    compute_precision,
    frozen_dtype,
    peak_rss_mb,
    release_memory,
    reset_peak_memory,
    resolve_device,
)
from engine.encoders import QWEN_TYPES, DinoTeacher, EncoderLoadError, load_text_encoder
from engine.flops import extra_forward_share, pixelhdm_flops
from engine.model import PixelHDM
from engine.optim import build_optimizer
from engine.self_align import SelfAlignTeacher
from engine.text_features import cached_text_encoder
from engine.train_io import oom_message
from engine.trainable import Trainable

# Width and parameter count of known Qwen3 encoders (read from config.json when local).
KNOWN_TEXT = {"Qwen/Qwen3-0.6B": (1024, 596e6), "Qwen/Qwen3-1.7B": (2048, 1.72e9),
              "Qwen/Qwen3-4B": (2560, 4.02e9)}
GPU_SIZES_GIB = (8, 12, 16, 24, 48, 80)
STEP_EFFICIENCY = 0.35   # fraction of the measured matmul speed a training step reaches


def text_shape(cfg: TextConfig) -> tuple[int, float]:
    """(width, frozen parameter count) of the configured text encoder, without loading it.
    EncoderLoadError when a local folder's config.json is not a Qwen3 config."""
    if cfg.encoder == "builtin":
        return cfg.builtin_dim, 0.0
    local = Path(cfg.name_or_path).expanduser() / "config.json"
    if not local.is_file():
        return KNOWN_TEXT.get(cfg.name_or_path, (1024, 596e6))
    try:
        c = json.loads(local.read_text(encoding="utf-8"))
        if c.get("model_type") not in QWEN_TYPES:
            raise ValueError(f"model_type {c.get('model_type')!r}")
        d, layers, inter = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
        heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
        hd = c.get("head_dim") or d // heads
        per_layer = d * hd * (heads * 2 + kv * 2) + 3 * d * inter
        return d, float(layers * per_layer + c["vocab_size"] * d)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as e:
        raise EncoderLoadError(f"text encoder '{cfg.name_or_path}': its config.json is not a Qwen3 "
                               f"model's ({type(e).__name__}: {e}); set text.name_or_path to a "
                               f"Qwen3 model folder or hub id (e.g. Qwen/Qwen3-0.6B)") from e


def largest_bucket(cfg: RunConfig) -> tuple[int, int]:
    d = cfg.data
    buckets = make_buckets(d.min_side, d.max_side, d.bucket_step, cfg.model.patch_size,
                           d.max_aspect)
    return max(buckets, key=lambda b: (b[0] * b[1], b[0]))


def forward_flops(cfg: RunConfig, width: int, height: int, text_tokens: int) -> dict[str, int]:
    """FLOPs of one forward pass for one image by part (2 per multiply-add;
    engine/flops.py)."""
    return pixelhdm_flops(cfg.model, text_shape(cfg.text)[0], width, height, text_tokens)


def count_parameters(cfg: RunConfig) -> int:
    with torch.device("meta"):
        net = PixelHDM(cfg.model, text_shape(cfg.text)[0])
    n = sum(p.numel() for p in net.parameters())
    if cfg.text.encoder == "builtin":
        t = cfg.text
        n += (8193 + t.max_tokens + 1) * t.builtin_dim + t.builtin_layers * 8 * t.builtin_dim ** 2
    return n


def machine_memory_gib() -> float | None:
    """This machine's physical memory in GiB; None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
    except (AttributeError, ValueError, OSError):    # Windows has no sysconf
        return None


def estimate(cfg: RunConfig, gpus: int = 1, device: str = "cuda") -> dict:
    """What one training step of `cfg` costs per GPU, estimated without running it.
    `device` "cpu": the memory is this machine's (no CUDA context), and "fits" compares
    it with the machine's memory instead of the GPU sizes."""
    on_cpu = torch.device(device).type == "cpu"
    tr, m = cfg.train, cfg.model
    width, height = largest_bucket(cfg)
    T = max(1, cfg.text.max_tokens // 2)   # typical caption length with batch padding
    params = count_parameters(cfg)
    _, text_params = text_shape(cfg.text)
    # a CPU without bf16 / fp16 arithmetic trains in fp32 (compute_precision)
    precision = compute_precision(tr.precision, torch.device("cpu"))[0] if on_cpu else tr.precision
    half = precision != "fp32"
    act_bytes = 2 if half else 4
    opt_bytes = 2 if tr.optimizer == "adamw8bit" else 8
    GiB = 2 ** 30
    weights = params * 4 / GiB
    grads = params * 4 / GiB
    optimizer = params * opt_bytes / GiB
    ema = params * 4 / GiB if tr.ema_decay > 0 else 0.0
    # loss.sra_weight: a second fp32 copy of the network gives the self-alignment targets
    sra = params * 4 / GiB if cfg.loss.sra_weight > 0 else 0.0
    # a frozen text encoder is unloaded before training (its features come from the disk
    # cache, engine/text_features.py); only the iREPA teacher stays
    frozen = 86e6 * (2 if half else 4) / GiB if cfg.loss.repa_teacher else 0.0
    # activations kept for backward, per sample: a transformer layer keeps ~34 values per
    # token and channel (Korthikanti et al. 2022, no attention matrix with fused kernels);
    # a pixel block ~30 values per pixel channel plus its compacted tokens. With
    # checkpointing only block inputs are kept, plus one block being recomputed.
    L = (width // m.patch_size) * (height // m.patch_size)
    S = L + T
    patch_block = 34 * S * m.hidden_dim * act_bytes
    pixel_block = (30 * width * height * m.pixel_dim + 34 * L * m.hidden_dim) * act_bytes
    if tr.grad_checkpointing:
        per_sample = (m.patch_layers * S * m.hidden_dim + m.pixel_layers * width * height
                      * m.pixel_dim) * act_bytes + max(patch_block, pixel_block)
    else:
        per_sample = m.patch_layers * patch_block + m.pixel_layers * pixel_block
    activations = tr.batch_size * per_sample * 1.15 / GiB   # allocator slack
    context = 0.0 if on_cpu else 0.5     # the CUDA context
    total = weights + grads + optimizer + ema + sra + frozen + activations + context
    parts = forward_flops(cfg, width, height, T)
    flops = float(sum(parts.values()))
    step_flops = (3 + extra_forward_share(cfg, parts)) * flops * tr.batch_size * tr.grad_accum
    if on_cpu:
        ram = machine_memory_gib()
        fits = ("" if ram is None else
                f"within this machine's {ram:.3g} GiB of memory" if total <= ram * 0.8 else
                f"more than 80 % of this machine's {ram:.3g} GiB of memory: lower the batch "
                f"size or resolution, or close other programs")
    else:
        sizes = [g for g in GPU_SIZES_GIB if total <= g * 0.92]
        fits = (f"fits a {sizes[0]} GB GPU" if sizes else
                f"needs more than {GPU_SIZES_GIB[-1]} GB: lower batch size or resolution")
    return {
        "parameters": params, "frozen_parameters": int(text_params),
        "bucket": [width, height], "image_tokens": L, "text_tokens": T,
        "gflops_per_image": flops / 1e9, "tflops_per_step": step_flops / 1e12,
        "memory_gib": {"weights": weights, "gradients": grads, "optimizer": optimizer,
                       "ema": ema, "self_alignment_teacher": sra, "frozen_encoders": frozen,
                       "activations": activations,
                       "total": total},
        "fits": fits, "device": "cpu" if on_cpu else "cuda",
        "gpus": gpus,
    }


def measured_tflops(device: torch.device, dtype: torch.dtype, n: int = 1024) -> float:
    """Matrix-multiply speed of this device in TFLOP/s (best of a few n x n products)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n ** 3 / best / 1e12


def dry_run(cfg: RunConfig, device: str | None = None, steps: int = 3) -> dict:
    """Run `steps` real training steps (forward, backward, optimizer) at the largest bucket
    with the configured batch size and the longest captions, on random pixels. Reports the
    time of the last steps and the peak memory. Raises RuntimeError with the settings to
    change when the step does not fit in memory. Everything it allocated is released
    before it returns: the studio starts the real run in another process right after."""
    dev = resolve_device(device)
    try:
        return _dry_run(cfg, dev, steps)
    except RuntimeError as e:
        if not (isinstance(e, torch.OutOfMemoryError)
                or isinstance(e.__cause__, torch.OutOfMemoryError)):
            raise
        # the error's traceback holds the failed step's frames (network, optimizer,
        # activations): only its text leaves this block, so that the memory can go back
        message = str(e)
    finally:
        release_memory(dev)
    raise RuntimeError(message)


def _dry_run(cfg: RunConfig, dev: torch.device, steps: int) -> dict:
    captions = [" ".join(["word"] * cfg.text.max_tokens)] * cfg.train.batch_size
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        return _measure(cfg, dev, steps, captions, dataclasses.replace(cfg.text, cache_dir=tmp))


def _measure(cfg: RunConfig, dev: torch.device, steps: int, captions: list[str],
             text_cfg: TextConfig) -> dict:
    """The dry run's steps, with a frozen text encoder unloaded as in training (its
    features cached in a folder of the dry run's own, so the user's cache stays clean).
    With model.self_cond every step feeds back its estimate: the slower kind of step, so
    its time and memory bound the run's."""
    tr = dataclasses.replace(cfg.train, precision=compute_precision(cfg.train.precision, dev)[0])
    width, height = largest_bucket(cfg)
    dtype = frozen_dtype(PRECISIONS[tr.precision])
    if cfg.text.encoder == "qwen3":
        text = cached_text_encoder(text_cfg, captions, dev, dtype, log=lambda _: None)
    else:
        text = load_text_encoder(text_cfg, dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(dev)   # the studio's earlier work does not count
    teacher = DinoTeacher(cfg.loss.repa_teacher, dev, dtype) if cfg.loss.repa_teacher else None
    net = PixelHDM(cfg.model, text.dim).to(dev)
    net.grad_checkpointing = tr.grad_checkpointing
    model = Trainable.for_run(cfg, net, text, teacher.dim if teacher else None, dev)
    sra_teacher = SelfAlignTeacher(cfg, text, dev) if model.sra is not None else None
    optimizer, _ = build_optimizer(model, tr, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=tr.precision == "fp16")
    B = tr.batch_size
    x = torch.rand(B, 3, height, width, device=dev) * 2 - 1
    grid = (height // cfg.model.patch_size, width // cfg.model.patch_size)
    times = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            t = torch.rand(B, device=dev)
            eps = torch.randn_like(x)
            teacher_tokens = teacher(x, grid) if teacher else None
            with autocast_for(tr.precision, dev):
                sra_targets = sra_teacher(x, eps, t, captions) if sra_teacher else None
                terms, _ = model(x, captions, t, eps, cfg, 0, teacher_tokens,
                                 grid if teacher else None, cfg.model.self_cond,
                                 sra_targets=sra_targets)
            scaler.scale(terms["total"]).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as e:
        raise RuntimeError(oom_message(cfg, x.shape)) from e
    step_s = min(times[1:] or times)
    if dev.type == "cuda":   # what the card gives the process: the allocator's reservation
        peak = torch.cuda.max_memory_reserved(dev) / 2 ** 20
    else:
        peak = peak_rss_mb()   # 0 where the system does not say (Windows)
    return {"device": str(dev), "bucket": [width, height], "batch_size": B,
            "seconds_per_step": step_s * tr.grad_accum, "images_s": B / step_s,
            "peak_memory_mib": peak, "peak_is_process_rss": dev.type != "cuda",
            "loss": float(terms["total"].detach())}


CPU_DAYS_WARNING = 2.0   # a config that would train longer than this on the CPU is a GPU one
CPU_TFLOPS_CEILING = 1.0   # no CPU trains faster than this: below it, no need to measure


@functools.cache
def _cpu_tflops() -> float:
    """This machine's fp32 matmul speed, measured once per process."""
    return measured_tflops(torch.device("cpu"), torch.float32)


def schedule_notes(cfg: RunConfig, stop_at: int | None = None) -> list[str]:
    """What a run shorter than its periodic settings never does: validate (so it records
    no validation loss, and no checkpoint can be picked by it) or finish the learning-rate
    warm-up. `stop_at`: the step this process trains to (default train.max_steps)."""
    tr, notes = cfg.train, []
    end = stop_at or tr.max_steps
    if tr.val_every and cfg.data.val_images and end < tr.val_every:
        notes.append(f"the run ends at step {end}, before its first validation "
                     f"(train.val_every = {tr.val_every}): it records no validation loss; "
                     f"lower train.val_every to see one")
    if tr.max_steps <= tr.warmup_steps:
        notes.append(f"train.max_steps = {tr.max_steps} ends within the learning-rate "
                     f"warm-up (train.warmup_steps = {tr.warmup_steps}): the learning rate "
                     f"never reaches train.lr; lower train.warmup_steps")
    return notes


def cpu_warning(cfg: RunConfig, device: str | torch.device, step_seconds: float | None = None
                ) -> str:
    """'' unless `cfg` is sized for a GPU and is about to train on the CPU: then one line
    with the expected time and what to do instead. `step_seconds` skips the measurement."""
    if torch.device(device).type != "cpu":
        return ""
    if step_seconds is None:
        tflops = estimate(cfg)["tflops_per_step"]
        if tflops / CPU_TFLOPS_CEILING * cfg.train.max_steps / 86400 < CPU_DAYS_WARNING:
            return ""   # even the fastest CPU would train it in time
        step_seconds = tflops / (_cpu_tflops() * STEP_EFFICIENCY)
    days = step_seconds * cfg.train.max_steps / 86400
    if days < CPU_DAYS_WARNING:
        return ""
    return (f"this config is sized for a GPU, and this machine trains on the CPU: about "
            f"{step_seconds:.3g} s per step, {days:,.0f} days for train.max_steps = "
            f"{cfg.train.max_steps:,}. Use the tiny-cpu preset here, or train on a machine "
            f"with an NVIDIA GPU")
