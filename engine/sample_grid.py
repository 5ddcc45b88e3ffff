"""The sample grid a run writes at every sample step: its cells, enlarged and labelled
with their prompts and settings, in one PNG with the settings in its metadata (the
`parameters` chunk other tools read, and the whole grid as JSON), and a JSON beside it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from torch import Tensor

from engine import __version__
from engine.checkpoint import step_name
from engine.config import RunConfig
from engine.dataset import to_uint8
from engine.fileio import atomic_target, atomic_write_text
from engine.job import RunDir
from engine.pngmeta import format_parameters
from engine.sample_prompts import SamplePrompt, cell_labels
from engine.sampling import noise_setting

GRID_COLUMNS = 4
GRID_PAD = 2
LABEL_MIN_WIDTH = 128   # slots are at least this wide, so that a label can be read


def grid_scale(images: list[np.ndarray]) -> int:
    """The whole factor small cells are enlarged by (every pixel a block) so that the
    widest reaches LABEL_MIN_WIDTH: a grid of 32 px cells is not a strip of dots beside
    its labels. One factor for all, so the cells keep their relative sizes."""
    return max(1, LABEL_MIN_WIDTH // max(a.shape[1] for a in images))


def grid_image(images: list[np.ndarray], labels: list[tuple[str, str]],
               columns: int = GRID_COLUMNS) -> np.ndarray:
    """Cells (H, W, 3) uint8 of any sizes, enlarged by grid_scale, in rows of `columns`;
    each centred in its slot (as wide as the widest cell of its column, as high as the
    highest of its row) over a caption strip: the label's prompt on one line, cut to fit,
    and its details (', '-separated) wrapped below, in PIL's built-in bitmap font."""
    k = grid_scale(images)
    images = [a.repeat(k, axis=0).repeat(k, axis=1) for a in images]
    font = ImageFont.load_default_imagefont()
    line_h = font.getbbox("Ag")[3] + 2
    cols = min(len(images), columns)
    rows = -(-len(images) // cols)
    col_w = [max(LABEL_MIN_WIDTH, *(a.shape[1] for a in images[c::cols])) for c in range(cols)]
    lines = [[_fit(prompt, font, col_w[i % cols] - 4)] + _wrap(details, font, col_w[i % cols] - 4)
             for i, (prompt, details) in enumerate(labels)]
    strip = GRID_PAD + line_h * max(len(t) for t in lines)
    row_h = [max(a.shape[0] for a in images[r * cols:(r + 1) * cols]) + strip
             for r in range(rows)]
    canvas = Image.new("RGB", (sum(col_w) + (cols + 1) * GRID_PAD,
                               sum(row_h) + (rows + 1) * GRID_PAD), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    for i, (arr, text) in enumerate(zip(images, lines)):
        r, c = divmod(i, cols)
        x = GRID_PAD + sum(col_w[:c]) + c * GRID_PAD
        y = GRID_PAD + sum(row_h[:r]) + r * GRID_PAD
        canvas.paste(Image.fromarray(arr), (x + (col_w[c] - arr.shape[1]) // 2, y))
        ty = y + row_h[r] - strip + GRID_PAD
        for n, line in enumerate(text):   # the prompt bright, the details dimmer
            draw.text((x + 2, ty + n * line_h), line, font=font,
                      fill=(225, 225, 225) if n == 0 else (150, 150, 150))
    return np.asarray(canvas)


def _wrap(details: str, font, width: int) -> list[str]:
    """The ', '-separated parts of `details` on as few lines of `width` pixels as they
    fit on (a part too long for a line is cut)."""
    out: list[str] = []
    for part in filter(None, _latin1(details).split(", ")):
        if out and font.getlength(f"{out[-1]}, {part}") <= width:
            out[-1] = f"{out[-1]}, {part}"
        else:
            out.append(_fit(part, font, width))
    return out


def _latin1(text: str) -> str:
    """`text` on one line in the bitmap font's alphabet (other characters become '?')."""
    return " ".join(text.split()).encode("latin-1", "replace").decode("latin-1")


def _fit(text: str, font, width: int) -> str:
    """`text` in the bitmap font's Latin-1 alphabet, cut to `width` pixels with '...'."""
    text = _latin1(text)
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text.rstrip() + "..."


def save_sample_grid(run: RunDir, step: int, images: list[Tensor], cells: list[SamplePrompt],
                     cfg: RunConfig) -> Path:
    """Write `samples/step_NNNNNNN.png` (the cells, up to 4 per row, each labelled:
    grid_image) and its `.json`: the grid's common settings and every cell's options.
    The PNG carries the JSON (`pixelhdm-grid`) and a `parameters` chunk in the layout
    other tools read, of its first cell (with the number of cells). Atomic: a
    half-written grid is never visible."""
    arrays = [to_uint8(x[None])[0] for x in images]
    s, first = cfg.sample, cells[0]
    info = {"step": step, "prompts": [c.prompt for c in cells],
            "seeds": [c.seed for c in cells], "negative": s.negative,
            "size": [first.width, first.height], "steps": s.steps, "sampler": s.sampler,
            "cfg": s.cfg, "cfg_rescale": s.cfg_rescale, "cfg_interval": list(s.cfg_interval),
            "cfg_ramp": s.cfg_ramp, "pag": s.pag, "noise_interval": list(s.noise_interval),
            "cfg_coarse": s.cfg_coarse, "cfg_coarse_sigma": s.cfg_coarse_sigma,
            "columns": min(len(cells), GRID_COLUMNS), "prompts_file": run.sample_prompts.name,
            "cells": [c.as_dict() for c in cells]}
    params = {"prompt": first.prompt, "negative": first.negative, "steps": first.steps,
              "sampler": s.sampler, "cfg": first.cfg, "seed": first.seed,
              "width": first.width, "height": first.height, "run_id": run.run_id,
              "rescale": s.cfg_rescale or None, "interval": list(s.cfg_interval),
              "ramp": s.cfg_ramp or None, "pag": s.pag or None,
              "coarse": s.cfg_coarse or None,
              "coarse_sigma": s.cfg_coarse_sigma if s.cfg_coarse else None,
              "noise_interval": noise_setting(s.sampler, s.noise_interval),
              "checkpoint_step": step, "prediction": cfg.model.prediction,
              "engine_version": __version__}
    text = format_parameters(params)
    if len(cells) > 1:   # other tools show a grid's first image's settings; say there are more
        text += f", Grid: {len(cells)} cells"
    run.samples.mkdir(parents=True, exist_ok=True)
    path = run.samples / f"{step_name(step)}.png"
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    meta.add_text("pixelhdm-grid", json.dumps(info))
    grid = grid_image(arrays, cell_labels(cells))
    with atomic_target(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG", pnginfo=meta)
    atomic_write_text(path.with_suffix(".json"), json.dumps(info, indent=1))
    return path
