"""Checkpoint files: safetensors only, so nothing is ever unpickled.

    checkpoints/step_0001000.safetensors        weights: `model.*` (raw) and `ema.*`
                                                 (EMA), metadata JSON under "pixelhdm"
    checkpoints/step_0001000.state.safetensors  training state: optimizer tensors under
                                                 `opt.*`, RNG states under `rng.*`, and
                                                 everything else as JSON under "state"
    checkpoints/keep.txt                         steps the user pinned (set_pinned writes
                                                 it, for the studio)

`model.*` keys are prefixed by part: `net.` (the PixelHDM network), `text.` (the builtin
text encoder, when used), `repa.` (the iREPA projector), `sra.` (the self-alignment
projector); the last two are trained but not averaged, so `ema.*` lacks them. The state
file is written first and the weights file last, each through a temporary file and
os.replace, so a step whose weights file exists is complete. An exported inference file
holds only `model.*` weights (the EMA ones by default) in a chosen dtype, portable
metadata and `modelspec.*` keys (engine/modelspec.py).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from engine.fileio import atomic_target, atomic_write_text, ensure_free
from engine.modelspec import PREFIX as MODELSPEC
from engine.modelspec import modelspec, portable_meta

FORMAT = 1
STEP_FILE = re.compile(r"^step_(\d{7,})\.safetensors$")
# the time-based resume point (train.save_minutes): one rotating entry, outside retention
LATEST_FILE = re.compile(r"^latest_(\d{7,})\.safetensors$")
LATEST_ANY = re.compile(r"^latest_(\d{7,})\.(state\.)?safetensors$")   # either file


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, damaged, or not a PixelHDM checkpoint."""


@dataclass
class CheckpointInfo:
    step: int
    path: Path
    state_path: Path | None   # None when the training state is missing (weights only)
    size: int                 # bytes, weights + state
    mtime: float


def step_name(step: int, prefix: str = "step") -> str:
    return f"{prefix}_{step:07d}"


def _nbytes(tensors: dict[str, Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in tensors.values())


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_target(path, _nbytes(tensors), durable=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)


def _clone_shared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors that share storage (e.g. tied weights): clone those."""
    seen, out = set(), {}
    for k, v in tensors.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), v.dtype) if v.numel() else None
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

def save_checkpoint(ckpt_dir: Path, step: int, model: dict[str, Tensor],
                    ema: dict[str, Tensor] | None, meta: dict,
                    state_tensors: dict[str, Tensor], state: dict, *,
                    latest: bool = False) -> Path:
    """Write one step's state file, then its weights file (which marks the pair complete).
    Returns the weights path. `latest` writes the rotating time-based resume point
    `latest_NNNNNNN.*` instead of a step checkpoint, and then removes the older latest
    entries: a crash at any moment leaves at least one complete pair."""
    ckpt_dir = Path(ckpt_dir)
    name = step_name(step, "latest" if latest else "step")
    tensors = {f"model.{k}": v for k, v in model.items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.items()})
    path, state_path = ckpt_dir / f"{name}.safetensors", ckpt_dir / f"{name}.state.safetensors"
    # a disk that visibly cannot hold the pair is named before anything is written
    ensure_free(path, _nbytes(tensors) + _nbytes(state_tensors))
    _atomic_save(_clone_shared(state_tensors), state_path,
                 {"state": json.dumps(state), "format": str(FORMAT)})
    meta = dict(meta, format=FORMAT, step=step, has_ema=ema is not None, saved_at=time.time())
    try:
        _atomic_save(_clone_shared(tensors), path, {"pixelhdm": json.dumps(meta)})
    except BaseException:   # a state file without its weights is no checkpoint: free its room
        if not path.exists():
            state_path.unlink(missing_ok=True)
        raise
    drop_latest(ckpt_dir, before=step + 1 if not latest else step)
    return path


def _latest_entries(ckpt_dir: Path) -> list[CheckpointInfo]:
    return _listing(ckpt_dir, LATEST_FILE, "latest")


def drop_latest(ckpt_dir: Path, before: int) -> None:
    """Remove the files of time-based resume points of steps below `before` (superseded by
    a newer latest entry or a step checkpoint at least as new), including a state file
    whose weights a crash never wrote."""
    for p in Path(ckpt_dir).iterdir():
        m = LATEST_ANY.match(p.name)
        if m and int(m.group(1)) < before:
            p.unlink(missing_ok=True)


def export_inference(src: Path, dst: Path, dtype: torch.dtype = torch.bfloat16,
                     ema: bool = True, title: str = "", description: str = "") -> Path:
    """An inference-only file: one set of weights (EMA if present and asked for) in
    `dtype`, with the source metadata made portable (no paths of this machine, see
    engine.modelspec), where it came from, and `modelspec.*` keys (`title` and
    `description` default to ones made from the run)."""
    weights, meta = load_weights(src, ema=ema)
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    meta = dict(portable_meta(meta, Path(src)), has_ema=False,
                exported_from=str(Path(src).name),
                exported_weights="ema" if ema and meta.get("has_ema") else "raw",
                exported_dtype=str(dtype).removeprefix("torch."), exported_at=time.time())
    _atomic_save({f"model.{k}": v for k, v in weights.items()}, Path(dst),
                 {"pixelhdm": json.dumps(meta), **modelspec(meta, title, description)})
    return Path(dst)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------

def read_meta(path: Path) -> dict:
    """The metadata of a weights file, without loading any tensor."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("pixelhdm")
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"checkpoint '{path}' is damaged or not a safetensors file "
                              f"({e}); pick another checkpoint") from e
    if raw is None:
        raise CheckpointError(f"'{path}' is a safetensors file but not a PixelHDM checkpoint "
                              f"(no 'pixelhdm' metadata); pick another checkpoint, one written "
                              f"by this engine")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        meta = e
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint '{path}' has damaged metadata (not a JSON object); "
                              f"pick another checkpoint")
    return meta


