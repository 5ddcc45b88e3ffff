"""Encoders around the network: text encoders (a frozen Qwen3 from `transformers`, or a
small builtin encoder trained with the model), the disk cache of a frozen encoder's text
features that training reads instead of the encoder, and the frozen DINOv3 teacher for
iREPA.

Every text encoder turns a list of prompts into a `TextCond` padded to the batch's
longest prompt (capped at `text.max_tokens`). The empty prompt is the unconditional
input for all of them: an all-False mask, zero tokens and a zero pooled vector.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import re
import secrets
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from engine.config import TextConfig, atomic_target, atomic_write_text
from engine.model import TextCond

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderLoadError(RuntimeError):
    """Weights of an encoder are missing or not what the config says."""


def _unconditional_rows(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Zero the padding rows (torch.where, so a NaN in a fully padded row cannot leak)
    and pool the last real token (zero for an empty prompt)."""
    tokens = torch.where(mask[..., None], tokens, torch.zeros((), dtype=tokens.dtype,
                                                              device=tokens.device))
    n = mask.sum(1)
    last = (n - 1).clamp_min(0)
    pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), last]
    return tokens, pooled * (n > 0)[:, None].to(pooled.dtype)


# --------------------------------------------------------------------------------------
# Builtin encoder (offline, trained with the model)
# --------------------------------------------------------------------------------------

