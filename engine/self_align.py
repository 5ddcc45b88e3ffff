"""Self-representation alignment (SRA; Jiang et al. 2025, "Diffusion Transformers Can
Provide Representation Guidance by Themselves"): representation guidance without an
outside model. The image tokens after an early patch block (`loss.sra_layer`), through a
small MLP (flow.SRAProjector), learn to predict the tokens after a later block
(`loss.sra_target_layer`) of the EMA network, which sees the same image and noise at
less noise: t + U(0, loss.sra_dt), clamped at 1. Where iREPA needs a DINOv3 folder,
this needs only the run's own EMA weights, so the demo and any run without a teacher
can use it.

The teacher here is a second copy of the network (and of the builtin text encoder, when
the run trains one), refreshed from the EMA weights once per optimizer step. It runs
eager, without gradients, and only up to the target block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.config import RunConfig, sra_layers
from engine.encoders import load_text_encoder
from engine.flow import interpolate
from engine.model import PixelHDM


class SelfAlignTeacher:
    """The EMA network's tokens after block `loss.sra_target_layer`, the SRA target."""

    def __init__(self, cfg: RunConfig, text_encoder, device: torch.device):
        lo = cfg.loss
        self.layer, self.dt = sra_layers(lo, cfg.model.patch_layers)[1], lo.sra_dt
        self.net = PixelHDM(cfg.model, text_encoder.dim).to(device).requires_grad_(False)
        self.net.eval()
        # a trained builtin encoder has EMA weights of its own; a frozen one is shared
        trained = isinstance(text_encoder, torch.nn.Module)
        self.text = (load_text_encoder(cfg.text, device).requires_grad_(False).eval()
                     if trained else None)
        self._frozen = None if trained else text_encoder
        self._params = {**{f"net.{k}": p for k, p in self.net.named_parameters()},
                        **({f"text.{k}": p for k, p in self.text.named_parameters()}
                           if self.text is not None else {})}

    @torch.no_grad()
    def refresh(self, shadow: dict[str, Tensor]) -> None:
        """Copy the EMA weights (`net.*`, `text.*` as Trainable names them) in."""
        missing = [k for k in self._params if k not in shadow]
        if missing:
            raise ValueError(f"the EMA weights lack {len(missing)} weights of the "
                             f"self-alignment teacher (e.g. {missing[0]})")
        keys = list(self._params)
        torch._foreach_copy_([self._params[k] for k in keys], [shadow[k] for k in keys])

    @torch.no_grad()
    def __call__(self, x: Tensor, eps: Tensor, t: Tensor, captions: list[str],
                 generator: torch.Generator | None = None) -> Tensor:
        """Targets (B, L, D) for clean images x, the noise eps and the times t (B,) of the
        micro-batch: the teacher's tokens at t + U(0, dt), layer-normed over D."""
        later = (t + self.dt * torch.rand(t.shape, generator=generator, device=t.device,
                                          dtype=t.dtype)).clamp(max=1.0)
        text = (self._frozen if self.text is None else self.text).encode(captions)
        tokens = self.net.patch_tokens(interpolate(x, eps, later), later, text, self.layer)
        return F.layer_norm(tokens.float(), tokens.shape[-1:])
