"""The torch side of a dataset: decoding an image's exact crop, the Dataset that feeds
the trainer, collate and the DataLoader.

A file that fails to decode during training does not stop it: its sample comes back with
an error that says what is wrong with the file and what to do, collate leaves it out and
lists it in `Batch.failed`, and the trainer logs and counts it. Random crops and flips
are a function of (seed, epoch, index, copy) alone, so any number of workers, and a
resumed run, see exactly the same pixels; the copies of a repeated image (kohya N_name
folders) differ from each other like two epochs do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from engine.buckets import (
    Box,
    BucketBatchSampler,
    BucketPlan,
    PlannedImage,
    SampleKey,
    Size,
    cover_scale,
    crop_box,
)
from engine.config import DataConfig
from engine.data import DataError
from engine.images import (
    BROKEN_FILE_ERRORS,
    MAX_PIXELS,
    ORIENT_TRANSPOSE,
    exif_orientation,
    open_image,
    problem_text,
    srgb_of_part,
    to_rgb,
)

# --------------------------------------------------------------------------------------
# Decoding a crop
# --------------------------------------------------------------------------------------

def load_crop(path: str, bucket: Size, fx: float = 0.5, fy: float = 0.5, flip: bool = False, *,
              max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The bucket-sized RGB crop of an image: the crop box of engine.buckets.crop_box at
    (fx, fy), resampled with Lanczos straight from the original pixels, optionally
    mirrored. Large JPEGs are decoded at a reduced DCT scale that still covers the crop
    at full resolution; an animated image gives its first frame. Raises one of
    BROKEN_FILE_ERRORS for a broken file (engine.images.ImageTooLarge over `max_pixels`)."""
    with open_image(path, max_pixels) as img:
        if img.format == "PNG":   # decoded in full anyway; its chunks after the pixels
            img.load()            # (a late eXIf) are then read with them
        orient = exif_orientation(img, decoded=img.format == "PNG")
        w, h = img.size if orient < 5 else img.size[::-1]
        s = cover_scale(w, h, bucket)
        factor = 1.0     # decoded pixels per original pixel
        if img.format in ("JPEG", "MPO") and s < 0.5:
            stored_w, stored_h = img.size
            drafted = img.draft(None, (math.ceil(stored_w * s), math.ceil(stored_h * s)))
            if drafted is not None:    # (mode, (0, 0, stored_w / k, stored_h / k))
                factor = drafted[1][2] / stored_w
        rgb = to_rgb(img, later_profile=True)
    icc = rgb.info.get("icc_profile")
    if orient != 1:
        rgb = rgb.transpose(ORIENT_TRANSPOSE[orient])
    box = tuple(v * factor for v in crop_box(w, h, bucket, fx, fy))
    out = rgb.resize(bucket, Image.Resampling.LANCZOS, box=box)
    out = srgb_of_part(out, icc)   # the colour profile, converted on the crop's pixels only
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounded to the nearest level: the
    inverse of to_tensor on 8-bit images."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()                 # (N, 3, H, W) -> (N, H, W, 3)


def to_tensor(img: Image.Image) -> Tensor:
    """PIL RGB -> float (3, H, W) in [-1, 1]."""
    return uint8_to_tensor(torch.from_numpy(np.array(img, dtype=np.uint8)))