def read_modelspec(path: Path) -> dict[str, str]:
    """The `modelspec.*` metadata of a weights file (exports carry it), prefix removed;
    {} for a file without it or one that cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception:   # read_meta names what is wrong with the file
        return {}
    return {k[len(MODELSPEC):]: v for k, v in raw.items()
            if k.startswith(MODELSPEC) and isinstance(v, str)}


def load_weights(path: Path, ema: bool = True, device: str | torch.device = "cpu"
                 ) -> tuple[dict[str, Tensor], dict]:
    """(weights without the model./ema. prefix, metadata). EMA weights when asked for
    and present, else the raw ones."""
    meta = read_meta(path)
    prefix = "ema." if ema and meta.get("has_ema") else "model."
    out = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for k in f.keys():
                if k.startswith(prefix):
                    out[k[len(prefix):]] = f.get_tensor(k)
    except Exception as e:
        raise CheckpointError(f"checkpoint '{path}' could not be read ({e})") from e
    return out, meta


def load_state(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict]:
    """(tensors, JSON state) of a training-state file."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            state = json.loads((f.metadata() or {})["state"])
            return {k: f.get_tensor(k) for k in f.keys()}, state
    except Exception as e:
        raise CheckpointError(f"training state '{path}' is damaged or missing ({e}); resume "
                              f"from an earlier checkpoint") from e


