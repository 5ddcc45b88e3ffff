"""The disk cache of a frozen text encoder's features: what Qwen3 made of each caption,
computed once before training (with progress in the log), shared by every run and
resume that uses the same encoder, and read instead of the encoder, which is unloaded
while the network trains. Lookups return exactly the `TextCond` the encoder's own
`encode` would (engine/encoders.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from engine.config import TextConfig
from engine.distributed import release_memory
from engine.encoders import EncoderLoadError, Qwen3TextEncoder, encoder_folder, load_text_encoder
from engine.model import TextCond
from engine.shard_store import Progress, ShardStore, cache_base, hash_keys, identity_key

# --------------------------------------------------------------------------------------
# Text-feature cache (what a frozen encoder made of each caption, on disk)
# --------------------------------------------------------------------------------------

FEATURES_FORMAT = 1             # part of the cache key: bump when features or layout change
FINGERPRINT_BYTES = 4 * 2**20   # read from each end of a weight file to fingerprint it
SHARD_BYTES = 2**30             # features gathered before a shard is written
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "special_tokens_map.json", "added_tokens.json")
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class TextFeatureError(RuntimeError):
    """A caption has no cached features and no encoder is loaded to make them."""


def text_cache_root(cfg: TextConfig) -> Path:
    """The folder text features are cached in (text.cache_dir, see its doc string)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return cache_base() / "text-features"


