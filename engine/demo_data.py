"""A built-in captioned dataset of coloured shapes, so anyone can train end to end with
no download: `python -m engine.data demo --out DIR`.

Each image is one shape (circle, square, triangle, star or cross) in one of six colours,
small or large, at one of five positions, on one of five background colours; its caption
names them, e.g. "a large red circle at the top left on a blue background". Some captions
leave out the size or the position, as real captions leave out details, so that short
prompts such as "a red circle on a white background" also make sense to a trained model.
The vocabulary is small on purpose: a model of about a million parameters at 32-64 px
learns it within minutes on a CPU. Shapes are drawn at 4x and box-downsampled, so edges
are anti-aliased like photographed edges rather than hard pixel steps. The same seed
always writes byte-identical files.

A second kind, `--kind bands`, draws two or three flat colour bands, horizontal or
vertical, with borders at random places ("vertical bands of blue, green and yellow"):
nearly every pixel is flat, so it shows grain on flat areas plainly, and images that share
a caption differ only in where the borders lie.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (245, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "yellow": (245, 225, 120),
    "purple": (110, 50, 140),
    "blue": (70, 120, 200),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
# radius / shorter image side. The demo run trains at 32 px, where a small shape is
# 2 * 0.16 * 24 = 7.7 px across in a 4:3 image and 10 px in a square one; at 0.12 (5.8 and
# 7.7 px) most small stars and crosses came out as blobs (116 / 150 outlines as prompted,
# against 140-150 / 150 in four runs at 0.16; docs/demo-quality.md, "Why the demo's
# small shapes are 0.16 of the side"). Jittered by +-10 %, the sizes stay apart (at most
# 0.176, at least 0.198).
SIZES: dict[str, float] = {"small": 0.16, "large": 0.22}
POSITIONS: dict[str, tuple[float, float]] = {               # centre as fractions of (w, h)
    "top left": (0.27, 0.27), "top right": (0.73, 0.27), "center": (0.5, 0.5),
    "bottom left": (0.27, 0.73), "bottom right": (0.73, 0.73),
}
# (width, height) and how often each is drawn: squares most, then 4:3 both ways. Wider
# images (2:1, 3:2) are left out: at the demo run's 32 px they are 32 x 16 and 24 x 16,
# where a shape is 4-8 px across and no outline can be told, so a third of the images
# taught one blob for every shape word (15 / 40 outlines drawn as prompted after 5000
# steps at 32 px with them, 26 / 40 without; docs/demo-quality.md, "Why the demo trains
# at 32 px")
IMAGE_SIZES: tuple[tuple[tuple[int, int], float], ...] = (
    ((128, 128), 0.3), ((96, 96), 0.3), ((128, 96), 0.2), ((96, 128), 0.2),
)
SUPERSAMPLE = 4
KEEP_SIZE = 0.75        # probability that a caption names the size
KEEP_POSITION = 0.75    # probability that a caption names the position
# the demo run memorised 600 images (about 170 passes each): one caption gave one image
# whatever the seed (0.45x and 0.57x of the true spread, two training seeds); 4800 images
# give 1.16x and 0.96x in the same steps and time
DEFAULT_COUNT = 4800


@dataclass(frozen=True)
class DemoItem:
    """Everything drawn in one demo image, and its caption."""
    width: int
    height: int
    shape: str
    colour: str
    size: str
    position: str
    background: str
    center: tuple[float, float]   # shape centre in pixels
    radius: float                 # in pixels
    caption: str


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(shape: str, colour: str, size: str | None, position: str | None,
                 background: str) -> str:
    """'a large red circle at the top left on a blue background'; size and position
    may be None (left out)."""
    noun = " ".join(w for w in (size, colour, shape) if w)
    text = f"{_article(noun)} {noun}"
    if position:
        text += " in the center" if position == "center" else f" at the {position}"
    return f"{text} on {_article(background)} {background} background"


_CAPTION = re.compile(
    rf"an? (?:(?P<size>{'|'.join(SIZES)}) )?(?P<colour>{'|'.join(COLOURS)}) "
    rf"(?P<shape>{'|'.join(SHAPES)})"
    rf"(?: at the (?P<position>{'|'.join(p for p in POSITIONS if p != 'center')})"
    rf"| in the (?P<center>center))?"
    rf" on an? (?P<background>{'|'.join(BACKGROUNDS)}) background")


def parse_caption(caption: str) -> dict[str, str | None] | None:
    """The inverse of make_caption: {'shape', 'colour', 'size', 'position', 'background'}
    (size and position None when the caption leaves them out), or None when `caption`
    is not a demo caption. Case and surrounding white space are ignored."""
    m = _CAPTION.fullmatch(" ".join(caption.lower().split()))
    if m is None:
        return None
    return {"shape": m["shape"], "colour": m["colour"], "size": m["size"],
            "position": m["position"] or m["center"], "background": m["background"]}


def probe_captions() -> list[str]:
    """The wide probe of a demo model: every shape at every place and in every size, each
    also with the place or the size left out (5 x 6 x 3 = 90 captions), the colours in
    turn and each on a background of another colour, in turn."""
    colours, out = list(COLOURS), []
    places, sizes = [*POSITIONS, None], [*SIZES, None]
    for k, (shape, place, size) in enumerate((a, b, c) for a in SHAPES for b in places
                                             for c in sizes):
        colour = colours[k % len(colours)]
        grounds = [g for g in BACKGROUNDS if g != colour]
        out.append(make_caption(shape, colour, size, place, grounds[k % len(grounds)]))
    return out


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of one image, drawn from IMAGE_SIZES by their weights."""
    sizes = [s for s, _ in IMAGE_SIZES]
    weights = np.array([p for _, p in IMAGE_SIZES])
    return sizes[rng.choice(len(sizes), p=weights / weights.sum())]


