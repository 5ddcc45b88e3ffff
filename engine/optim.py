"""Optimisation pieces of the training loop: parameter groups and the optimizer, the
learning-rate schedules, ZClip adaptive gradient clipping, and the EMA of the weights.
Each keeps its state in plain tensors and numbers so checkpoints load without pickle."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from engine.config import TrainConfig

# --------------------------------------------------------------------------------------
# Parameter groups and optimizer
# --------------------------------------------------------------------------------------

def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for matrices, none for norms, biases and embeddings (they
    set scales and lookup vectors, which decay would only shrink)."""
    no_decay_ids = set()
    for mod in module.modules():
        if isinstance(mod, nn.Embedding):
            no_decay_ids.update(id(p) for p in mod.parameters(recurse=False))
    decay, plain = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in no_decay_ids or name.rsplit(".", 1)[-1] == "pos":
            plain.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0}]


def build_optimizer(module: nn.Module, cfg: TrainConfig, device: torch.device
                    ) -> tuple[torch.optim.Optimizer, str]:
    """AdamW (fused on CUDA and the CPU) or bitsandbytes' 8-bit AdamW. Returns the
    optimizer and a note for the log when the requested one was not available."""
    groups = param_groups(module, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    note = ""
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            bnb = None
        if bnb is not None and device.type == "cuda":
            return bnb.optim.AdamW8bit(groups, **kwargs), note
        note = ("train.optimizer = adamw8bit needs the bitsandbytes package on a CUDA GPU "
                f"({'not installed' if bnb is None else 'no CUDA device'}); using 32-bit AdamW, "
                "which needs about twice the optimizer memory")
    # fused: one kernel over all parameters, on CUDA and on the CPU alike (the CPU's
    # default otherwise is a Python loop over parameters)
    return torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu"), **kwargs), note


# --------------------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up to `lr`, then
    constant, cosine to `min_lr` at `max_steps`, or cosine restarts every
    `restart_every` steps whose peak is multiplied by `restart_decay` per cycle."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    s = step - cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        frac = min(1.0, s / span)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
    cycle, pos = divmod(s, cfg.restart_every)
    peak = max(cfg.min_lr, cfg.lr * cfg.restart_decay ** cycle)
    frac = pos / cfg.restart_every
    return cfg.min_lr + (peak - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))


# --------------------------------------------------------------------------------------
# ZClip (Kumar et al. 2025, arXiv 2504.02507)
# --------------------------------------------------------------------------------------

class ZClip:
    """Adaptive gradient clipping on the z-score of the total gradient norm.

    Keeps EMAs of the norm's mean mu and variance; after `warmup` steps that only
    collect statistics, a norm g with z = (g - mu) / sigma above `z_thr` is clipped to
    mu + (z_thr^2 / z) * sigma (the paper's reciprocal mode: the larger the spike, the
    harder the clip). The statistics are updated with the clipped norm, so a spike does
    not inflate them.
    """

    def __init__(self, z_thr: float = 2.5, alpha: float = 0.97, warmup: int = 25):
        self.z_thr, self.alpha, self.warmup = z_thr, alpha, warmup
        self.mean, self.var, self.count = 0.0, 0.0, 0
        self._seen: list[float] = []

    def target(self, g: float) -> float:
        """The norm to clip to for an observed norm g (g itself when not a spike), and
        update the statistics."""
        if not math.isfinite(g):
            return g
        if self.count < self.warmup:
            self._seen.append(g)
            self.count += 1
            if self.count == self.warmup:
                t = torch.tensor(self._seen, dtype=torch.float64)
                self.mean = float(t.mean())
                self.var = float(t.var(unbiased=False))
                self._seen = []
            return g
        std = math.sqrt(max(self.var, 1e-12))
        z = (g - self.mean) / std
        clipped = self.mean + (self.z_thr ** 2 / z) * std if z > self.z_thr else g
        self.mean = self.alpha * self.mean + (1 - self.alpha) * clipped
        self.var = self.alpha * self.var + (1 - self.alpha) * (clipped - self.mean) ** 2
        self.count += 1
        return clipped

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count, "seen": list(self._seen)}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
        self._seen = list(state["seen"])


def grad_norm(params: list[Tensor]) -> Tensor:
    """The total L2 norm of the parameters' gradients, an fp32 device scalar."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every value of every tensor is finite (one read from the device)."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def clip_gradients(params: list[Tensor], zclip: ZClip | None, max_norm: float, norm: float
                   ) -> tuple[float, float]:
    """Clip the gradients, whose total norm `norm` (see grad_norm) the caller has read,
    with ZClip and/or a hard cap. Returns (norm before, norm after). A non-finite norm
    is returned as is and nothing is clipped."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0, 0.0
    if not math.isfinite(norm):
        return norm, norm
    target = zclip.target(norm) if zclip is not None else norm
    if max_norm > 0:
        target = min(target, max_norm)
    if target < norm:
        scale = target / (norm + 1e-6)
        torch._foreach_mul_(grads, scale)
        return norm, target
    return norm, norm


# --------------------------------------------------------------------------------------
# EMA of the weights
# --------------------------------------------------------------------------------------

class EMA:
    """fp32 shadow copies of parameters: shadow = d * shadow + (1 - d) * param after each
    optimizer step, with the warm-up d_n = min(decay, (1 + n) / (10 + n)) so early
    averages are not dominated by the random initialisation."""

    def __init__(self, named_params: dict[str, Tensor], decay: float, warmup: bool = True):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.params = named_params
        self.shadow = {k: p.detach().float().clone() for k, p in named_params.items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys],
                             [self.params[k].detach().float() for k in keys], 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, named_params: dict[str, Tensor]) -> None:
        for k, p in named_params.items():
            p.copy_(self.shadow[k].to(p.dtype))
