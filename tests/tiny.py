"""The small configs the tests build networks and runs from, defined once.

NET is the network of the quick tests (32 wide: a forward pass takes milliseconds);
LEARNER is the one that learns the demo shapes in tens of steps (64 wide). Both are
override lines on the tiny-cpu preset; `tiny_cfg` (also the `tiny_config` fixture)
applies NET plus any extra lines. `learner_net` builds the network tests of the model use,
`make_text` the text features they feed it."""

from __future__ import annotations

import dataclasses

import torch

from engine.config import ModelConfig, RunConfig, load_preset
from engine.model import PixelHDM, TextCond

NET = ["model.hidden_dim=32", "model.num_heads=2", "model.num_kv_heads=1",
       "model.mrope_split=[4,6,6]", "model.patch_layers=1", "model.pixel_layers=1",
       "model.pixel_dim=4", "model.bottleneck_dim=16", "text.builtin_dim=32",
       "text.builtin_layers=1"]
LEARNER = ["model.hidden_dim=64", "model.num_heads=4", "model.num_kv_heads=2",
           "model.mrope_split=[4,6,6]", "model.patch_layers=2", "model.pixel_layers=1",
           "model.pixel_dim=4"]


def tiny_cfg(*extra: str) -> RunConfig:
    """tiny-cpu with NET and `extra` override lines (patch 8, generation up to 128 px)."""
    return load_preset("tiny-cpu", [*NET, *extra])


def as_sets(lines) -> list[str]:
    """Override lines as the command line's `--set k=v` pairs."""
    return [a for kv in lines for a in ("--set", kv)]


TEXT_DIM = 32


def learner_cfg(**changes) -> ModelConfig:
    """The LEARNER network with two pixel blocks and `changes`."""
    cfg = load_preset("tiny-cpu", LEARNER).model
    return dataclasses.replace(cfg, **{"pixel_layers": 2, "bottleneck_dim": 16, **changes})


def learner_net(cfg: ModelConfig | None = None, seed: int = 0) -> PixelHDM:
    """That network (or `cfg`'s) with seeded weights, in eval mode."""
    torch.manual_seed(seed)
    return PixelHDM(cfg or learner_cfg(), TEXT_DIM).eval()


def make_text(lengths, T=None, dim=TEXT_DIM, seed=0) -> TextCond:
    """Random text features: `lengths` real tokens per caption, padded to T (masked)."""
    g = torch.Generator().manual_seed(seed)
    T = T or max(max(lengths), 1)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    tokens = torch.randn(len(lengths), T, dim, generator=g) * mask[..., None]
    pooled = torch.randn(len(lengths), dim, generator=g) * (torch.tensor(lengths) > 0)[:, None]
    return TextCond(tokens, mask, pooled)
