"""What a training run carries from step to step, and what its checkpoints restore.

`TrainState` holds the loop's counters and averages; `Parts` the objects whose state a
checkpoint saves beside the weights (optimizer, EMA, ZClip, grad scaler, data sampler,
noise generator). Three functions work on them:

    payload(state, parts, rng, fingerprint)     what the training-state file holds
    restore(ckpt, state, parts, ...)            a resume: everything back as it was
    rollback(ckpt, state, parts, initial)       after divergence: weights and optimizer
                                                back, the learning rate halved

so each can be tested alone (tests/test_train_state.py), and the loop in engine/train.py
reads top to bottom.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from engine.checkpoint import (
    CheckpointInfo,
    flatten_optimizer,
    load_state,
    load_weights,
    unflatten_optimizer,
)
from engine.distributed import Dist, gather_rng_states, restore_rng_states
from engine.job import resume_target

HOST_SEED = 500_000   # added to a rank's noise seed for its host-side generator (on a GPU)


def host_generator(device: torch.device, seed: int) -> torch.Generator | None:
    """The CPU generator of a rank's host-side draws beside a GPU noise generator seeded
    with `seed`; None on the CPU, where the noise generator serves (Parts.host_draws)."""
    return None if device.type == "cpu" else torch.Generator().manual_seed(seed + HOST_SEED)


class RestoreError(RuntimeError):
    """A checkpoint that does not fit the run it is restored into."""


@dataclass
class TrainState:
    """The loop's counters: exactly what a resume needs besides the weights and Parts."""
    step: int = 0                   # optimizer steps done
    stop_at: int = 0                # the step this process trains to
    epoch: int = 0
    position: int = 0               # batches of the epoch already taken (this rank)
    lr_scale: float = 1.0           # halved by every rollback
    loss_avg: float = 0.0           # running average of the loss, for the spike guard
    loss_count: int = 0
    best_val: float = math.inf      # lowest validation loss so far
    best_step: int | None = None    # its step (retention keeps that checkpoint)
    last_val: float | None = None   # the latest validation loss
    last_val_step: int | None = None   # the step it was measured at
    origin: dict | None = field(default=None, compare=False)   # train.init_from's record;
    # saved in the weights' metadata, not in the state file

    def state_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "origin"}
        out["best_val"] = self.best_val if math.isfinite(self.best_val) else None
        return out

    def load_state_dict(self, info: dict) -> None:
        """Take every counter `info` (a training-state file's JSON) holds; stop_at is the
        caller's to decide (engine.job.resume_target)."""
        for name in ("step", "epoch", "position", "lr_scale", "loss_avg", "loss_count",
                     "best_step", "last_val", "last_val_step"):
            if name in info:
                setattr(self, name, info[name])
        best = info.get("best_val")
        self.best_val = math.inf if best is None else float(best)


@dataclass
class Parts:
    """The training objects a checkpoint carries, besides the weights."""
    model: torch.nn.Module          # engine.trainable.Trainable
    optimizer: torch.optim.Optimizer
    ema: object | None              # engine.optim.EMA
    zclip: object | None            # engine.optim.ZClip
    scaler: torch.amp.GradScaler
    sampler: object                 # engine.buckets.BucketBatchSampler
    noise_gen: torch.Generator
    # caption dropout and self-conditioning draw on the host: from the noise generator on
    # the CPU, from this per-rank CPU generator beside a GPU's
    host_gen: torch.Generator | None = None

    @property
    def host_draws(self) -> torch.Generator:
        return self.noise_gen if self.host_gen is None else self.host_gen

    def rng_states(self, d: Dist, device: torch.device) -> dict[str, Tensor]:
        """Every rank's random states for a checkpoint (a collective call)."""
        return gather_rng_states(d, self.noise_gen, device, self.host_gen)


def payload(state: TrainState, parts: Parts, rng: dict[str, Tensor], fingerprint: str
            ) -> tuple[dict[str, Tensor], dict]:
    """(tensors, JSON) of a training-state file: the counters, optimizer, clipping, scaler,
    EMA count, data position and every rank's random state (`rng`)."""
    opt_tensors, opt_info = flatten_optimizer(parts.optimizer.state_dict())
    info = {**state.state_dict(),
            "sampler": parts.sampler.state_dict(state.position), "optimizer": opt_info,
            "zclip": parts.zclip.state_dict() if parts.zclip else None,
            "scaler": parts.scaler.state_dict() if parts.scaler.is_enabled() else None,
            "ema_updates": parts.ema.updates if parts.ema else 0, "fingerprint": fingerprint}
    return {**opt_tensors, **rng}, info


