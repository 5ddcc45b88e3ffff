"""Generation settings inside PNG files: written as two text chunks and read back
("recall").

* `parameters`: the widely-used layout other tools read and write,
      <prompt>
      Negative prompt: <negative>
      Steps: 30, Sampler: Heun, CFG scale: 4.0, Seed: 123, Size: 512x512, Model hash: ...
* `pixelhdm`: a JSON object with every setting (run id, checkpoint step and hash, all
  sampling parameters, engine version).

`read_png_parameters` prefers the JSON and falls back to parsing `parameters`, so PNGs
from other tools in that layout recall their prompt, negative, steps, sampler, guidance,
seed and size too. Samplers are written with the labels other tools use
(engine.sampling.SAMPLER_LABELS: "Euler", "DPM++ 2M", ...) and read back from those
labels, from common variants ("DPM++ 2M Karras") and from our own names ("dpmpp_2m").
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from engine.fileio import file_mode
from engine.sampling import SAMPLER_LABELS

METADATA_FORMAT = 1
FILE_NUMBER = re.compile(r"^(\d+)-")


class MetadataError(ValueError):
    """An image file cannot be read."""


# label in the `parameters` text <-> key of the params dict, and how to read the value
_TEXT_FIELDS: list[tuple[str, str, Callable]] = [
    ("Steps", "steps", int), ("Sampler", "sampler", str), ("CFG scale", "cfg", float),
    ("Seed", "seed", int), ("Size", "size", str), ("Model hash", "checkpoint_hash", str),
    ("Model", "run_id", str), ("Denoising strength", "strength", float),
    ("Shift", "shift", float), ("CFG rescale", "rescale", float),
    ("CFG interval", "interval", lambda v: [float(a) for a in v.split("-")]),
    ("CFG ramp", "ramp", float), ("PAG scale", "pag", float),
    ("CFG coarse", "coarse", float), ("CFG coarse blur", "coarse_sigma", float),
    ("Noise interval", "noise_interval", lambda v: [float(a) for a in v.split("-")]),
    ("Checkpoint step", "checkpoint_step", int), ("Weights", "weights", str),
    ("Prediction", "prediction", str), ("PixelHDM version", "engine_version", str),
]
_PAIR = re.compile(r'\s*([A-Za-z][\w \-/+().]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def format_parameters(params: dict) -> str:
    """The `parameters` text: prompt, 'Negative prompt: ...' (when there is one), then one
    line of 'Label: value' pairs."""
    spans = {key: "-".join(str(v) for v in params[key])
             for key in ("interval", "noise_interval") if params.get(key) is not None}
    values = dict(params, size=f"{params['width']}x{params['height']}", **spans,
                  sampler=SAMPLER_LABELS.get(params.get("sampler"), params.get("sampler")))
    pairs = [f"{label}: {_quote(values[key])}" for label, key, _ in _TEXT_FIELDS
             if values.get(key) is not None]
    lines = [params["prompt"]]
    if params.get("negative"):
        lines.append(f"Negative prompt: {params['negative']}")
    return "\n".join(lines + [", ".join(pairs)])


# the names a sampler goes by, lower-cased: its label, our key, and common variants (the
# Karras schedule is a time grid, not another sampler)
_SAMPLER_NAMES = {
    **{label.lower(): key for key, label in SAMPLER_LABELS.items()},
    **{key: key for key in SAMPLER_LABELS},
    "dpmpp 2m": "dpmpp_2m", "dpm++ 2m karras": "dpmpp_2m", "dpmpp_2m karras": "dpmpp_2m",
    "dpmpp 2m sde": "dpmpp_2m_sde", "dpm++ 2m sde karras": "dpmpp_2m_sde",
    "euler karras": "euler", "heun karras": "heun", "ab2": "ab2",
}


def sampler_key(name: str) -> str:
    """Our sampler key for a name written in a PNG ('DPM++ 2M Karras' -> dpmpp_2m, 'Heun'
    -> heun, 'Euler a' -> euler_a); unknown names (e.g. 'DPM++ SDE') are returned as
    written."""
    return _SAMPLER_NAMES.get(" ".join(name.strip().lower().split()), name)


def parse_parameters(text: str) -> dict:
    """Read a `parameters` text (ours or another tool's in the same layout) into the params
    keys: prompt, negative and whatever the last line holds; labels without a key of ours
    go to params['other'] as text. 'Model' is read as run_id, 'Model hash' as
    checkpoint_hash."""
    lines = text.strip("\n").split("\n")
    pairs = [(m.group(1).strip(), m.group(2).strip()) for m in _PAIR.finditer(lines[-1])
             if m.group(1)]
    if len(pairs) < 3:  # no settings line: the whole text is the prompt
        pairs, body = [], lines
    else:
        body = lines[:-1]
    neg_at = next((i for i, ln in enumerate(body) if ln.startswith("Negative prompt:")), len(body))
    out: dict = {"prompt": "\n".join(body[:neg_at]),
                 "negative": "\n".join(body[neg_at:])[len("Negative prompt:"):].strip()}
    fields = {label: (key, conv) for label, key, conv in _TEXT_FIELDS}
    other = {}
    for label, value in pairs:
        key, conv = fields.get(label, (None, None))
        try:
            if len(value) > 1 and value[0] == value[-1] == '"':
                value = json.loads(value)
            if key == "size":
                out["width"], out["height"] = (int(v) for v in value.lower().split("x"))
            elif key is not None:
                out[key] = conv(value)
            else:
                other[label] = value
        except ValueError:
            other[label] = value
    if "sampler" in out:
        out["sampler"] = sampler_key(out["sampler"])
    if other:
        out["other"] = other
    return out


def png_text(params: dict) -> dict[str, str]:
    """The PNG text chunks of an image: `parameters` and the `pixelhdm` JSON."""
    return {"parameters": format_parameters(params),
            "pixelhdm": json.dumps(dict(params, format=METADATA_FORMAT), ensure_ascii=False)}


def read_png_parameters(source: str | os.PathLike | Image.Image) -> dict:
    """The settings of an image ("recall"): the `pixelhdm` JSON when present, else the
    parsed `parameters` text; {} when the image carries neither."""
    def chunks_of(im: Image.Image) -> dict:
        return {**im.info, **(getattr(im, "text", None) or {})}
    if isinstance(source, Image.Image):
        chunks = chunks_of(source)
    else:
        try:
            with Image.open(source) as im:
                chunks = chunks_of(im)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise MetadataError(f"cannot read image '{source}' ({e})") from e
    raw = chunks.get("pixelhdm")
    if isinstance(raw, str):
        try:
            data = json.loads(raw)
            if isinstance(data, dict) and isinstance(data.get("sampler"), str):
                return dict(data, sampler=sampler_key(data["sampler"]))
            if isinstance(data, dict):
                return data
        except json.JSONDecodeError:
            pass
    text = chunks.get("parameters")
    return parse_parameters(text) if isinstance(text, str) and text.strip() else {}


def save_png(image: Image.Image, params: dict, out_dir: str | os.PathLike) -> Path:
    """Write `NNNNN-<seed>.png` (NNNNN = one more than the highest number in the folder)
    with its text chunks. Never overwrites: the name is claimed with O_EXCL and the
    finished file moved onto the claim."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in png_text(params).items():
        info.add_text(key, value)
    fd, tmp = tempfile.mkstemp(prefix=".gen-", suffix=".png", dir=out_dir)
    try:
        with contextlib.suppress(OSError):   # readable as any file the user writes
            os.chmod(tmp, file_mode())
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        numbers = [int(m.group(1)) for p in out_dir.iterdir() if (m := FILE_NUMBER.match(p.name))]
        number = max(numbers, default=0) + 1
        while True:
            path = out_dir / f"{number:05d}-{params['seed']}.png"
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                break
            except FileExistsError:
                number += 1
        os.replace(tmp, path)
        return path
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
