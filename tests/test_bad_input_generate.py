"""Bad input, generation side, through the three doors a request comes in by: the
Pipeline API, `python -m engine.generate` and the studio's Generate tab. Every refusal is
one line naming the value and what is allowed (CLI exit code 2 for a bad argument, 1 for
a file that cannot be used); inputs that are odd but usable (an empty or over-long
prompt, a start image of another mode or shape) work, with a note saying what happened.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import dump_yaml
from engine.generate import GenerateError, Pipeline, main
from engine.model import PixelHDM
from tests.test_generate import build, save, tiny_cfg, weights

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(steps=1, width=16, height=16, seed=1)


def one_line(text: str) -> str:
    assert "\n" not in text.strip() and "Traceback" not in text, text
    return text


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder with one tiny checkpoint: patch 8, sides up to 128, max_tokens 16."""
    cfg = tiny_cfg()
    net, enc = build(cfg)
    run_dir = tmp_path_factory.mktemp("runs") / "run-a"
    save(run_dir, cfg, weights(net, enc))
    return run_dir


@pytest.fixture(scope="module")
def pipe(run) -> Pipeline:
    return Pipeline.load(run, device="cpu")


def refused(pipe: Pipeline, **kwargs) -> str:
    with pytest.raises(GenerateError) as err:
        pipe.generate("a red circle", **{**FAST, **kwargs})
    return one_line(str(err.value))


def cli(run: Path, out: Path, *args: str, prompt: str = "a red circle") -> list[str]:
    return ["--checkpoint", str(run), "--prompt", prompt, "--steps", "1", "--width", "16",
            "--height", "16", "--device", "cpu", "--out", str(out), *args]


# --------------------------------------------------------------------------------------
# Sizes, steps, guidance and seeds: refused with the allowed values
# --------------------------------------------------------------------------------------

REQUESTS = [
    (dict(width=20), "width = 20 is not allowed: use a multiple of the patch size 8 from 8 to "
                     "128 (nearest: 16 or 24)"),
    (dict(height=12), "height = 12 is not allowed: use a multiple of the patch size 8 from 8 "
                      "to 128 (nearest: 8 or 16)"),
    (dict(width=136), "width = 136 is not allowed: use a multiple of the patch size 8 from 8 "
                      "to 128 (nearest: 128)"),
    (dict(height=4096), "height = 4096 is not allowed: use a multiple of the patch size 8 "
                        "from 8 to 128 (nearest: 128)"),
    (dict(width=0), "width = 0 is not allowed: use a multiple of the patch size 8 from 8 to 128"),
    (dict(width=-8), "width = -8 is not allowed"),
    (dict(width=16.0), "width = 16.0 is not allowed: use a whole number of pixels, a multiple "
                       "of the patch size 8"),
    (dict(steps=0), "steps = 0: allowed a whole number from 1 to 1000"),
    (dict(steps=1001), "steps = 1001: allowed a whole number from 1 to 1000"),
    (dict(steps=2.5), "steps = 2.5: allowed a whole number from 1 to 1000"),
    (dict(cfg=-1), "cfg = -1.0: allowed a number >= 0 (1 = no guidance)"),
    (dict(cfg=float("nan")), "cfg = nan: allowed a number >= 0"),
    (dict(seed=-2), "seed = -2: allowed a whole number from 0 to 9223372036854775807, or -1 "
                    "(or empty) for a random seed"),
    (dict(seed=2**63), "seed = 9223372036854775808: allowed a whole number from 0 to "
                       "9223372036854775807"),
    (dict(seed=2**63 - 1, n=2), "seed = 9223372036854775807: allowed a whole number from 0 "
                                "to 9223372036854775806"),
    (dict(seed=1.5), "seed = 1.5: allowed a whole number"),
    (dict(seed="7"), "seed = '7': allowed a whole number"),
]


@pytest.mark.parametrize("kwargs, message", REQUESTS,
                         ids=["width-not-a-multiple", "height-not-a-multiple", "width-too-large",
                              "height-far-too-large", "width-zero", "width-negative",
                              "width-float", "steps-zero", "steps-above-max", "steps-fraction",
                              "cfg-negative", "cfg-nan", "seed-negative", "seed-2**63",
                              "seed-last-image-past-the-range", "seed-fraction", "seed-text"])
