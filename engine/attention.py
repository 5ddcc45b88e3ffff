"""Gated grouped-query attention with QK-norm and 3-axis mRoPE, over three
interchangeable kernels: flash-attn, PyTorch scaled-dot-product attention, and an
explicit-math reference that the other two are tested against.

Layouts: activations (B, S, D); per-head tensors (B, H, S, head_dim); key masks (B, S)
booleans, True = a real token that may be attended to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.config import ATTENTION_BACKENDS

try:  # optional GPU extra (requirements-gpu.txt); never needed on the CPU
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

BACKENDS = ATTENTION_BACKENDS
FAST_CUDA_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.CUDNN_ATTENTION]
# Masked calls leave cuDNN out: with an explicit mask and a sequence length of 64 modulo
# 128, its backward on Hopper gives NaN query gradients for rows whose log-sum-exp is
# below -88.7 (pytorch/pytorch#196678, torch 2.11-2.13). Flash takes no mask, so the
# memory-efficient kernel runs them, as on every other GPU.
MASKED_CUDA_KERNELS = [SDPBackend.EFFICIENT_ATTENTION]


# (major, minor) compute capability of each visible GPU, read once when a CUDA device is
# resolved (engine.distributed.resolve_device). A plain dict: code inside compiled blocks
# reads it as a constant.
_CAPABILITY: dict[int, tuple[int, int]] = {}


def note_gpu_capabilities() -> None:
    if not _CAPABILITY:
        for i in range(torch.cuda.device_count()):
            _CAPABILITY[i] = tuple(torch.cuda.get_device_capability(i))


def pre_ampere(device: torch.device) -> bool:
    """Whether `device` is a GPU older than Ampere (compute capability below 8.0: GTX 10xx,
    RTX 20xx, T4, V100). Those have no bf16 arithmetic, and neither flash-attn nor SDPA's
    flash and cuDNN kernels run on them: SDPA's memory-efficient kernel, in fp16 or fp32
    with K/V repeated to the query heads, is the fast kernel there. False for the CPU and
    for a GPU not yet resolved."""
    return device.type == "cuda" and gpu_capability(device) < (8, 0)


def gpu_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA `device`. The table is filled when a
    CUDA device is resolved, or here on first use by code that skipped that (never inside
    a compiled block: the trainer and generator resolve their device first)."""
    if not _CAPABILITY and torch.cuda.is_available():
        note_gpu_capabilities()
    return _CAPABILITY.get(device.index or 0, (8, 0))


