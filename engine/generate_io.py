"""The edges of generation (engine/generate.py): reading a checkpoint for inference with
every part checked, finding its text encoder, and turning any picture into the RGB start
image of img2img.

A checkpoint file can be damaged (cut short, bytes changed), foreign (a safetensors file
of another program) or not fit the network its own config describes (weights of another
size, written by another engine version). Each case is refused with one message that
names the file, says what is wrong in a few words (not torch's list of every key) and
what to do. Nothing here writes anything.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import yaml
from PIL import Image
from torch import Tensor, nn

from engine.checkpoint import CheckpointError, list_checkpoints, read_meta
from engine.config import ConfigError, RunConfig, config_from_dict, parse_wxh
from engine.distributed import frozen_dtype
from engine.encoders import (
    BuiltinTextEncoder,
    EncoderLoadError,
    Qwen3TextEncoder,
    load_text_encoder,
    qwen3_width,
)
from engine.images import exif_orientation
from engine.modelspec import leaf, names_folder

PICK_ANOTHER = "pick another checkpoint"


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------

def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A weights file as given, or the newest step checkpoint of a run folder (or of its
    checkpoints/ folder)."""
    p = Path(path).expanduser()
    if p.is_dir():
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        infos = list_checkpoints(folder)
        if not infos:
            raise CheckpointError(f"'{p}' holds no checkpoint (expected "
                                  f"checkpoints/step_NNNNNNN.safetensors); give a run folder "
                                  f"that has saved at least once, or a .safetensors file")
        return infos[-1].path
    if not p.is_file():
        raise CheckpointError(f"checkpoint '{p}' does not exist; give a .safetensors file or a "
                              f"run folder")
    return p


def checkpoint_config(path: Path) -> tuple[dict, RunConfig, int]:
    """(metadata, training config, text-encoder width) of a weights file, each checked;
    CheckpointError naming the file otherwise."""
    path = Path(path)
    meta = read_meta(path)
    if not isinstance(meta.get("config"), str) or "text_dim" not in meta:
        raise CheckpointError(f"checkpoint '{path}' lacks its config or text_dim metadata; it "
                              f"was not written by this engine: {PICK_ANOTHER}")
    text_dim = meta["text_dim"]
    if isinstance(text_dim, bool) or not isinstance(text_dim, int) or text_dim < 1:
        raise CheckpointError(f"checkpoint '{path}' has damaged metadata (text_dim = "
                              f"{text_dim!r}); {PICK_ANOTHER}")
    try:
        cfg = config_from_dict(yaml.safe_load(meta["config"]), f"{path.name} (config)")
    except (ConfigError, yaml.YAMLError) as e:
        raise CheckpointError(f"the config stored in '{path}' is not valid for this engine "
                              f"version ({' '.join(str(e).split())}); generate with the engine "
                              f"version that wrote it, or {PICK_ANOTHER}") from e
    return meta, cfg, text_dim


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def load_part(module: nn.Module, weights: dict[str, Tensor], what: str, prefix: str,
              path: Path, error: type[Exception]) -> nn.Module:
    """`module` with a checkpoint part's weights (keys without `prefix.`) loaded strictly,
    frozen, in eval mode. `error` (with the file, the first difference and the count of
    differences) when keys or shapes differ or a value is NaN or infinite."""
    if not weights:
        raise error(f"checkpoint '{path}' holds no {prefix}.* weights for its {what}; it is "
                    f"incomplete: {PICK_ANOTHER}")
    expected = module.state_dict()
    shaped = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in weights]
    unknown = [k for k in weights if k not in expected]
    found = []
    if shaped:
        k = shaped[0]
        found.append(f"{len(shaped)} of another shape (e.g. {prefix}.{k} is "
                     f"{_shape(weights[k])} in the file, {_shape(expected[k])} in the network)")
    if missing:
        found.append(f"{len(missing)} missing (e.g. {prefix}.{missing[0]})")
    if unknown:
        found.append(f"{len(unknown)} unknown to the network (e.g. {prefix}.{unknown[0]})")
    if found:
        raise error(f"the {what} weights in '{path}' do not fit the network its config "
                    f"describes: {'; '.join(found)}. The file was changed, or written by "
                    f"another engine version: {PICK_ANOTHER}")
    for k, v in weights.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise error(f"the {what} weights in '{path}' hold NaN or infinite values "
                        f"({prefix}.{k}): the file is damaged or its training diverged; "
                        f"{PICK_ANOTHER} (an earlier one)")
    module.load_state_dict(weights)
    return module.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------
# The text encoder of a checkpoint
# --------------------------------------------------------------------------------------

class TextEncoderNeeded(EncoderLoadError):
    """The Qwen3 text encoder a checkpoint names is not on this machine and none was given
    when loading. `name`: what the checkpoint calls it; `width`: the hidden size it needs."""

    def __init__(self, message: str, name: str, width: int):
        super().__init__(message)
        self.name, self.width = name, width


