"""Aspect-ratio buckets: the bucket list, which bucket an image goes to, where it is
cropped, the bucket plan shown before training, and the batch sampler that trains it.

Everything here is pure (no file or pixel I/O), so the studio's preview and the trainer
run the same code on the same numbers and cannot disagree.

Crop geometry. An image of w x h pixels trained in a bw x bh bucket is scaled by
s = max(bw / w, bh / h), the smallest scale at which it covers the bucket, and a
bw x bh window of the scaled image is kept. In original-image pixels that window is a
box of (bw / s) x (bh / s); where it sits is given by two fractions (fx, fy) of the
slack on each axis: (0.5, 0.5) is the centre crop, uniform random fractions give the
random crop. The box is the single description of a crop: the loader resamples exactly
that box to bw x bh (PIL `resize(..., box=...)`), and a UI draws it on a thumbnail.

Repeats. An image with r repeats (kohya `N_name` folders, engine.conventions) is r
samples of its bucket every epoch: bucket counts, batches and the epoch length below count
samples, and the sampler shuffles the copies with the rest. Copy k of an image is told
apart by SampleKey.copy, so each copy gets its own random crop and flip.

Batches. A bucket with n samples at batch size B on W ranks is cut into global batches of
B * W. Without drop_last its last global batch holds r = n mod (B * W) images; it is cut
into W equal batches of ceil(r / W) and the few missing places (fewer than W) repeat
images of the same bucket, wrapping around its shuffled order, so every rank yields the
same number of batches (DDP needs it). With drop_last the r images wait for another
epoch. All global batches of all buckets are then shuffled together, so buckets are
interleaved through the epoch; the order depends on (seed, epoch) only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from torch.utils.data import Sampler

from engine.config import DataConfig
from engine.stages import stage_scale

if TYPE_CHECKING:  # the planner reads records produced by the scanner in engine.data
    from engine.data import ImageRecord

Size = tuple[int, int]                      # (width, height) in pixels
Box = tuple[float, float, float, float]     # (left, top, right, bottom) in original pixels

# Aspect ratios (width / height) tried for every base size, as upstream PixelHDM does.
BUCKET_RATIOS: tuple[float, ...] = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16, 2.0, 0.5)

# Bucket assignment score: weight of the log-aspect mismatch versus the fraction of the
# image's area that the bucket gives up (upstream values).
ASPECT_WEIGHT = 0.7
AREA_WEIGHT = 0.3

# The plan holds out at most this fraction of the usable images for validation.
MAX_VAL_FRACTION = 0.2
MIN_KEPT = 0.6          # an image whose crop keeps less of its area is named in a warning
NAMED = 5               # images named in one warning


# --------------------------------------------------------------------------------------
# Bucket list and assignment
# --------------------------------------------------------------------------------------

def _floor_to(x: float, p: int) -> int:
    return int(x) // p * p


def make_buckets(min_side: int, max_side: int, step: int, patch: int,
                 max_aspect: float) -> list[Size]:
    """All (width, height) buckets, sides multiples of `patch` within [min_side, max_side]
    and aspect within [1 / max_aspect, max_aspect], sorted by (area, width).

    Base sizes b run from min_side to max_side by `step` (plus max_side itself). Each base
    gives (1) area-preserving buckets w = sqrt(b^2 r), h = sqrt(b^2 / r) for every ratio r
    of BUCKET_RATIOS (and max_aspect itself when it is not among them), (2) for the large
    bases (b >= max_side / 2, at least the top three) buckets whose long side is b, and
    (3) the square b x b. With 256-512, step 64, patch 16, aspect 2 this is upstream's
    list of 27 buckets; with 256-1024 it is its 123."""
    if min(min_side, max_side, step, patch) < 1 or max_aspect < 1.0:
        raise ValueError(f"bucket settings out of range: min_side={min_side}, max_side={max_side}, "
                         f"step={step}, patch={patch}, max_aspect={max_aspect}")
    lo, hi = min_side, _floor_to(max_side, patch)
    if _floor_to(lo, patch) < lo:
        lo = _floor_to(lo, patch) + patch
    if lo > hi:
        raise ValueError(f"no bucket side fits: min_side {min_side} > max_side {max_side} "
                         f"after rounding to multiples of the patch size {patch}")
    bases = sorted({_floor_to(b, patch) for b in range(lo, hi + 1, step)} | {hi})
    ratios = [r for r in BUCKET_RATIOS if 1.0 / max_aspect <= r <= max_aspect]
    if max_aspect not in ratios:
        ratios += [max_aspect, 1.0 / max_aspect]

    def fits(w: int, h: int) -> bool:
        return lo <= w <= hi and lo <= h <= hi and 1.0 / max_aspect <= w / h <= max_aspect

    out: set[Size] = set()
    for b in bases:
        for r in ratios:
            w = _floor_to(math.sqrt(b * b * r), patch)
            h = _floor_to(math.sqrt(b * b / r), patch)
            if fits(w, h):
                out.add((w, h))
    large = [b for b in bases if b >= hi / 2]
    if len(large) < 3:
        large = bases[-3:]
    for b in large:
        for r in ratios:
            if r == 1.0:
                continue
            w, h = (b, _floor_to(b / r, patch)) if r > 1.0 else (_floor_to(b * r, patch), b)
            if fits(w, h):
                out.add((w, h))
    out.update((b, b) for b in bases)
    return sorted(out, key=lambda s: (s[0] * s[1], s[0]))


def assign_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket for a width x height image: among buckets no larger in area than the
    image, the one minimising 0.7 |ln(w/h) - ln(bw/bh)| + 0.3 (area lost / image area)
    (the first in list order on a tie). An image smaller than every bucket gets the
    bucket closest in aspect, the smaller on a tie."""
    if not buckets:
        raise ValueError("empty bucket list")
    area = width * height
    log_ar = math.log(width / height)
    best, best_score = None, math.inf
    for bw, bh in buckets:
        if bw * bh > area:
            continue
        score = (ASPECT_WEIGHT * abs(log_ar - math.log(bw / bh))
                 + AREA_WEIGHT * (area - bw * bh) / area)
        if score < best_score:
            best, best_score = (bw, bh), score
    if best is not None:
        return best
    return min(buckets, key=lambda s: (abs(log_ar - math.log(s[0] / s[1])), s[0] * s[1]))