class _LeanRMSNorm(torch.autograd.Function):
    """F.rms_norm over the last axis with a backward of five passes over x.

    PyTorch runs the CPU forward as one fused kernel but builds its backward from a dozen
    generic operators (powers, means, products and sums over the whole tensor). Here the
    backward reuses the forward's per-row 1 / rms r:
        n = x r,  gw = g w,  dx = r (gw - n mean(gw n)),  dw = sum over rows of g n
    with the mean a fused dot product per row. Same numbers up to rounding; about 3 % of a
    `tiny-cpu` training step at 64x64, whose per-pixel norms run on 16-wide rows."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        x, weight, rstd = ctx.saved_tensors
        n = x * rstd
        dx = dw = None
        if ctx.needs_input_grad[0]:
            gw = g * weight
            mean = torch.linalg.vecdot(gw, n).unsqueeze(-1) / x.shape[-1]
            dx = torch.addcmul(gw, n, mean, value=-1).mul_(rstd)
        if ctx.needs_input_grad[1]:
            dw = (g * n).reshape(-1, x.shape[-1]).sum(0)
        return dx, dw, None


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w, computed in fp32 and cast back (stable in bf16).
    Training on the CPU uses the lean backward above; compiled graphs and GPUs use
    PyTorch's own (fused there)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf, w = x.float(), self.weight.float()
        if (x.device.type == "cpu" and torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and (xf.requires_grad or w.requires_grad)):
            y = _LeanRMSNorm.apply(xf, w, self.eps)
        else:
            y = F.rms_norm(xf, (x.shape[-1],), w, self.eps)
        return y.to(x.dtype)


# --------------------------------------------------------------------------------------
# mRoPE: rotary embedding over three position axes (Lumina-Image 2.0 style)
# --------------------------------------------------------------------------------------

def rope_frequencies(split: tuple[int, int, int], theta: float) -> Tensor:
    """(3, head_dim / 2) float32 matrix F with angles = positions @ F.

    Axis a owns `split[a]` channels of each head, i.e. split[a]/2 rotation pairs with
    frequencies theta^(-2j / split[a]); row a of F holds them in that axis' columns and
    zeros elsewhere. The angle of a pair is position * frequency, so q.k after rotation
    depends only on position differences."""
    rows = torch.zeros(3, sum(split) // 2, dtype=torch.float64)
    col = 0
    for axis, dim in enumerate(split):
        j = torch.arange(0, dim, 2, dtype=torch.float64)
        rows[axis, col:col + dim // 2] = theta ** (-j / dim)
        col += dim // 2
    return rows.float()


def rope_angles(pos: Tensor, split: tuple[int, int, int], theta: float) -> Tensor:
    """Rotation angles for integer positions `pos` (..., 3) -> (..., head_dim / 2)."""
    return angles_from(pos, rope_frequencies(split, theta).to(pos.device))


def angles_from(pos: Tensor, freqs: Tensor) -> Tensor:
    """pos (..., 3) times the frequency matrix (3, n) -> (..., n), in fp32 elementwise
    products (a matmul would run in TF32 or bf16 under autocast and lose the angles)."""
    return (pos.float()[..., :, None] * freqs).sum(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved channel pairs (2j, 2j+1) of x (B, H, S, hd) by the angles
    whose cos/sin are (B or 1, 1, S, hd/2): each pair as one complex number times
    cos + i sin, a single fused multiply in fp32 (several times faster than rotating the
    pairs as separate real tensors, forward and backward)."""
    if torch.compiler.is_compiling():
        # Inductor generates no code for complex numbers (it would call the eager kernels
        # from inside the compiled block): there the rotation is written out in reals,
        # which it fuses into one pass
        pairs = x.float().unflatten(-1, (-1, 2))                          # (B, H, S, hd/2, 2)
        re, im = pairs.unbind(-1)
        out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
        return out.flatten(-2).to(x.dtype)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))      # (B, H, S, hd/2)
    out = torch.view_as_real(pairs * torch.complex(cos, sin))            # (B, H, S, hd/2, 2)
    return out.flatten(-2).to(x.dtype)                                    # (B, H, S, hd)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------

