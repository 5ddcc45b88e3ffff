"""The disk cache of decoded training crops: each training image's bucket-sized crop,
decoded once before training (with progress in the log) and read by every loader worker,
later epoch, resume and run of the same dataset instead of decoding the file again.

Decoding is the data side's whole cost: a JPEG photo takes milliseconds of a core to
decode and resample, its stored crop microseconds to read (the page cache keeps the hot
part in memory, shared by all processes). Without this cache each loader worker keeps
its own in-memory cache (data.cache_mb), which holds only what that worker met and is
lost when the run ends.

Only centre crops are the same every epoch and so can be stored; a flip is the stored
crop mirrored. Random crops (data.crop = random) decode every time.

The store (engine/shard_store.py) of a dataset is <data.cache_dir>/<hash of its folder>
(by default <cache root>/image-crops/...); its shards hold, for N crops,
    hashes  (N, 2) int64     hash_keys of crop_key: file path, size, modification time,
                             bucket and pixel limit, so a changed file is a new key
    sizes   (N, 2) int64     (width, height)
    offsets (N + 1,) int64   where each crop starts in `pixels`
    pixels  (offsets[N],) uint8, each crop (H, W, 3) row-major
All stores together keep to data.disk_cache_gb, and a build leaves KEEP_FREE_BYTES free on
its disk. When a build needs room, its own shards none of whose crops the plan trains
(files changed since, other sizes) go first, oldest first, then other datasets' whole
stores, least recently used first; crops that still do not fit are decoded every epoch,
as the log says. A cache that cannot be written (a read-only or full disk) never stops a
run: it trains decoding the images.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from filelock import FileLock, Timeout
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset

from engine.buckets import PlannedImage, Size
from engine.config import DataConfig
from engine.dataset import StoredCrops, load_crop
from engine.fileio import atomic_write_text, format_bytes, free_bytes
from engine.images import BROKEN_FILE_ERRORS, MAX_PIXELS, problem_text
from engine.shard_store import Progress, ShardStore, cache_base, hash_keys, identity_key

# part of every key and of each store's identity: bump when decoding changes its pixels
# (2: embedded colour profiles converted to sRGB)
CROPS_FORMAT = 2
NAMED_BROKEN = 5                 # files that do not decode named in one log line
SHARD_BYTES = 256 * 2**20        # crops gathered before a shard is written
KEEP_FREE_BYTES = 2 * 2**30      # a build never leaves less than this free on its disk


def crop_cache_root(data_cfg: DataConfig | None = None) -> Path:
    """The folder of the crop stores (data.cache_dir, see its doc string)."""
    if data_cfg is not None and data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    return cache_base() / "image-crops"


def crop_keys(images: Sequence[PlannedImage], max_pixels: int = MAX_PIXELS
              ) -> list[str | None]:
    """What each planned image's stored crop depends on (None: its file cannot be read)."""
    keys = []
    for im in images:
        try:
            st = os.stat(im.record.path)
        except OSError:
            keys.append(None)
            continue
        w, h = im.bucket
        keys.append(f"{CROPS_FORMAT}|{os.path.abspath(im.record.path)}|{st.st_size}|"
                    f"{st.st_mtime_ns}|{w}x{h}|{max_pixels}")
    return keys


def store_identity(folder: Path) -> dict | None:
    """The identity ({"format", "dataset"}) of a crop store, of any format, or None when the
    folder is not one: its index must name a dataset in the crop stores' layout and the
    folder be named after it. Nothing else beside the stores (data.cache_dir may be any
    folder) is ever deleted to make room."""
    try:
        identity = json.loads((folder / "index.json").read_text(encoding="utf-8"))["identity"]
        if (isinstance(identity, dict) and set(identity) == {"format", "dataset"}
                and isinstance(identity["dataset"], str)
                and folder.name == identity_key(identity)):
            return identity
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


class _Store(NamedTuple):
    """Another crop store beside one (CropCache._others)."""
    current: bool        # in this version's decoding format
    used: float          # its index's mtime: the last use
    size: int            # bytes
    folder: Path
    dataset: str