class BuiltinTextEncoder(nn.Module):
    """Words -> hashed ids -> a small pre-norm transformer. Needs no download and no
    vocabulary file: a word's id is crc32(lower-cased word) modulo the table size, so
    tokenisation is deterministic on every machine. A BOS token that every prompt
    carries gives attention a real key even for the empty prompt; it is not part of
    the output. Pooled vector = mean of the word tokens."""

    VOCAB = 8192
    WORD = re.compile(r"[0-9a-z]+|[^\s0-9a-z]", re.IGNORECASE)
    trainable = True

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dim, self.max_tokens = cfg.builtin_dim, cfg.max_tokens
        self.embed = nn.Embedding(self.VOCAB + 1, self.dim)     # last id = BOS
        self.pos = nn.Parameter(torch.zeros(cfg.max_tokens + 1, self.dim))
        layer = nn.TransformerEncoderLayer(self.dim, max(1, self.dim // 32), 2 * self.dim,
                                           dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.builtin_layers, enable_nested_tensor=False) \
            if cfg.builtin_layers else None
        self.norm = nn.LayerNorm(self.dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def words(self, prompt: str) -> list[str]:
        return self.WORD.findall(prompt.lower())[: self.max_tokens]

    def count_tokens(self, prompts: list[str]) -> list[int]:
        return [len(self.WORD.findall(p.lower())) for p in prompts]

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(ids (B, 1+T), mask (B, 1+T)) with BOS first; T = longest prompt, at least 1."""
        rows = [[zlib.crc32(w.encode("utf-8")) % self.VOCAB for w in self.words(p)]
                for p in prompts]
        T = max(1, max((len(r) for r in rows), default=0))
        ids = torch.zeros(len(prompts), 1 + T, dtype=torch.long)
        mask = torch.zeros(len(prompts), 1 + T, dtype=torch.bool)
        ids[:, 0], mask[:, 0] = self.VOCAB, True
        for i, r in enumerate(rows):
            ids[i, 1:1 + len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, 1:1 + len(r)] = True
        return ids, mask

    def encode(self, prompts: list[str]) -> TextCond:
        ids, mask = self.tokenize(prompts)
        dense = bool(mask[:, 1:].all())   # known here, on the CPU, for free
        # CPU -> GPU without waiting for the GPU's queue: the source is staged at once
        ids = ids.to(self.pos.device, non_blocking=True)
        mask = mask.to(self.pos.device, non_blocking=True)
        x = self.embed(ids) + self.pos[: ids.shape[1]]                          # (B, 1+T, C)
        if self.layers is not None:
            x = self.layers(x, src_key_padding_mask=~mask)
        x = self.norm(x)[:, 1:]                                                 # (B, T, C)
        words = mask[:, 1:]
        tokens = torch.where(words[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        n = words.sum(1, keepdim=True)
        pooled = tokens.sum(1) / n.clamp_min(1).to(x.dtype)                    # (B, C)
        return TextCond(tokens, words, pooled, dense)


# --------------------------------------------------------------------------------------
# Qwen3 (frozen, from the hub or a local folder)
# --------------------------------------------------------------------------------------

def _missing_weights(what: str, name: str, err: Exception, how: str) -> EncoderLoadError:
    return EncoderLoadError(f"{what} '{name}' could not be loaded ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}). {how}")


class Qwen3TextEncoder:
    """A frozen Qwen3 base model; tokens = last hidden states (after Qwen's final norm),
    pooled = the hidden state of the last real token. No chat template, no BOS/EOS."""

    trainable = False

    def __init__(self, cfg: TextConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        name = cfg.name_or_path
        local = Path(name).expanduser()
        how = (f"Put the model folder (config.json, model.safetensors, tokenizer files) at "
               f"'{name}', or download it with `hf download Qwen/Qwen3-0.6B "
               f"--local-dir workspace/models/Qwen3-0.6B` and set text.name_or_path to that "
               f"folder. Hub ids download on first use when the machine is online.")
        looks_local = name.startswith((".", "/", "~")) or local.exists()
        if looks_local and not (local / "config.json").is_file():
            raise EncoderLoadError(f"text encoder folder '{name}' has no config.json. {how}")
        source = str(local) if local.exists() else name
        try:
            config = AutoConfig.from_pretrained(source)
            if config.model_type not in ("qwen3", "qwen2", "qwen3_moe"):
                raise EncoderLoadError(f"text encoder '{name}' is a {config.model_type!r} model; "
                                       f"a Qwen3 model is expected (e.g. Qwen/Qwen3-0.6B)")
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            # safetensors only: a folder with just pytorch_model.bin would be unpickled
            model = AutoModel.from_pretrained(source, dtype=dtype, attn_implementation="sdpa",
                                              use_safetensors=True)
        except (OSError, ValueError) as e:
            raise _missing_weights("text encoder", name, e, how) from e
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(device).eval().requires_grad_(False)
        self.dim = model.config.hidden_size
        self.max_tokens = cfg.max_tokens
        self.folder = encoder_folder(name)   # where its files are: the feature cache's key

    def count_tokens(self, prompts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False).input_ids]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextCond:
        device = next(self.model.parameters()).device
        enc = self.tokenizer(prompts, padding="longest", truncation=True,
                             max_length=self.max_tokens, return_tensors="pt")
        dense = bool(enc.attention_mask.all())   # known on the CPU, for free
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device).bool()
        if ids.shape[1] == 0:  # every prompt empty
            z = torch.zeros(len(prompts), 1, self.dim, device=device, dtype=self.model.dtype)
            none = torch.zeros(len(prompts), 1, dtype=torch.bool, device=device)
            return TextCond(z, none, z[:, 0])
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        tokens, pooled = _unconditional_rows(hidden, mask)
        return TextCond(tokens, mask, pooled, dense)


def load_text_encoder(cfg: TextConfig, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32):
    """The encoder a config names: a trainable `BuiltinTextEncoder` (an nn.Module the
    trainer optimises and saves) or a frozen `Qwen3TextEncoder`."""
    if cfg.encoder == "builtin":
        return BuiltinTextEncoder(cfg).to(device)
    return Qwen3TextEncoder(cfg, device, dtype)


# --------------------------------------------------------------------------------------
# Text-feature cache (what a frozen encoder made of each caption, on disk)
# --------------------------------------------------------------------------------------

FEATURES_FORMAT = 1             # part of the cache key: bump when features or layout change
FINGERPRINT_BYTES = 4 * 2**20   # read from each end of a weight file to fingerprint it
SHARD_BYTES = 2**30             # features gathered before a shard is written
PROGRESS_SECONDS = 5.0
LOCK_NOTICE_SECONDS = 2.0       # waiting longer than this for the folder lock is logged
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "special_tokens_map.json", "added_tokens.json")
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class TextFeatureError(RuntimeError):
    """A caption has no cached features and no encoder is loaded to make them."""


def encoder_folder(name_or_path: str) -> Path | None:
    """The folder holding an encoder's files: a local folder, or the hub cache's snapshot
    of a downloaded hub id (looked up without the network); None when not downloaded."""
    local = Path(name_or_path).expanduser()
    if local.exists():
        return local.resolve()
    from huggingface_hub import try_to_load_from_cache
    try:
        found = try_to_load_from_cache(name_or_path, "config.json")
    except ValueError:   # not a hub id either
        return None
    return Path(found).parent if isinstance(found, str) else None


def text_cache_root(cfg: TextConfig) -> Path:
    """The folder text features are cached in (text.cache_dir, see its doc string)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    base = os.environ.get("PIXELHDM_CACHE_DIR")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "pixelhdm") \
        / "text-features"


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


def caption_hashes(captions: list[str]) -> np.ndarray:
    """(B, 2) int64: the blake2b-128 of each caption's UTF-8 text, the cache's key."""
    raw = b"".join(hashlib.blake2b(c.encode("utf-8"), digest_size=16).digest() for c in captions)
    return np.frombuffer(raw, dtype="<i8").reshape(len(captions), 2)


class _Shard:
    """One opened shard: its caption hashes and token offsets in memory, its features
    memory-mapped (safetensors slices read only the rows asked for)."""

    def __init__(self, handle, hashes: np.ndarray, offsets: np.ndarray):
        self.handle, self.hashes, self.offsets = handle, hashes, offsets
        self.tokens, self.pooled = handle.get_slice("tokens"), handle.get_slice("pooled")


class TextFeatureCache:
    """The text features of one frozen encoder, kept on disk and served like an encoder:
    `encode(captions)` returns the TextCond the encoder's own `encode` returns (padding to
    the batch's longest prompt, zero padding rows, the all-zero empty prompt).

    `folder` = <text_cache_root>/<hash of encoder_identity>, holding
      index.json               the identity and the shards: file, caption count, bytes
      shard-<random>.safetensors, for its N captions:
        hashes  (N, 2) int64   caption_hashes
        offsets (N + 1,) int64 rows of `tokens` per caption: only the real tokens
        tokens  (offsets[N], C) and pooled (N, C), in the identity's dtype
      .lock                    held while the folder is written
    A shard is written once (temp file + os.replace, then the index the same way) and
    never changed; a later build adds shards. Builds hold the lock from their check of
    what is missing to their last shard, so two runs building at once neither clash nor
    encode a caption twice. Only hashes and offsets are read into memory (24 bytes a
    caption). A damaged shard (truncated, unreadable, not what the index says) is
    reported, dropped and its captions encoded again by the next build. The empty prompt
    is never stored."""

    trainable = False

    def __init__(self, root: Path, encoder_dir: Path, max_tokens: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", encoder=None, log=print):
        self.identity = encoder_identity(encoder_dir, max_tokens, dtype)
        key = hashlib.blake2b(json.dumps(self.identity, sort_keys=True).encode(),
                              digest_size=10).hexdigest()
        self.folder = Path(root).expanduser() / key
        config = json.loads((Path(encoder_dir) / "config.json").read_text(encoding="utf-8"))
        self.dim, self.dtype, self.device = int(config["hidden_size"]), dtype, torch.device(device)
        self.encoder, self.log = encoder, log
        self._filelock = FileLock(str(self.folder / ".lock"))
        self._shards: list[_Shard] = []
        self._load()

    def __len__(self) -> int:
        return len(self._hi)

    # ---- reading ------------------------------------------------------------------
    def _read_index(self) -> dict:
        """The index; a missing one is empty, and so is an unreadable or foreign one (the
        next write replaces it and removes the shards it no longer lists)."""
        path = self.folder / "index.json"
        empty = {"identity": self.identity, "shards": []}
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            if index.get("identity") != self.identity:
                raise ValueError("it describes another encoder")
            for s in index["shards"]:
                if not (isinstance(s["file"], str) and s["file"].startswith("shard-")
                        and isinstance(s["captions"], int) and isinstance(s["bytes"], int)):
                    raise ValueError(f"bad shard entry {s!r}")
            return index
        except FileNotFoundError:
            return empty
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.log(f"text features: the index {path} is damaged ({e}); its features will "
                     f"be encoded again")
            return empty

    def _open_shard(self, entry: dict) -> _Shard:
        path = self.folder / entry["file"]
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(f"{size} bytes, the index says {entry['bytes']}")
        handle = safe_open(str(path), framework="pt")
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

    def _load(self) -> dict:
        """Open every shard the index lists and rebuild the lookup table; damaged shards
        are reported and removed from the index. Returns the index."""
        index = self._read_index()
        shards, damaged = [], []
        for entry in index["shards"]:
            try:
                shards.append(self._open_shard(entry))
            except (OSError, ValueError, KeyError, SafetensorError) as e:
                damaged.append(entry["file"])
                self.log(f"text features: {self.folder / entry['file']} is damaged ({e}); "
                         f"its {entry['captions']} captions will be encoded again")
        self._shards = shards
        hashes = np.concatenate([s.hashes for s in shards] or [np.zeros((0, 2), np.int64)])
        where = np.concatenate([np.stack([np.full(len(s.hashes), i), np.arange(len(s.hashes))],
                                         1) for i, s in enumerate(shards)]
                               or [np.zeros((0, 2), np.int64)])
        order = np.lexsort((hashes[:, 1], hashes[:, 0]))
        self._hi, self._lo, self._where = hashes[order, 0], hashes[order, 1], where[order]
        if damaged:
            with self._lock():
                index = self._read_index()
                index["shards"] = [s for s in index["shards"] if s["file"] not in damaged]
                atomic_write_text(self.folder / "index.json", json.dumps(index, indent=1))
                for name in damaged:
                    with contextlib.suppress(OSError):   # still open elsewhere (Windows)
                        (self.folder / name).unlink()
        return index

    def _find(self, captions: list[str]) -> np.ndarray:
        """(B,) each caption's row in the lookup table, -1 when it has no features."""
        found = np.full(len(captions), -1)
        if not len(self._hi):
            return found
        h = caption_hashes(captions)
        left = np.searchsorted(self._hi, h[:, 0], "left")
        right = np.searchsorted(self._hi, h[:, 0], "right")
        first = np.minimum(left, len(self._hi) - 1)
        found = np.where((right > left) & (self._lo[first] == h[:, 1]), left, -1)
        for b in np.flatnonzero(right - left > 1):   # equal first halves: sorted by the second
            i = left[b] + np.searchsorted(self._lo[left[b]:right[b]], h[b, 1])
            found[b] = i if i < right[b] and self._lo[i] == h[b, 1] else -1
        return found

    def missing(self, captions) -> list[str]:
        """The distinct non-empty captions without features, in first-seen order."""
        unique = [c for c in dict.fromkeys(captions) if c]
        return [c for c, i in zip(unique, self._find(unique), strict=True) if i < 0]

    def encode(self, captions: list[str]) -> TextCond:
        """What the encoder's `encode(captions)` returns, read from the cache: built on the
        CPU, then moved to `device`. A caption without features is encoded and added while
        an encoder is attached, and a TextFeatureError otherwise."""
        found = self._find(captions)
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
            found = self._find(captions)
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
        tokens = torch.zeros(len(captions), T, self.dim, dtype=self.dtype)   # (B, T, C)
        pooled = torch.zeros(len(captions), self.dim, dtype=self.dtype)      # (B, C)
        for b, (shard, start, end, r) in enumerate(spans):
            if shard is not None:
                if end > start:
                    tokens[b, : end - start] = shard.tokens[start:end]
                pooled[b] = shard.pooled[r:r + 1][0]
        mask = torch.arange(T) < lengths[:, None]                             # (B, T)
        # CPU -> GPU without waiting for the GPU's queue: the source is staged at once
        return TextCond(tokens, mask, pooled).to(self.device, non_blocking=True)

    # ---- writing ------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self):
        """Hold the folder's file lock (re-entrant in this object); a wait is logged."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._filelock.acquire(timeout=LOCK_NOTICE_SECONDS)
        except Timeout:
            self.log(f"text features: waiting for another process writing {self.folder}")
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

    def _write_shard(self, index: dict, hashes: list[np.ndarray], lengths: list[Tensor],
                     tokens: list[Tensor], pooled: list[Tensor]) -> None:
        name = f"shard-{secrets.token_hex(6)}.safetensors"
        lengths = torch.cat(lengths)
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        with atomic_target(self.folder / name) as tmp:
            save_file({"hashes": torch.from_numpy(np.concatenate(hashes)), "offsets": offsets,
                       "tokens": torch.cat(tokens), "pooled": torch.cat(pooled)}, str(tmp),
                      metadata={"format": str(FEATURES_FORMAT)})
            with open(tmp, "r+b") as f:
                os.fsync(f.fileno())
        index["shards"].append({"file": name, "captions": len(lengths),
                                "bytes": (self.folder / name).stat().st_size})
        atomic_write_text(self.folder / "index.json", json.dumps(index, indent=1))

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
            size = done = 0
            start = last = time.monotonic()
            for rows in batches:
                batch = [todo[i] for i in rows.tolist()]
                cond = self.encoder.encode(batch)
                parts = (caption_hashes(batch), cond.mask.sum(1).cpu(),
                         cond.tokens[cond.mask].cpu(),   # (sum of lengths, C): real tokens
                         cond.pooled.cpu())
                for store, part in zip(pending, parts, strict=True):
                    store.append(part)
                size += parts[2].nbytes + parts[3].nbytes
                done += len(batch)
                if size >= shard_bytes:
                    self._write_shard(index, *pending)
                    pending, size = ([], [], [], []), 0
                now = time.monotonic()
                if now - last >= PROGRESS_SECONDS:
                    rate = done / (now - start)
                    eta = (len(todo) - done) / rate
                    eta_text = f"{eta / 60:.0f} min" if eta >= 90 else f"{eta:.0f} s"
                    self.log(f"text features: {done}/{len(todo)} captions encoded "
                             f"({rate:.1f}/s), ETA {eta_text}")
                    last = now
            if pending[0]:
                self._write_shard(index, *pending)
            self._load()
            self.log(f"text features: {len(todo)} captions encoded in "
                     f"{time.monotonic() - start:.0f} s")
        return len(todo)

    def unload_encoder(self) -> None:
        """Drop the encoder and free its memory (when nothing else holds it); from now
        on a caption without features is a TextFeatureError."""
        self.encoder = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


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


# --------------------------------------------------------------------------------------
# DINOv3 teacher for iREPA
# --------------------------------------------------------------------------------------

class DinoTeacher:
    """Frozen DINOv3 ViT (transformers' DINOv3ViTModel) from a local folder.

    The image is resized so the teacher's patch grid equals the model's (h, w) grid,
    mapped from [-1, 1] to ImageNet normalisation in torch (the transformers image
    processor needs torchvision), and only patch tokens are returned: the CLS token and
    the register tokens are dropped.
    """

    def __init__(self, path: str, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModel

        folder = Path(path).expanduser()
        how = ("DINOv3 weights are licence-gated: accept the licence of e.g. "
               "facebook/dinov3-vitb16-pretrain-lvd1689m on the Hugging Face hub, download the "
               "folder (`hf download facebook/dinov3-vitb16-pretrain-lvd1689m "
               "--local-dir workspace/models/dinov3-vitb16`) and set loss.repa_teacher to it, or "
               "set loss.repa_teacher to '' to train without iREPA.")
        if not (folder / "config.json").is_file():
            raise EncoderLoadError(f"iREPA teacher folder '{path}' not found or has no "
                                   f"config.json. {how}")
        try:
            config = AutoConfig.from_pretrained(str(folder))
            if config.model_type != "dinov3_vit":
                raise EncoderLoadError(f"iREPA teacher '{path}' is a {config.model_type!r} model; "
                                       f"a DINOv3 ViT (model_type dinov3_vit) is expected. {how}")
            model = AutoModel.from_pretrained(str(folder), dtype=dtype, use_safetensors=True)
        except OSError as e:
            raise _missing_weights("iREPA teacher", path, e, how) from e
        self.model = model.to(device).eval().requires_grad_(False)
        self.patch = config.patch_size
        self.dim = config.hidden_size
        self.skip = 1 + getattr(config, "num_register_tokens", 0)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """Patch tokens (B, h*w, C) of clean images (B, 3, H, W) in [-1, 1]."""
        h, w = grid
        x = (images.float() + 1) / 2
        x = F.interpolate(x, size=(h * self.patch, w * self.patch), mode="bilinear",
                          antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        out = self.model(pixel_values=x.to(self.model.dtype)).last_hidden_state  # (B, skip+h*w, C)
        tokens = out[:, self.skip:]
        if tokens.shape[1] != h * w:
            raise RuntimeError(f"DINOv3 returned {tokens.shape[1]} patch tokens for a {h}x{w} "
                               f"grid; expected {h * w}")
        return tokens.float()
