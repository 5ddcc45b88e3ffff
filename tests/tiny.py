"""The small configs the tests build networks and runs from, defined once.

NET is the network of the quick tests (32 wide: a forward pass takes milliseconds);
LEARNER is the one that learns the demo shapes in tens of steps (64 wide). Both are
override lines on the tiny-cpu preset; `tiny_cfg` (also the `tiny_config` fixture)
applies NET plus any extra lines."""

from __future__ import annotations

from engine.config import RunConfig, load_preset

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
