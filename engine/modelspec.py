"""What an exported model file says about itself (engine.checkpoint.export_inference).

An inference file leaves the machine it was trained on, so its metadata is made to
travel:

* `modelspec.*` keys, the safetensors metadata convention that model browsers and UIs
  read without loading a tensor: spec version, architecture, implementation, title,
  description, resolution (the most-trained size), date (ISO 8601), prediction type,
  and the trained sizes;
* none of the training machine's absolute paths. In the stored config data.path,
  text.cache_dir and data.cache_dir are emptied, loss.repa_teacher and a local
  text.name_or_path keep only their folder name (a hub id such as Qwen/Qwen3-0.6B stays
  as it is), and any other value that is an absolute path, anywhere in the metadata, is
  cut to its last part.
  A text encoder that was a local folder is named in `text_encoder_folder`: whoever
  loads the file gives that Qwen3 (engine.generate --text-encoder), or puts a folder of
  that name next to the file.

Pure: metadata in, metadata out; nothing here reads the weights.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path, PureWindowsPath

import yaml

from engine.config import ConfigError, config_from_dict, most_trained

SPEC_VERSION = "1.0.0"
IMPLEMENTATION = "pixelhdm"
# model.prediction -> the name other tools use for what the network outputs
PREDICTION_TYPES = {"v": "v_prediction", "x": "x_prediction"}
PREFIX = "modelspec."
# config settings that name a folder of the training machine: emptied, or cut to the name
REMOVED = ("data.path", "text.cache_dir", "data.cache_dir")
NAMED = ("loss.repa_teacher",)
ENCODER_NOTE = ("text.name_or_path was a folder on the machine the model was trained on; "
                "give that Qwen3 model when loading: `--text-encoder FOLDER_OR_HUB_ID` "
                "(python -m engine.generate), the 'Text encoder' field of the studio's Generate "
                "tab, or a folder of this name next to the model file")
# an absolute path: POSIX, home-relative, Windows drive or UNC, file URL
_ABSOLUTE = re.compile(r"^(?:/|~|\\\\|[A-Za-z]:[\\/]|file:)")
_STOP = "\\s\"',;"   # characters that end a path written inside a text


def leaf(path: str) -> str:
    """The last part of a path written with either separator ('' for a root)."""
    return PureWindowsPath(path.rstrip("/\\")).name


def names_folder(name_or_path: str) -> bool:
    """Whether a text.name_or_path names a local folder rather than a hub id: it starts
    like a path ('.', '/', '~', a drive), holds a backslash or more than the one '/' of
    'owner/name', or exists here."""
    name = name_or_path.strip()
    if not name:
        return False
    if (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
            or PureWindowsPath(name).anchor):
        return True
    try:
        return Path(name).expanduser().exists()
    except (OSError, ValueError):
        return True


# --------------------------------------------------------------------------------------
# Paths of the training machine
# --------------------------------------------------------------------------------------

def machine_roots(source: Path) -> list[str]:
    """Folders whose paths give away the machine: the home folder, the temporary folder,
    the working folder, and the folders above the source checkpoint (its run, the
    workspace...), longest first; never a bare filesystem root."""
    found = {Path.home(), Path(tempfile.gettempdir())}
    with contextlib.suppress(OSError):   # a working folder deleted meanwhile
        found.add(Path.cwd())
    source = Path(os.path.abspath(source))
    found.update(source.parents)
    for p in list(found):
        try:
            found.add(p.resolve())
        except (OSError, RuntimeError):
            continue
    return sorted({str(p) for p in found if len(p.parts) > 1}, key=len, reverse=True)


def portable_text(text: str, roots: list[str]) -> str:
    """`text` without the machine's paths: a value that is one absolute path becomes its
    last part; a path under one of `roots` written inside a longer text too."""
    one_line = "\n" not in text and text == text.strip()
    if one_line and _ABSOLUTE.match(text) and (not re.search(r"\s", text) or _exists(text)
                                               or any(_under(text, r) for r in roots)):
        return leaf(text)
    for root in roots:
        pattern = re.escape(root) + f"(?=$|[\\\\/{_STOP}])[^{_STOP}]*"
        text = re.sub(pattern, lambda m: leaf(m.group(0)), text)
    return text


def _under(text: str, root: str) -> bool:
    return text == root or (text.startswith(root) and text[len(root)] in "/\\")


def _exists(text: str) -> bool:
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError, RuntimeError):
        return False


def portable(value, roots: list[str]):
    """A JSON-like value (dicts, lists, strings, numbers) with portable_text applied to
    every string in it (dict keys stay)."""
    if isinstance(value, str):
        return portable_text(value, roots)
    if isinstance(value, dict):
        return {k: portable(v, roots) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, roots) for v in value]
    return value


def portable_config(raw: dict, roots: list[str]) -> tuple[dict, dict[str, str], str]:
    """(config dict without machine paths, setting -> what was done to it, the folder name
    of a local text encoder or ''). The known path settings are judged on their original
    values, then every other string goes through `portable`."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    changed: dict[str, str] = {}
    folder = ""

    def section(name: str) -> dict:
        return raw[name] if isinstance(raw.get(name), dict) else {}

    for key in REMOVED + NAMED:
        sec, _, name = key.partition(".")
        if isinstance(section(sec).get(name), str) and section(sec)[name]:
            section(sec)[name] = "" if key in REMOVED else leaf(section(sec)[name])
            changed[key] = "removed" if key in REMOVED else "folder name only"
    text = section("text")
    name = text.get("name_or_path")
    if text.get("encoder", "qwen3") == "qwen3" and isinstance(name, str) and names_folder(name):
        folder = text["name_or_path"] = leaf(name)
        changed["text.name_or_path"] = "folder name only: give the encoder when loading"
    return portable(raw, roots), changed, folder