def aspect_error(width: int, height: int, bucket: Size) -> float:
    """|ln(image aspect) - ln(bucket aspect)|: 0 = no crop; 0.1 = about 10 % cropped."""
    return abs(math.log(width / height) - math.log(bucket[0] / bucket[1]))


def cover_scale(width: int, height: int, bucket: Size) -> float:
    """The scale at which the image just covers the bucket (> 1 means upscaling)."""
    return max(bucket[0] / width, bucket[1] / height)


def crop_box(width: int, height: int, bucket: Size, fx: float = 0.5, fy: float = 0.5) -> Box:
    """The crop of a width x height image for `bucket`, in original-image pixels.
    fx, fy in [0, 1] place the box within the slack of each axis (0.5 = centred)."""
    s = cover_scale(width, height, bucket)
    cw, ch = min(width, bucket[0] / s), min(height, bucket[1] / s)
    left, top = fx * (width - cw), fy * (height - ch)
    return (left, top, left + cw, top + ch)


# --------------------------------------------------------------------------------------
# Batch layout of one bucket (shared by the planner and the sampler)
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchLayout:
    """How one bucket's images become batches in an epoch, per rank."""
    batches: int        # batches each rank yields from the bucket
    last_batch: int     # size of each rank's last batch from the bucket (0 = no batch)
    padded: int         # repeated images that fill the last global batch (< world size)
    dropped: int        # images left out every epoch by drop_last


