"""Shared test setup: offline, one torch thread, the text-feature cache in a temporary
folder, and tiny random Qwen3 / DINOv3 models built with `transformers`, saved to disk
and loaded back through the user code path."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# never the user's ~/.cache (subprocesses started by tests inherit it too)
os.environ["PIXELHDM_CACHE_DIR"] = tempfile.mkdtemp(prefix="pixelhdm-test-cache-")
atexit.register(shutil.rmtree, os.environ["PIXELHDM_CACHE_DIR"], ignore_errors=True)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

CAPTIONS = [
    "a red circle on a white background", "a blue square at the top left",
    "a large green triangle", "a small yellow star on a purple background",
    "a photo of a cat", "an apple on a wooden table", "a lighthouse at sunset",
]


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """A folder holding a random 2-layer Qwen3 and a small byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    folder = tmp_path_factory.mktemp("qwen3")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CAPTIONS * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<unk>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # like Qwen's tokenizer: no BOS/EOS added, and no pad token (the encoder sets one)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                     eos_token="<|endoftext|>", model_max_length=128,
                                     padding_side="left")
    hf_tok.save_pretrained(folder)
    cfg = Qwen3Config(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=256,
                      eos_token_id=hf_tok.eos_token_id)
    torch.manual_seed(0)
    Qwen3Model(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dinov3(tmp_path_factory) -> Path:
    """A folder holding a random 2-layer DINOv3 ViT with patch 8 and 4 register tokens."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    folder = tmp_path_factory.mktemp("dinov3")
    cfg = DINOv3ViTConfig(patch_size=8, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, image_size=64,
                          num_register_tokens=4)
    torch.manual_seed(0)
    DINOv3ViTModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_config():
    """tests/tiny.py's tiny_cfg: the quick tests' network on the tiny-cpu preset, plus any
    override lines given."""
    from tiny import tiny_cfg
    return tiny_cfg



@pytest.fixture
def traced_compile(monkeypatch):
    """torch.compile traced by dynamo but run with its eager backend (no code generation,
    so seconds instead of minutes), under torch's default limit of 8 compiled variants per
    function, with dynamo's caches cleared before and after. For tests of what dynamo
    decides: graph breaks, guards, recompiles."""
    import torch._dynamo
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: real_compile(self, backend="eager", **kw))
    with torch._dynamo.config.patch(recompile_limit=8):
        torch._dynamo.reset()
        yield
    torch._dynamo.reset()
