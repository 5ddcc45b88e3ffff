"""Models that travel: an exported file carries `modelspec.*` keys and no path of the
machine it was trained on, loads elsewhere with another copy of its Qwen3 text encoder
(`--text-encoder`, Pipeline.load(text_encoder=...), the Generate tab's field), and the
PNG `parameters` text names samplers the way other tools do."""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors import safe_open

from engine.checkpoint import export_inference, read_meta, read_modelspec, save_checkpoint
from engine.config import RunConfig, dump_yaml
from engine.encoders import EncoderLoadError
from engine.generate import Pipeline, main
from engine.generate_io import TextEncoderNeeded, checkpoint_config
from engine.model import PixelHDM
from engine.modelspec import portable_config
from engine.pngmeta import format_parameters, parse_parameters, png_text, read_png_parameters
from engine.sampling import SAMPLER_LABELS, SAMPLERS
from tests.test_generate import build, pixels, save, tiny_cfg, weights

FAST = dict(steps=2, width=16, height=16, seed=3)
TRAINED = {"32x32": 40, "16x24": 10, "16x16": 40}


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def strings(value) -> list[str]:
    """Every string inside a metadata value: JSON and YAML texts are opened too."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in strings(k) + strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    if not isinstance(value, str):
        return []
    out = [value]
    for parse in (json.loads, yaml.safe_load):
        try:
            inner = parse(value)
        except (ValueError, yaml.YAMLError):
            continue
        if isinstance(inner, (dict, list)):
            out += strings(inner)
    return out


def save_with(folder: Path, cfg: RunConfig, model: dict, text_dim: int = 32, **extra) -> Path:
    """A run checkpoint (step 10) whose metadata holds `extra` besides the usual keys."""
    meta = {"run_id": folder.name, "config": dump_yaml(cfg), "text_dim": text_dim, **extra}
    return save_checkpoint(folder / "checkpoints", 10, model, None, meta, {}, {})


def qwen3_checkpoint(folder: Path, tiny_qwen3: Path, data: Path, teacher: Path) -> Path:
    """A run checkpoint trained (as far as its metadata says) with a local Qwen3 folder, a
    dataset, a feature cache and an iREPA teacher, all paths of this machine, and what
    other parts of the engine may record: a source file, a nested record, a note."""
    cfg = tiny_cfg("text.encoder=qwen3", f"text.name_or_path={tiny_qwen3}",
                   f"data.path={data}", f"text.cache_dir={Path.home() / '.cache' / 'feats'}",
                   f"data.cache_dir={Path.home() / '.cache' / 'crops'}",
                   f"loss.repa_teacher={teacher}", "loss.repa_layer=1")
    torch.manual_seed(0)
    return save_with(folder, cfg, weights(PixelHDM(cfg.model, 64), None), 64,
                     trained_sizes=TRAINED,
                     init_from=str(Path.home() / "runs" / "old" / "step_01.safetensors"),
                     history={"sources": [str(folder / "a b" / "c.safetensors")]},
                     reason=f"copied from {folder}/abc, then tuned")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_qwen3):
    """(source checkpoint, export in another folder) of a Qwen3 run."""
    root = tmp_path_factory.mktemp("train-machine")
    (root / "data").mkdir()
    src = qwen3_checkpoint(root / "run-q", tiny_qwen3, root / "data", root / "dinov3-vitb16")
    models = tmp_path_factory.mktemp("models")
    return src, export_inference(src, models / "q.safetensors", torch.float32, title="")


# --------------------------------------------------------------------------------------
# ModelSpec keys
# --------------------------------------------------------------------------------------

def test_an_export_carries_modelspec_keys(tmp_path):
    cfg = tiny_cfg()
    src = save(tmp_path / "run-a", cfg, weights(*build(cfg)))
    dst = export_inference(src, tmp_path / "a.safetensors", torch.float32,
                           title="  Red circles\n v1 ", description="Shapes on white.")
    spec = read_modelspec(dst)
    assert set(header(dst)) == {"pixelhdm", *(f"modelspec.{k}" for k in spec)}
    assert spec["sai_model_spec"] == "1.0.0"
    assert spec["architecture"] == "pixelhdm/tiny" and spec["implementation"] == "pixelhdm"
    assert (spec["title"], spec["description"]) == ("Red circles v1", "Shapes on white.")
    assert spec["prediction_type"] == "v_prediction"
    assert spec["resolution"] == "32x32"       # no trained sizes recorded: data.max_side
    saved = read_meta(src)["saved_at"]
    assert abs(datetime.fromisoformat(spec["date"]).timestamp() - saved) < 1
    assert read_modelspec(src) == {}           # a run checkpoint carries none

    cfg = tiny_cfg("model.prediction=x", "model.size=")
    src = save_with(tmp_path / "shapes", cfg, {"net.w": torch.zeros(1)}, trained_sizes=TRAINED)
    spec = read_modelspec(export_inference(src, tmp_path / "b.safetensors"))
    assert spec["prediction_type"] == "x_prediction"
    assert spec["architecture"] == "pixelhdm/custom" and spec["title"] == "shapes step 10"
    assert spec["resolution"] == "32x32"       # the most-trained size; ties: the larger
    assert spec["trained_sizes"] == "16x16: 40, 32x32: 40, 16x24: 10"
    assert "flow matching with x-prediction" in spec["description"]
    assert "step 10 of run shapes" in spec["description"]


def test_an_export_still_loads_and_draws_what_its_checkpoint_draws(tmp_path):
    cfg = tiny_cfg()
    src = save(tmp_path / "run-a", cfg, weights(*build(cfg)))
    dst = export_inference(src, tmp_path / "models" / "a.safetensors", torch.float32)
    a = Pipeline.load(src, device="cpu").generate("a red circle", **FAST)[0]
    b = Pipeline.load(dst, device="cpu").generate("a red circle", **FAST)[0]
    assert np.array_equal(pixels(a.image), pixels(b.image))
    assert b.params["run_id"] == "run-a" and b.params["checkpoint_step"] == 10


# --------------------------------------------------------------------------------------
# No path of the training machine
# --------------------------------------------------------------------------------------

def test_an_export_holds_no_path_of_the_training_machine(exported, tiny_qwen3):
    src, dst = exported
    forbidden = {str(src.parent.parent.parent), str(Path.home()), str(tiny_qwen3),
                 str(Path.cwd()), tempfile.gettempdir() + "/"}
    source_values = strings(header(src))
    assert any(str(tiny_qwen3) in s for s in source_values)    # the source has them all
    assert any(str(Path.home()) in s for s in source_values)
    for value in strings(header(dst)):
        for path in forbidden:
            assert path not in value, f"{path!r} left in {value[:200]!r}"
    meta, cfg, text_dim = checkpoint_config(dst)   # still a valid config for this engine
    assert text_dim == 64 and cfg.text.encoder == "qwen3"
    assert cfg.text.name_or_path == tiny_qwen3.name == meta["text_encoder_folder"]
    assert "--text-encoder" in meta["text_encoder_note"]
    assert (cfg.data.path, cfg.text.cache_dir, cfg.data.cache_dir) == ("", "", "")
    assert cfg.loss.repa_teacher == "dinov3-vitb16"
    assert meta["init_from"] == "step_01.safetensors"
    assert meta["history"] == {"sources": ["c.safetensors"]}
    assert meta["reason"] == "copied from abc, then tuned"
    assert meta["portable_changes"]["data.path"] == "removed"
    assert meta["trained_sizes"] == TRAINED and meta["exported_from"] == src.name


def test_a_hub_id_stays_and_a_windows_folder_is_cut_to_its_name():
    hub, changed, folder = portable_config({"text": {"encoder": "qwen3",
                                                     "name_or_path": "Qwen/Qwen3-0.6B"}}, [])
    assert hub["text"]["name_or_path"] == "Qwen/Qwen3-0.6B" and folder == "" and changed == {}
    win, changed, folder = portable_config(
        {"text": {"encoder": "qwen3", "name_or_path": "D:\\models\\Qwen3-0.6B\\"},
         "data": {"path": "C:\\Users\\me\\pics"}, "sample": {"prompts": ["a cat / a dog"]}}, [])
    assert win["text"]["name_or_path"] == folder == "Qwen3-0.6B"
    assert win["data"]["path"] == "" and win["sample"]["prompts"] == ["a cat / a dog"]
    assert set(changed) == {"data.path", "text.name_or_path"}


# --------------------------------------------------------------------------------------
# Loading with another copy of the text encoder
# --------------------------------------------------------------------------------------

def test_an_export_whose_encoder_is_elsewhere_asks_for_it(exported, tmp_path, capsys):
    _, dst = exported
    with pytest.raises(TextEncoderNeeded) as err:
        Pipeline.load(dst, device="cpu")
    message = str(err.value)
    assert f"needs its Qwen3 text encoder '{err.value.name}'" in message
    assert "pass --text-encoder FOLDER_OR_HUB_ID" in message and "hidden size 64" in message
    args = ["--checkpoint", str(dst), "--prompt", "a red circle", "--steps", "1", "--device",
            "cpu", "--out", str(tmp_path / "out")]
    assert main(args) == 1
    err_text = capsys.readouterr().err
    assert "--text-encoder" in err_text and len(err_text.strip().splitlines()) == 1


def test_the_override_loads_the_export_and_matches_the_checkpoint(exported, tiny_qwen3,
                                                                 tmp_path, capsys):
    src, dst = exported
    a = Pipeline.load(src, device="cpu").generate("a red circle", **FAST)[0]
    pipe = Pipeline.load(dst, device="cpu", text_encoder=str(tiny_qwen3))
    b = pipe.generate("a red circle", **FAST)[0]
    assert np.array_equal(pixels(a.image), pixels(b.image))
    assert pipe.cfg.text.name_or_path == str(tiny_qwen3)
    args = ["--checkpoint", str(dst), "--text-encoder", str(tiny_qwen3), "--prompt", "a",
            "--steps", "1", "--width", "16", "--height", "16", "--device", "cpu", "--out",
            str(tmp_path)]
    assert main(args) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    # a folder of the encoder's name next to the file is found without being asked for
    beside = tmp_path / "next" / dst.name
    beside.parent.mkdir()
    shutil.copy(dst, beside)
    shutil.copytree(tiny_qwen3, beside.parent / tiny_qwen3.name)
    c = Pipeline.load(beside, device="cpu").generate("a red circle", **FAST)[0]
    assert np.array_equal(pixels(a.image), pixels(c.image))


def test_a_run_whose_encoder_folder_moved_loads_with_the_override(tiny_qwen3, tmp_path):
    moved = tmp_path / "gone" / "Qwen3-tiny"
    cfg = tiny_cfg("text.encoder=qwen3", f"text.name_or_path={moved}")
    torch.manual_seed(0)
    src = save_with(tmp_path / "run-m", cfg, weights(PixelHDM(cfg.model, 64), None), 64)
    with pytest.raises(TextEncoderNeeded, match=f"'{moved}', a folder that does not exist on "
                                                f"this machine: pass --text-encoder"):
        Pipeline.load(src, device="cpu")
    pipe = Pipeline.load(src, device="cpu", text_encoder=str(tiny_qwen3))
    assert pipe.generate("a red circle", **FAST)[0].image.size == (16, 16)


def test_an_override_of_another_width_is_refused_naming_both(exported, tiny_qwen3, tmp_path):
    from transformers import Qwen3Config, Qwen3Model

    _, dst = exported
    other = tmp_path / "qwen3-32"
    shutil.copytree(tiny_qwen3, other)
    (other / "model.safetensors").unlink()
    config = json.loads((other / "config.json").read_text())
    Qwen3Model(Qwen3Config(**{k: v for k, v in config.items() if k not in (
        "architectures", "transformers_version", "dtype", "torch_dtype")} | dict(
        hidden_size=32, head_dim=8))).save_pretrained(other)
    with pytest.raises(EncoderLoadError) as err:
        Pipeline.load(dst, device="cpu", text_encoder=str(other))
    assert str(err.value).startswith(
        f"the text encoder '{other}' has hidden size 32, but checkpoint 'q.safetensors' was "
        f"trained with '{tiny_qwen3.name}' of hidden size 64")


def test_an_override_for_a_builtin_encoder_is_refused(tmp_path, tiny_qwen3):
    cfg = tiny_cfg()
    src = save(tmp_path / "run-a", cfg, weights(*build(cfg)))
    with pytest.raises(EncoderLoadError, match="has a builtin text encoder whose weights are in "
                                               "the file"):
        Pipeline.load(src, device="cpu", text_encoder=str(tiny_qwen3))


def test_the_generate_tab_takes_the_text_encoder_field(exported, tiny_qwen3, tmp_path):
    import gradio as gr

    from studio import tab_generate
    from studio.paths import PathError
    from studio.workspace import Studio

    studio = Studio(tmp_path / "ws")
    studio.models_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(exported[1], studio.models_dir / "q.safetensors")
    shutil.copytree(tiny_qwen3, studio.workspace / "encoders" / "qwen")
    with gr.Blocks():
        handlers = tab_generate.build(studio)

    def press(encoder: str) -> str:
        values = dict(prompt="a red circle", negative="", sampler="euler", steps=1, cfg=3.0,
                      rescale=0.0, lo=0.0, hi=1.0, ramp=0.0, pag=0.0, coarse=0.0,
                      coarse_sigma=1.5, noise_lo=0.0,
                      noise_hi=1.0, shift=0.0, width=16, height=16, seed="1", strength=0.75,
                      count=1, init=None)
        last = list(handlers["run"]("model/q.safetensors", True, *values.values(), None,
                                    encoder))[-1]
        return last[handlers["run_outputs"][1]]

    needs = press("")
    assert needs.startswith("**Not generated:** this model needs its Qwen3 text encoder")
    assert "in the Text encoder field" in needs and "--text-encoder" not in needs
    assert press("encoders/qwen").startswith("Done: 1 image(s), seed 1")
    assert press(str(studio.workspace / "encoders" / "qwen")).startswith("Done:")
    outside = press(str(tiny_qwen3))
    assert outside.startswith("**Text encoder: the path") and "outside the folders" in outside
    assert "outside the folders" in press("../../etc")
    assert tab_generate.text_encoder_choice("Qwen/Qwen3-0.6B", studio) == "Qwen/Qwen3-0.6B"
    assert tab_generate.text_encoder_choice("  ", studio) is None
    with pytest.raises(PathError, match="neither a folder nor a hub id"):
        tab_generate.text_encoder_choice("two words", studio)
    fields = len(handlers["model_args"]["inputs"]) - 2
    shown = handlers["model_args"]["fn"]("model/q.safetensors", *[None] * fields, [None] * fields)
    shown = [shown[handlers["model_info"]]]
    assert f"text encoder `{tiny_qwen3.name}`, a folder of the training machine" in shown[0]
    assert shown[0].startswith("**run-q step 10** · Run `run-q`")


@pytest.mark.parametrize("typed", ["../outside/qwen", "..", "/tmp", "a/../../outside/qwen",
                                   "x\x00y", "encoders/escape", "~/qwen"], ids=repr)
def test_the_text_encoder_field_refuses_folders_outside_the_workspace(typed, tmp_path):
    import os

    from studio.paths import PathError
    from studio.tab_generate import text_encoder_choice
    from studio.workspace import Studio

    studio = Studio(tmp_path / "ws")
    (tmp_path / "outside" / "qwen").mkdir(parents=True)
    (studio.workspace / "encoders").mkdir()
    if typed == "encoders/escape" and os.name == "nt":
        pytest.skip("symlinks need privileges on Windows")
    if typed == "encoders/escape":   # a link inside the workspace is judged by where it leads
        (studio.workspace / "encoders" / "escape").symlink_to(tmp_path / "outside" / "qwen")
    with pytest.raises(PathError, match="Text encoder: "):
        text_encoder_choice(typed, studio)


# --------------------------------------------------------------------------------------
# Sampler labels in PNG parameters
# --------------------------------------------------------------------------------------

PARAMS = dict(prompt="a red circle", negative="", width=16, height=16, steps=2, cfg=3.0,
              rescale=0.0, interval=[0.0, 1.0], shift=1.0, seed=5)


@pytest.mark.parametrize("key", list(SAMPLERS))
def test_png_parameters_name_the_sampler_as_other_tools_do(key, tmp_path):
    from studio import gen_settings
    from studio.tab_generate import recall

    assert set(SAMPLER_LABELS) == set(SAMPLERS)
    label = SAMPLER_LABELS[key]
    text = format_parameters(dict(PARAMS, sampler=key))
    assert f"Sampler: {label}," in text and f"Sampler: {key}," not in text
    assert parse_parameters(text)["sampler"] == key
    # a PNG with only the `parameters` text, as another tool or an older file writes it
    for written in (label, key, label.upper()):
        info = PngInfo()
        info.add_text("parameters", format_parameters(PARAMS | {"sampler": "x"}).replace(
            "Sampler: x", f"Sampler: {written}"))
        Image.new("RGB", (4, 4)).save(tmp_path / "p.png", pnginfo=info)
        assert read_png_parameters(tmp_path / "p.png")["sampler"] == key
        _, recalled = recall(tmp_path / "p.png")
        assert gen_settings.recall_values(recalled)[2] == key   # the Sampler field of the tab
    # our JSON chunk keeps the key; one holding a label reads as the key too
    chunks = png_text(dict(PARAMS, sampler=key))
    assert json.loads(chunks["pixelhdm"])["sampler"] == key
    image = Image.new("RGB", (4, 4))
    image.info["pixelhdm"] = json.dumps(dict(PARAMS, sampler=label))
    assert read_png_parameters(image)["sampler"] == key


def test_foreign_sampler_names_are_read_or_kept():
    line = "p\nSteps: 20, Sampler: {}, CFG scale: 5, Seed: 1"
    assert parse_parameters(line.format("DPM++ 2M Karras"))["sampler"] == "dpmpp_2m"
    assert parse_parameters(line.format("dpmpp_2m"))["sampler"] == "dpmpp_2m"
    assert parse_parameters(line.format("Euler a"))["sampler"] == "euler_a"
    assert parse_parameters(line.format("DPM++ 2M SDE Karras"))["sampler"] == "dpmpp_2m_sde"
    assert parse_parameters(line.format("DPM++ SDE"))["sampler"] == "DPM++ SDE"