def read_state_info(path: Path) -> dict:
    """The JSON part of a training-state file (step, stop_at, ...), without its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["state"])
    except Exception as e:
        raise CheckpointError(f"training state '{path}' is damaged or missing ({e}); resume "
                              f"from an earlier checkpoint") from e


def list_checkpoints(ckpt_dir: Path) -> list[CheckpointInfo]:
    """Step checkpoints in a folder, oldest first (the time-based latest entry is a resume
    point, not one of them)."""
    return _listing(ckpt_dir, STEP_FILE, "step")


def _listing(ckpt_dir: Path, pattern: re.Pattern, prefix: str) -> list[CheckpointInfo]:
    out = []
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return out
    for p in ckpt_dir.iterdir():
        m = pattern.match(p.name)
        if not m:
            continue
        state = p.with_name(f"{step_name(int(m.group(1)), prefix)}.state.safetensors")
        try:   # retention may delete a step while the folder is listed
            st = p.stat()
            state_size = state.stat().st_size if state.is_file() else None
        except OSError:
            continue
        out.append(CheckpointInfo(int(m.group(1)), p, state if state_size is not None else None,
                                  st.st_size + (state_size or 0), st.st_mtime))
    return sorted(out, key=lambda c: c.step)


def latest_resumable(ckpt_dir: Path, damaged: list | None = None) -> CheckpointInfo | None:
    """The newest point a run can resume from: the step checkpoint or time-based latest
    entry with its training state that has the highest step, of those whose two files
    open. Newer ones that do not (cut short, overwritten) are passed over, and appended to
    `damaged` as (CheckpointInfo, what is wrong) when it is given."""
    found = [c for c in list_checkpoints(ckpt_dir) + _latest_entries(ckpt_dir)
             if c.state_path is not None]
    for c in sorted(found, key=lambda c: c.step, reverse=True):
        why = damage(c)
        if not why:
            return c
        if damaged is not None:
            damaged.append((c, why))
    return None


def damage(info: CheckpointInfo) -> str:
    """What is wrong with a checkpoint's files ('' when the weights and the training state,
    if it has one, are whole): each file's header is read and its length checked against
    it, no tensor read and nothing mapped (Windows could then not delete the file while
    the trainer's retention does). Answers are kept per file size and time: the studio
    asks at every refresh."""
    for path in (info.path, info.state_path):
        if path is not None and (why := _file_damage(Path(path))):
            return f"{Path(path).name} is damaged ({why})"
    return ""


_DAMAGE: dict[tuple, str] = {}


def _file_damage(path: Path) -> str:
    """'' for a whole safetensors file, else what is wrong with it."""
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key in _DAMAGE:
            return _DAMAGE[key]
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(st.st_size - 8, 100 << 20):
                why = "no safetensors header"
            else:
                header = json.loads(f.read(n))
                ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
                expected = 8 + n + max(ends, default=0)
                why = ("" if expected == st.st_size else
                       f"{st.st_size:,} bytes where its header describes {expected:,}: cut "
                       f"short or overwritten")
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        why = "its header is not valid"
    if len(_DAMAGE) > 4096:
        _DAMAGE.clear()
    _DAMAGE[key] = why
    return why


def pinned_steps(ckpt_dir: Path) -> set[int]:
    """Steps listed in keep.txt (one per line; set_pinned writes it)."""
    try:
        text = (Path(ckpt_dir) / "keep.txt").read_text(encoding="utf-8")
    except OSError:
        return set()
    return {int(s) for s in text.split() if s.isdigit()}


def set_pinned(ckpt_dir: Path, step: int, pinned: bool) -> set[int]:
    """Pin `step` (retention never deletes it) or unpin it; keep.txt is replaced
    atomically, so a trainer applying retention meanwhile reads the old or the new list.
    Returns the pinned steps now."""
    pins = pinned_steps(ckpt_dir)
    pins = pins | {int(step)} if pinned else pins - {int(step)}
    atomic_write_text(Path(ckpt_dir) / "keep.txt", "".join(f"{s}\n" for s in sorted(pins)))
    return pins


def delete_checkpoint(ckpt_dir: Path, step: int) -> list[Path]:
    """Delete step checkpoint `step`: its weights file first (whose presence marks a
    complete step, so a failure half-way leaves no checkpoint that looks whole), then its
    training state, then its pin. Returns the deleted files; CheckpointError when the
    folder holds no file of that step."""
    ckpt_dir = Path(ckpt_dir)
    name = step_name(int(step))
    files = [ckpt_dir / f"{name}.safetensors", ckpt_dir / f"{name}.state.safetensors"]
    deleted = [p for p in files if p.is_file()]
    if not deleted:
        raise CheckpointError(f"there is no checkpoint of step {step} in {ckpt_dir} (deleted "
                              f"already, by retention or by hand)")
    for p in deleted:
        p.unlink(missing_ok=True)
    if int(step) in pinned_steps(ckpt_dir):
        set_pinned(ckpt_dir, step, False)
    return deleted


def retention_victims(steps: list[int], keep_last: int, keep: set[int]) -> list[int]:
    """Steps the retention rule deletes: all but the newest `keep_last`, the pinned steps
    and `keep` (the best validation step). Pure, so the studio previews the same rule."""
    steps = sorted(steps)
    protected = set(keep) | set(steps[-keep_last:] if keep_last > 0 else [])
    return [s for s in steps if s not in protected]


def apply_retention(ckpt_dir: Path, keep_last: int, keep: set[int] = frozenset()) -> list[Path]:
    """Delete the step checkpoints `retention_victims` names (pinned steps from keep.txt
    are protected too). Returns the deleted files."""
    infos = list_checkpoints(ckpt_dir)
    victims = set(retention_victims([c.step for c in infos], keep_last,
                                    pinned_steps(ckpt_dir) | set(keep)))
    deleted = []
    for info in infos:
        if info.step not in victims:
            continue
        for p in (info.path, info.state_path):
            if p is not None:
                p.unlink(missing_ok=True)
                deleted.append(p)
    return deleted


# --------------------------------------------------------------------------------------
# Optimizer and RNG state <-> flat tensors + JSON
# --------------------------------------------------------------------------------------

def flatten_optimizer(sd: dict) -> tuple[dict[str, Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], info: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, vals in info["scalars"].items():
        state.setdefault(int(idx), {}).update(vals)
    return {"state": state, "param_groups": info["param_groups"]}