def uint8_to_tensor(arr: Tensor) -> Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]: one image or a batch."""
    return arr.movedim(-1, -3).float().div_(127.5).sub_(1.0)   # (.., H, W, 3) -> (.., 3, H, W)


# --------------------------------------------------------------------------------------
# Dataset, samples, batches
# --------------------------------------------------------------------------------------

@dataclass
class Sample:
    image: Tensor | None      # (3, H, W) in [-1, 1]; None when the file failed
    caption: str
    path: str
    bucket: Size
    epoch: int
    position: int
    error: str = ""           # why the file failed ('' = it did not)


@dataclass
class StoredCrops:
    """Where each planned image's decoded crop is stored in the disk cache
    (engine/crop_cache.py; `where[i]` = shard file, offset; shard -1: not stored), and why
    the files that did not decode when the cache was built do not (`failed[i]`: they are
    left out without being decoded again), handed to the training Dataset. Pickles without
    its open files, so loader workers started by spawn (Windows, macOS) open their own."""
    files: list[str]
    where: np.ndarray                               # (N, 2) int64
    failed: dict[int, str] = field(default_factory=dict)
    _slices: dict = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict:
        return {"files": self.files, "where": self.where, "failed": self.failed, "_slices": {}}

    @property
    def count(self) -> int:
        return int((self.where[:, 0] >= 0).sum())

    def read(self, index: int, bucket: Size) -> Tensor | None:
        """The stored (H, W, 3) uint8 crop of planned image `index`, or None (not stored,
        or its shard unreadable: deleted by another run making room, damaged)."""
        shard, offset = self.where[index].tolist()
        if shard < 0:
            return None
        w, h = bucket
        try:
            pixels = self._slices.get(shard)
            if pixels is None:
                pixels = safe_open(self.files[shard], framework="pt").get_slice("pixels")
                self._slices[shard] = pixels
            return pixels[offset:offset + h * w * 3].view(h, w, 3)
        except (OSError, SafetensorError, RuntimeError, ValueError):
            self.where[index, 0] = -1     # decode it from now on
            return None


@dataclass
class Batch:
    images: Tensor                     # (B, 3, H, W) in [-1, 1], B may be 0
    captions: list[str]
    paths: list[str]
    failed: list[tuple[str, str]]      # (path, reason) of samples left out
    epoch: int
    position: int                      # batches of the epoch trained once this one is

    def __len__(self) -> int:
        return self.images.shape[0]


    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True)."""
        return Batch(self.images.pin_memory(), self.captions, self.paths, self.failed,
                     self.epoch, self.position)


class BucketDataset(Dataset):
    """The planned images as training samples. Indexed by SampleKey (from
    BucketBatchSampler) or a plain index (epoch 0). Random crop offsets and flips are
    a function of (seed, epoch, index, copy) alone, so any number of workers, and a
    resumed run, see exactly the same pixels."""

    def __init__(self, images: Sequence[PlannedImage], *, crop: str = "center",
                 flip: bool = False, seed: int = 0, max_pixels: int = MAX_PIXELS,
                 cache_bytes: int = 0, stored: StoredCrops | None = None):
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        self.images, self.crop, self.flip = list(images), crop, flip
        self.seed, self.max_pixels = seed, max_pixels
        # a centre crop is the same every epoch (a flip mirrors it): it is read from the
        # disk cache (engine/crop_cache.py) where stored there, else decoded, and kept in
        # memory as uint8 (each process its own) up to `cache_bytes`: a dictionary lookup
        # is about 0.1 ms an image quicker than reading the disk cache again
        self.fixed = crop == "center"
        self.stored = stored if self.fixed else None
        self.cache_bytes = cache_bytes if self.fixed else 0
        self._cache: dict[int, Tensor] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.images)

    def augmentation(self, index: int, epoch: int, copy: int = 0) -> tuple[float, float, bool]:
        """(fx, fy, flip) of copy `copy` of an image in an epoch (copies > 0 exist for
        repeated images); crop_box(w, h, bucket, fx, fy) is the exact box trained."""
        key = [self.seed, epoch, index] + ([copy] if copy else [])
        u = np.random.default_rng(key).random(3)
        fx, fy = (u[0], u[1]) if self.crop == "random" else (0.5, 0.5)
        return float(fx), float(fy), bool(self.flip and u[2] < 0.5)

    def crop_at(self, index: int, epoch: int, copy: int = 0) -> tuple[Box, bool]:
        """(box in original pixels, mirrored) trained for an image in an epoch, as
        __getitem__ chooses it (the plan holds the centre boxes)."""
        im = self.images[index]
        fx, fy, flip = self.augmentation(index, epoch, copy)
        return crop_box(im.record.width, im.record.height, im.bucket, fx, fy), flip

    def _keep(self, index: int, pixels: Tensor) -> None:
        """Keep a centre crop in memory while `cache_bytes` has room (a no-op otherwise)."""
        if self._cached_bytes + pixels.numel() <= self.cache_bytes:
            self._cache[index] = pixels
            self._cached_bytes += pixels.numel()

    def __getitem__(self, key: SampleKey | int) -> Sample:
        if not isinstance(key, SampleKey):
            key = SampleKey(int(key), 0, 0)
        im = self.images[key.index]
        fx, fy, flip = self.augmentation(key.index, key.epoch, key.copy)
        pixels = self._cache.get(key.index)
        if pixels is None and self.stored is not None:
            if key.index in self.stored.failed:      # did not decode; unchanged since
                return Sample(None, im.caption, im.record.path, im.bucket, key.epoch,
                              key.position, self.stored.failed[key.index])
            pixels = self.stored.read(key.index, im.bucket)
            if pixels is not None:
                self._keep(key.index, pixels)
        if pixels is None:
            try:
                img = load_crop(im.record.path, im.bucket, fx, fy, flip and not self.fixed,
                                max_pixels=self.max_pixels)
            except BROKEN_FILE_ERRORS as e:
                return Sample(None, im.caption, im.record.path, im.bucket, key.epoch,
                              key.position, problem_text(e, im.record.path))
            pixels = torch.from_numpy(np.array(img, dtype=np.uint8))         # (H, W, 3)
            self._keep(key.index, pixels)
        if flip and self.fixed:
            pixels = pixels.flip(1)                                         # mirror W
        return Sample(uint8_to_tensor(pixels), im.caption, im.record.path, im.bucket,
                      key.epoch, key.position)


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack one bucket's samples; failed ones are left out and listed in `failed`."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    buckets = {s.bucket for s in samples}
    if len(buckets) > 1:
        raise ValueError(f"a batch mixes buckets {sorted(buckets)}; use BucketBatchSampler")
    ok = [s for s in samples if not s.error]
    bw, bh = samples[0].bucket
    images = torch.stack([s.image for s in ok]) if ok else torch.empty(0, 3, bh, bw)
    return Batch(images, [s.caption for s in ok], [s.path for s in ok],
                 [(s.path, s.error) for s in samples if s.error],
                 samples[0].epoch, samples[0].position)