def load_text_part(cfg: RunConfig, meta: dict, path: Path, text_dim: int,
                   weights: dict[str, Tensor], device: torch.device, dtype: torch.dtype,
                   override: str | None = None
                   ) -> tuple[BuiltinTextEncoder | Qwen3TextEncoder, RunConfig]:
    """(text encoder on `device`, the config naming the encoder actually loaded) of a
    checkpoint: its builtin encoder with the weights from the file (`weights`, keys
    without `text.`), or the Qwen3 its config names (on CUDA in `dtype`, fp32 for fp16
    (`frozen_dtype`); fp32 elsewhere).
    `override`, a folder or hub id, replaces that Qwen3; an export's encoder folder (meta
    `text_encoder_folder`) is used when a folder of that name lies next to the file.
    EncoderLoadError otherwise: TextEncoderNeeded when the encoder is not here and none
    was given; one that is not text_dim wide names both encoders."""
    override = (override or "").strip()
    if cfg.text.encoder == "builtin":
        if override:
            raise EncoderLoadError(f"checkpoint '{path}' has a builtin text encoder whose weights "
                                   f"are in the file; a text-encoder override ('{override}') is "
                                   f"only for checkpoints trained with a Qwen3 encoder: leave it "
                                   f"out")
        enc = load_part(BuiltinTextEncoder(cfg.text), weights, "builtin text-encoder", "text",
                        path, EncoderLoadError)
        return enc.to(device), cfg
    trained = meta.get("text_encoder_folder") or cfg.text.name_or_path
    if override and names_folder(override) and not Path(override).expanduser().exists():
        raise EncoderLoadError(f"the text encoder folder '{override}' does not exist: give the "
                               f"folder of a Qwen3 model (config.json, model.safetensors, "
                               f"tokenizer files) or its hub id")
    source = override or _named_encoder(cfg, meta, path, text_dim)
    width = qwen3_width(source) if override else None
    if width is not None and width != text_dim:   # refused before its weights are loaded
        raise EncoderLoadError(_wrong_width(source, width, path, trained, text_dim))
    cfg = copy.deepcopy(cfg)
    cfg.text.name_or_path = source
    enc = load_text_encoder(cfg.text, device,
                            frozen_dtype(dtype) if device.type == "cuda" else torch.float32)
    if enc.dim != text_dim:
        raise EncoderLoadError(_wrong_width(source, enc.dim, path, trained, text_dim))
    return enc, cfg


def _wrong_width(source: str, width: int, path: Path, trained: str, text_dim: int) -> str:
    used = "one" if source == trained else f"'{trained}'"
    return (f"the text encoder '{source}' has hidden size {width}, but checkpoint "
            f"'{Path(path).name}' was trained with {used} of hidden size {text_dim}: give the "
            f"Qwen3 model it was trained with (hidden size {text_dim}), e.g. with --text-encoder")


def _named_encoder(cfg: RunConfig, meta: dict, path: Path, text_dim: int) -> str:
    """The folder or hub id of the Qwen3 a checkpoint names, when it can be on this
    machine; TextEncoderNeeded when it is a folder that is not here."""
    folder, name = meta.get("text_encoder_folder"), cfg.text.name_or_path
    if isinstance(folder, str) and folder:
        plain = folder == leaf(folder) and folder not in (".", "..") and "\x00" not in folder
        if plain and (Path(path).parent / folder / "config.json").is_file():
            return str(Path(path).parent / folder)
        where = (f"'{folder}', a folder on the machine it was trained on (no folder of that "
                 f"name next to the file)")
    elif names_folder(name) and not Path(name).expanduser().is_dir():
        where = f"'{name}', a folder that does not exist on this machine"
    else:
        return name
    raise TextEncoderNeeded(
        f"checkpoint '{path}' needs its Qwen3 text encoder {where}: pass --text-encoder "
        f"FOLDER_OR_HUB_ID (Pipeline.load: text_encoder=...) with the same Qwen3 model it was "
        f"trained with (hidden size {text_dim}), e.g. its folder or its hub id",
        folder if isinstance(folder, str) and folder else name, text_dim)


# --------------------------------------------------------------------------------------
# Start images
# --------------------------------------------------------------------------------------

def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of a picture as shown (EXIF orientations 5 to 8 swap the axes)."""
    w, h = image.size
    return (h, w) if exif_orientation(image) >= 5 else (w, h)


# --------------------------------------------------------------------------------------
# Sizes the model was trained at
# --------------------------------------------------------------------------------------

def trained_sizes(meta: dict) -> dict[str, int]:
    """'WxH' -> images of the buckets a checkpoint's run trained on ({} for checkpoints
    that predate the record, or a damaged one)."""
    raw = meta.get("trained_sizes")
    if not isinstance(raw, dict):
        return {}
    out = {}
    for k, n in raw.items():
        try:
            w, h = parse_wxh(k)
        except ValueError:
            continue
        if isinstance(n, int) and not isinstance(n, bool) and n > 0 and w > 0 and h > 0:
            out[f"{w}x{h}"] = n
    return out


def describe_sizes(trained: dict[str, int], most: int = 4) -> str:
    """'32x32 (640 images), 48x40 (120) and 2 more', most-trained first."""
    ranked = sorted(trained.items(), key=lambda kv: (-kv[1], kv[0]))
    parts = [f"{k} ({n} image{'s' if n != 1 else ''})" if i == 0 else f"{k} ({n})"
             for i, (k, n) in enumerate(ranked[:most])]
    rest = len(ranked) - most
    return ", ".join(parts) + (f" and {rest} more" if rest > 0 else "")


def size_note(trained: dict[str, int], width: int, height: int) -> str:
    """A warning when width x height is far from every size the model was trained at:
    over 2x the largest trained area, under half the smallest, or an aspect ratio 25 %
    beyond the trained ones. '' when it is near, or nothing is known."""
    sizes = [parse_wxh(k) for k in trained]
    if not sizes or width <= 0 or height <= 0:
        return ""
    areas = [w * h for w, h in sizes]
    aspects = [w / h for w, h in sizes]
    area, aspect = width * height, width / height
    if (area <= 2 * max(areas) and area >= 0.5 * min(areas)
            and min(aspects) / 1.25 <= aspect <= max(aspects) * 1.25):
        return ""
    best = max(trained, key=lambda k: trained[k])
    return (f"{width}x{height} is far from the sizes this model was trained at "
            f"({describe_sizes(trained)}): expect repeated or broken subjects; {best} is "
            f"the size it knows best")
