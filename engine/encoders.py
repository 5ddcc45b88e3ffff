"""Encoders around the network: text encoders (a frozen Qwen3 from `transformers`, or a
small builtin encoder trained with the model) and the frozen DINOv3 teacher for iREPA.
The disk cache of a frozen encoder's features is engine/text_features.py.

Every text encoder turns a list of prompts into a `TextCond` padded to the batch's
longest prompt (capped at `text.max_tokens`). The empty prompt is the unconditional
input for all of them: an all-False mask, zero tokens and a zero pooled vector.
"""

from __future__ import annotations

import functools
import re
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import Tensor, nn

from engine.config import TextConfig
from engine.distributed import to_device
from engine.model import TextCond

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# what `transformers` raises for a folder it cannot use: missing or unreadable files
# (OSError), a config it does not know (ValueError), damaged weights (SafetensorError)
LOAD_ERRORS = (OSError, ValueError, SafetensorError)
# a tokenizer is either one tokenizer.json, a sentencepiece model, or a BPE vocabulary
TOKENIZER_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
QWEN_TYPES = ("qwen3", "qwen2", "qwen3_moe")   # config.json model_type of a usable encoder


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

@functools.lru_cache(maxsize=1 << 16)
def _word_ids(prompt: str, max_tokens: int, vocab: int) -> tuple[int, ...]:
    """The builtin encoder's ids of a prompt's words (a run's captions recur every epoch)."""
    words = BuiltinTextEncoder.split(prompt)[:max_tokens]
    return tuple(zlib.crc32(w.encode("utf-8")) % vocab for w in words)


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
        self.word_norm = nn.LayerNorm(self.dim) if cfg.builtin_word_skip else None
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    @classmethod
    def split(cls, prompt: str) -> list[str]:
        """A prompt's lower-cased words: runs of ASCII letters and digits, any other
        character alone."""
        return cls.WORD.findall(prompt.lower())

    def words(self, prompt: str) -> list[str]:
        return self.split(prompt)[: self.max_tokens]

    def count_tokens(self, prompts: list[str]) -> list[int]:
        return [len(self.split(p)) for p in prompts]

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(ids (B, 1+T), mask (B, 1+T)) with BOS first; T = longest prompt, at least 1.
        Built from Python lists in one tensor each (a training step tokenises its batch)."""
        rows = [_word_ids(p, self.max_tokens, self.VOCAB) for p in prompts]
        T = max(1, max((len(r) for r in rows), default=0))
        ids = torch.tensor([(self.VOCAB, *r) + (0,) * (T - len(r)) for r in rows],
                           dtype=torch.long).view(len(prompts), 1 + T)
        mask = torch.tensor([(True,) * (1 + len(r)) + (False,) * (T - len(r)) for r in rows],
                            dtype=torch.bool).view(len(prompts), 1 + T)
        return ids, mask

    def encode(self, prompts: list[str]) -> TextCond:
        ids, mask = self.tokenize(prompts)
        dense = bool(mask[:, 1:].all())   # known here, on the CPU, for free
        ids, mask = to_device(ids, self.pos.device), to_device(mask, self.pos.device)
        emb = self.embed(ids)                                                   # (B, 1+T, C)
        x = emb + self.pos[: ids.shape[1]]
        if self.layers is not None:
            x = self.layers(x, src_key_padding_mask=~mask)
        x = self.norm(x)[:, 1:]                                                 # (B, T, C)
        if self.word_norm is not None:
            x = x + self.word_norm(emb[:, 1:])
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


def _not_a_model_folder(what: str, name: str, folder: Path, how: str) -> EncoderLoadError | None:
    """Why `folder` cannot hold a model (missing, a file, no config.json); None if it may."""
    if folder.is_file():
        return EncoderLoadError(f"{what} '{name}' is a file; a model folder (config.json, "
                                f"model.safetensors, ...) is expected. {how}")
    if not folder.is_dir():
        return EncoderLoadError(f"{what} folder '{name}' does not exist. {how}")
    if not (folder / "config.json").is_file():
        return EncoderLoadError(f"{what} folder '{name}' has no config.json. {how}")
    return None


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


def qwen3_width(name_or_path: str) -> int | None:
    """The hidden size in a model's config.json (a folder or a hub id), read without its
    weights; None when the config cannot be read (loading the model then says why)."""
    from transformers import AutoConfig

    try:
        local = Path(name_or_path).expanduser()
        config = AutoConfig.from_pretrained(str(local) if local.exists() else name_or_path)
    except LOAD_ERRORS:
        return None
    width = getattr(config, "hidden_size", None)
    return width if isinstance(width, int) and not isinstance(width, bool) else None


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
        if looks_local and (problem := _not_a_model_folder("text encoder", name, local, how)):
            raise problem
        source = str(local) if local.exists() else name
        try:
            config = AutoConfig.from_pretrained(source)
            if config.model_type not in QWEN_TYPES:
                raise EncoderLoadError(f"text encoder '{name}' is a {config.model_type!r} model; "
                                       f"a Qwen3 model is expected: set text.name_or_path to a "
                                       f"Qwen3 folder or hub id (e.g. Qwen/Qwen3-0.6B)")
            # without its files transformers builds an empty tokenizer that silently turns
            # every prompt into the unconditional input
            if looks_local and not any(all((local / f).is_file() for f in files)
                                       for files in TOKENIZER_SETS):
                raise EncoderLoadError(f"text encoder folder '{name}' has no tokenizer files "
                                       f"(tokenizer.json, or vocab.json and merges.txt). {how}")
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            # safetensors only: a folder with just pytorch_model.bin would be unpickled
            model = AutoModel.from_pretrained(source, dtype=dtype, attn_implementation="sdpa",
                                              use_safetensors=True)
        except LOAD_ERRORS as e:
            raise _missing_weights("text encoder", name, e, how) from e
        if not self.tokenizer("a cat", add_special_tokens=False).input_ids:
            raise EncoderLoadError(f"the tokenizer of text encoder '{name}' turns text into no "
                                   f"tokens: its tokenizer files are missing or broken. {how}")
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(device).eval().requires_grad_(False)
        self.dim = model.config.hidden_size
        self.max_tokens = cfg.max_tokens
        self.folder = encoder_folder(name)   # where its files are: the feature cache's key

    def count_tokens(self, prompts: list[str]) -> list[int]:
        # verbose=False: counting a long prompt is not running it through the model
        return [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False,
                                                   verbose=False).input_ids]

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
        # no KV cache: nothing is generated, and Qwen3's config asks for one, which would
        # hold every layer's keys and values until the forward returns (112 KiB a token in
        # bf16 for Qwen3-0.6B: 3.5 GiB for a feature-cache batch of 64 x 511 tokens)
        hidden = self.model(input_ids=ids, attention_mask=mask.long(),
                            use_cache=False).last_hidden_state
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
        if problem := _not_a_model_folder("iREPA teacher", path, folder, how):
            raise problem
        try:
            config = AutoConfig.from_pretrained(str(folder))
            if config.model_type != "dinov3_vit":
                raise EncoderLoadError(f"iREPA teacher '{path}' is a {config.model_type!r} model; "
                                       f"a DINOv3 ViT (model_type dinov3_vit) is expected. {how}")
            model = AutoModel.from_pretrained(str(folder), dtype=dtype, use_safetensors=True)
        except LOAD_ERRORS as e:
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
