"""Bad input, configuration side: every answer is one line that names the thing at fault
(key and value, file, folder) and says what to do; no traceback, nothing written.

* every field of every config section with a value of the wrong type and one outside its
  range, generated from the dataclass fields and their metadata (a new field is covered
  the day it is added), in a preset file and through --set; unknown keys;
* sizes the patch cannot divide;
* checkpoints of another size, damaged (cut short, header bytes changed, NaN bytes) or
  foreign (a safetensors file of another program), through generation's loading and
  engine.checkpoint's read_meta / load_weights;
* text-encoder and iREPA-teacher folders that are missing or hold another model.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine import preflight
from engine.buckets import make_buckets
from engine.checkpoint import CheckpointError, load_weights, read_meta
from engine.config import SECTIONS, ConfigError, RunConfig, load_preset
from engine.encoders import DinoTeacher, EncoderLoadError, load_text_encoder
from engine.generate import Pipeline, main
from engine.model import PixelHDM
from tests.test_generate import build, save, tiny_cfg, weights

ROOT = Path(__file__).resolve().parent.parent


def one_line(text: str) -> str:
    assert "\n" not in text.strip() and "Traceback" not in text, text
    return text


# --------------------------------------------------------------------------------------
# Every field: a wrong type and an out-of-range value
# --------------------------------------------------------------------------------------

# fields whose allowed values are not in their metadata: either any value of their type
# is fine, or validate() checks them against other fields (the value here breaks that)
FREE = {"description", "text.name_or_path", "text.cache_dir", "data.path", "data.cache_dir",
        "data.default_caption", "loss.p_mean", "loss.repa_teacher", "sample.negative",
        "train.init_from"}
CROSS = {"model.mrope_split": [8, 8, 8], "train.betas": [0.9], "sample.prompts": [],
         "sample.cfg_interval": [0.8, 0.2], "sample.pag_interval": [0.5, 0.1],
         "sample.noise_interval": [0.5, 0.5],
         "sample.pag_layers": [0], "data.stages": ["32 until soon"]}
WRONG_TYPE = {bool: "maybe", int: "many", float: "fast", str: 12}


def all_fields():
    """(key, type, metadata) of every config value, `description` included."""
    hints = typing.get_type_hints(RunConfig)
    yield "description", str, {}
    for section in SECTIONS:
        cls = hints[section]
        inner = typing.get_type_hints(cls)
        for f in fields(cls):
            yield f"{section}.{f.name}", inner[f.name], f.metadata


def wrong_type(tp):
    return "7" if typing.get_origin(tp) is list else WRONG_TYPE[tp]


def out_of_range(key: str, tp, meta: dict) -> list[tuple[str, object]]:
    """(label, value) outside the allowed range of one field ([] for free fields)."""
    if key in CROSS:
        return [("invalid", CROSS[key])]
    if meta.get("choices"):
        return [("not-a-choice", "no-such-choice")]
    step = 1 if tp is int else 0.5
    out = []
    if meta.get("lo") is not None:
        lo = meta["lo"]
        out.append(("at-open-min" if meta.get("lo_open") else "below-min",
                    lo if meta.get("lo_open") else lo - step))
    if meta.get("hi") is not None:
        out.append(("above-max", meta["hi"] + step))
    return out


def field_cases():
    for key, tp, meta in all_fields():
        yield pytest.param(key, wrong_type(tp), "expected|allowed", id=f"{key}-wrong-type")
        for label, value in out_of_range(key, tp, meta):
            yield pytest.param(key, value, "allowed", id=f"{key}-{label}")


def test_every_field_has_a_range_or_is_listed_as_free_or_cross_checked():
    """A new field must either say its range in its metadata, or be listed here: then
    the cases below test it too."""
    keys = set()
    for key, tp, meta in all_fields():
        keys.add(key)
        ranged = meta.get("choices") or meta.get("lo") is not None or meta.get("hi") is not None
        if tp is not bool and not ranged:
            assert key in FREE or key in CROSS, f"{key}: give it a range or list it in FREE"
    assert (FREE | set(CROSS)) <= keys, "FREE or CROSS names a field that no longer exists"
    assert len(keys) > 90


def _check(err: ConfigError, key: str, source: str, kind: str) -> None:
    text = one_line(str(err))
    assert source in text and f"{key} = " in text, text
    assert any(word in text for word in kind.split("|")), text   # what is allowed or expected


@pytest.mark.parametrize("key, value, kind", list(field_cases()))
def test_bad_value_in_a_preset_file(tmp_path, key, value, kind):
    section, _, name = key.partition(".")
    raw = {section: {name: value}} if name else {section: value}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_preset(path)
    _check(err.value, key, "mine.yaml", kind)


@pytest.mark.parametrize("key, value, kind", list(field_cases()))
def test_bad_value_through_set(key, value, kind):
    with pytest.raises(ConfigError) as err:
        load_preset("tiny-cpu", [f"{key}={json.dumps(value)}"])
    _check(err.value, key, "tiny-cpu.yaml", kind)


@pytest.mark.parametrize("text, message", [
    ("model:\n  size: tiny\n  hiden_dim: 3\n",
     "mine.yaml: unknown key 'model.hiden_dim': did you mean 'hidden_dim'?"),
    ("trian:\n  lr: 0.1\n", "mine.yaml: unknown section 'trian': did you mean 'train'?"),
    ("1: 2\nmodel: {}\n", "mine.yaml: unknown section '1'"),
    ("model: [1, 2]\n", "mine.yaml: model = [1, 2]: expected a mapping"),
    ("model: {size: tiny\n", "mine.yaml: not valid YAML"),
    ("- a\n- b\n", "mine.yaml: expected a mapping with sections"),
], ids=["unknown-key", "unknown-section", "number-as-section", "section-not-a-mapping",
        "broken-yaml", "list-at-top"])
def test_unknown_or_misshapen_keys_in_a_file(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_preset(path)
    assert message in one_line(str(err.value))


@pytest.mark.parametrize("override, message", [
    ("train.lrr=0.1", "unknown key 'train.lrr': did you mean 'lr'?"),
    ("trian.lr=0.1", "unknown section 'trian' in 'trian.lr': did you mean 'train'?"),
    ("lr=0.1", "'lr' must name a section and a key, e.g. train.lr=3e-4"),
    ("train.lr", "'train.lr' is not of the form section.key=value"),
    ("train.lr=[1", "train.lr = '[1': not a valid value"),
], ids=["unknown-key", "unknown-section", "no-section", "no-value", "broken-yaml"])
def test_unknown_keys_through_set(override, message):
    with pytest.raises(ConfigError) as err:
        load_preset("tiny-cpu", [override])
    assert message in one_line(str(err.value))


def test_a_preset_that_is_not_a_text_file_or_is_a_folder(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00model")
    with pytest.raises(ConfigError, match=r"binary\.yaml: not a YAML text file"):
        load_preset(tmp_path / "binary.yaml")
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"folder\.yaml: is a folder; give a preset name"):
        load_preset(tmp_path / "folder.yaml")
    with pytest.raises(ConfigError, match="no such config file; give a preset name"):
        load_preset(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------------------
# Sizes the patch cannot divide
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["data.min_side=36"], "data.min_side = 36: must be a multiple of model.patch_size 8 "
                           "(nearest: 32 or 40)"),
    (["data.max_side=60"], "data.max_side = 60: must be a multiple of model.patch_size 8"),
    (["data.bucket_step=12"], "data.bucket_step = 12: must be a multiple of model.patch_size 8 "
                              "(nearest: 8 or 16)"),
    (["model.patch_size=24"], "data.min_side = 32: must be a multiple of model.patch_size 24 "
                              "(nearest: 24 or 48)"),
    (["sample.width=30"], "sample.width = 30: must be 0 or a multiple of model.patch_size 8 "
                          "(nearest: 24 or 32)"),
    (["sample.height=4"], "sample.height = 4: must be 0 or a multiple of model.patch_size 8"),
], ids=["min_side", "max_side", "bucket_step", "patch_size", "sample_width", "sample_height"])
def test_sizes_the_patch_cannot_divide(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_preset("tiny-cpu", overrides)
    assert message in one_line(str(err.value))


@pytest.mark.parametrize("overrides", [
    [], ["model.patch_size=16"], ["model.patch_size=4", "data.max_aspect=3.3"],
    ["model.patch_size=24", "data.min_side=48", "data.max_side=96", "data.bucket_step=24"],
], ids=["tiny-cpu", "patch-16", "patch-4-aspect-3.3", "patch-24"])
def test_every_bucket_of_a_valid_config_is_made_of_whole_patches(overrides):
    cfg = load_preset("tiny-cpu", overrides)
    d, p = cfg.data, cfg.model.patch_size
    buckets = make_buckets(d.min_side, d.max_side, d.bucket_step, p, d.max_aspect)
    assert buckets and all(w % p == 0 and h % p == 0 for w, h in buckets)


# --------------------------------------------------------------------------------------
# Checkpoints: another size, damaged, foreign
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """One valid tiny checkpoint (builtin text encoder)."""
    cfg = tiny_cfg()
    net, enc = build(cfg)
    return save(tmp_path_factory.mktemp("runs") / "good", cfg, weights(net, enc))


def _meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _rewrite(good: Path, dst: Path, tensors=None, **meta) -> None:
    """A copy of `good` with other tensors and/or other `pixelhdm` metadata fields."""
    info = json.loads(_meta(good)["pixelhdm"])
    info.update(meta)
    save_file(load_file(str(good)) if tensors is None else tensors, str(dst),
              metadata={"pixelhdm": json.dumps(info)})


def _with_bytes(good: Path, dst: Path, change) -> None:
    data = bytearray(good.read_bytes())
    dst.write_bytes(bytes(change(data)))


def _header_len(data: bytearray) -> int:
    return struct.unpack("<Q", bytes(data[:8]))[0]


def _nan_tail(data: bytearray) -> bytearray:
    data[-4096:] = b"\xff" * 4096   # float32 0xffffffff is NaN
    return data


def _other_size(good: Path, dst: Path) -> None:
    big = tiny_cfg("model.hidden_dim=64", "model.num_heads=4")
    net, enc = build(big)
    tensors = {f"model.{k}": v for k, v in weights(net, enc).items()}
    save_file(tensors, str(dst), metadata=_meta(good))


def _without_blocks(good: Path, dst: Path) -> None:
    tensors = {k: v for k, v in load_file(str(good)).items() if ".patch_blocks." not in k}
    save_file(tensors, str(dst), metadata=_meta(good))


def _newer_config(good: Path, dst: Path) -> None:
    cfg = yaml.safe_load(json.loads(_meta(good)["pixelhdm"])["config"])
    cfg["model"]["future_knob"] = 1
    _rewrite(good, dst, config=yaml.safe_dump(cfg))


# name, how the file is made from the good one, what the message says
DAMAGED = [
    ("truncated-in-the-middle", lambda g, d: _with_bytes(g, d, lambda b: b[: len(b) // 2]),
     "is damaged or not a safetensors file"),
    ("truncated-in-the-header", lambda g, d: _with_bytes(g, d, lambda b: b[:20]),
     "is damaged or not a safetensors file"),
    ("empty-file", lambda g, d: d.write_bytes(b""), "is damaged or not a safetensors file"),
    ("header-length-changed", lambda g, d: _with_bytes(
        g, d, lambda b: struct.pack("<Q", _header_len(b) + 999) + b[8:]),
     "is damaged or not a safetensors file"),
    ("header-bytes-changed", lambda g, d: _with_bytes(
        g, d, lambda b: b[:10] + b"X" * 10 + b[20:]), "is damaged or not a safetensors file"),
    ("not-a-pixelhdm-file", lambda g, d: save_file({"w": torch.zeros(2)}, str(d),
                                                    metadata={"format": "pt"}),
     "is a safetensors file but not a PixelHDM checkpoint"),
]
# these pass engine.checkpoint's own checks and are refused by generation's loading
MISFIT = [
    ("tensor-bytes-changed-to-nan", lambda g, d: _with_bytes(g, d, _nan_tail),
     "hold NaN or infinite values"),
    ("metadata-not-json", lambda g, d: save_file(
        {"w": torch.zeros(2)}, str(d), metadata={"pixelhdm": "{not json"}),
     "has damaged metadata"),
    ("metadata-without-config", lambda g, d: save_file(
        {"w": torch.zeros(2)}, str(d), metadata={"pixelhdm": json.dumps({"step": 1})}),
     "lacks its config or text_dim metadata; it was not written by this engine"),
    ("text-dim-not-a-number", lambda g, d: _rewrite(g, d, text_dim="wide"),
     "has damaged metadata (text_dim = 'wide')"),
    ("config-of-a-newer-engine", _newer_config,
     "is not valid for this engine version (good.safetensors (config): unknown key "
     "'model.future_knob'"),
    ("weights-of-another-size", _other_size,
     "do not fit the network its config describes: 34 of another shape (e.g. "
     "net.t_embed.mlp.0.weight is 64x256 in the file, 32x256 in the network)"),
    ("weights-missing", _without_blocks, "do not fit the network its config describes: "
     "15 missing (e.g. net.patch_blocks.0.norm1.weight)"),
]


@pytest.fixture(scope="module")
def bad_files(good, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    out = {}
    for name, make, _ in DAMAGED + MISFIT:
        if name == "config-of-a-newer-engine":   # the message names the file
            out[name] = folder / name / "good.safetensors"
            out[name].parent.mkdir()
        else:
            out[name] = folder / f"{name}.safetensors"
        make(good, out[name])
    return out


@pytest.mark.parametrize("name, message", [(n, m) for n, _, m in DAMAGED + MISFIT],
                         ids=[n for n, _, _ in DAMAGED + MISFIT])
def test_generation_refuses_a_bad_checkpoint(bad_files, name, message):
    path = bad_files[name]
    # EncoderLoadError: the damage is in the builtin text encoder's part of the file
    with pytest.raises((CheckpointError, EncoderLoadError)) as err:
        Pipeline.load(path, device="cpu")
    text = one_line(str(err.value))
    assert message in text and str(path) in text
    assert "pick another checkpoint" in text


@pytest.mark.parametrize("name, message", [(n, m) for n, _, m in DAMAGED],
                         ids=[n for n, _, _ in DAMAGED])
def test_read_meta_and_load_weights_refuse_a_damaged_file(bad_files, name, message):
    path = bad_files[name]
    for read in (read_meta, load_weights):
        with pytest.raises(CheckpointError) as err:
            read(path)
        assert message in one_line(str(err.value)) and str(path) in str(err.value)


def test_read_meta_refuses_metadata_that_is_not_json(bad_files):
    with pytest.raises(CheckpointError, match="metadata"):
        read_meta(bad_files["metadata-not-json"])


@pytest.mark.slow
def test_the_cli_says_a_damaged_checkpoint_in_one_line_with_exit_code_1(bad_files, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "engine.generate", "--checkpoint",
         str(bad_files["truncated-in-the-middle"]), "--prompt", "a", "--device", "cpu",
         "--out", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert "is damaged or not a safetensors file" in one_line(done.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["weights-of-another-size", "metadata-not-json"])
def test_the_cli_refuses_a_misfit_checkpoint_with_exit_code_1(bad_files, name, tmp_path,
                                                              capsys):
    assert main(["--checkpoint", str(bad_files[name]), "--prompt", "a", "--device", "cpu",
                 "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert str(bad_files[name]) in one_line(err) and "pick another checkpoint" in err
    assert list(tmp_path.iterdir()) == []


def test_a_folder_without_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint .* give a run folder"):
        Pipeline.load(tmp_path, device="cpu")


# --------------------------------------------------------------------------------------
# Text-encoder and iREPA-teacher folders
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tiny_qwen3, tiny_dinov3, tmp_path_factory) -> dict[str, Path]:
    """Broken copies of the tiny Qwen3 and DINOv3 folders."""
    root = tmp_path_factory.mktemp("models")

    def copy(src: Path, name: str, drop=(), cut=()) -> Path:
        dst = root / name
        shutil.copytree(src, dst)
        for f in drop:
            (dst / f).unlink()
        for f in cut:
            data = (dst / f).read_bytes()
            (dst / f).write_bytes(data[: len(data) // 2])
        return dst

    (root / "a-file.txt").write_text("not a folder")
    return {
        "missing": root / "missing", "a-file": root / "a-file.txt",
        "qwen3": tiny_qwen3, "dinov3": tiny_dinov3,
        "qwen3-no-tokenizer": copy(tiny_qwen3, "no-tok",
                                   drop=("tokenizer.json", "tokenizer_config.json")),
        "qwen3-no-weights": copy(tiny_qwen3, "no-weights", drop=("model.safetensors",)),
        "qwen3-cut-weights": copy(tiny_qwen3, "cut-weights", cut=("model.safetensors",)),
        "dinov3-cut-weights": copy(tiny_dinov3, "dino-cut", cut=("model.safetensors",)),
    }


TEXT_CASES = [
    ("missing", "text encoder folder '{}' does not exist"),
    ("a-file", "text encoder '{}' is a file; a model folder"),
    ("dinov3", "is a 'dinov3_vit' model; a Qwen3 model is expected: set text.name_or_path"),
    ("qwen3-no-tokenizer", "text encoder folder '{}' has no tokenizer files"),
    ("qwen3-no-weights", "could not be loaded (OSError"),
    ("qwen3-cut-weights", "could not be loaded (SafetensorError"),
]


@pytest.mark.parametrize("name, message", TEXT_CASES, ids=[n for n, _ in TEXT_CASES])
def test_a_wrong_text_encoder_folder(folders, name, message):
    from engine.config import TextConfig

    folder = folders[name]
    with pytest.raises(EncoderLoadError) as err:
        load_text_encoder(TextConfig(encoder="qwen3", name_or_path=str(folder)))
    text = one_line(str(err.value))
    assert message.format(folder) in text and str(folder) in text
    assert "text.name_or_path" in text   # what to set


def test_generation_with_a_checkpoint_whose_text_encoder_folder_is_gone(folders, tmp_path,
                                                                        capsys):
    cfg = tiny_cfg("text.encoder=qwen3", f"text.name_or_path={folders['missing']}")
    run = tmp_path / "run"
    save(run, cfg, weights(PixelHDM(cfg.model, 64), None), text_dim=64)
    assert main(["--checkpoint", str(run), "--prompt", "a", "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 1
    err = one_line(capsys.readouterr().err)
    assert f"needs its Qwen3 text encoder '{folders['missing']}'" in err
    assert "pass --text-encoder FOLDER_OR_HUB_ID" in err and "hidden size 64" in err


def test_the_estimate_names_a_text_folder_that_holds_another_model(folders):
    cfg = load_preset("tiny-cpu", ["text.encoder=qwen3",
                                   f"text.name_or_path={folders['dinov3']}"])
    with pytest.raises(EncoderLoadError) as err:
        preflight.estimate(cfg)
    text = one_line(str(err.value))
    assert "its config.json is not a Qwen3 model's" in text and "model_type 'dinov3_vit'" in text
    cfg = load_preset("tiny-cpu", ["text.encoder=qwen3", f"text.name_or_path={folders['qwen3']}"])
    assert preflight.estimate(cfg)["frozen_parameters"] > 0


TEACHER_CASES = [
    ("missing", "iREPA teacher folder '{}' does not exist"),
    ("a-file", "iREPA teacher '{}' is a file; a model folder"),
    ("qwen3", "iREPA teacher '{}' is a 'qwen3' model; a DINOv3 ViT"),
    ("dinov3-cut-weights", "iREPA teacher '{}' could not be loaded (SafetensorError"),
]


@pytest.mark.parametrize("name, message", TEACHER_CASES, ids=[n for n, _ in TEACHER_CASES])
def test_a_wrong_irepa_teacher_folder(folders, name, message):
    with pytest.raises(EncoderLoadError) as err:
        DinoTeacher(str(folders[name]))
    text = one_line(str(err.value))
    assert message.format(folders[name]) in text
    assert "set loss.repa_teacher to it, or set loss.repa_teacher to ''" in text


def test_the_dry_run_names_a_teacher_that_is_not_a_dinov3(folders):
    cfg = load_preset("tiny-cpu", ["train.batch_size=1", f"loss.repa_teacher={folders['qwen3']}",
                                   "loss.repa_layer=1"])
    with pytest.raises(EncoderLoadError, match="is a 'qwen3' model; a DINOv3 ViT"):
        preflight.dry_run(cfg, device="cpu", steps=1)
