"""Text encoders and the DINOv3 teacher, loaded through the same code path users take."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import learner_cfg

from engine.config import TextConfig
from engine.encoders import (
    BuiltinTextEncoder,
    DinoTeacher,
    EncoderLoadError,
    Qwen3TextEncoder,
    load_text_encoder,
)
from engine.model import PixelHDM, TextCond


def qwen_cfg(folder, **kw):
    return TextConfig(encoder="qwen3", name_or_path=str(folder), **kw)


def test_qwen3_loads_from_a_folder_frozen_and_right_padded(tiny_qwen3):
    enc = load_text_encoder(qwen_cfg(tiny_qwen3))
    assert isinstance(enc, Qwen3TextEncoder) and not enc.trainable
    assert enc.tokenizer.padding_side == "right" and enc.tokenizer.pad_token is not None
    assert all(not p.requires_grad for p in enc.model.parameters())
    cond = enc.encode(["a red circle on a white background", "a cat", ""])
    B, T, C = cond.tokens.shape
    assert (B, C) == (3, enc.dim) and cond.pooled.shape == (3, C)
    lengths = cond.mask.sum(1).tolist()
    assert lengths[0] == T and 0 < lengths[1] < T and lengths[2] == 0
    # right padding: real tokens first
    assert cond.mask[1, : lengths[1]].all() and not cond.mask[1, lengths[1]:].any()
    # padding rows are zero; the empty prompt is all zeros
    assert cond.tokens[1, lengths[1]:].abs().sum() == 0
    assert cond.tokens[2].abs().sum() == 0 and cond.pooled[2].abs().sum() == 0


def test_qwen3_padding_does_not_change_a_prompt(tiny_qwen3):
    enc = load_text_encoder(qwen_cfg(tiny_qwen3))
    alone = enc.encode(["a cat"])
    batch = enc.encode(["a cat", "a small yellow star on a purple background"])
    n = int(alone.mask.sum())
    torch.testing.assert_close(batch.tokens[0, :n], alone.tokens[0, :n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch.pooled[0], alone.pooled[0], rtol=1e-4, atol=1e-5)
    # pooled = the last real token
    torch.testing.assert_close(alone.pooled[0], alone.tokens[0, n - 1])


def test_qwen3_truncates_and_counts(tiny_qwen3):
    enc = load_text_encoder(qwen_cfg(tiny_qwen3, max_tokens=4))
    long = "a small yellow star on a purple background " * 3
    assert enc.encode([long]).tokens.shape[1] == 4
    assert enc.count_tokens([long])[0] > 4
    assert enc.encode(["", ""]).mask.shape == (2, 1)


def test_qwen3_encodes_without_a_kv_cache(tiny_qwen3, monkeypatch):
    """Qwen3's config asks for a KV cache, which would hold every layer's keys and values
    (gigabytes for a feature-cache batch) for features that need none."""
    import transformers.cache_utils as cache_utils

    def refuse(*args, **kwargs):
        raise AssertionError("a KV cache was made")

    enc = load_text_encoder(qwen_cfg(tiny_qwen3))
    assert enc.model.config.use_cache   # what the config asks
    monkeypatch.setattr(cache_utils.DynamicCache, "__init__", refuse)
    cond = enc.encode(["a red circle", "a much longer caption of a blue square"])
    assert cond.tokens.shape[0] == 2


def test_qwen3_in_bf16(tiny_qwen3):
    enc = load_text_encoder(qwen_cfg(tiny_qwen3), dtype=torch.bfloat16)
    assert enc.encode(["a cat"]).tokens.dtype == torch.bfloat16


def test_missing_qwen3_weights_say_where_to_put_them(tmp_path):
    with pytest.raises(EncoderLoadError, match="hf download Qwen/Qwen3-0.6B"):
        load_text_encoder(qwen_cfg(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderLoadError, match="has no config.json"):
        load_text_encoder(qwen_cfg(tmp_path / "empty"))
    # a hub id offline (HF_HUB_OFFLINE=1 in tests): a clear message, not a traceback
    with pytest.raises(EncoderLoadError, match="could not be loaded"):
        load_text_encoder(qwen_cfg("example-org/definitely-not-cached-model"))


def test_a_dinov3_folder_is_not_a_text_encoder(tiny_dinov3):
    with pytest.raises(EncoderLoadError, match="Qwen3 model is expected"):
        load_text_encoder(qwen_cfg(tiny_dinov3))


def test_qwen3_conditions_the_model(tiny_qwen3):
    enc = load_text_encoder(qwen_cfg(tiny_qwen3))
    torch.manual_seed(0)
    net = PixelHDM(learner_cfg(), enc.dim).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 16, 32), torch.rand(2), enc.encode(["a cat", ""]))
    assert out.shape == (2, 3, 16, 32) and torch.isfinite(out).all()


def test_builtin_encoder_is_deterministic_trainable_and_unconditional_on_empty():
    cfg = TextConfig(encoder="builtin", builtin_dim=64, builtin_layers=2, max_tokens=16)
    torch.manual_seed(0)
    enc = load_text_encoder(cfg)
    assert isinstance(enc, BuiltinTextEncoder) and enc.trainable
    ids1, _ = enc.tokenize(["A Red circle!"])
    ids2, _ = enc.tokenize(["a red CIRCLE !"])
    assert torch.equal(ids1, ids2)
    cond = enc.encode(["a red circle", "", "a large green triangle at the top left"])
    assert cond.tokens.shape == (3, 8, 64)
    assert cond.mask.sum(1).tolist() == [3, 0, 8]
    assert cond.tokens[1].abs().sum() == 0 and cond.pooled[1].abs().sum() == 0
    assert torch.isfinite(cond.tokens).all()
    cond.pooled[0].sum().backward()
    assert enc.embed.weight.grad is not None and enc.embed.weight.grad.abs().sum() > 0
    # truncation and counting
    assert enc.encode(["w " * 40]).tokens.shape[1] == 16
    assert enc.count_tokens(["w " * 40]) == [40]
    # the ids: BOS, then crc32 of each lower-cased word (runs of ASCII letters and digits;
    # any other character alone) modulo the table, padded with 0
    import zlib
    ids, mask = enc.tokenize(["Über 東京, ok", "", "w " * 40])
    words = [zlib.crc32(w.encode()) % enc.VOCAB for w in ("ü", "ber", "東", "京", ",", "ok")]
    assert ids.shape == mask.shape == (3, 17) and ids.dtype == torch.long
    assert ids[:, 0].tolist() == [enc.VOCAB] * 3 and mask[:, 0].all()
    assert ids[0, 1:7].tolist() == words and not ids[0, 7:].any() and not ids[1, 1:].any()
    assert mask.sum(1).tolist() == [7, 1, 17]
    assert enc.tokenize([])[0].shape == (0, 2)


def test_builtin_padding_does_not_change_a_prompt():
    cfg = TextConfig(encoder="builtin", builtin_dim=64, builtin_layers=2, max_tokens=16)
    enc = load_text_encoder(cfg).eval()
    with torch.no_grad():
        a = enc.encode(["a red circle"])
        b = enc.encode(["a red circle", "a large green triangle at the top left"])
    torch.testing.assert_close(b.tokens[0, :3], a.tokens[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.pooled[0], a.pooled[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("skip", [False, True])
def test_builtin_word_skip_keeps_words_apart_whatever_the_context_does(skip):
    """Trained jointly, the context layers can come to swamp a word's own embedding, and the
    final norm then gives 'circle' and 'square' one output (seen on the demo: cosine 1.00,
    shapes at chance). With text.builtin_word_skip each word's normalised embedding is added
    after the norm, so two words stay apart however large the context part grows."""
    cfg = TextConfig(encoder="builtin", builtin_dim=64, builtin_layers=2, max_tokens=16,
                     builtin_word_skip=skip)
    torch.manual_seed(0)
    enc = load_text_encoder(cfg).eval()
    with torch.no_grad():
        enc.pos.mul_(1e4)                       # a context part that dwarfs the word itself
        cond = enc.encode(["a red circle", "a red square"])
    a, b = cond.tokens[0, 2], cond.tokens[1, 2]
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    assert (cos < 0.9) if skip else (cos > 0.999)
    assert (enc.word_norm is not None) == skip
    assert ("word_norm.weight" in enc.state_dict()) == skip


def test_textcond_cat_pads_to_the_longest():
    a = TextCond(torch.ones(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 4))
    b = TextCond(torch.ones(2, 5, 4), torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 4))
    c = TextCond.cat([a, b])
    assert c.tokens.shape == (3, 5, 4) and c.mask.sum(1).tolist() == [2, 5, 5]
    assert c.tokens[0, 2:].abs().sum() == 0
    assert len(c.select([0, 0, 1])) == 3


@pytest.mark.parametrize("grid", [(4, 4), (2, 6), (5, 3)])
def test_dinov3_teacher_drops_cls_and_registers_and_follows_the_grid(tiny_dinov3, grid):
    teacher = DinoTeacher(str(tiny_dinov3))
    assert teacher.skip == 1 + 4 and teacher.patch == 8 and teacher.dim == 64
    images = torch.rand(2, 3, 16 * grid[0], 16 * grid[1]) * 2 - 1
    tokens = teacher(images, grid)
    assert tokens.shape == (2, grid[0] * grid[1], 64)
    # the same as running the transformers model by hand on the normalised input
    x = torch.nn.functional.interpolate((images + 1) / 2, size=(8 * grid[0], 8 * grid[1]),
                                        mode="bilinear", antialias=True)
    x = (x - teacher.mean) / teacher.std
    with torch.no_grad():
        ref = teacher.model(pixel_values=x).last_hidden_state[:, 5:]
    torch.testing.assert_close(tokens, ref)


def test_dinov3_missing_or_wrong_folder(tmp_path, tiny_qwen3):
    with pytest.raises(EncoderLoadError, match="licence-gated"):
        DinoTeacher(str(tmp_path / "nope"))
    with pytest.raises(EncoderLoadError, match="DINOv3 ViT"):
        DinoTeacher(str(tiny_qwen3))


def test_text_config_dataclass_is_the_only_input():
    cfg = dataclasses.replace(TextConfig(), encoder="builtin", builtin_dim=32, builtin_layers=0)
    enc = load_text_encoder(cfg)
    assert enc.encode(["x"]).tokens.shape == (1, 1, 32)