def sample_item(rng: np.random.Generator) -> DemoItem:
    """Draw the contents of one image from `rng`."""
    w, h = image_size(rng)
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    backgrounds = [b for b in BACKGROUNDS if b != colour]
    background = backgrounds[rng.integers(len(backgrounds))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    center, radius = _jittered(rng, w, h, size, position)
    keep_size, keep_pos = rng.random() < KEEP_SIZE, rng.random() < KEEP_POSITION
    caption = make_caption(shape, colour, size if keep_size else None,
                           position if keep_pos else None, background)
    return DemoItem(w, h, shape, colour, size, position, background, center, radius, caption)


def _jittered(rng: np.random.Generator, w: int, h: int, size: str, position: str
              ) -> tuple[tuple[float, float], float]:
    """Centre (pixels) and radius of a shape of `size` at `position` in a w x h image,
    each a little off its nominal value, as the dataset draws them."""
    fx, fy = POSITIONS[position]
    jx, jy, jr = rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03), rng.uniform(0.9, 1.1)
    return ((fx + jx) * w, (fy + jy) * h), SIZES[size] * min(w, h) * jr


def items_for_caption(caption: str, width: int, height: int, count: int,
                      rng: np.random.Generator) -> list[DemoItem]:
    """`count` width x height images that the dataset could hold under `caption` (a demo
    caption): what it leaves out (size, position) drawn as the dataset draws it, and the
    same small jitter of place and size. The true spread of one caption, for comparing a
    model's spread across seeds with."""
    want = parse_caption(caption)
    if want is None:
        raise ValueError(f"not a demo caption: {caption!r}")
    out = []
    for _ in range(count):
        size = want["size"] or list(SIZES)[rng.integers(len(SIZES))]
        position = want["position"] or list(POSITIONS)[rng.integers(len(POSITIONS))]
        center, radius = _jittered(rng, width, height, size, position)
        out.append(DemoItem(width, height, want["shape"], want["colour"], size, position,
                            want["background"], center, radius, caption))
    return out


def _polygon(cx: float, cy: float, radii: list[float],
             start_deg: float) -> list[tuple[float, float]]:
    """Vertices at equal angles from `start_deg` (0 = right, -90 = up), one radius each."""
    angles = [math.radians(start_deg + 360.0 * k / len(radii)) for k in range(len(radii))]
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)]


def render(item: DemoItem) -> Image.Image:
    """The RGB image of `item`, drawn at SUPERSAMPLE x and box-averaged down."""
    k = SUPERSAMPLE
    img = Image.new("RGB", (item.width * k, item.height * k), BACKGROUNDS[item.background])
    draw = ImageDraw.Draw(img)
    cx, cy, r = item.center[0] * k, item.center[1] * k, item.radius * k
    fill = COLOURS[item.colour]
    if item.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif item.shape == "square":
        a = r * 0.9     # a square of half-side 0.9 r has about the circle's area
        draw.rectangle((cx - a, cy - a, cx + a, cy + a), fill=fill)
    elif item.shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, [1.2 * r] * 3, -90.0), fill=fill)
    elif item.shape == "star":
        draw.polygon(_polygon(cx, cy, [1.2 * r, 0.5 * r] * 5, -90.0), fill=fill)
    elif item.shape == "cross":
        a, b = r, 0.38 * r
        draw.rectangle((cx - a, cy - b, cx + a, cy + b), fill=fill)
        draw.rectangle((cx - b, cy - a, cx + b, cy + a), fill=fill)
    else:
        raise ValueError(f"unknown demo shape {item.shape!r}")
    return img.reduce(k)


BAND_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "white": (245, 245, 245), "blue": (40, 90, 220),
    "green": (40, 170, 70), "yellow": (245, 210, 40), "black": (20, 20, 20),
}