def portable_meta(meta: dict, source: Path) -> dict:
    """A checkpoint's metadata without the training machine's paths (see the module
    docstring); `text_encoder_folder`/`text_encoder_note` name a local encoder and
    `portable_changes` lists the config settings changed."""
    roots = machine_roots(source)
    out = portable({k: v for k, v in meta.items() if k != "config"}, roots)
    raw = _config_dict(meta)
    if raw is not None:
        cfg, changed, folder = portable_config(raw, roots)
        out["config"] = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=100)
        out["portable_changes"] = changed
        if folder:
            out.update(text_encoder_folder=folder, text_encoder_note=ENCODER_NOTE)
    elif "config" in meta:   # unreadable: nothing of it can be trusted to be path-free
        out["config"] = portable_text(str(meta["config"]), roots)
    return out


def _config_dict(meta: dict) -> dict | None:
    try:
        raw = yaml.safe_load(meta["config"]) if isinstance(meta.get("config"), str) else None
    except yaml.YAMLError:
        return None
    return raw if isinstance(raw, dict) else None


# --------------------------------------------------------------------------------------
# ModelSpec keys
# --------------------------------------------------------------------------------------

def default_title(meta: dict) -> str:
    return f"{meta.get('run_id') or 'pixelhdm'} step {meta.get('step', 0)}"


def modelspec(meta: dict, title: str = "", description: str = "") -> dict[str, str]:
    """The `modelspec.*` keys of an export whose (portable) metadata is `meta`; an empty
    title or description takes a default made from the run."""
    raw = _config_dict(meta) or {}
    try:
        cfg = config_from_dict(raw, "checkpoint config")
    except ConfigError:
        cfg = None
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    size = model.get("size") or "custom"
    prediction = cfg.model.prediction if cfg else model.get("prediction", "v")
    trained = meta.get("trained_sizes") if isinstance(meta.get("trained_sizes"), dict) else {}
    top = most_trained(trained)
    if top is None and cfg is not None:
        top = (cfg.data.max_side, cfg.data.max_side)
    saved = meta.get("saved_at")
    when = saved if isinstance(saved, (int, float)) and not isinstance(saved, bool) else time.time()
    out = {
        "sai_model_spec": SPEC_VERSION,
        "architecture": f"pixelhdm/{size}",
        "implementation": IMPLEMENTATION,
        "title": " ".join(title.split()) or default_title(meta),
        "description": description.strip() or _description(meta, cfg, size, prediction),
        "date": datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds"),
        "prediction_type": PREDICTION_TYPES.get(prediction, str(prediction)),
    }
    if top is not None:
        out["resolution"] = f"{top[0]}x{top[1]}"
    if ranked := _ranked_sizes(trained):
        out["trained_sizes"] = ranked
    return {PREFIX + k: v for k, v in out.items()}


def _ranked_sizes(trained: dict) -> str:
    """'32x32: 640, 48x40: 120' (images per trained size, most first)."""
    usable = [(k, n) for k, n in trained.items()
              if isinstance(n, int) and not isinstance(n, bool) and n > 0]
    return ", ".join(f"{k}: {n}" for k, n in sorted(usable, key=lambda kv: (-kv[1], kv[0])))


def _description(meta: dict, cfg, size: str, prediction: str) -> str:
    head = f"PixelHDM text-to-image model ({size} size"
    if cfg is not None:
        head += f", patch {cfg.model.patch_size}"
    parts = [head + f"): pixel space, flow matching with {prediction}-prediction"]
    if cfg is not None:
        parts.append("conditioned on a builtin text encoder" if cfg.text.encoder == "builtin"
                     else f"conditioned on the Qwen3 text encoder {cfg.text.name_or_path}")
    if isinstance(meta.get("step"), int):
        parts.append(f"step {meta['step']} of run {meta.get('run_id', '?')}")
    return ", ".join(parts) + "."