def test_the_api_refuses_a_bad_request(pipe, kwargs, message):
    assert message in refused(pipe, **kwargs)


def test_the_largest_seed_and_size_are_accepted(pipe):
    out = pipe.generate("a", **{**FAST, "seed": 2**63 - 1, "width": 128, "height": 8})
    assert out[0].params["seed"] == 2**63 - 1 and out[0].image.size == (128, 8)


@pytest.mark.parametrize("args, message", [
    (["--width", "20"], "width = 20 is not allowed: use a multiple of the patch size 8"),
    (["--height", "4096"], "height = 4096 is not allowed"),
    (["--cfg", "-1"], "cfg = -1.0: allowed a number >= 0"),
    (["--seed", "-5"], "seed = -5: allowed a whole number from 0"),
    (["--seed", str(2**63)], f"seed = {2**63}: allowed a whole number from 0"),
], ids=["width-not-a-multiple", "height-too-large", "cfg-negative", "seed-negative",
        "seed-2**63"])
def test_the_cli_refuses_a_bad_argument_with_exit_code_2(run, tmp_path, capsys, args, message):
    assert main(cli(run, tmp_path, *args)) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in one_line(captured.err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_cli_answers_steps_0_in_one_line_without_a_traceback(run, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "engine.generate",
                           *cli(run, tmp_path / "out", "--steps", "0")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert "steps = 0: allowed a whole number from 1 to 1000" in one_line(done.stderr)
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_an_output_folder_it_cannot_write(run, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(cli(run, blocker / "out")) == 2
    err = one_line(capsys.readouterr().err)
    assert f"'{blocker}' is a file; choose a folder you can write to" in err


def test_the_cli_says_out_of_memory_with_what_to_lower(run, tmp_path, capsys, monkeypatch):
    def too_big(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
    monkeypatch.setattr(Pipeline, "generate", too_big)
    assert main(cli(run, tmp_path)) == 1
    assert "out of memory while generating: lower --batch-size" in one_line(
        capsys.readouterr().err)


# --------------------------------------------------------------------------------------
# Prompts: empty or longer than max_tokens work, with a note
# --------------------------------------------------------------------------------------

LONG = " ".join(f"word{i}" for i in range(40))


def test_an_empty_prompt_gives_an_unconditional_image_with_a_note(pipe):
    assert pipe.notes("") == ["the prompt is empty: the image is unconditional (what the model "
                              "draws without a caption); type a prompt to describe the image"]
    assert pipe.notes(["a cat", " "])[0].startswith("prompt 2 is empty")
    assert pipe.notes("a red circle") == []
    empty = pipe.generate("", **FAST)[0]
    assert empty.params["prompt"] == "" and empty.image.size == (16, 16)


def test_a_prompt_longer_than_max_tokens_is_cut_with_a_note(pipe):
    assert pipe.notes(LONG, negative=LONG) == [
        "the prompt is 40 tokens long; the model reads only the first 16 (text.max_tokens of its "
        "training run) and ignores the rest: shorten it to steer all of the image",
        "the negative prompt is 40 tokens long; the model reads only the first 16 (text.max_tokens"
        " of its training run) and ignores the rest: shorten it to steer all of the image"]
    long = pipe.generate(LONG, **FAST)[0]
    cut = pipe.generate(" ".join(LONG.split()[:16]), **FAST)[0]
    assert long.params["prompt"] == LONG
    assert np.array_equal(np.asarray(long.image), np.asarray(cut.image))


def test_the_cli_prints_the_notes_and_generates(run, tmp_path, capsys):
    assert main(cli(run, tmp_path, prompt="")) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1 and len(list(tmp_path.iterdir())) == 1
    assert "note: the prompt is empty: the image is unconditional" in captured.err
    assert main(cli(run, tmp_path, prompt=LONG)) == 0
    assert "note: the prompt is 40 tokens long" in capsys.readouterr().err


def test_a_long_prompt_for_a_qwen3_checkpoint(tiny_qwen3, tmp_path, capfd):
    cfg = tiny_cfg("text.encoder=qwen3", f"text.name_or_path={tiny_qwen3}", "text.max_tokens=8")
    save(tmp_path / "q", cfg, weights(PixelHDM(cfg.model, 64), None), text_dim=64)
    prompt = "a small yellow star on a purple background " * 20
    assert main(cli(tmp_path / "q", tmp_path / "out", prompt=prompt)) == 0
    err = capfd.readouterr().err
    assert "the model reads only the first 8 (text.max_tokens" in err
    assert "Token indices sequence length" not in err   # no tokenizer warning on top


@pytest.mark.parametrize("encoder, message", [
    ("missing", "the text encoder folder '{tmp}/missing' does not exist: give the folder of a "
                "Qwen3 model"),
    ("file.txt", "text encoder '{tmp}/file.txt' is a file; a model folder"),
], ids=["missing-folder", "a-file"])
def test_the_cli_refuses_a_text_encoder_it_cannot_use_in_one_line(tiny_qwen3, tmp_path, capsys,
                                                                  encoder, message):
    cfg = tiny_cfg("text.encoder=qwen3", f"text.name_or_path={tiny_qwen3}")
    save(tmp_path / "q", cfg, weights(PixelHDM(cfg.model, 64), None), text_dim=64)
    (tmp_path / "file.txt").write_text("not a model")
    args = cli(tmp_path / "q", tmp_path / "out", "--text-encoder", str(tmp_path / encoder))
    assert main(args) == 1
    err = one_line(capsys.readouterr().err)
    assert message.format(tmp=tmp_path) in err and not (tmp_path / "out").exists()


def test_the_cli_refuses_a_text_encoder_for_a_builtin_checkpoint(run, tiny_qwen3, tmp_path,
                                                                 capsys):
    assert main(cli(run, tmp_path / "out", "--text-encoder", str(tiny_qwen3))) == 1
    err = one_line(capsys.readouterr().err)
    assert "has a builtin text encoder whose weights are in the file" in err
    assert "leave it out" in err


# --------------------------------------------------------------------------------------
# img2img: start images of any mode or shape
# --------------------------------------------------------------------------------------

def _reopened(image: Image.Image, tmp_path: Path) -> Image.Image:
    image.save(tmp_path / "init.png")
    return Image.open(tmp_path / "init.png")


def _grey16(value: int, tmp_path: Path) -> Image.Image:
    return _reopened(Image.fromarray(np.full((16, 24), value, np.uint16)), tmp_path)


MODES = [
    ("RGBA-transparent", lambda t: Image.new("RGBA", (24, 16), (255, 0, 0, 0)), (255, 255, 255)),
    ("RGBA-opaque", lambda t: Image.new("RGBA", (24, 16), (255, 0, 0, 255)), (255, 0, 0)),
    ("LA-transparent", lambda t: Image.new("LA", (24, 16), (90, 0)), (255, 255, 255)),
    ("L", lambda t: Image.new("L", (24, 16), 90), (90, 90, 90)),
    ("16-bit-png", lambda t: _grey16(90 * 257, t), (90, 90, 90)),
    ("I-16-bit-values", lambda t: Image.fromarray(np.full((16, 24), 90 * 257, np.int32)),
     (90, 90, 90)),
    ("F-0-to-1", lambda t: Image.fromarray(np.full((16, 24), 0.5, np.float32)), (128, 128, 128)),
    ("CMYK", lambda t: Image.new("CMYK", (24, 16), (0, 255, 255, 0)), (255, 0, 0)),
    ("P", lambda t: Image.new("RGB", (24, 16), (0, 0, 255)).convert("P"), (0, 0, 255)),
    ("1", lambda t: Image.new("1", (24, 16), 1), (255, 255, 255)),
]


@pytest.mark.parametrize("make, rgb", [(m, c) for _, m, c in MODES], ids=[n for n, _, _ in MODES])
def test_a_start_image_of_any_mode_keeps_its_colours(pipe, tmp_path, make, rgb):
    """Strength 0 gives the start image back: what it shows, in 8-bit RGB."""
    init = make(tmp_path)
    out = pipe.generate("a", seed=1, steps=2, init_image=init, strength=0.0)[0]
    assert out.image.mode == "RGB" and out.image.size == (24, 16)
    assert np.array_equal(np.asarray(out.image), np.broadcast_to(np.array(rgb, np.uint8),
                                                                 (16, 24, 3)))
    assert pipe.notes("a", init_image=init) == []


def test_a_start_image_of_another_shape_is_cropped_with_a_note(pipe):
    init = Image.new("RGB", (200, 10), (10, 200, 30))
    out = pipe.generate("a", seed=1, steps=2, init_image=init, strength=0.0, width=16,
                        height=16)[0]
    assert out.image.size == (16, 16)
    assert np.array_equal(np.asarray(out.image)[8, 8], [10, 200, 30])
    assert pipe.notes("a", None, 16, 16, init_image=init) == [
        "the start image (200x10) has another shape than 16x16: it is scaled to cover it and "
        "its centre is cropped"]
    assert pipe.generate("a", seed=1, steps=1, init_image=init)[0].image.size == (128, 8)


def test_a_turned_photo_takes_its_upright_size(pipe, tmp_path):
    """EXIF orientation 6 (shown turned by 90 degrees): the default size is the upright one."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (24, 16), (0, 128, 0)).save(tmp_path / "turned.jpg", exif=exif.tobytes())
    with Image.open(tmp_path / "turned.jpg") as init:
        out = pipe.generate("a", seed=1, steps=1, init_image=init, strength=0.0)[0]
        assert pipe.notes("a", init_image=init) == []
    assert out.image.size == (16, 24)


def test_the_cli_takes_a_16_bit_start_image_of_another_shape(run, tmp_path, capsys):
    init = _grey16(90 * 257, tmp_path)   # 24x16, cropped to 16x16
    assert main(cli(run, tmp_path / "out", "--init", init.filename, "--strength", "0")) == 0
    captured = capsys.readouterr()
    assert "note: the start image (24x16) has another shape than 16x16" in captured.err
    with Image.open(captured.out.strip()) as out:
        assert out.size == (16, 16) and out.getpixel((8, 8)) == (90, 90, 90)


def test_the_cli_refuses_an_init_file_that_is_not_an_image_with_exit_code_1(run, tmp_path,
                                                                             capsys):
    (tmp_path / "init.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(cli(run, tmp_path / "out", "--init", str(tmp_path / "init.png"))) == 1
    err = one_line(capsys.readouterr().err)
    assert f"--init: cannot read the image '{tmp_path / 'init.png'}'" in err
    assert "give a PNG, JPEG or WebP file" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------
# The studio's Generate tab
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tab(tmp_path_factory):
    """The Generate tab's handlers on a workspace with two runs of one checkpoint each."""
    import gradio as gr

    from studio import tab_generate
    from studio.workspace import Studio

    studio = Studio(tmp_path_factory.mktemp("ws"))
    cfg = tiny_cfg()
    net, enc = build(cfg)
    for run_id in ("run-a", "run-b"):
        folder = studio.runner.runs_root / run_id
        save(folder, cfg, weights(net, enc))
        (folder / "config.yaml").write_text(dump_yaml(cfg))
    with gr.Blocks():
        handlers = tab_generate.build(studio)
    return studio, handlers


def press_generate(tab, cid="run/run-a/10", **fields) -> tuple:
    """What the page shows after pressing Generate: the last update of every output
    (preview, status, results, settings, history, history files, checkpoint, model info)."""
    _, handlers = tab
    values = dict(prompt="a red circle", negative="", sampler="euler", steps=1, cfg=3.0,
                  rescale=0.0, lo=0.0, hi=1.0, ramp=0.0, pag=0.0, coarse=0.0, coarse_sigma=1.5,
                  noise_lo=0.0,
                  noise_hi=1.0, shift=0.0, width=16, height=16, seed="1", strength=0.75, count=1,
                  init=None)
    values.update(fields)
    updates = list(handlers["run"](cid, True, *values.values(), None))
    assert updates
    return tuple(updates[-1].get(c, gr.skip()) for c in handlers["run_outputs"])   # as shown


def test_fresh_noise_sliders_are_enabled_only_for_stochastic_samplers(tab):
    _, handlers = tab
    for sampler, on in (("heun", False), ("euler", False), ("euler_a", True),
                        ("dpmpp_2m_sde", True)):
        assert [s.interactive for s in handlers["noise_controls"](sampler)] == [on, on]


def test_the_tab_generates(tab):
    status = press_generate(tab)[1]
    assert status.startswith("Done: 1 image(s), seed 1") and "Note" not in status


def test_the_tab_takes_the_coarse_blur_with_coarse_guidance_only(tab):
    """The blur field reaches the sampler and the image's settings when coarse guidance
    is on; without it an emptied blur field stops nothing."""
    last = press_generate(tab, cfg=4.0, coarse=2.0, coarse_sigma=3.0)
    assert last[1].startswith("Done:") and "| Coarse blur (px) | 3.0 |" in last[3]
    assert press_generate(tab, coarse_sigma=None)[1].startswith("Done:")
    last = press_generate(tab, cfg=4.0, coarse=2.0, coarse_sigma=None)   # the run's blur
    assert "| Coarse blur (px) | 1.5 |" in last[3]


@pytest.mark.parametrize("fields, message", [
    (dict(width=20), "width = 20 is not allowed: use a multiple of the patch size 8 from 8 to "
                     "128 (nearest: 16 or 24)"),
    (dict(height=1024), "height = 1024 is not allowed"),
    (dict(width=None), "Width is empty: type a number"),
    (dict(width=16.5), "Width = 16.5 is not a whole number"),
    (dict(steps=0), "steps = 0: allowed a whole number from 1 to 1000"),
    (dict(steps=5000), "steps = 5000: allowed a whole number from 1 to 1000"),
    (dict(cfg=-1.0), "cfg = -1.0: allowed a number >= 0 (1 = no guidance)"),
    (dict(cfg=None), "CFG scale is empty: type a number"),
    (dict(seed="-5"), "seed -5 is negative (leave it empty for a random seed)"),
    (dict(seed="abc"), "seed 'abc' is not a whole number (leave it empty for a random seed)"),
    (dict(seed="1.5"), "seed '1.5' is not a whole number"),
    (dict(seed=str(2**63)), f"seed = {2**63}: allowed a whole number from 0"),
    (dict(coarse=2.0, coarse_sigma=0.0), "cfg_coarse_sigma = 0.0: allowed 0.1 to 64 pixels"),
], ids=["width-not-a-multiple", "height-too-large", "width-empty", "width-fraction",
        "steps-zero", "steps-above-max", "cfg-negative", "cfg-empty", "seed-negative",
        "seed-text", "seed-fraction", "seed-2**63", "coarse-blur-zero"])
def test_the_tab_refuses_a_bad_field_in_one_line(tab, fields, message):
    import gradio as gr

    last = press_generate(tab, **fields)
    assert message in one_line(last[1]) and "Error:" not in last[1]
    assert last[1].startswith("**")
    assert [u for i, u in enumerate(last) if i != 1] == [gr.skip()] * 7   # only the status


def test_the_tab_notes_an_empty_or_long_prompt_and_an_odd_start_image(tab):
    status = press_generate(tab, prompt="")[1]
    assert status.startswith("Done:") and "Note: the prompt is empty" in status
    status = press_generate(tab, prompt=LONG)[1]
    assert "Note: the prompt is 40 tokens long" in status
    rgba = Image.new("RGBA", (40, 8), (0, 0, 0, 0))
    last = press_generate(tab, init=rgba, strength=0.0)
    assert last[1].startswith("Done:") and "has another shape than 16x16" in last[1]
    assert np.array_equal(np.asarray(last[0])[4, 4], [255, 255, 255])   # white, not black


def _gone_checkpoint(studio, run_id: str) -> Path:
    path = studio.runner.runs_root / run_id / "checkpoints" / "step_0000010.safetensors"
    assert f"run/{run_id}/10" in [c for _, c in studio.checkpoint_choices()]
    path.unlink()
    return path


def test_a_checkpoint_deleted_while_chosen_gives_a_message_and_a_fresh_list(tab):
    studio, _ = tab
    assert press_generate(tab, cid="run/run-b/10")[1].startswith("Done:")   # loaded, cached
    _gone_checkpoint(studio, "run-b")
    last = press_generate(tab, cid="run/run-b/10")
    assert one_line(last[1]) == ("**Not generated:** the checkpoint `run/run-b/10` is no longer "
                                 "on disk (deleted by retention or by hand). The list is "
                                 "refreshed: choose another checkpoint.")
    choices, chosen = last[6].choices, last[6].value
    assert chosen is None and [c for _, c in choices] == [c for _, c in studio.checkpoint_choices()]
    assert "run/run-b/10" not in [c for _, c in choices] and last[7] == "Choose a checkpoint."


def test_a_checkpoint_deleted_while_it_loads(tab, tmp_path, monkeypatch):
    """Gone between the check of the choice and the loading of the file."""
    studio, _ = tab
    folder = studio.runner.runs_root / "run-c"
    cfg = tiny_cfg()
    save(folder, cfg, weights(*build(cfg)))
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    path = _gone_checkpoint(studio, "run-c")
    monkeypatch.setattr(studio, "checkpoint_path", lambda cid: path)
    last = press_generate(tab, cid="run/run-c/10")
    assert "the checkpoint `run/run-c/10` is no longer on disk" in one_line(last[1])
    assert last[6].value is None and "run/run-c/10" not in [c for _, c in last[6].choices]


def test_choosing_or_using_a_damaged_checkpoint_says_so(tab):
    studio, handlers = tab
    folder = studio.runner.runs_root / "run-d"
    cfg = tiny_cfg()
    path = save(folder, cfg, weights(*build(cfg)))
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model = handlers["model_args"]
    shown = model["fn"]("run/run-d/10", *[None] * (len(model["inputs"]) - 1))
    shown = [shown[handlers["model_info"]]]
    assert shown[0].startswith(f"**checkpoint '{path}' is damaged or not a safetensors file")
    assert "pick another checkpoint" in one_line(shown[0])
    status = press_generate(tab, cid="run/run-d/10")[1]
    assert status.startswith(f"**Not generated:** checkpoint '{path}' is damaged")
    assert "pick another checkpoint" in one_line(status)


def test_half_precision_a_cpu_would_emulate_is_refused(monkeypatch):
    import torch

    import engine.distributed as distributed
    from engine.generate import resolve_precision
    monkeypatch.setattr(distributed, "native_half", lambda precision: False)
    with pytest.raises(GenerateError) as err:
        resolve_precision("bfloat16", torch.device("cpu"))
    assert one_line(str(err.value)).startswith(
        "dtype = bfloat16: this CPU has no bf16 arithmetic")
    assert "use fp32" in str(err.value)
    assert resolve_precision(None, torch.device("cpu")) == "fp32"
    monkeypatch.setattr(distributed, "native_half", lambda precision: True)
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_images_that_overflow_fp16_are_made_again_in_fp32(pipe, monkeypatch):
    """GPUs before Ampere generate in fp16, whose range (65504) a model trained in bf16
    may exceed: NaN images would come out as noise. Those are made in fp32, and their
    PNG says so; a request in fp32 gives the same images."""
    import copy

    import engine.generate as generate
    real, asked = generate.render, []

    def render(*args, amp_dtype=None, **kwargs):
        asked.append(amp_dtype)
        out = real(*args, amp_dtype=None, **kwargs)   # the CPU computes fp32 here
        return torch.full_like(out, float("nan")) if amp_dtype == torch.float16 else out
    monkeypatch.setattr(generate, "render", render)
    half = copy.copy(pipe)
    half.precision = "fp16"
    kwargs = dict(seed=5, n=2, batch_size=1, steps=2, width=16, height=16)
    images = half.generate("a red circle", **kwargs)
    assert asked == [torch.float16, torch.float32, torch.float16, torch.float32]
    assert [im.params["dtype"] for im in images] == ["fp32", "fp32"]
    plain = pipe.generate("a red circle", **kwargs)
    for a, b in zip(images, plain, strict=True):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_a_network_that_gives_nan_is_named_not_drawn_as_noise(pipe, monkeypatch):
    import engine.generate as generate
    real = generate.render
    monkeypatch.setattr(generate, "render", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(GenerateError) as e:
        pipe.generate("a red circle", seed=9, steps=2, width=16, height=16)
    text = one_line(str(e.value))
    assert "NaN" in text and "seed 9" in text and "fp32" in text
    assert pipe.path.name in text and "earlier checkpoint" in text