def _load_training_objects(ckpt: CheckpointInfo, parts: Parts, device: torch.device
                           ) -> tuple[dict, dict[str, Tensor], dict]:
    """Weights, EMA, optimizer, ZClip and scaler from `ckpt`; returns (weights metadata,
    state tensors, state JSON)."""
    # read on the CPU and copied into the tensors the model and EMA already have on the
    # device: a rollback in mid-run then needs no second copy of either on the GPU
    weights, meta = load_weights(ckpt.path, ema=False)
    try:
        parts.model.load_state_dict(weights)
    except RuntimeError as e:
        raise RestoreError(f"checkpoint {ckpt.path.name} does not fit this config (was the "
                           f"model section changed?): {str(e).splitlines()[0]}") from e
    del weights
    if parts.ema is not None:
        ema_w, ema_meta = load_weights(ckpt.path, ema=True)
        if ema_meta.get("has_ema"):
            for k in parts.ema.shadow:
                parts.ema.shadow[k].copy_(ema_w[k])
        del ema_w
    tensors, info = load_state(ckpt.state_path, device="cpu")
    parts.optimizer.state.clear()   # the moments it replaces go first (2x the weights)
    opt_tensors = {k: v.to(device) for k, v in tensors.items() if k.startswith("opt.")}
    parts.optimizer.load_state_dict(unflatten_optimizer(opt_tensors, info["optimizer"]))
    if parts.zclip and info.get("zclip"):
        parts.zclip.load_state_dict(info["zclip"])
    if parts.ema is not None:
        parts.ema.updates = info["ema_updates"]
    if info.get("scaler") and parts.scaler.is_enabled():
        parts.scaler.load_state_dict(info["scaler"])
    return meta, tensors, info


def restore(ckpt: CheckpointInfo, state: TrainState, parts: Parts, *, d: Dist,
            device: torch.device, fingerprint: str, seed: int, max_steps: int,
            requested: int | None, event: Callable[[str, str], None]) -> None:
    """A resume: weights, Parts and TrainState back to `ckpt`, the data position included
    when the dataset and batching are unchanged (else the epoch starts again, said through
    `event(kind, message)`)."""
    meta, tensors, info = _load_training_objects(ckpt, parts, device)
    state.origin = meta.get("init_from")
    state.stop_at = resume_target(info.get("stop_at"), max_steps, requested)
    state.load_state_dict(info)
    why = restore_rng_states(d, parts.noise_gen, device, tensors, parts.host_gen)
    if why:
        parts.noise_gen.manual_seed(seed * 1000 + d.rank + 7 * state.step)
        parts.host_gen = host_generator(device, seed * 1000 + d.rank + 7 * state.step)
        event("rng-reseeded", f"{why}; its noise is drawn afresh")
    changed = ("the dataset differs from the one this checkpoint was trained on"
               if info.get("fingerprint") != fingerprint else "")
    if not changed:
        try:
            parts.sampler.load_state_dict(info["sampler"])
        except ValueError:
            changed = ("the batch size, number of processes, drop_last or seed differ from "
                       "the checkpoint's")
    if changed:
        event("epoch-restarted", f"{changed}; epoch {state.epoch} starts again from its first "
                                 f"batch")
        parts.sampler.set_epoch(state.epoch)
        state.position = 0


def rollback(ckpt: CheckpointInfo | None, state: TrainState, parts: Parts,
             initial: dict[str, Tensor] | None, device: torch.device) -> str:
    """After several bad batches: the weights, EMA and optimizer of the last good
    checkpoint (`ckpt`), or the run's initial weights when none was saved yet, and half
    the learning rate. The step, data position and random state go on. Returns where it
    went back to."""
    if ckpt is not None:
        _load_training_objects(ckpt, parts, device)
        where = ckpt.path.name
    else:
        if initial is not None:
            parts.model.load_state_dict(initial)   # copied into the model's own tensors
            parts.optimizer.state.clear()
            if parts.ema is not None:   # the average may hold the bad steps as well
                parts.ema.updates = 0
                for k, v in parts.ema.shadow.items():
                    v.copy_(initial[k])
        where = "the initial weights"
    state.lr_scale *= 0.5
    return where
