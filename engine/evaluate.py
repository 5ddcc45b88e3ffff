"""Image-quality figures of a trained model, the same for the command line
(`python -m engine.bench quality`), the trainer and the studio.

A model generates `seeds` images for each of its run's first `n` sample prompts, all at
one size (the run's sample size), and is compared with real images of its dataset,
cropped to that size by the trainer's own crop (engine.dataset.load_crop): the run's
held-out validation images, or a fixed choice of the images of another folder. Every
measure works on 8-bit RGB arrays (N, H, W, 3), so generated and real images go through
the same code. Nothing is written anywhere.

* **Flat-area noise** (8-bit levels): per-pixel grain where the picture is flat. A 3x3
  median removes grain but keeps edges and shapes of two pixels and more; a pixel counts
  as flat when the median image varies by less than a threshold over the 5x5 window
  around it (so pixels within two pixels of an edge, anti-aliased ones included, never
  count). The threshold is FLAT_LEVELS, or FLAT_FACTOR times the image's median
  residual when that is larger, so strong grain does not make every pixel an "edge".
  The figure is the mean |pixel - median| over flat pixels and channels: about 0.7 sigma
  for Gaussian noise of sigma levels, 0 for a perfectly flat area.
* **Diversity** (levels): per prompt, the per-pixel standard deviation (n - 1) across its
  seeds, averaged over pixels and channels; the reference is the same statistic over
  as many real images that share the prompt's caption, or, when fewer than two do, the
  images whose captions hold most of the prompt's words (then the fewest other words).
  On the demo dataset, a prompt that is a demo caption is compared with the spread the
  dataset itself gives that caption: DRAWN_GROUPS groups of as many images drawn by the
  demo's own generator at the sample size (what the caption leaves out drawn as the
  dataset draws it), their spreads averaged. Its captions are nearly all unique, so
  "similar captions" there mix shapes, colours and places that the prompt fixes.
* **Prompt adherence** (demo dataset only, engine/demo_data.py): each attribute a demo
  caption names is read back from pixels. Background: the median colour of the outer
  ring of pixels, nearest background colour. Shape colour: the median colour of pixels
  far from that background (more than half as far as the farthest pixel that a 3x3
  median keeps, so a speck of another colour cannot stand for the shape), nearest shape
  colour. Shape: a soft mask of the shape (anti-aliased pixels count by how much of the
  shape they hold); its largest connected part against each demo shape drawn with the
  same area and centroid, the closest wins, and a second part of OBJECT_SHARE of its
  mass or more (two half-shapes where one was asked for) scores no shape; smaller parts
  are specks and are ignored. Size: the radius that shape has at the part's area, over
  the image's shorter side, nearest named size on a log scale. Position: the centroid of
  the part, nearest named position. The same scoring of the real images says how far the
  scorer itself can be trusted at this size.
* **Fréchet distance** between Gaussians fitted to features of the generated and the
  real images. Cheap features (always): 8-bin histograms per channel, a 4x4 thumbnail
  and the mean and spread of 16 fixed random 3x3 filters after a ReLU at two scales.
  DINOv3 features (when loss.repa_teacher is an existing folder): the mean of the
  teacher's patch tokens. With few images the covariances are shrunk towards their
  diagonal, S' = (1 - a) S + a diag(S) with a = d / (d + n) (d features, n images of the
  smaller set), which keeps the distance finite and stable. The real reference is the
  distance between the two halves of the real set.

Ratios divide by the real figure, at least one 8-bit level (the rounding of an 8-bit
image), so a perfectly flat real set still gives a finite ratio.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from engine.buckets import plan_buckets, split_validation
from engine.config import RunConfig
from engine.data import DataError, scan_dataset
from engine.dataset import load_crop, to_uint8, uint8_to_tensor
from engine.demo_data import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    DemoItem,
    items_for_caption,
    parse_caption,
    render,
)
from engine.encoders import DinoTeacher
from engine.generate import render_samples
from engine.images import BROKEN_FILE_ERRORS
from engine.job import RunDir
from engine.model import patch_grid
from engine.sample_prompts import (
    PromptsError,
    SamplePrompt,
    from_config,
    parse_prompts,
    prompt_defaults,
    read_text,
)

FLAT_LEVELS = 24.0      # a window whose median image varies less than this is flat ...
FLAT_FACTOR = 4.0       # ... or less than this many times the image's median residual
MAX_REAL = 64           # real images compared at most
SEED_STRIDE = 1000      # seed of image k of prompt i: the prompt's seed + k * SEED_STRIDE
DEMO_SHARE = 0.9        # a dataset is the demo when this share of its captions parse
DRAWN_GROUPS = 8        # groups of `seeds` demo drawings averaged for a caption's true spread
# area / radius^2 of each demo shape as engine/demo_data.render draws it (red on black)
AREA = {"circle": np.pi, "square": 3.24, "triangle": 1.871, "star": 1.763, "cross": 2.462}
OBJECT_SHARE = 0.15     # a part of the mask this share of the largest one's mass is a drawing
Progress = Callable[[int, int, str], None]


class EvaluateError(ValueError):
    """The evaluation cannot run as asked; the message says what to change."""


# --------------------------------------------------------------------------------------
# Measures (pure: uint8 arrays in, numbers out)
# --------------------------------------------------------------------------------------

def _windows(a: np.ndarray, k: int) -> np.ndarray:
    """(k*k, H, W, C): `a` (H, W, C) shifted over a k x k window, edges repeated."""
    r = k // 2
    p = np.pad(a, ((r, r), (r, r), (0, 0)), mode="edge")
    H, W = a.shape[:2]
    return np.stack([p[i:i + H, j:j + W] for i in range(k) for j in range(k)])


def flat_noise(images: np.ndarray) -> tuple[float, float]:
    """(mean grain in levels, share of pixels that are flat) of uint8 images (N, H, W, 3),
    pooled over every flat pixel; (nan, 0) when no pixel is flat."""
    total, count = 0.0, 0
    for img in images:
        x = img.astype(np.float32)
        med = np.median(_windows(x, 3), axis=0)
        resid = np.abs(x - med).mean(-1)                                 # (H, W)
        win = _windows(med, 5)
        spread = (win.max(0) - win.min(0)).max(-1)                       # (H, W)
        flat = spread < max(FLAT_LEVELS, FLAT_FACTOR * float(np.median(resid)))
        total += float(resid[flat].sum())
        count += int(flat.sum())
    pixels = sum(img.shape[0] * img.shape[1] for img in images)
    return (total / count if count else float("nan")), count / max(pixels, 1)


def seed_spread(images: np.ndarray) -> float:
    """Mean per-pixel standard deviation (n - 1) across images (S, H, W, 3), in levels."""
    if len(images) < 2:
        raise ValueError("the spread needs at least two images")
    return float(images.astype(np.float64).std(axis=0, ddof=1).mean())


def ratio(generated: float, real: float) -> float:
    """generated / real, the real figure taken as at least one 8-bit level."""
    return generated / max(real, 1.0)


def _normal(caption: str) -> str:
    return " ".join(caption.lower().strip().rstrip(".").split())


def reference_group(prompt: str, pool: list[tuple[str, str]], k: int
                    ) -> tuple[list[str], str]:
    """Up to `k` paths of (path, caption) `pool` to compare a prompt's spread with, and
    which they are: 'same caption' when at least two share it, else 'similar captions'."""
    want = _normal(prompt)
    same = sorted(p for p, c in pool if _normal(c) == want)
    if len(same) >= 2:
        return same[:k], "same caption"
    words = set(want.split())

    def rank(item: tuple[str, str]) -> tuple[float, int, str]:
        have = set(_normal(item[1]).split())
        return -len(words & have) / max(len(words), 1), len(have - words), item[0]
    return [p for p, _ in sorted(pool, key=rank)[:k]], "similar captions"


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda n: float(np.sum((colour - np.array(palette[n])) ** 2)))


def score_demo(image: np.ndarray, caption: str) -> dict[str, bool]:
    """Attribute -> whether the pixels of `image` (H, W, 3) uint8 show what the demo
    caption names: background, colour, shape, size, position (those it names; {} when the
    caption is not a demo caption)."""
    want = parse_caption(caption)
    if want is None:
        return {}
    x = image.astype(np.float32)
    H, W = x.shape[:2]
    ring = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])
    bg = np.median(ring, axis=0)
    out = {"background": _nearest(bg, BACKGROUNDS) == want["background"]}
    dist = np.sqrt(((x - bg) ** 2).sum(-1))                              # (H, W)
    # how far the shape stands out: the largest distance that survives a 3x3 median, so a
    # lone speck of another colour cannot stand for the shape
    peak = float(np.median(_windows(dist[..., None], 3), axis=0).max())
    far = dist > 0.5 * peak
    if peak < 40 or far.sum() < 2:                # no shape stands out of the background
        out.update(colour=False, shape=False)
        out.update({k: False for k in ("size", "position") if want[k]})
        return out
    fg = np.median(x[far], axis=0)
    out["colour"] = _nearest(fg, COLOURS) == want["colour"]
    # soft mask: how much of each pixel lies on the shape, along background -> shape colour
    axis = fg - bg
    alpha = np.clip(((x - bg) @ axis) / float(axis @ axis), 0.0, 1.0)   # (H, W)
    alpha[alpha < 0.1] = 0.0
    # one drawing: the largest connected part; other parts of at least OBJECT_SHARE of its
    # mass are further drawings (two half-shapes are not "a star"), smaller ones are specks
    labels = _components(alpha > 0)
    mass = np.bincount(labels.ravel(), weights=alpha.ravel())
    mass[0] = 0.0
    main = alpha * (labels == int(mass.argmax()))
    single = int((mass >= OBJECT_SHARE * mass.max()).sum()) == 1
    area = float(main.sum())
    ys, xs = np.mgrid[0:H, 0:W]
    cx, cy = (main * (xs + 0.5)).sum() / area, (main * (ys + 0.5)).sum() / area
    shape, radius = _shape_of(main, cx, cy)
    out["shape"] = single and shape == want["shape"]
    if want["size"]:
        # the drawn shape's radius over the shorter side: nearest named size on a log
        # scale (sizes are ratios of each other)
        near = min(SIZES, key=lambda z: abs(np.log(radius / min(H, W) / SIZES[z])))
        out["size"] = near == want["size"]
    if want["position"]:
        near = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx / W) ** 2
                   + (POSITIONS[p][1] - cy / H) ** 2)
        out["position"] = near == want["position"]
    return out


def _components(mask: np.ndarray) -> np.ndarray:
    """(H, W) int labels of the 8-connected parts of a bool mask (0 off the mask): every
    pixel takes the largest label around it until nothing changes."""
    H, W = mask.shape
    labels = np.where(mask, np.arange(1, H * W + 1).reshape(H, W), 0)
    while True:
        grown = np.where(mask, _windows(labels[..., None], 3).max(0)[..., 0], 0)
        if np.array_equal(grown, labels):
            return labels
        labels = grown


def _shape_of(alpha: np.ndarray, cx: float, cy: float) -> tuple[str, float]:
    """The demo shape whose drawing, of the same area and centroid, is closest to the soft
    mask `alpha` (H, W) (mean absolute difference), and that drawing's radius in pixels."""
    H, W = alpha.shape
    area, best = float(alpha.sum()), {}
    for shape in SHAPES:
        r = float(np.sqrt(area / AREA[shape]))
        centre = (cx, cy - 0.15 * r) if shape == "triangle" else (cx, cy)  # its centroid
        item = DemoItem(W, H, shape, "red", "small", "center", "black", centre, r, "")
        drawn = (np.asarray(render(item), dtype=np.float32)[..., 0] - 20.0) / 200.0
        best[shape, r] = float(np.abs(drawn - alpha).mean())
    return min(best, key=best.get)


