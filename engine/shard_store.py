"""A folder of write-once shards keyed by 128-bit hashes: what the text-feature cache
(engine/text_features.py) and the decoded-crop cache (engine/crop_cache.py) have in
common.

A store's folder holds
  index.json                 {"identity": ..., "shards": [{"file", <count key>, "bytes"}]}
  shard-<random>.safetensors each with a `hashes` (N, 2) int64 tensor (the keys) and the
                             store's own tensors
  .lock                      held while the folder is written
A shard is written once (temp file, fsync, os.replace, then the index the same way) and
never changed; later builds add shards. A damaged shard (truncated, unreadable, not what
the index says) is reported, dropped from the index and its items made again by the next
build; shards the index does not list (a process killed between the two writes) are
deleted under the lock. Only the hashes are held in memory, sorted, for lookups.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import save_file

from engine.fileio import atomic_target, atomic_write_text

PROGRESS_SECONDS = 5.0
LOCK_NOTICE_SECONDS = 2.0       # waiting longer than this for the folder lock is logged
NO_HASHES = np.zeros((0, 2), np.int64)


def cache_base() -> Path:
    """Where the caches live: $PIXELHDM_CACHE_DIR when set, else ~/.cache/pixelhdm."""
    base = os.environ.get("PIXELHDM_CACHE_DIR")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "pixelhdm"


def hash_keys(keys: Iterable[str]) -> np.ndarray:
    """(N, 2) int64: the blake2b-128 of each key's UTF-8 text."""
    raw = b"".join(hashlib.blake2b(k.encode("utf-8"), digest_size=16).digest() for k in keys)
    return np.frombuffer(raw, dtype="<i8").reshape(-1, 2).copy()


def identity_key(identity: dict) -> str:
    """The folder name of a store: a short hash of everything its contents depend on."""
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(),
                           digest_size=10).hexdigest()


class Progress:
    """'<what>: done/total <unit> (rate/s), ETA ...' to `log` every PROGRESS_SECONDS."""

    def __init__(self, what: str, unit: str, total: int, log: Callable[[str], None]):
        self.what, self.unit, self.total, self.log = what, unit, total, log
        self.done = 0
        self.start = self.last = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            eta_text = f"{eta / 60:.0f} min" if eta >= 90 else f"{eta:.0f} s"
            self.log(f"{self.what}: {self.done}/{self.total} {self.unit} ({rate:.1f}/s), "
                     f"ETA {eta_text}")
            self.last = now

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start