def _digest(path: Path, ends: int | None = None) -> str:
    """blake2b of a file, or of its first and last `ends` bytes: with the file's size, a
    cheap fingerprint of a weight file that any retraining or conversion changes."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if ends is None or os.fstat(f.fileno()).st_size <= 2 * ends:
            h.update(f.read())
        else:
            h.update(f.read(ends))
            f.seek(-ends, os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()


def encoder_identity(folder: Path, max_tokens: int, dtype: torch.dtype) -> dict:
    """Everything a frozen Qwen3's features depend on: its config, its tokenizer files, its
    weight files (name, size, fingerprint), text.max_tokens and the dtype it runs and
    stores in. The cache keys features by a hash of this, so a changed encoder never meets
    stale features."""
    folder = Path(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not weights:
        raise EncoderLoadError(f"text encoder folder '{folder}' has no config.json or no "
                               f"*.safetensors weights")
    return {"format": FEATURES_FORMAT, "config": _digest(folder / "config.json"),
            "tokenizer": {n: _digest(folder / n) for n in TOKENIZER_FILES
                          if (folder / n).is_file()},
            "weights": {p.name: [p.stat().st_size, _digest(p, FINGERPRINT_BYTES)]
                        for p in weights},
            "max_tokens": max_tokens, "dtype": str(dtype).removeprefix("torch.")}


class _Shard:
    """One opened shard: its caption hashes and token offsets in memory, its features
    memory-mapped (safetensors slices read only the rows asked for)."""

    def __init__(self, handle, hashes: np.ndarray, offsets: np.ndarray):
        self.handle, self.hashes, self.offsets = handle, hashes, offsets
        self.tokens, self.pooled = handle.get_slice("tokens"), handle.get_slice("pooled")


class TextFeatureCache(ShardStore):
    """The text features of one frozen encoder, kept on disk and served like an encoder:
    `encode(captions)` returns the TextCond the encoder's own `encode` returns (padding to
    the batch's longest prompt, zero padding rows, the all-zero empty prompt).

    `folder` = <text_cache_root>/<hash of encoder_identity>, a ShardStore
    (engine/shard_store.py) whose shards hold, for their N captions:
        hashes  (N, 2) int64   hash_keys of the captions
        offsets (N + 1,) int64 rows of `tokens` per caption: only the real tokens
        tokens  (offsets[N], C) and pooled (N, C), in the identity's dtype
    Builds hold the lock from their check of what is missing to their last shard, so two
    runs building at once neither clash nor encode a caption twice. Only hashes and
    offsets are read into memory (24 bytes a caption). The empty prompt is never stored."""

    trainable = False
    what, count_key, noun, remade = "text features", "captions", "captions", "encoded"

    def __init__(self, root: Path, encoder_dir: Path, max_tokens: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", encoder=None, log=print):
        identity = encoder_identity(encoder_dir, max_tokens, dtype)
        super().__init__(Path(root).expanduser() / identity_key(identity), identity, log)
        config = json.loads((Path(encoder_dir) / "config.json").read_text(encoding="utf-8"))
        self.dim, self.dtype, self.device = int(config["hidden_size"]), dtype, torch.device(device)
        self.encoder = encoder
        self._load()

    # ---- reading ------------------------------------------------------------------
    def _open_shard(self, entry: dict) -> _Shard:
        handle = safe_open(str(self._check_size(entry)), framework="pt")
        n = entry["captions"]
        shard = _Shard(handle, handle.get_tensor("hashes").numpy(),
                       handle.get_tensor("offsets").numpy())
        dtype = SAFETENSORS_DTYPES[self.dtype]
        if (shard.hashes.shape != (n, 2) or shard.offsets.shape != (n + 1,)
                or shard.offsets[0] != 0 or (np.diff(shard.offsets) < 0).any()
                or shard.tokens.get_shape() != [int(shard.offsets[-1]), self.dim]
                or shard.pooled.get_shape() != [n, self.dim]
                or shard.tokens.get_dtype() != dtype or shard.pooled.get_dtype() != dtype):
            raise ValueError("its tensors do not match the index")
        return shard

    def missing(self, captions) -> list[str]:
        """The distinct non-empty captions without features, in first-seen order."""
        unique = [c for c in dict.fromkeys(captions) if c]
        return [c for c, i in zip(unique, self._find(hash_keys(unique)), strict=True) if i < 0]

    def encode(self, captions: list[str]) -> TextCond:
        """What the encoder's `encode(captions)` returns, read from the cache: built on the
        CPU, then moved to `device`. A caption without features is encoded and added while
        an encoder is attached, and a TextFeatureError otherwise."""
        found = self._find(hash_keys(captions))
        absent = [c for c, i in zip(captions, found, strict=True) if i < 0 and c]
        if absent:
            if self.encoder is None:
                raise TextFeatureError(
                    f"caption {absent[0][:200]!r} has no features in the text-feature cache "
                    f"{self.folder} ({len(set(absent))} of this batch's captions are missing) "
                    f"and the text encoder is unloaded. Training precomputes every caption of "
                    f"the dataset and the sample prompts at its start: restart or resume the "
                    f"run after changing captions or prompts")
            self.add(absent)
            found = self._find(hash_keys(captions))
        spans = []
        for i in found.tolist():
            if i < 0:        # the empty prompt
                spans.append((None, 0, 0, 0))
                continue
            s, r = self._where[i].tolist()
            shard = self._shards[s]
            spans.append((shard, int(shard.offsets[r]), int(shard.offsets[r + 1]), r))
        lengths = torch.tensor([end - start for _, start, end, _ in spans])
        T = max(1, int(lengths.max()))
        # for a GPU, built in pinned memory: a copy from pageable memory may first drain
        # the GPU's queue to stage it (CUDA's API synchronization notes), in every micro-batch
        pin = self.device.type == "cuda"
        tokens = torch.zeros(len(captions), T, self.dim, dtype=self.dtype,
                             pin_memory=pin)                                  # (B, T, C)
        pooled = torch.zeros(len(captions), self.dim, dtype=self.dtype, pin_memory=pin)
        mask = torch.zeros(len(captions), T, dtype=torch.bool, pin_memory=pin)  # (B, T)
        torch.lt(torch.arange(T), lengths[:, None], out=mask)
        for b, (shard, start, end, r) in enumerate(spans):
            if shard is not None:
                if end > start:
                    tokens[b, : end - start] = shard.tokens[start:end]
                pooled[b] = shard.pooled[r:r + 1][0]
        return TextCond(tokens, mask, pooled).to(self.device, non_blocking=True)

    # ---- writing ------------------------------------------------------------------
    def _write_features(self, index: dict, hashes: list[np.ndarray], lengths: list[Tensor],
                        tokens: list[Tensor], pooled: list[Tensor]) -> None:
        lengths = torch.cat(lengths)
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        self._write_shard(index, {"hashes": torch.from_numpy(np.concatenate(hashes)),
                                  "offsets": offsets, "tokens": torch.cat(tokens),
                                  "pooled": torch.cat(pooled)},
                          len(lengths), {"format": str(FEATURES_FORMAT)})

    def add(self, captions, batch_size: int = 64, shard_bytes: int = SHARD_BYTES) -> int:
        """Encode the captions without features, `batch_size` at a time, and store them
        (a shard every `shard_bytes`, so an interrupted build keeps what it wrote). A
        progress line goes to `log` every few seconds. Returns how many were encoded."""
        if self.encoder is None:
            raise TextFeatureError(f"no text encoder is loaded to add features to {self.folder}")
        with self._lock():
            index = self._load()   # what other processes added meanwhile
            todo = self.missing(captions)
            if not todo:
                return 0
            self._drop_strays(index)
            # batches of one token length: no padding, so a caption's features do not
            # depend on the captions it was encoded with
            lengths = np.minimum(np.concatenate([self.encoder.count_tokens(todo[i:i + 4096])
                                                 for i in range(0, len(todo), 4096)]),
                                 self.encoder.max_tokens)
            order = np.argsort(lengths, kind="stable")
            runs = np.split(order, np.flatnonzero(np.diff(lengths[order])) + 1)
            batches = [run[i:i + batch_size] for run in runs
                       for i in range(0, len(run), batch_size)]
            self.log(f"text features: encoding {len(todo)} captions into {self.folder} "
                     f"({len(self)} already there)")
            pending: tuple[list, list, list, list] = ([], [], [], [])
            size = 0
            progress = Progress("text features", "captions encoded", len(todo), self.log)
            for rows in batches:
                batch = [todo[i] for i in rows.tolist()]
                cond = self.encoder.encode(batch)
                parts = (hash_keys(batch), cond.mask.sum(1).cpu(),
                         cond.tokens[cond.mask].cpu(),   # (sum of lengths, C): real tokens
                         cond.pooled.cpu())
                for store, part in zip(pending, parts, strict=True):
                    store.append(part)
                size += parts[2].nbytes + parts[3].nbytes
                if size >= shard_bytes:
                    self._write_features(index, *pending)
                    pending, size = ([], [], [], []), 0
                progress.advance(len(batch))
            if pending[0]:
                self._write_features(index, *pending)
            self._load()
            self.log(f"text features: {len(todo)} captions encoded in {progress.seconds:.0f} s")
        return len(todo)

    def unload_encoder(self) -> None:
        """Drop the encoder and free its memory (when nothing else holds it); from now
        on a caption without features is a TextFeatureError."""
        self.encoder = None
        release_memory(self.device)


def build_text_features(encoder: Qwen3TextEncoder, captions, cfg: TextConfig, log=print,
                        batch_size: int = 64) -> TextFeatureCache:
    """The feature cache of `encoder` (under text_cache_root(cfg)) with features for every
    caption of `captions`: those it lacks are encoded now. The encoder stays attached (a
    caption met later is encoded and added) until `unload_encoder()`."""
    if encoder.folder is None:
        raise EncoderLoadError("the text encoder's files were not found in the hub cache; "
                               "set text.name_or_path to a local folder")
    device = next(encoder.model.parameters()).device
    cache = TextFeatureCache(text_cache_root(cfg), encoder.folder, encoder.max_tokens,
                             encoder.model.dtype, device, encoder, log)
    cache.add(captions, batch_size)
    return cache


def cached_text_encoder(cfg: TextConfig, captions, device: torch.device | str,
                        dtype: torch.dtype, log=print) -> TextFeatureCache:
    """A frozen Qwen3 as training uses it: the features of every caption in `captions`
    made once (the encoder is loaded only when some are missing, and unloaded after) and
    then read from the disk cache."""
    n = len(set(captions))
    folder = encoder_folder(cfg.name_or_path)
    if folder is not None:
        try:
            cache = TextFeatureCache(text_cache_root(cfg), folder, cfg.max_tokens, dtype,
                                     device, log=log)
        except EncoderLoadError:   # not a usable folder: loading says what is wrong
            cache = None
        if cache is not None and not cache.missing(captions):
            log(f"text features: all {n} captions found in the feature cache at "
                f"{cache.folder}; the text encoder is not loaded")
            return cache
    cache = build_text_features(load_text_encoder(cfg, device, dtype), captions, cfg, log)
    cache.unload_encoder()
    log(f"text encoder unloaded; {n} captions served from the feature cache at {cache.folder}")
    return cache