def band_image(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """One image of the bands kind and its caption: 2 or 3 distinct colours in order
    (top to bottom, or left to right), borders drawn at SUPERSAMPLE x and box-averaged."""
    w, h = image_size(rng)
    n = 2 if rng.random() < 0.5 else 3
    names = [list(BAND_COLOURS)[i] for i in rng.choice(len(BAND_COLOURS), n, replace=False)]
    horizontal = bool(rng.random() < 0.5)
    cuts = ([rng.uniform(0.3, 0.7)] if n == 2
            else [rng.uniform(0.25, 0.42), rng.uniform(0.58, 0.75)])
    k = SUPERSAMPLE
    length = (h if horizontal else w) * k
    band = np.searchsorted(np.array(cuts) * length, np.arange(length) + 0.5)  # band per line
    line = np.array([BAND_COLOURS[c] for c in names], np.uint8)[band]       # (length, 3)
    pixels = np.broadcast_to(line[:, None] if horizontal else line[None, :],
                             (h * k, w * k, 3))
    words = ", ".join(names[:-1]) + " and " + names[-1]
    caption = f"{'horizontal' if horizontal else 'vertical'} bands of {words}"
    return Image.fromarray(np.ascontiguousarray(pixels)).reduce(k), caption


def _readme(count: int, seed: int) -> str:
    radii = " and ".join(f"{r:g}" for r in SIZES.values())
    return f"""Demo dataset of coloured shapes ({count} images, seed {seed})

Written by `python -m engine.data demo`. Every image is procedurally drawn (no external
data; free to use for anything). Each PNG has a caption file of the same name (.txt).

An image shows one shape on a plain background:
  shapes:      {", ".join(SHAPES)}
  colours:     {", ".join(COLOURS)}
  sizes:       {", ".join(SIZES)} (radius {radii} of the shorter side)
  positions:   {", ".join(POSITIONS)}
  backgrounds: {", ".join(BACKGROUNDS)}
  image sizes: {", ".join(f"{w}x{h}" for (w, h), _ in IMAGE_SIZES)} px

Captions read like "a large red circle at the top left on a blue background"; about a
quarter of them leave out the size and a quarter the position. The same seed writes the
same files. Train on it with the tiny-cpu preset (32-64 px, a 2.2 M-parameter network).
"""


def _bands_readme(count: int, seed: int) -> str:
    return f"""Flat colour bands ({count} images, seed {seed})

Written by `python -m engine.data demo --kind bands`: procedurally drawn, free to use for
anything. Each image has two or three bands of {", ".join(BAND_COLOURS)}, horizontal
or vertical, with borders at random places; the caption names them in order, e.g.
"vertical bands of blue, green and yellow". Nearly every pixel is flat, which makes grain
on flat areas easy to see and to measure (python -m engine.bench quality).
"""


DEMO_KINDS = ("shapes", "bands")
_HEADER = re.compile(r"Demo dataset of coloured shapes \((\d+) images, seed (\d+)\)")


def outdated_demo(folder: str | os.PathLike) -> str | None:
    """None when `folder` holds a shapes demo dataset as this version writes it, else why
    not. Judged by its README.txt, which states the shapes, colours, sizes with their radii,
    places, backgrounds and image sizes: a version that changes any of them writes another
    text (a change elsewhere in the drawing goes unnoticed unless the text changes too)."""
    readme = Path(folder) / "README.txt"
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return (f"{folder} has no readable README.txt, so it is not a demo dataset as this "
                f"version writes it")
    head = _HEADER.match(text)
    if head is None or text != _readme(int(head[1]), int(head[2])):
        return (f"{folder} was written by an older version of the demo dataset (or changed "
                f"since): its README.txt differs from what this version writes")
    return None


def write_demo_dataset(out_dir: str | os.PathLike, count: int = DEFAULT_COUNT,
                       seed: int = 0, kind: str = "shapes") -> Path:
    """Write `count` captioned PNGs of a DEMO_KINDS kind and README.txt into `out_dir`
    (new or empty) and return its path. The folder appears complete or not at all."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if kind not in DEMO_KINDS:
        raise ValueError(f"unknown demo kind {kind!r}; allowed: {', '.join(DEMO_KINDS)}")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder; choose a "
                              f"new folder for the demo dataset")
    out.parent.mkdir(parents=True, exist_ok=True)
    # a unique temporary folder: two writers (two clicks, two processes) never share one
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()     # (not mkdtemp: its 0700 mode would stay on the finished folder)
    try:
        rng = np.random.default_rng(seed)
        digits = max(4, len(str(count - 1)))
        for i in range(count):
            if kind == "bands":
                image, caption = band_image(rng)
            else:
                item = sample_item(rng)
                image, caption = render(item), item.caption
            name = f"{kind[:-1]}_{i:0{digits}d}"
            image.save(tmp / f"{name}.png", optimize=False)
            (tmp / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
        text = (_bands_readme if kind == "bands" else _readme)(count, seed)
        (tmp / "README.txt").write_text(text, encoding="utf-8")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