def batch_layout(n: int, batch_size: int, world_size: int = 1,
                 drop_last: bool = False) -> BatchLayout:
    global_batch = batch_size * world_size
    full, rest = divmod(n, global_batch)
    if drop_last or rest == 0:
        return BatchLayout(full, batch_size if full else 0, 0, rest if drop_last else 0)
    per_rank = -(-rest // world_size)
    return BatchLayout(full + 1, per_rank, per_rank * world_size - rest, 0)


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------

@dataclass
class PlannedImage:
    """One usable image and exactly how it is trained."""
    record: ImageRecord
    caption: str                 # the caption trained (after the missing-caption policy)
    bucket: Size
    scale: float                 # cover scale; > 1 means the image is upscaled
    box: Box                     # centre crop, original pixels (random: BucketDataset.augmentation)
    aspect_error: float
    kept: float                  # fraction of the image's area inside the crop box

    @property
    def rel(self) -> str:
        return self.record.rel

    @property
    def repeats(self) -> int:
        """Times the image is trained per epoch."""
        return self.record.repeats

    def to_dict(self) -> dict:
        return {"path": self.record.rel, "width": self.record.width,
                "height": self.record.height, "caption": self.caption,
                "repeats": self.repeats,
                "bucket": list(self.bucket), "scale": round(self.scale, 4),
                "box": [round(v, 2) for v in self.box],
                "aspect_error": round(self.aspect_error, 4), "kept": round(self.kept, 4)}


@dataclass
class DroppedImage:
    path: str                    # relative to the dataset root
    reason: str                  # "too_small" or "no_caption"
    detail: str


@dataclass
class BucketStats:
    size: Size
    images: int                  # distinct images
    samples: int                 # images x their repeats: what an epoch trains
    batches: int                 # per rank per epoch
    last_batch: int
    padded: int                  # samples
    dropped: int                 # samples per epoch, by drop_last
    tokens: int                  # image tokens per sample: (h / p) * (w / p)
    mean_aspect_error: float
    worst_aspect_error: float


@dataclass
class BucketPlan:
    """What training a set of images will do, before it is done."""
    patch_size: int
    batch_size: int
    world_size: int
    grad_accum: int
    drop_last: bool
    buckets: list[BucketStats]           # every bucket of the list, empty ones included
    images: list[PlannedImage]           # training images, sorted by path: dataset order
    val_images: list[PlannedImage]       # held out for the validation loss
    dropped: list[DroppedImage]
    warnings: list[str] = field(default_factory=list)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches each rank trains per epoch."""
        return sum(b.batches for b in self.buckets)

    @property
    def steps_per_epoch(self) -> float:
        """Optimizer steps per epoch (micro-batches / grad_accum)."""
        return self.batches_per_epoch / self.grad_accum

    @property
    def samples_per_epoch(self) -> int:
        """Samples trained per epoch over all ranks, repeats and padding included."""
        return sum(b.samples - b.dropped + b.padded for b in self.buckets)

    @property
    def tokens_per_sample(self) -> float:
        """Mean image tokens of a trained sample: what a step costs, roughly."""
        return (sum(b.tokens * b.samples for b in self.buckets)
                / max(1, sum(b.samples for b in self.buckets)))

    @property
    def repeated(self) -> bool:
        """Whether any training image repeats (kohya N_name folders)."""
        return any(im.repeats != 1 for im in self.images)

    @property
    def mean_aspect_error(self) -> float:
        return float(np.mean([im.aspect_error for im in self.images])) if self.images else 0.0

    @property
    def worst_aspect_error(self) -> float:
        return max((im.aspect_error for im in self.images), default=0.0)

    @property
    def upscaled(self) -> int:
        return sum(im.scale > 1.0 for im in self.images)

    def bucket_sizes(self) -> list[Size]:
        """The bucket of every training image, in dataset order (the sampler's input)."""
        return [im.bucket for im in self.images]

    def repeats(self) -> list[int]:
        """The repeats of every training image, in dataset order (the sampler's input)."""
        return [im.repeats for im in self.images]

    def to_dict(self) -> dict:
        return {"patch_size": self.patch_size, "batch_size": self.batch_size,
                "world_size": self.world_size, "grad_accum": self.grad_accum,
                "drop_last": self.drop_last, "batches_per_epoch": self.batches_per_epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "samples_per_epoch": self.samples_per_epoch, "repeated": self.repeated,
                "mean_aspect_error": round(self.mean_aspect_error, 4),
                "worst_aspect_error": round(self.worst_aspect_error, 4),
                "upscaled": self.upscaled,
                "buckets": [{**asdict(b), "size": list(b.size),
                             "mean_aspect_error": round(b.mean_aspect_error, 4),
                             "worst_aspect_error": round(b.worst_aspect_error, 4)}
                            for b in self.buckets],
                "images": [im.to_dict() for im in self.images],
                "val_images": [im.to_dict() for im in self.val_images],
                "dropped": [asdict(d) for d in self.dropped],
                "warnings": list(self.warnings)}


def split_validation(records: Sequence, n: int, seed: int = 0) -> tuple[list, list]:
    """(train, val): `n` records held out, chosen by a keyed hash of their relative path.
    The choice depends neither on the order of `records` nor on the run's seed, and adding
    images to a dataset rarely changes it, so validation losses stay comparable."""
    def key(r) -> bytes:
        return hashlib.blake2b(f"{seed}:{r.rel}".encode(), digest_size=8).digest()

    held = {r.rel for r in sorted(records, key=key)[:max(0, n)]}
    return ([r for r in records if r.rel not in held], [r for r in records if r.rel in held])


def plan_image(record: ImageRecord, caption: str, buckets: Sequence[Size]) -> PlannedImage:
    w, h = record.width, record.height
    bucket = assign_bucket(w, h, buckets)
    box = crop_box(w, h, bucket)
    kept = (box[2] - box[0]) * (box[3] - box[1]) / (w * h)
    return PlannedImage(record, caption, bucket, cover_scale(w, h, bucket), box,
                        aspect_error(w, h, bucket), kept)


def _named(images: list[PlannedImage], what: Callable[[PlannedImage], str]) -> str:
    """The first few images by name with a figure each, for a warning."""
    shown = ", ".join(f"{im.record.rel} ({what(im)})" for im in images[:NAMED])
    return shown + (f" and {len(images) - NAMED} more" if len(images) > NAMED else "")


def plan_buckets(records: Sequence[ImageRecord], data_cfg: DataConfig, patch_size: int,
                 batch_size: int, world_size: int = 1, grad_accum: int = 1, *,
                 split_seed: int = 0) -> BucketPlan:
    """Assign every record to a bucket, drop what cannot train (and say why), hold out
    data_cfg.val_images images for validation (at most a fifth of the usable ones) and
    count batches exactly as BucketBatchSampler will cut them: each image counts its
    repeats times (validation images count once)."""
    if min(batch_size, world_size, grad_accum, patch_size) < 1:
        raise ValueError(f"batch_size {batch_size}, world_size {world_size}, grad_accum "
                         f"{grad_accum} and patch_size {patch_size} must all be >= 1")
    d = data_cfg
    buckets = make_buckets(d.min_side, d.max_side, d.bucket_step, patch_size, d.max_aspect)
    dropped: list[DroppedImage] = []
    usable: list[PlannedImage] = []
    for r in sorted(records, key=lambda r: r.rel):
        if min(r.width, r.height) < d.min_side:
            dropped.append(DroppedImage(r.rel, "too_small", f"{r.width}x{r.height} px, shorter "
                                        f"side below data.min_side {d.min_side}"))
        elif r.caption is None and d.missing_caption == "skip":
            dropped.append(DroppedImage(r.rel, "no_caption", "no caption (data.missing_caption "
                                        "= skip)"))
        else:
            caption = r.caption if r.caption is not None else d.default_caption
            usable.append(plan_image(r, caption, buckets))

    warnings: list[str] = []
    n_val = min(d.val_images, int(len(usable) * MAX_VAL_FRACTION))
    if n_val < d.val_images:
        warnings.append(f"validation set reduced to {n_val} image(s) (data.val_images = "
                        f"{d.val_images}, at most {MAX_VAL_FRACTION:.0%} of {len(usable)} "
                        f"usable images)")
    train, val = split_validation(usable, n_val, split_seed)

    by_bucket: dict[Size, list[PlannedImage]] = {b: [] for b in buckets}
    for im in train:
        by_bucket[im.bucket].append(im)
    stats = []
    for b, ims in by_bucket.items():
        samples = sum(im.repeats for im in ims)
        lay = batch_layout(samples, batch_size, world_size, d.drop_last)
        errs = [im.aspect_error for im in ims]
        stats.append(BucketStats(b, len(ims), samples, lay.batches, lay.last_batch, lay.padded,
                                 lay.dropped, (b[0] // patch_size) * (b[1] // patch_size),
                                 float(np.mean(errs)) if errs else 0.0, max(errs, default=0.0)))
    global_batch = batch_size * world_size
    small = [f"{s.size[0]}x{s.size[1]}: {s.samples}" for s in stats
             if 0 < s.samples < global_batch]
    if small:
        effect = ("they are never trained (data.drop_last)" if d.drop_last
                  else "each trains in one smaller batch")
        warnings.append(f"{len(small)} bucket(s) hold fewer images than a global batch of "
                        f"{global_batch} ({', '.join(small)}): {effect}")
    n_dropped = sum(s.dropped for s in stats)
    if n_dropped:
        warnings.append(f"data.drop_last leaves {n_dropped} of {sum(s.samples for s in stats)} "
                        f"samples out of every epoch (different ones each epoch)")
    if not train:
        warnings.append("no usable training images")
    elif not any(s.batches for s in stats):
        warnings.append("no bucket fills a single batch, so an epoch has no batches: lower "
                        "train.batch_size or set data.drop_last off")
    upscaled = sorted((im for im in train if im.scale > 1.0), key=lambda im: -im.scale)
    if upscaled:
        warnings.append(f"{len(upscaled)} image(s) upscaled to fill their bucket (blurrier "
                        f"pixels): {_named(upscaled, lambda im: f'{im.scale:.2f}x')}")
    cut = sorted((im for im in usable if im.kept < MIN_KEPT), key=lambda im: im.kept)
    if cut:
        warnings.append(f"{len(cut)} image(s) lose more than {1 - MIN_KEPT:.0%} of the "
                        f"picture to their crop, being wider or taller than any bucket "
                        f"(data.max_aspect = {d.max_aspect:g}): "
                        f"{_named(cut, lambda im: f'keeps {im.kept:.0%}')}; crop or split "
                        f"them into pictures of an ordinary shape, or raise data.max_aspect")
    return BucketPlan(patch_size, batch_size, world_size, grad_accum, d.drop_last, stats,
                      train, val, dropped, warnings)


def stage_data(d: DataConfig, side: int, patch: int) -> DataConfig:
    """The data settings of a progressive-resolution stage up to `side` px (data.stages):
    min_side and bucket_step scaled like max_side (stage_scale), so every image keeps its
    aspect and framing on fewer pixels."""
    return replace(d, max_side=side, min_side=min(side, stage_scale(d.min_side, side,
                                                                    d.max_side, patch)),
                   bucket_step=stage_scale(d.bucket_step, side, d.max_side, patch))


def stage_plans(plan: BucketPlan, data_cfg: DataConfig, stages) -> list[BucketPlan]:
    """The plan of every progressive-resolution stage (engine.stages.resolution_stages):
    the images of the full `plan` (the same training and held-out ones) in the buckets of
    stage_data, and `plan` itself for the last, full-size stage."""
    records = [im.record for im in plan.images + plan.val_images]
    return [plan if until is None else
            plan_buckets(records, stage_data(data_cfg, side, plan.patch_size), plan.patch_size,
                         plan.batch_size, plan.world_size, plan.grad_accum)
            for side, until in stages]


def format_plan(plan: BucketPlan) -> list[str]:
    """The plan as text lines: the table of used buckets, then what an epoch trains."""
    rows = [["bucket", "images", "samples", "batches", "last", "padded", "dropped", "tokens",
             "aspect err"]]
    for b in plan.buckets:
        if b.images:
            rows.append([f"{b.size[0]}x{b.size[1]}", str(b.images), str(b.samples),
                         str(b.batches), str(b.last_batch), str(b.padded), str(b.dropped),
                         str(b.tokens), f"{b.mean_aspect_error:.3f} / {b.worst_aspect_error:.3f}"])
    rows.append(["total", str(len(plan.images)), str(sum(b.samples for b in plan.buckets)),
                 str(plan.batches_per_epoch), "",
                 str(sum(b.padded for b in plan.buckets)),
                 str(sum(b.dropped for b in plan.buckets)), "",
                 f"{plan.mean_aspect_error:.3f} / {plan.worst_aspect_error:.3f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    used = sum(1 for b in plan.buckets if b.images)
    lines = [f"Buckets   {used} of {len(plan.buckets)} used; samples = images x repeats per "
             f"epoch; batches and last batch per rank; aspect error |ln(image/bucket aspect)| "
             f"mean / worst"]
    lines += ["  " + "  ".join(c.rjust(w) if 0 < i < 8 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    reasons: dict[str, int] = {}
    for d in plan.dropped:
        reasons[d.reason] = reasons.get(d.reason, 0) + 1
    why = f" ({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))})" if reasons else ""
    repeats = (f"; with kohya repeats {sum(plan.repeats())} samples an epoch"
               if plan.repeated else "")
    return lines + ["", f"Training  {len(plan.images)} images, {len(plan.val_images)} held out "
                        f"for validation, {len(plan.dropped)} dropped{why}{repeats}",
                    f"Epoch     {plan.batches_per_epoch} batches of up to {plan.batch_size} per "
                    f"rank = {plan.steps_per_epoch:g} optimizer steps ({plan.samples_per_epoch} "
                    f"samples over {plan.world_size} rank(s))"]


# --------------------------------------------------------------------------------------
# Batch sampler
# --------------------------------------------------------------------------------------

class SampleKey(NamedTuple):
    """What the sampler hands the dataset for one sample. The epoch travels with the
    index because DataLoader workers hold their own stale copy of the dataset."""
    index: int       # position in the dataset (plan.images order)
    epoch: int
    position: int    # batches of this epoch consumed once this sample's batch is trained
    copy: int = 0    # which of the image's repeats in this epoch (0 .. repeats - 1)


class BucketBatchSampler(Sampler[list[SampleKey]]):
    """Yields batches of SampleKeys, every batch from one bucket; see the module
    docstring for the layout. Resumable: state_dict / load_state_dict hold (epoch,
    position) and a fingerprint of the data and settings, so a resumed run continues
    mid-epoch with exactly the batches it would have trained.

    `repeats[i]` (default 1) is how many samples image i is per epoch. The sampler works
    on sample slots: image i owns `repeats[i]` consecutive slots, so without repeats a
    slot is the image index and the batches are those of a sampler without the option."""

    def __init__(self, buckets: Sequence[Size], batch_size: int, *, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 repeats: Sequence[int] | None = None):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got "
                             f"batch_size {batch_size}, rank {rank}, world_size {world_size}")
        reps = np.ones(len(buckets), np.int64) if repeats is None else np.asarray(repeats,
                                                                                  np.int64)
        if reps.shape != (len(buckets),) or (len(reps) and reps.min() < 1):
            raise ValueError(f"need one repeat count >= 1 per image, got {len(reps)} for "
                             f"{len(buckets)} images (minimum {reps.min(initial=1)})")
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self._index = np.repeat(np.arange(len(buckets), dtype=np.int64), reps)   # slot -> image
        first = np.cumsum(reps) - reps                                          # image -> slot
        self._copy = np.arange(len(self._index)) - np.repeat(first, reps)       # slot -> copy
        groups: dict[Size, list[int]] = {}
        for i, (b, r) in enumerate(zip(buckets, reps.tolist())):
            groups.setdefault(tuple(b), []).extend(range(first[i], first[i] + r))
        self._groups = [np.asarray(groups[b], dtype=np.int64) for b in sorted(groups)]
        h = hashlib.blake2b(digest_size=8)
        h.update(repr((batch_size, world_size, drop_last, seed)).encode())
        h.update(np.asarray(buckets, dtype=np.int64).tobytes())
        if (reps != 1).any():    # plain datasets keep the fingerprint they always had
            h.update(b"repeats" + reps.tobytes())
        self.fingerprint = h.hexdigest()
        self.epoch = 0
        self._start = 0       # first batch of the next iteration (set by load_state_dict)
        self._yielded = 0     # batches of the current epoch handed out so far

    @classmethod
    def from_plan(cls, plan: BucketPlan, *, seed: int, rank: int = 0) -> BucketBatchSampler:
        return cls(plan.bucket_sizes(), plan.batch_size, seed=seed, drop_last=plan.drop_last,
                   rank=rank, world_size=plan.world_size, repeats=plan.repeats())

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank)."""
        return sum(batch_layout(len(g), self.batch_size, self.world_size, self.drop_last).batches
                   for g in self._groups)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (call before every epoch)."""
        self.epoch, self._start, self._yielded = epoch, 0, 0

    def _epoch_slots(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of sample slots for `epoch`, in training order."""
        rng = np.random.default_rng([self.seed, epoch])
        global_batches = []
        gb = self.batch_size * self.world_size
        for g in self._groups:
            order = g[rng.permutation(len(g))]
            lay = batch_layout(len(g), self.batch_size, self.world_size, self.drop_last)
            for k in range(lay.batches):
                chunk = order[k * gb:(k + 1) * gb]
                if len(chunk) < gb:   # the last global batch: wrap around to W equal batches
                    need = lay.last_batch * self.world_size
                    chunk = order[np.arange(k * gb, k * gb + need) % len(g)]
                global_batches.append(chunk)
        per_rank = [c.reshape(self.world_size, -1)[self.rank]  # (W * b,) -> (W, b)
                    for c in global_batches]
        return [per_rank[i] for i in rng.permutation(len(per_rank))]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        batches = self._epoch_slots(self.epoch)
        start, self._start = self._start, 0
        for pos in range(start, len(batches)):
            self._yielded = pos + 1
            slots = batches[pos]
            yield [SampleKey(i, self.epoch, pos + 1, c) for i, c in
                   zip(self._index[slots].tolist(), self._copy[slots].tolist())]

    def state_dict(self, position: int | None = None) -> dict:
        """The state to resume from. `position` = batches of the current epoch already
        trained; a DataLoader with workers draws batches ahead of the training loop, so
        pass the `position` of the last batch trained. Default: batches yielded so far."""
        return {"epoch": self.epoch, "position": self._yielded if position is None else position,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue at (epoch, position). Raises ValueError when the images, their buckets
        or repeats, the batch size, world size, drop_last or seed changed: the saved position would
        not mean the same batches (call set_epoch(state['epoch']) to restart that epoch)."""
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError("the batch sampler state was saved for different data or batch "
                             "settings (images, buckets, repeats, batch size, world size, "
                             "drop_last or seed changed); restart the epoch with set_epoch instead")
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(f"sampler position {position} outside 0..{len(self)}")
        self.epoch, self._start, self._yielded = int(state["epoch"]), position, position