def _filters() -> torch.Tensor:
    """16 fixed zero-mean unit-norm 3x3 RGB filters (the same on every machine)."""
    w = torch.randn(16, 3, 3, 3, generator=torch.Generator().manual_seed(1234))
    w = w - w.mean(dim=(1, 2, 3), keepdim=True)
    return w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def cheap_features(images: np.ndarray) -> np.ndarray:
    """(N, 136) float64 features of uint8 images (N, H, W, 3): per-channel 8-bin
    histograms (24), a 4x4 thumbnail (48), and the mean and standard deviation of 16
    fixed random filters after a ReLU, at full and half resolution (64)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    hist = torch.stack([((x[:, c] * 8).long().clamp(max=7).flatten(1)[..., None]
                         == torch.arange(8)).float().mean(1) for c in range(3)], 1).flatten(1)
    thumb = F.adaptive_avg_pool2d(x, 4).flatten(1)
    conv = []
    for scale in (x, F.avg_pool2d(x, 2, ceil_mode=True)):
        r = F.relu(F.conv2d(scale, _filters(), padding=1)).flatten(2)
        conv += [r.mean(2), r.std(2)]
    return torch.cat([hist, thumb, *conv], 1).double().numpy()


def dino_features(images: np.ndarray, teacher: DinoTeacher, patch: int) -> np.ndarray:
    """(N, C): the mean DINOv3 patch token of each uint8 image (N, H, W, 3), on the
    teacher's grid of the model's patch grid (as iREPA sees the image)."""
    x = uint8_to_tensor(torch.from_numpy(np.ascontiguousarray(images)))   # (N, 3, H, W)
    grid = patch_grid(x, patch)
    device = teacher.mean.device
    out = [teacher(x[i:i + 16].to(device), grid).mean(1).cpu() for i in range(0, len(x), 16)]
    return torch.cat(out).double().numpy()


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to features a (n, d) and b (m, d), the
    covariances shrunk towards their diagonal by d / (d + min(n, m))."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least two images per set")
    d = a.shape[1]
    shrink = d / (d + min(len(a), len(b)))

    def cov(f: np.ndarray) -> np.ndarray:
        s = np.cov(f, rowvar=False).reshape(d, d)
        return (1 - shrink) * s + shrink * np.diag(np.diag(s))
    ca, cb = cov(a), cov(b)
    root = _psd_sqrt(ca)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ cb @ root), 0.0, None)).sum()
    value = float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca) + np.trace(cb)
                  - 2 * cross)
    return max(value, 0.0)


def _halves(real: np.ndarray) -> float | None:
    """The distance between the two halves of a real feature set (every other image)."""
    return frechet_distance(real[0::2], real[1::2]) if len(real) >= 4 else None


# --------------------------------------------------------------------------------------
# Prompts and real images
# --------------------------------------------------------------------------------------

def run_prompts(cfg: RunConfig, checkpoint: Path, trained: dict[str, int] | None
                ) -> list[SamplePrompt]:
    """The sample prompts of the run a checkpoint belongs to (its run folder's
    sample_prompts.txt when that parses), else those of its config."""
    d = prompt_defaults(cfg, trained)
    if checkpoint.parent.name == "checkpoints":
        path = RunDir(checkpoint.parent.parent).sample_prompts
        if path.is_file():
            try:
                return parse_prompts(read_text(path), d)
            except PromptsError:
                pass
    return from_config(cfg, d)[1]


class RealImages:
    """A dataset's images to compare with: `held` (path, caption) for noise, Fréchet
    distance and adherence, `pool` (every usable image) for the diversity references;
    each image is decoded once per size."""

    def __init__(self, held: list[tuple[str, str]], pool: list[tuple[str, str]], what: str):
        self.held, self.pool, self.what = held, pool, what
        parsed = sum(parse_caption(c) is not None for _, c in pool)
        self.demo = parsed >= DEMO_SHARE * len(pool)
        self._cache: dict[tuple[str, int, int], np.ndarray | None] = {}

    @classmethod
    def of(cls, cfg: RunConfig, data_dir: str | None = None) -> RealImages:
        """The run's held-out validation images (its plan's split, as the trainer makes
        it), or up to MAX_REAL images of `data_dir` chosen by engine.buckets'
        split_validation. Reads no image yet and writes nothing."""
        root = data_dir or cfg.data.path
        try:
            scan = scan_dataset(root, cfg.data)
        except DataError as e:
            also = "" if data_dir else "; give the dataset with --data DIR"
            raise EvaluateError(f"{' '.join(str(e).split())}{also}") from None
        data = replace(cfg.data, val_images=0) if data_dir else cfg.data
        plan = plan_buckets(scan.records, data, cfg.model.patch_size, cfg.train.batch_size)
        return cls.of_plan(plan, root, own=not data_dir)

    @classmethod
    def of_plan(cls, plan, root, *, own: bool = True, limit: int = MAX_REAL) -> RealImages:
        """As `of`, from a bucket plan already made (the trainer's own): its held-out
        images (at most `limit`), or, when it holds none out, a fixed choice of its
        images; `own` says the plan is the run's (not another folder's)."""
        pool = [(im.record.path, im.caption) for im in (*plan.images, *plan.val_images)]
        if len(pool) < 2:
            raise EvaluateError(f"'{root}' holds {len(pool)} usable images; at least 2 are "
                                f"needed to compare with")
        if plan.val_images and own:
            held = [(im.record.path, im.caption) for im in plan.val_images][:limit]
            what = f"{len(held)} held-out images of {root} (the run's validation split)"
        else:
            held = [(im.record.path, im.caption)
                    for im in split_validation(plan.images, min(limit, MAX_REAL))[1]]
            what = f"{len(held)} images of {root}" + (
                "" if not own else " (the run holds none out, data.val_images = 0: these "
                                   "were trained on)")
        return cls(held, pool, what)

    def load_held(self, width: int, height: int) -> tuple[np.ndarray, list[str]]:
        """The held images (as load) and their captions."""
        images = self.load([p for p, _ in self.held], width, height)
        return images, [c for p, c in self.held if self._cache[p, width, height] is not None]

    def load(self, paths: list[str], width: int, height: int) -> np.ndarray:
        """uint8 (N, height, width, 3) crops of `paths` (files that fail are left out)."""
        out = []
        for p in paths:
            key = (p, width, height)
            if key not in self._cache:
                try:
                    self._cache[key] = np.asarray(load_crop(p, (width, height)), np.uint8)
                except BROKEN_FILE_ERRORS:
                    self._cache[key] = None
            if self._cache[key] is not None:
                out.append(self._cache[key])
        return np.stack(out) if out else np.zeros((0, height, width, 3), np.uint8)


# --------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------

def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


@functools.lru_cache(maxsize=256)
def drawn_spread(caption: str, seeds: int, width: int, height: int) -> tuple[float, str]:
    """The spread across `seeds` images that the demo dataset gives `caption` (a demo
    caption), averaged over DRAWN_GROUPS groups drawn at width x height; the same draws
    for the same caption every time."""
    caption = _normal(caption)
    rng = np.random.default_rng(zlib.crc32(caption.encode()))
    spreads = [seed_spread(np.stack([np.asarray(render(item), np.uint8) for item in
                                     items_for_caption(caption, width, height, seeds, rng)]))
               for _ in range(DRAWN_GROUPS)]
    return float(np.mean(spreads)), f"demo drawings ({DRAWN_GROUPS} x {seeds})"


def _pool_spread(real: RealImages, prompt: str, seeds: int, width: int, height: int
                 ) -> tuple[float | None, str]:
    paths, kind = reference_group(prompt, real.pool, seeds)
    group = real.load(paths, width, height)
    return (seed_spread(group) if len(group) >= 2 else None), f"{kind} ({len(group)})"


def _adherence(images: list[np.ndarray], captions: list[str]) -> dict[str, list[bool]]:
    out: dict[str, list[bool]] = {}
    for img, caption in zip(images, captions):
        for attribute, ok in score_demo(img, caption).items():
            out.setdefault(attribute, []).append(ok)
    return out


def evaluate(net, encode, cfg: RunConfig, device: torch.device | str, precision: str,
             prompts: list[SamplePrompt], real: RealImages, *, seeds: int, steps: int,
             width: int, height: int, teacher: DinoTeacher | None = None,
             progress: Progress | None = None) -> dict:
    """The quality figures of `net` (in eval mode on `device`) for `prompts`, `seeds`
    images each at width x height with `steps` sampler steps, against `real`. Returns
    {"figures", "per_prompt", "adherence", "notes"}: lists of rows (None = not measured)."""
    if seeds < 2 or steps < 1 or not prompts:
        raise EvaluateError("quality needs at least one prompt, 2 seeds and 1 step")
    total, done = len(prompts) + 2, 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total, what)

    notes: list[str] = []
    held, held_captions = real.load_held(width, height)
    tick("real images")
    generated, rows = [], []
    for p in prompts:
        cells = [replace(p, width=width, height=height, steps=steps,
                         seed=p.seed + k * SEED_STRIDE) for k in range(seeds)]
        images = to_uint8(torch.stack(render_samples(net, encode, cells, cfg, device,
                                                     precision)))
        generated.append(images)
        real_spread, kind = (drawn_spread(p.prompt, seeds, width, height)
                             if real.demo and parse_caption(_normal(p.prompt)) else
                             _pool_spread(real, p.prompt, seeds, width, height))
        spread = seed_spread(images)
        row = {"prompt": p.prompt, "spread": spread, "real_spread": real_spread,
               "ratio": ratio(spread, real_spread) if real_spread is not None else None,
               "reference": kind, "noise": flat_noise(images)[0],
               "adherence": None, "by_attribute": None}
        if real.demo:
            scores = _adherence(list(images), [p.prompt] * len(images))
            hits = [v for vs in scores.values() for v in vs]
            row["adherence"] = 100.0 * float(np.mean(hits)) if hits else None
            row["by_attribute"] = ({name: 100.0 * float(np.mean(v)) for name, v in scores.items()}
                                   or None)        # None: the prompt is not a demo caption
        rows.append(row)
        tick(p.prompt[:40])
    every = np.concatenate(generated)
    gen_noise, gen_flat = flat_noise(every)
    real_noise, real_flat = flat_noise(held)
    figures = [
        {"measure": "flat-area noise (levels)", "generated": gen_noise, "real": real_noise,
         "ratio": ratio(gen_noise, real_noise) if np.isfinite(gen_noise * real_noise) else None,
         "note": f"flat pixels: {gen_flat:.0%} generated, {real_flat:.0%} real"}]
    gen_spread = _mean([r["spread"] for r in rows if r["real_spread"] is not None])
    real_spread = _mean([r["real_spread"] for r in rows])
    kinds = sorted({r["reference"].split(" (")[0] for r in rows})
    figures.append({"measure": "seed diversity (levels)", "generated": gen_spread,
                    "real": real_spread, "note": f"real: {' and '.join(kinds)}",
                    "ratio": ratio(gen_spread, real_spread) if real_spread is not None
                    else None})
    sets = [("cheap features", cheap_features)]
    if teacher is not None:
        sets.append(("DINOv3", lambda x: dino_features(x, teacher, cfg.model.patch_size)))
    for name, features in sets:
        if len(held) < 2:
            notes.append(f"Fréchet distance ({name}): fewer than 2 real images")
            continue
        g, r = features(every), features(held)
        figures.append({"measure": f"Fréchet distance ({name})", "generated":
                        frechet_distance(g, r), "real": _halves(r), "ratio": None,
                        "note": f"{len(g)} generated vs {len(r)} real; real: half vs half"})
    tick("features")
    adherence = []
    if real.demo:
        gen = _adherence(list(every), [p.prompt for p in prompts for _ in range(seeds)])
        ref = _adherence(list(held), held_captions)
        for attribute in ("background", "colour", "shape", "size", "position"):
            if attribute in gen:
                adherence.append({"attribute": attribute, "scored": len(gen[attribute]),
                                  "generated": 100.0 * np.mean(gen[attribute]),
                                  "real": (100.0 * np.mean(ref[attribute])
                                           if ref.get(attribute) else None)})
        if not adherence:
            notes.append("prompt adherence: no sample prompt is a demo caption")
    else:
        notes.append("prompt adherence: only on the built-in demo dataset (its captions "
                     "name what the pixels must show); this dataset is not the demo")
    return {"figures": _finite(figures), "per_prompt": _finite(rows),
            "adherence": adherence, "notes": notes}


def _finite(rows: list[dict]) -> list[dict]:
    """NaN (nothing measured) as None, so the report is valid JSON."""
    return [{k: None if isinstance(v, float) and not np.isfinite(v) else v
             for k, v in r.items()} for r in rows]


# --------------------------------------------------------------------------------------
# Live figures: what the trainer records with every sample grid (train.quality)
# --------------------------------------------------------------------------------------

LIVE_PROMPTS, LIVE_SEEDS, LIVE_STEPS, LIVE_REAL = 2, 2, 8, 16
LIVE_KEYS = ("q_noise_ratio", "q_diversity_ratio", "q_adherence", "q_fid", "q_fid_real")


class LiveQuality:
    """A fixed small evaluation for one run: the first LIVE_PROMPTS prompts of its
    config's sample.prompts (fixed, so the figures of a run stay comparable; edits to the
    prompts file change the grids only), LIVE_SEEDS seeds each, LIVE_STEPS sampler steps
    at the run's sample size, against at most LIVE_REAL images of the trainer's own plan
    (RealImages.of_plan: its validation split), decoded once."""

    def __init__(self, cfg: RunConfig, plan, trained: dict[str, int]):
        self.cfg, self.plan, self.trained = cfg, plan, trained
        self._real: RealImages | None = None

    def __call__(self, net, encode, device: torch.device | str, precision: str
                 ) -> dict[str, float]:
        """live_figures of `net` (eval mode, the weights to judge); raises on failure."""
        if self._real is None:
            self._real = RealImages.of_plan(self.plan, self.cfg.data.path, limit=LIVE_REAL)
        d = prompt_defaults(self.cfg, self.trained)
        prompts = from_config(self.cfg, d)[1][:LIVE_PROMPTS]
        result = evaluate(net, encode, self.cfg, device, precision, prompts, self._real,
                          seeds=LIVE_SEEDS, steps=LIVE_STEPS, width=d.width, height=d.height)
        return live_figures(result)


def live_figures(result: dict) -> dict[str, float]:
    """The flat keys (LIVE_KEYS) of an evaluate() result: q_noise_ratio (flat-area noise,
    generated / real), q_diversity_ratio (seed spread, generated / real), q_adherence
    (demo only: the right attributes' share, 0-1, the mean over the attributes scored)
    q_fid (the Fréchet distance on cheap features) and q_fid_real (the same distance
    between the two halves of the real images: what q_fid would be for a model that draws
    like them). A figure not measured is left out."""
    by = {f["measure"]: f for f in result["figures"]}
    shares = [a["generated"] / 100.0 for a in result["adherence"]]
    out = {"q_noise_ratio": by.get("flat-area noise (levels)", {}).get("ratio"),
           "q_diversity_ratio": by.get("seed diversity (levels)", {}).get("ratio"),
           "q_adherence": float(np.mean(shares)) if shares else None,
           "q_fid": by.get("Fréchet distance (cheap features)", {}).get("generated"),
           "q_fid_real": by.get("Fréchet distance (cheap features)", {}).get("real")}
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}