def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel that will run for a requested backend on this device and dtype."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} unknown (allowed: {', '.join(BACKENDS)})")
    flash_ok = (flash_attn_func is not None and device.type == "cuda"
                and dtype in (torch.float16, torch.bfloat16) and not pre_ampere(device))
    if name == "flash" and not flash_ok:
        raise RuntimeError(
            "model.attention = 'flash' needs the flash-attn package on a CUDA GPU in fp16/bf16 "
            f"(here: flash-attn {'installed' if flash_attn_func else 'not installed'}, device "
            f"{device.type}, dtype {str(dtype).removeprefix('torch.')}). Install it with "
            "`pip install --no-build-isolation flash-attn` (see requirements-gpu.txt) or set "
            "model.attention to auto or sdpa.")
    if name == "auto":
        return "flash" if flash_ok else "sdpa"
    return name


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, backend: str) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for q (B, Hq, S, d) and k, v (B, Hkv, S, d) with
    Hq a multiple of Hkv (grouped-query: query head i uses kv head i // (Hq / Hkv)).
    `mask` (B, S) masks keys. flash-attn takes no padding mask here, so masked calls run
    through SDPA (see `sdpa_attention` for which kernel that is)."""
    kernel = resolve_backend(backend, q.device, q.dtype)
    if kernel == "flash" and mask is None:
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)                                         # (B, Hq, S, d)
    if kernel in ("sdpa", "flash"):
        return sdpa_attention(q, k, v, mask, expand_kv=needs_expanded_kv(q, mask))
    return reference_attention(q, k, v, mask)


def needs_expanded_kv(q: Tensor, mask: Tensor | None) -> bool:
    """Whether SDPA needs K/V repeated to the query heads to reach a fast kernel.

    On the CPU, SDPA's flash kernel takes both a key mask and shared K/V heads. On CUDA
    the flash kernel reads shared K/V heads but takes no mask and no fp32, while the
    memory-efficient kernel takes masks and fp32 but not shared heads: every masked or
    fp32 call would fall to the math kernel, which materialises B x H x S^2 scores. Such
    calls repeat K/V instead (Hq/Hkv times the K/V memory, far less than the scores).
    A GPU older than Ampere has only the memory-efficient kernel: every call repeats."""
    if q.device.type != "cuda":
        return False
    return (mask is not None or q.dtype not in (torch.float16, torch.bfloat16)
            or pre_ampere(q.device))


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                   expand_kv: bool) -> Tensor:
    """PyTorch SDPA; on CUDA restricted to the flash, memory-efficient and cuDNN kernels,
    so a call that only the math kernel could take raises instead of running slowly."""
    hq, hkv = q.shape[1], k.shape[1]
    if expand_kv and hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)                          # (B, Hq, S, d)
        v = v.repeat_interleave(hq // hkv, dim=1)
    attn_mask = None if mask is None else mask[:, None, None, :]           # (B, 1, 1, S)
    gqa = k.shape[1] != hq
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
    with sdpa_kernel(cuda_kernels(mask)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)


def cuda_kernels(mask: Tensor | None) -> list[SDPBackend]:
    """The SDPA kernels a CUDA call may run: never the math kernel, and for a masked call
    the memory-efficient kernel alone (MASKED_CUDA_KERNELS)."""
    return FAST_CUDA_KERNELS if mask is None else MASKED_CUDA_KERNELS


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """The explicit reference: K/V repeated per group, fp32 scores and softmax."""
    hq, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hkv, dim=1)                              # (B, Hq, S, d)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, Hq, S, S)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


# --------------------------------------------------------------------------------------
# The attention layer
# --------------------------------------------------------------------------------------

class GatedAttention(nn.Module):
    """Grouped-query self-attention with per-head RMS QK-norm, mRoPE on q and k, and a
    sigmoid output gate computed from the layer's input ("Gated Attention for LLMs",
    Qiu et al. 2025, position G1: after SDPA, before the output projection).

    The gate projection starts at zero, so every gate starts at exactly 0.5.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, gate: str = "headwise",
                 backend: str = "auto"):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.gate_kind, self.backend = gate, backend
        self.q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        gate_out = {"headwise": heads, "elementwise": heads * self.head_dim, "none": 0}[gate]
        self.gate = nn.Linear(dim, gate_out, bias=False) if gate_out else None
        for lin in (self.q, self.k, self.v, self.o):
            nn.init.xavier_uniform_(lin.weight)
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                identity: bool = False) -> Tensor:
        """With `identity` every token attends to itself alone (the attention map is the
        identity, so the output is each token's own value): the perturbed branch of
        perturbed-attention guidance (engine.sampling.cfg_model)."""
        B, S, _ = x.shape
        v = self.v(x).view(B, S, self.kv_heads, self.head_dim)                  # (B, S, Hkv, d)
        if identity:
            out = v.repeat_interleave(self.heads // self.kv_heads, dim=2)       # (B, S, Hq, d)
        else:
            q = self.q(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)  # (B, Hq, S, d)
            k = self.k(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
            q = apply_rope(self.q_norm(q), cos, sin)
            k = apply_rope(self.k_norm(k), cos, sin)
            out = attention(q, k, v.transpose(1, 2), mask, self.backend).transpose(1, 2)
        if self.gate is not None:
            g = torch.sigmoid(self.gate(x)).view(B, S, self.heads, -1)           # (B, S, Hq, 1|d)
            out = out * g
        return self.o(out.reshape(B, S, -1))                                      # (B, S, D)
