"""New runs that start from the weights of an existing checkpoint (train.init_from): to
fine-tune on new data, to go on at a higher resolution (the usual 256 then 512 recipe), or
to start over with another learning rate. The optimizer, the step count and the schedule
start fresh; only the weights come along (the EMA ones by default).

The new run may change the data, the resolution, the schedule and the losses. It may not
change the network's shape or the text encoder: those keys are compared with the
checkpoint's own config and refused by name when they differ. One change of the network
is allowed: model.self_cond on a plain checkpoint, whose input weights are widened with
zero weights for the estimate, as a new self-conditioned network starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from engine.checkpoint import load_weights
from engine.config import ConfigError, RunConfig
from engine.generate_io import checkpoint_config, resolve_checkpoint
from engine.model import with_estimate_inputs
from engine.trainable import PROJECTORS

# text keys that change what the network is conditioned on (max_tokens and the feature
# cache folder may change freely)
TEXT_KEYS = ("encoder", "name_or_path", "builtin_dim", "builtin_layers")


@dataclass
class InitSource:
    path: Path                 # the weights file
    weights: dict[str, Tensor]
    meta: dict
    cfg: RunConfig             # the config the weights were trained with
    which: str                 # "ema" or "raw": what was loaded

    def record(self) -> dict:
        """What a run started from it writes into its checkpoints' metadata."""
        return {"file": self.path.name, "run_id": self.meta.get("run_id", ""),
                "step": self.meta.get("step"), "weights": self.which}


def load_init(source: str | Path, which: str = "ema") -> InitSource:
    """The weights of a checkpoint file, or of a run folder's newest checkpoint.
    CheckpointError for a missing or damaged one."""
    if which not in ("ema", "raw"):
        raise ConfigError(f"train.init_weights = {which!r}: allowed: ema, raw")
    path = resolve_checkpoint(source)
    meta, cfg, _ = checkpoint_config(path)
    weights, _ = load_weights(path, ema=which == "ema")
    if which == "ema" and not meta.get("has_ema") and "exported_weights" not in meta:
        which = "raw"   # a checkpoint saved without EMA: its raw weights are all there is
    return InitSource(path, weights, meta, cfg, which)


def differences(src: RunConfig, cfg: RunConfig) -> list[str]:
    """'section.key (A in the checkpoint, B here)' for every key that shapes the network
    or its text conditioning and differs."""
    out = []
    for f in dataclasses.fields(src.model):
        a, b = getattr(src.model, f.name), getattr(cfg.model, f.name)
        if f.name == "self_cond" and b:
            continue   # a plain network's weights widen (apply)
        if a != b:
            out.append(f"model.{f.name} ({a!r} in the checkpoint, {b!r} here)")
    for key in TEXT_KEYS:
        a, b = getattr(src.text, key), getattr(cfg.text, key)
        if key.startswith("builtin") and src.text.encoder != "builtin":
            continue
        if key == "name_or_path" and src.text.encoder != "qwen3":
            continue
        if key == "name_or_path" and Path(str(a)).name == Path(str(b)).name:
            continue   # the same model, from another folder or the hub
        if a != b:
            out.append(f"text.{key} ({a!r} in the checkpoint, {b!r} here)")
    return out


def check_fits(init: InitSource, cfg: RunConfig) -> None:
    """ConfigError naming every differing key when `cfg` cannot take `init`'s weights."""
    _refuse_differences(init.path, differences(init.cfg, cfg))


def check_source(source: str | Path, cfg: RunConfig) -> None:
    """check_fits from the checkpoint's config alone, no weight read: for the command line,
    before the data is read and a text encoder loaded (a Qwen3 one would be fetched and
    encode every caption first). CheckpointError for a missing or damaged checkpoint."""
    path = resolve_checkpoint(source)
    _, src, _ = checkpoint_config(path)
    _refuse_differences(path, differences(src, cfg))


def _refuse_differences(path: Path, diff: list[str]) -> None:
    if diff:
        raise ConfigError(
            f"train.init_from {path}: a run started from a checkpoint may change the "
            f"data, resolution, schedule and losses, but not the network or the text "
            f"encoder, and these differ: {'; '.join(diff)}. Drop those settings (or start "
            f"from the checkpoint's own config), or choose another checkpoint")


# the input weights that read the previous estimate under model.self_cond (Trainable keys)
ESTIMATE_INPUTS = ("net.patch_in.weight", "net.pixel_in.weight")


def apply(init: InitSource, model) -> list[str]:
    """Load `init`'s weights into a Trainable (network and builtin text encoder strictly;
    the iREPA and self-alignment projectors only where their shapes still fit, since the
    teacher or the settings may have changed). Returns one note per part left fresh."""
    state = model.state_dict()
    take, notes, widened = {}, [], False
    for k, v in init.weights.items():
        if k.startswith(PROJECTORS):
            if k in state and state[k].shape == v.shape:
                take[k] = v
            continue
        if k in ESTIMATE_INPUTS and state[k].shape[1] == 2 * v.shape[1]:
            v = with_estimate_inputs(v)
            widened = True
        take[k] = v
    missing = [k for k in state if k not in take]
    needed = [k for k in missing if not k.startswith(PROJECTORS)]
    if needed:
        raise ConfigError(f"train.init_from {init.path}: the checkpoint lacks "
                          f"{len(needed)} weights of this network (e.g. {needed[0]}); choose "
                          f"another checkpoint")
    for prefix, name in (("repa.", "iREPA"), ("sra.", "self-alignment")):
        if any(k.startswith(prefix) for k in missing):
            notes.append(f"the {name} projector starts fresh (the checkpoint has none that "
                         f"fits)")
    if widened:
        notes.append("self-conditioning is new to these weights: the ones that read the "
                     "previous estimate start at zero")
    model.load_state_dict(take, strict=False)
    return notes