class BucketLoader(DataLoader):
    """A DataLoader of Batches that raises DataError once every image of its dataset has
    failed to load and none has loaded: no epoch could yield a batch again, and skipping
    on would never end. Checked here, in the trainer's process, which sees the batches
    of every worker."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._failed: dict[str, str] = {}     # path -> why, while nothing has loaded
        self._loaded = False

    def __iter__(self):
        for batch in super().__iter__():
            self._loaded = self._loaded or len(batch) > 0
            if not self._loaded:
                self._failed.update(batch.failed)
                if len(self._failed) >= len(self.dataset):
                    path, why = next(iter(self._failed.items()))
                    raise DataError(f"none of the {len(self._failed)} images could be decoded "
                                    f"(e.g. {path}: {why}); run `python -m engine.data report "
                                    f"<dataset folder> --preset <preset> --deep` to list "
                                    f"every broken file")
            yield batch


def make_loader(plan: BucketPlan, data_cfg: DataConfig, *, seed: int, rank: int = 0,
                validation: bool = False, pin_memory: bool = False,
                stored: StoredCrops | None = None) -> tuple[DataLoader, BucketBatchSampler]:
    """DataLoader and its sampler for the plan's training images (their crops read from
    `stored` where it has them: engine.crop_cache.stored_crops), or (validation=True)
    its held-out images: centre crops, no flips, every image once, rank 0's view."""
    if validation:
        ds = BucketDataset(plan.val_images, seed=seed)
        sampler = BucketBatchSampler([im.bucket for im in plan.val_images], plan.batch_size,
                                     seed=seed)
    else:
        ds = BucketDataset(plan.images, crop=data_cfg.crop, flip=data_cfg.flip, seed=seed,
                           cache_bytes=data_cfg.cache_mb * 2**20, stored=stored)
        sampler = BucketBatchSampler.from_plan(plan, seed=seed, rank=rank)
    # validation only skips: a broken held-out image must not stop a run that can train
    loader_cls = DataLoader if validation else BucketLoader
    loader = loader_cls(ds, batch_sampler=sampler, collate_fn=collate,
                        num_workers=data_cfg.workers, pin_memory=pin_memory,
                        persistent_workers=data_cfg.workers > 0)
    return loader, sampler


def validation_batches(plan: BucketPlan, data_cfg: DataConfig, seed: int, device
                       ) -> list[tuple[Tensor, Tensor, list[str]]]:
    """The held-out images as (images, noise, captions) batches on `device`: centre crops
    and noise fixed by the seed, so the validation loss of two steps differs only because
    the weights do."""
    loader, _ = make_loader(plan, replace(data_cfg, workers=0), seed=seed, validation=True)
    out = []
    for i, batch in enumerate(loader):
        if not len(batch):
            continue
        g = torch.Generator().manual_seed(seed + 7919 * (i + 1))
        eps = torch.randn(batch.images.shape, generator=g)
        out.append((batch.images.to(device), eps.to(device), list(batch.captions)))
    return out