class ShardStore(abc.ABC):
    """The folder, index, lock and hash lookup of a store; subclasses open their shards
    (`_open_shard`, returning an object with a `hashes` (N, 2) array) and write them with
    `_write_shard`. `what` names the store in log lines, `count_key` is the index entry's
    item count, `noun`/`remade` word what a damaged shard costs ('captions', 'encoded')."""

    what, count_key, noun, remade = "store", "items", "items", "made"

    def __init__(self, folder: Path, identity: dict, log: Callable[[str], None] = print):
        self.folder, self.identity, self.log = Path(folder), identity, log
        self._filelock = FileLock(str(self.folder / ".lock"))
        self._shards: list = []
        self._names: list[str] = []
        self._hi = self._lo = np.zeros(0, np.int64)
        self._where = NO_HASHES

    def __len__(self) -> int:
        return len(self._hi)

    # ---- reading ------------------------------------------------------------------
    @abc.abstractmethod
    def _open_shard(self, entry: dict):
        """The shard of an index entry, opened and checked against it (ValueError, OSError
        or SafetensorError when damaged): an object with a `hashes` (N, 2) array."""

    def _read_index(self) -> dict:
        """The index; a missing one is empty, and so is an unreadable or foreign one (the
        next write replaces it and removes the shards it no longer lists)."""
        path = self.folder / "index.json"
        empty = {"identity": self.identity, "shards": []}
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            if index.get("identity") != self.identity:
                raise ValueError("it describes other contents")
            for s in index["shards"]:
                if not (isinstance(s["file"], str) and s["file"].startswith("shard-")
                        and isinstance(s[self.count_key], int) and isinstance(s["bytes"], int)):
                    raise ValueError(f"bad shard entry {s!r}")
            return index
        except FileNotFoundError:
            return empty
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.log(f"{self.what}: the index {path} is damaged ({e}); its {self.noun} will "
                     f"be {self.remade} again")
            return empty

    def _check_size(self, entry: dict) -> Path:
        """The shard's path, when its size is what the index says (else ValueError)."""
        path = self.folder / entry["file"]
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(f"{size} bytes, the index says {entry['bytes']}")
        return path

    def _load(self) -> dict:
        """Open every shard the index lists and rebuild the lookup table; damaged shards
        are reported and removed from the index. Returns the index."""
        index = self._read_index()
        shards, names, damaged = [], [], []
        for entry in index["shards"]:
            try:
                shards.append(self._open_shard(entry))
                names.append(entry["file"])
            except (OSError, ValueError, KeyError, SafetensorError) as e:
                damaged.append(entry["file"])
                self.log(f"{self.what}: {self.folder / entry['file']} is damaged ({e}); its "
                         f"{entry[self.count_key]} {self.noun} will be {self.remade} again")
        self._shards, self._names = shards, names
        hashes = np.concatenate([s.hashes for s in shards] or [NO_HASHES])
        where = np.concatenate([np.stack([np.full(len(s.hashes), i), np.arange(len(s.hashes))],
                                         1) for i, s in enumerate(shards)] or [NO_HASHES])
        order = np.lexsort((hashes[:, 1], hashes[:, 0]))
        self._hi, self._lo, self._where = hashes[order, 0], hashes[order, 1], where[order]
        if damaged:
            with self._lock():
                index = self._read_index()
                self._drop_shards(index, damaged)
        return index

    def _find(self, h: np.ndarray) -> np.ndarray:
        """(B,) each key's row in the lookup table (`_where[row]` = shard, row in it), -1
        where the store lacks it; `h` is hash_keys' (B, 2)."""
        found = np.full(len(h), -1)
        if not len(self._hi) or not len(h):
            return found
        left = np.searchsorted(self._hi, h[:, 0], "left")
        right = np.searchsorted(self._hi, h[:, 0], "right")
        first = np.minimum(left, len(self._hi) - 1)
        found = np.where((right > left) & (self._lo[first] == h[:, 1]), left, -1)
        for b in np.flatnonzero(right - left > 1):   # equal first halves: sorted by the second
            i = left[b] + np.searchsorted(self._lo[left[b]:right[b]], h[b, 1])
            found[b] = i if i < right[b] and self._lo[i] == h[b, 1] else -1
        return found

    # ---- writing ------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self):
        """Hold the folder's file lock (re-entrant in this object); a wait is logged."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._filelock.acquire(timeout=LOCK_NOTICE_SECONDS)
        except Timeout:
            self.log(f"{self.what}: waiting for another process writing {self.folder}")
            self._filelock.acquire()
        try:
            yield
        finally:
            self._filelock.release()

    def _drop_strays(self, index: dict) -> None:
        """Shards the index does not list and temp files: left by a process killed
        between a shard and its index entry, or by a damaged index. Called under the lock."""
        listed = {s["file"] for s in index["shards"]}
        for p in self.folder.iterdir():
            if (p.name.startswith("shard-") and p.name not in listed) or \
                    p.name.startswith((".shard-", ".index.json.")):
                with contextlib.suppress(OSError):
                    p.unlink()

    def _drop_shards(self, index: dict, names: Iterable[str]) -> None:
        """Remove shards from the index, then their files. Called under the lock."""
        names = set(names)
        index["shards"] = [s for s in index["shards"] if s["file"] not in names]
        atomic_write_text(self.folder / "index.json", json.dumps(index, indent=1))
        for name in names:
            with contextlib.suppress(OSError):   # still open elsewhere (Windows)
                (self.folder / name).unlink()

    def _write_shard(self, index: dict, tensors: dict[str, torch.Tensor], count: int,
                     metadata: dict[str, str]) -> str:
        """Write one shard (durably) and list it in the index; returns its file name."""
        name = f"shard-{secrets.token_hex(6)}.safetensors"
        with atomic_target(self.folder / name) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
            with open(tmp, "r+b") as f:
                os.fsync(f.fileno())
        index["shards"].append({"file": name, self.count_key: count,
                                "bytes": (self.folder / name).stat().st_size})
        atomic_write_text(self.folder / "index.json", json.dumps(index, indent=1))
        return name
