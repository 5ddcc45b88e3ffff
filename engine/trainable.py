"""What a training run optimises, as one nn.Module (so DistributedDataParallel sees a
single forward): the PixelHDM network, the builtin text encoder when the config uses it,
and the iREPA and self-alignment projectors. Its forward is one micro-batch: encode the
captions, noise the images to times t, run the network and return every loss term
(engine/flow.py). With model.self_cond a micro-batch the trainer picks first runs the
network without gradients at the same times and feeds its clean estimate back as the
input beside z. The trainer, the dry run (engine/preflight.py) and nothing else call it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.config import RunConfig, sra_layers
from engine.flow import (
    IREPAProjector,
    SRAProjector,
    flow_losses,
    interpolate,
    to_clean,
    to_velocity,
    v_loss_per_sample,
    velocity_target,
)
from engine.model import PixelHDM, TextCond, patch_grid

# the training-only heads: saved with the raw weights, not averaged, not sampled with
PROJECTORS = ("repa.", "sra.")


class Trainable(nn.Module):
    """The network, the builtin text encoder (when used), the iREPA projector and the
    self-alignment (SRA) projector (each when its loss is on).
    A frozen text encoder (in training, its feature cache: engine/text_features.py
    `cached_text_encoder`) is kept as a plain attribute: it is neither trained nor saved."""

    def __init__(self, net: PixelHDM, text_encoder, projector: IREPAProjector | None,
                 sra_projector: SRAProjector | None = None):
        super().__init__()
        self.net = net
        self.text = text_encoder if isinstance(text_encoder, nn.Module) else None
        self.repa = projector
        self.sra = sra_projector
        self._frozen = None if self.text is not None else text_encoder

    @classmethod
    def for_run(cls, cfg: RunConfig, net: PixelHDM, text_encoder, teacher_dim: int | None,
                device: torch.device) -> Trainable:
        """The module a run of `cfg` trains: the iREPA projector when a teacher of width
        `teacher_dim` is loaded, the self-alignment projector when loss.sra_weight > 0.
        The trainer and the dry run both build it here."""
        D = cfg.model.hidden_dim
        repa = IREPAProjector(D, teacher_dim).to(device) if teacher_dim else None
        sra = SRAProjector(D).to(device) if cfg.loss.sra_weight > 0 else None
        return cls(net, text_encoder, repa, sra)

    def encode(self, captions: list[str]) -> TextCond:
        return (self._frozen if self.text is None else self.text).encode(captions)

    def forward(self, x: Tensor, captions: list[str], t: Tensor, eps: Tensor, cfg: RunConfig,
                step: int, teacher: Tensor | None, teacher_grid: tuple[int, int] | None,
                self_cond: bool = False, sra_targets: Tensor | None = None):
        text = self.encode(captions)
        z = interpolate(x, eps, t)
        grid = patch_grid(x, cfg.model.patch_size)
        repa_layer = cfg.loss.repa_layer if teacher is not None else None
        prev = None
        if self_cond:
            with torch.no_grad():
                prev = to_clean(self.net(z, t, text).float(), z, t, cfg.model.prediction)
        sra_layer = (sra_layers(cfg.loss, cfg.model.patch_layers)[0]
                     if sra_targets is not None else None)
        out = self.net.forward_train(z, t, text, repa_layer, prev=prev, sra_layer=sra_layer)
        terms = flow_losses(out.pred, z, t, x, eps, cfg.model.prediction, cfg.loss,
                            features=out.features, grid=grid, teacher=teacher,
                            teacher_grid=teacher_grid, projector=self.repa,
                            gamma_sq=out.gamma_sq, step=step, sra_features=out.sra_features,
                            sra_targets=sra_targets, sra_projector=self.sra)
        with torch.no_grad():
            per_sample = v_loss_per_sample(
                to_velocity(out.pred, z, t, cfg.model.prediction, cfg.loss.t_eps),
                velocity_target(x, eps, t, cfg.model.prediction, cfg.loss.t_eps))
        return terms, per_sample

    def weights(self) -> dict[str, Tensor]:
        """Everything saved as `model.*`: net., text., repa., sra."""
        return self.state_dict()

    def ema_params(self) -> dict[str, Tensor]:
        """Parameters averaged by the EMA (the projectors are not needed for sampling)."""
        return {k: p for k, p in self.named_parameters() if not k.startswith(PROJECTORS)}



