"""Presets load, round-trip through YAML, and every bad value gets a precise message (the
wrong type and an out-of-range value of every field, generated from the dataclasses:
tests/test_bad_input_config.py)."""

from __future__ import annotations

import pytest
import yaml

from engine.config import (
    MODEL_SIZES,
    ConfigError,
    config_from_dict,
    dump_yaml,
    field_docs,
    list_presets,
    load_preset,
    save_config,
)

PRESETS = ["home-12gb", "home-24gb", "home-8gb", "pixelhdm-default", "tiny-cpu"]


def test_all_presets_exist_and_load():
    assert list_presets() == PRESETS
    for name in PRESETS:
        cfg = load_preset(name)
        assert cfg.description
        assert cfg.model.hidden_dim % cfg.model.num_heads == 0


@pytest.mark.parametrize("name", PRESETS)
def test_resolved_config_round_trips(name, tmp_path):
    cfg = load_preset(name)
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_preset(path) == cfg
    assert config_from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_saving_the_same_config_keeps_the_file_and_its_time(tmp_path):
    """A resume that changes nothing leaves config.yaml as it was: its time is the run's
    "Created" in the studio."""
    import os
    path = tmp_path / "config.yaml"
    cfg = load_preset("tiny-cpu")
    save_config(cfg, path)
    os.utime(path, (1_000_000, 1_000_000))
    save_config(load_preset(path), path)
    assert path.stat().st_mtime == 1_000_000
    save_config(load_preset("tiny-cpu", ["train.max_steps=7"]), path)
    assert path.stat().st_mtime > 1_000_000 and load_preset(path).train.max_steps == 7


def test_preset_facts():
    tiny = load_preset("tiny-cpu")
    assert tiny.text.encoder == "builtin" and tiny.train.precision == "fp32"
    assert 32 <= tiny.data.min_side and tiny.data.max_side <= 64
    assert tiny.model.patch_size in (4, 8)
    for name in ("home-8gb", "home-12gb", "home-24gb"):
        cfg = load_preset(name)
        assert cfg.text.name_or_path == "Qwen/Qwen3-0.6B"
        assert cfg.train.precision == "bf16" and cfg.train.grad_checkpointing
    d = load_preset("pixelhdm-default").model
    assert (d.hidden_dim, d.pixel_dim, d.patch_size, d.patch_layers, d.pixel_layers,
            d.num_heads, d.num_kv_heads, d.mlp_ratio, d.bottleneck) == (1024, 16, 16, 16, 4, 16, 4,
                                                                       3.0, 64)


def test_size_row_then_explicit_keys():
    cfg = load_preset("tiny-cpu", ["model.size=small"])
    assert cfg.model.hidden_dim == MODEL_SIZES["small"]["hidden_dim"]
    cfg = load_preset("tiny-cpu", ["model.hidden_dim=256", "model.num_heads=8",
                                   "model.mrope_split=[8,12,12]"])
    assert cfg.model.hidden_dim == 256
    assert cfg.model.patch_layers == MODEL_SIZES["tiny"]["patch_layers"]


def test_overrides_are_typed():
    cfg = load_preset("tiny-cpu", ["train.lr=3e-4", "data.flip=true", "sample.prompts=[a, b]",
                                   "description=hello"])
    assert cfg.train.lr == 3e-4 and cfg.data.flip is True
    assert cfg.sample.prompts == ["a", "b"] and cfg.description == "hello"


@pytest.mark.parametrize("override, message", [
    ("model.num_heads=3", "model.num_heads = 3: hidden_dim 128 is not divisible by it"),
    ("model.num_kv_heads=3", "model.num_kv_heads = 3: num_heads 4 is not divisible by it"),
    ("model.num_heads=32", "model.num_heads = 32: head_dim = 128/32 = 4 must be a multiple of 8 "
     "for the GPU attention kernels (allowed with this hidden_dim: 2, 4, 8, 16)"),
    ("model.mrope_split=[8,8,8]", "three even numbers summing to head_dim 32"),
    ("model.mrope_split=[7,13,12]", "model.mrope_split = [7, 13, 12]"),
    ("data.min_side=36", "data.min_side = 36: must be a multiple of model.patch_size 8"),
    ("data.bucket_step=12", "data.bucket_step = 12: must be a multiple of model.patch_size 8"),
    ("model.patch_size=32", "data.bucket_step = 16: must be a multiple of model.patch_size 32"),
    ("data.min_side=128", "larger than data.max_side 64"),
    ("model.gate=sometimes", "allowed: one of 'headwise', 'elementwise', 'none'"),
    ("train.lr=0", "train.lr = 0.0: allowed: > 0.0"),
    ("train.batch_size=0", "train.batch_size = 0: allowed: >= 1"),
    ("data.caption_dropout=1.5", "allowed: >= 0.0 and <= 1.0"),
    ("train.batch_size=2.5", "train.batch_size = 2.5: expected a whole number"),
    ("train.batch_size=true", "expected a whole number"),
    ("data.flip=3", "data.flip = 3: expected true or false"),
    ("train.lr=fast", "expected a number"),
    ("train.betas=[0.9]", "train.betas = [0.9]: allowed: two numbers in [0, 1)"),
    ("train.min_lr=1", "train.min_lr = 1.0: allowed: <= train.lr"),
    ("sample.cfg_interval=[0.8,0.2]", "0 <= lo < hi <= 1"),
    ("sample.width=30", "sample.width = 30: must be 0 or a multiple of model.patch_size 8"),
    ("sample.sampler=ddim", "allowed: one of 'euler', 'heun', 'dpmpp_2m', 'ab2'"),
    ("loss.repa_teacher=x", "loss.repa_layer = 8: allowed: 1 to model.patch_layers = 4"),
    ("text.builtin_dim=48", "text.builtin_dim = 48: allowed: a multiple of 32"),
    ("model.size=huge", "model.size = 'huge'"),
    ("train.nope=1", "unknown key 'train.nope'"),
    ("nope.lr=1", "unknown section 'nope'"),
    ("lr=1", "must name a section and a key"),
])
def test_every_validation_error_names_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_preset("tiny-cpu", [override])
    text = str(err.value)
    assert message in text
    assert "tiny-cpu.yaml" in text


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  size: tiny\n  hiden_dim: 3\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: unknown key 'model\.hiden_dim'"):
        load_preset(path)
    path.write_text("model: [1, 2]\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_preset(path)
    path.write_text("model: {size: tiny\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_preset(path)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*tiny-cpu"):
        load_preset("nope")
    with pytest.raises(ConfigError, match="no such config file"):
        load_preset("/nonexistent/x.yaml")


def test_every_field_is_documented():
    docs = field_docs()
    assert "train.lr" in docs and "model.mrope_split" in docs
    assert all(text.strip() for text in docs.values())