class _CropShard:
    def __init__(self, handle, hashes: np.ndarray, sizes: np.ndarray, offsets: np.ndarray):
        self.handle, self.hashes, self.sizes, self.offsets = handle, hashes, sizes, offsets


def _same(x):
    return x


class _Decode(Dataset):
    """Decoding the crops to store, in loader workers: (item, (H, W, 3) uint8 array, the
    reason a file does not decode, or None for one that could not be read this time)."""

    def __init__(self, jobs: list[tuple[str, Size]], max_pixels: int):
        self.jobs, self.max_pixels = jobs, max_pixels

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        path, bucket = self.jobs[i]
        try:
            return i, np.asarray(load_crop(path, bucket, max_pixels=self.max_pixels), np.uint8)
        except BROKEN_FILE_ERRORS as e:
            # a file the system could not read this time (locked, offline, no permission,
            # an I/O error: an errno) is tried again; what its decoder refused is not
            return i, (problem_text(e, path) if getattr(e, "errno", None) is None else None)


class CropCache(ShardStore):
    """The decoded crops of one dataset folder (see the module's doc string)."""

    what, count_key, noun, remade = "image crops", "images", "crops", "decoded"

    def __init__(self, root: Path, dataset: str, log: Callable[[str], None] = print):
        identity = {"format": CROPS_FORMAT, "dataset": dataset}
        super().__init__(Path(root).expanduser() / identity_key(identity), identity, log)
        self._load()

    def _load(self) -> dict:
        """As ShardStore._load, and the files that did not decode: the index's "broken",
        the hex hash of each crop key -> {"path", "why"} (a repaired file has another
        key)."""
        index = super()._load()
        broken = index.get("broken")
        self._broken = ({k: v for k, v in broken.items() if isinstance(v, dict)
                         and isinstance(v.get("path"), str) and isinstance(v.get("why"), str)}
                        if isinstance(broken, dict) else {})
        return index

    def _open_shard(self, entry: dict) -> _CropShard:
        handle = safe_open(str(self._check_size(entry)), framework="pt")
        n = entry["images"]
        shard = _CropShard(handle, handle.get_tensor("hashes").numpy(),
                           handle.get_tensor("sizes").numpy(),
                           handle.get_tensor("offsets").numpy())
        pixels = handle.get_slice("pixels")
        if (shard.hashes.shape != (n, 2) or shard.sizes.shape != (n, 2)
                or shard.offsets.shape != (n + 1,) or shard.offsets[0] != 0
                or (np.diff(shard.offsets) != shard.sizes.prod(1) * 3).any()
                or pixels.get_shape() != [int(shard.offsets[-1])]
                or pixels.get_dtype() != "U8"):
            raise ValueError("its tensors do not match the index")
        return shard

    def stored(self, images: Sequence[PlannedImage], keys: Sequence[str | None]
               ) -> StoredCrops:
        """Where each image's crop is (`keys`: crop_keys(images); -1 where not stored), and
        why the files that did not decode at the last build do not."""
        where = np.full((len(keys), 2), -1, np.int64)
        known = [i for i, k in enumerate(keys) if k is not None]
        hashes = hash_keys([keys[i] for i in known])
        rows = self._find(hashes)
        failed = {}
        names = _hex(hashes) if self._broken else [""] * len(known)
        for i, row, h in zip(known, rows.tolist(), names, strict=True):
            if h in self._broken:
                failed[i] = self._broken[h]["why"]
            if row < 0:
                continue
            s, r = self._where[row].tolist()
            shard = self._shards[s]
            if tuple(shard.sizes[r].tolist()) == tuple(images[i].bucket):
                where[i] = (s, shard.offsets[r])
        return StoredCrops([str(self.folder / n) for n in self._names], where, failed)

    def _others(self) -> list[_Store]:
        """The other stores beside this one: those of an older decoding format first
        (nothing reads them again), then the least recently used (stored_crops touches a
        store's index at each use)."""
        out = []
        for folder in self.folder.parent.iterdir():
            identity = None if folder == self.folder else store_identity(folder)
            if identity is None:
                continue
            with contextlib.suppress(OSError):   # being deleted by another process
                out.append(_Store(identity["format"] == CROPS_FORMAT,
                                  os.stat(folder / "index.json").st_mtime,
                                  sum(p.stat().st_size for p in folder.iterdir()
                                      if p.is_file()),
                                  folder, identity["dataset"]))
        return sorted(out, key=lambda o: (o.current, o.used))

    def _delete_store(self, folder: Path) -> bool:
        """Delete another store unless a process is writing it; whether it went. Its index
        goes first, under its lock (without it the folder is no store, and nothing reads
        it), then its shards; the folder and the lock file after the lock is released
        (Windows deletes no file that is open, the held lock file included). A shard still
        open in another process (Windows) stays and is removed at a later build."""
        lock = FileLock(str(folder / ".lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        try:
            try:
                (folder / "index.json").unlink()
            except FileNotFoundError:
                pass
            except OSError:
                return False
            for p in folder.iterdir():
                if p.name != ".lock":
                    with contextlib.suppress(OSError):
                        p.unlink()
        finally:
            lock.release()
        shutil.rmtree(folder, ignore_errors=True)
        return True

    def _drop_outdated(self) -> None:
        """Delete this dataset's stores of older decoding formats: their crops are never
        read again (another format is another key)."""
        for o in self._others():
            if (not o.current and o.dataset == self.identity["dataset"]
                    and self._delete_store(o.folder)):
                self.log(f"image crops: deleted this dataset's crops decoded by an older "
                         f"version ({o.folder}, {format_bytes(o.size)})")

    def _make_room(self, index: dict, wanted: np.ndarray, need: int, cap: int) -> int:
        """Make `need` more bytes fit under `cap` (all stores beside this one together):
        delete this store's shards none of whose crops are `wanted`, oldest first, then
        other datasets' whole stores, least recently used first (one being written is
        left alone). Returns the bytes this store may still grow by."""
        others = self._others()
        total = sum(s["bytes"] for s in index["shards"]) + sum(o.size for o in others)
        if total + need > cap:
            rows = self._find(wanted)
            live = {self._names[s] for s in self._where[rows[rows >= 0], 0].tolist()}
            drop = []
            for s in index["shards"]:
                if total + need <= cap:
                    break
                if s["file"] not in live:
                    drop.append(s["file"])
                    total -= s["bytes"]
            if drop:
                self.log(f"image crops: deleting {len(drop)} shard(s) of crops this run does "
                         f"not train, to stay within data.disk_cache_gb")
                # closed first: Windows deletes no file this process still has mapped
                self._shards, self._names = [], []
                gc.collect()
                self._drop_shards(index, drop)
                self._load()
        for o in others:
            if total + need <= cap:
                break
            if not self._delete_store(o.folder):
                continue
            total -= o.size
            self.log(f"image crops: deleted the least recently used crops of another dataset "
                     f"({o.folder}, {format_bytes(o.size)}) to stay within data.disk_cache_gb")
        return max(0, min(cap - total, free_bytes(self.folder) - KEEP_FREE_BYTES))

    def add(self, images: Sequence[PlannedImage], keys: Sequence[str | None], *,
            cap_bytes: int, workers: int = 0, max_pixels: int = MAX_PIXELS,
            shard_bytes: int = SHARD_BYTES) -> int:
        """Decode and store the crops of the images whose `keys` (crop_keys(images)) are
        missing, as many as fit (see _make_room), `workers` processes decoding. Returns
        how many."""
        with self._lock():
            index = self._load()
            self._drop_strays(index)
            self._drop_outdated()
            known = [(k, (im.record.path, im.bucket))
                     for k, im in zip(keys, images, strict=True) if k is not None]
            wanted = hash_keys([k for k, _ in known])
            names = _hex(wanted)
            # a file the plan no longer holds is forgotten (kept: other stages' and other
            # settings' entries of the planned files)
            paths = {os.path.abspath(im.record.path) for im in images}
            self._broken = {h: v for h, v in self._broken.items() if v["path"] in paths}
            self._record_broken(index, [])   # written when something was forgotten
            todo, seen = [], set()
            for (key, job), row, h in zip(known, self._find(wanted).tolist(), names,
                                          strict=True):
                if row < 0 and key not in seen and h not in self._broken:
                    seen.add(key)
                    todo.append((key, job))
            if not todo:
                return 0
            room = self._make_room(index, wanted, sum(w * h * 3 for _, (_, (w, h)) in todo),
                                   cap_bytes)
            fits, size = 0, 0
            for _, (_, (w, h)) in todo:
                if size + w * h * 3 > room:
                    break
                size += w * h * 3
                fits += 1
            if fits < len(todo):
                self.log(f"image crops: {len(todo) - fits} of {len(todo)} crops do not fit in "
                         f"data.disk_cache_gb = {cap_bytes / 2**30:g} or the disk's free space "
                         f"(keeping {format_bytes(KEEP_FREE_BYTES)} free); those are decoded "
                         f"every epoch")
            todo = todo[:fits]
            if not todo:
                return 0
            self.log(f"image crops: decoding {len(todo)} training crops "
                     f"({format_bytes(size)}) into {self.folder} ({len(self)} already there)")
            # its own generator: the global one seeds the run, whether or not it decodes
            loader = DataLoader(_Decode([job for _, job in todo], max_pixels), batch_size=None,
                                shuffle=False, num_workers=workers, collate_fn=_same,
                                generator=torch.Generator())
            progress = Progress("image crops", "crops decoded", len(todo), self.log)
            pending: list[tuple[str, np.ndarray]] = []
            pending_bytes = stored = 0
            failed: list[tuple[int, str]] = []
            for i, pixels in loader:
                if isinstance(pixels, str):
                    failed.append((i, pixels))
                elif pixels is not None:
                    pending.append((todo[i][0], pixels))
                    pending_bytes += pixels.nbytes
                    stored += 1
                if pending_bytes >= shard_bytes:
                    self._write_crops(index, pending)
                    pending, pending_bytes = [], 0
                progress.advance(1)
            if pending:
                self._write_crops(index, pending)
            self._record_broken(index, [(todo[i][0], todo[i][1][0], why) for i, why in failed])
            self._load()
            self.log(f"image crops: {stored} crops decoded in {progress.seconds:.0f} s")
        return stored

    def _record_broken(self, index: dict, failed: list[tuple[str, str, str]]) -> None:
        """Remember the files (key, path, why) that did not decode, so that no build or
        epoch decodes them again until they change, and name them. Called under the lock."""
        broken = {**self._broken, **{h: {"path": os.path.abspath(path), "why": why}
                                     for h, (_, path, why) in
                                     zip(_hex(hash_keys([k for k, _, _ in failed])), failed)}}
        if broken != index.get("broken", {}):
            index["broken"] = broken
            atomic_write_text(self.folder / "index.json", json.dumps(index, indent=1))
        if failed:
            named = "; ".join(f"{path}: {why}" for _, path, why in failed[:NAMED_BROKEN])
            more = len(failed) - NAMED_BROKEN
            self.log(f"image crops: {len(failed)} image(s) do not decode and are left out of "
                     f"training until they change: {named}"
                     + (f"; and {more} more (`python -m engine.data report` with --deep "
                        f"lists them)" if more > 0 else ""))

    def _write_crops(self, index: dict, crops: list[tuple[str, np.ndarray]]) -> None:
        sizes = torch.tensor([[a.shape[1], a.shape[0]] for _, a in crops], dtype=torch.long)
        offsets = torch.zeros(len(crops) + 1, dtype=torch.long)
        offsets[1:] = (sizes.prod(1) * 3).cumsum(0)
        pixels = torch.from_numpy(np.concatenate([a.reshape(-1) for _, a in crops]))
        self._write_shard(index, {"hashes": torch.from_numpy(hash_keys([k for k, _ in crops])),
                                  "sizes": sizes, "offsets": offsets, "pixels": pixels},
                          len(crops), {"format": str(CROPS_FORMAT)})


def _hex(hashes: np.ndarray) -> list[str]:
    """hash_keys' (N, 2) int64 rows as 32-digit hex strings (the index's JSON keys)."""
    return [bytes(row).hex() for row in np.ascontiguousarray(hashes, dtype="<i8")]


def dataset_name(images: Sequence[PlannedImage]) -> str:
    """The dataset folder of planned images (their records' common root)."""
    if not images:
        return ""
    rec = images[0].record
    path = Path(os.path.abspath(rec.path))
    return str(path.parents[len(Path(rec.rel).parts) - 1])


def uncached_advice(data_cfg: DataConfig, stored: StoredCrops | None, n: int) -> str:
    """Why some training crops are decoded from their files every epoch, and what to do
    about it; '' when the crop cache holds them all."""
    if data_cfg.crop != "center":
        return ("with data.crop = random every crop is decoded from its file each time: store "
                "the images at no more than about twice the largest training size "
                "(data.max_side), or train centre crops, which the crop cache decodes once")
    if data_cfg.disk_cache_gb <= 0:
        return ("the crop cache is off (data.disk_cache_gb = 0), so every epoch decodes the "
                "image files: set it above 0 to decode each image once")
    missing = n - (stored.count + len(stored.failed) if stored is not None else 0)
    if missing > 0:
        return (f"{missing} of {n} training crops are not in the crop cache and are decoded "
                f"every epoch (the log's 'image crops' lines say why): raise "
                f"data.disk_cache_gb, or free disk space, or store the images at no more "
                f"than about twice the largest training size (data.max_side)")
    return ""


def cache_status(images: Sequence[PlannedImage], data_cfg: DataConfig) -> str:
    """One line on what the crop cache holds of a plan's training images and what the
    next run will decode (the Dataset tab's preview); '' when there are no images."""
    n = len(images)
    if not n:
        return ""
    if data_cfg.crop != "center":
        return "Crop cache: not used with random crops (every epoch decodes every image)."
    if data_cfg.disk_cache_gb <= 0:
        return ("Crop cache: off (data.disk_cache_gb = 0): every epoch decodes every image.")
    try:
        cache = CropCache(crop_cache_root(data_cfg), dataset_name(images), lambda _: None)
    except OSError:
        return ""
    stored = cache.stored(images, crop_keys(images))
    failed = len(stored.failed)
    todo = [im.bucket for i, (im, (s, _)) in enumerate(zip(images, stored.where.tolist(),
                                                            strict=True))
            if s < 0 and i not in stored.failed]
    broken = (f" {failed} image(s) did not decode when the crops were stored and are left "
              f"out of training until they change: replace or delete them (the report with "
              f"--deep names them)." if failed else "")
    if not todo:
        return (f"Crop cache: all {n - failed} training crops are decoded already; a run "
                f"reads them instead of the image files.{broken}")
    size = format_bytes(sum(w * h * 3 for w, h in todo))
    return (f"Crop cache: {n - len(todo) - failed} of {n} training crops decoded already; the "
            f"next run decodes the other {len(todo)} once before it trains ({size} in "
            f"{crop_cache_root(data_cfg)}).{broken}")


def stored_crops(images: Sequence[PlannedImage], data_cfg: DataConfig,
                 log: Callable[[str], None] = print) -> StoredCrops | None:
    """The stored crops of a plan's training images, decoding and storing those missing
    first; None when the crops are not stored (data.disk_cache_gb = 0, random crops, no
    images) or the cache cannot be used (logged; training then decodes every epoch)."""
    if data_cfg.disk_cache_gb <= 0 or data_cfg.crop != "center" or not images:
        return None
    keys = crop_keys(images)
    cache, made = None, 0
    try:
        cache = CropCache(crop_cache_root(data_cfg), dataset_name(images), log)
        if (cache.folder / "index.json").exists():   # its last use, for making room
            os.utime(cache.folder / "index.json")
        made = cache.add(images, keys, cap_bytes=int(data_cfg.disk_cache_gb * 2**30),
                         workers=data_cfg.workers)
    except OSError as e:   # a read-only or full disk: what was written stays usable
        log(f"image crops: cannot write the crop cache ({e}); the crops not stored are "
            f"decoded every epoch")
        if cache is None:
            return None
        cache._load()
    stored = cache.stored(images, keys)
    if made == 0:
        log(f"image crops: {stored.count} of {len(images)} training crops found in "
            f"{cache.folder}")
    return stored
