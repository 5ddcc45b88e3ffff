"""Generation: per-image seeds, sizes, img2img, PNG metadata and recall, checkpoint
loading (run folders, EMA/raw, builtin text weights), render_grid, the CLI and the
sampling benchmark, on a tiny model saved with engine.checkpoint and loaded back.

Closed forms: a network whose output layer is zeroed predicts its bias c everywhere.
With x-prediction every sampler returns x_hat = c; with v-prediction the flow has the
constant velocity c, which Euler and Heun integrate exactly: z_1 = eps + c.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from PIL import Image
from tiny import NET

from engine import __version__
from engine.bench import main as bench_main
from engine.checkpoint import CheckpointError, save_checkpoint
from engine.config import RunConfig, dump_yaml, load_preset
from engine.encoders import BuiltinTextEncoder, EncoderLoadError
from engine.generate import (
    Cancelled,
    GenerateError,
    Pipeline,
    from_pil,
    main,
    render,
    render_grid,
    resolve_checkpoint,
    to_pil,
)
from engine.model import PixelHDM
from engine.pngmeta import format_parameters, parse_parameters, read_png_parameters, save_png
from engine.sampling import SAMPLERS, NoiseStreams

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
TINY = [*NET, "text.max_tokens=16", "data.min_side=16", "data.max_side=32",
        "data.bucket_step=8", "sample.steps=3", "sample.width=16", "sample.height=16",
        "sample.prompts=[a red circle, a blue square on a white background]",
        "model.prediction=v"]   # the closed-form tests below integrate a constant velocity
FAST = dict(steps=2, width=16, height=16)


def tiny_cfg(*extra: str) -> RunConfig:
    return tiny.tiny_cfg(*TINY[len(NET):], *extra)   # patch 8, generation up to 128 px


def build(cfg: RunConfig, seed: int = 0) -> tuple[PixelHDM, BuiltinTextEncoder]:
    torch.manual_seed(seed)
    enc = BuiltinTextEncoder(cfg.text).eval()
    return PixelHDM(cfg.model, enc.dim).eval(), enc


def weights(net: PixelHDM, enc: BuiltinTextEncoder | None) -> dict:
    out = {f"net.{k}": v for k, v in net.state_dict().items()}
    if enc is not None:
        out.update({f"text.{k}": v for k, v in enc.state_dict().items()})
    return out


def save(run_dir: Path, cfg: RunConfig, model: dict, ema: dict | None = None, step: int = 10,
         text_dim: int = 32) -> Path:
    meta = {"run_id": run_dir.name, "config": dump_yaml(cfg), "text_dim": text_dim,
            "engine_version": __version__}
    return save_checkpoint(run_dir / "checkpoints", step, model, ema, meta, {}, {})


def constant_output(net: PixelHDM, c: tuple[float, float, float]) -> PixelHDM:
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.copy_(torch.tensor(c))
    return net


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder with one checkpoint whose EMA weights differ from the raw ones."""
    cfg = tiny_cfg()
    net, enc = build(cfg)
    raw = weights(net, enc)
    ema = {k: v + 0.05 * torch.randn_like(v) if k.startswith("net.") else v
           for k, v in raw.items()}
    run_dir = tmp_path_factory.mktemp("runs") / "run-a"
    save(run_dir, cfg, raw, ema)
    return run_dir


@pytest.fixture(scope="module")
def pipe(run) -> Pipeline:
    return Pipeline.load(run, device="cpu")


# --------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["heun", "euler_a"])
def test_seed_alone_equals_seed_in_batch_exactly(sampler):
    """Image i of a request is made from seed + i only: with a batch-independent network
    (constant velocity) the pixels are bit-identical alone and inside a batch, also with
    the fresh noise of the ancestral sampler's steps."""
    cfg = tiny_cfg()
    net, enc = build(cfg)
    constant_output(net, (0.1, -0.2, 0.3))
    opts = dict(steps=3, sampler=sampler, cfg=3.0, rescale=0.0, interval=(0.0, 1.0),
                shift=1.0)
    batch = render(net, enc.encode, ["a", "b", "a"], "", [5, 6, 7], 16, 24, **opts)
    alone = render(net, enc.encode, ["b"], "", [6], 16, 24, **opts)
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[2])  # same prompt, other seed


def test_the_ancestral_sampler_draws_fresh_noise_from_each_images_seed():
    """euler_a differs from Euler on the same seed (its steps' noise is used, not ignored),
    repeats exactly, and its step noise continues the image's own stream: the second draw
    of the seed's generator, not a shared or fixed one."""
    cfg = tiny_cfg()
    net, enc = build(cfg)
    constant_output(net, (0.1, -0.2, 0.3))
    opts = dict(steps=2, cfg=1.0, rescale=0.0, interval=(0.0, 1.0), shift=1.0)
    euler = render(net, enc.encode, ["a"], "", [5], 16, 16, sampler="euler", **opts)
    ancestral = render(net, enc.encode, ["a"], "", [5], 16, 16, sampler="euler_a", **opts)
    assert not torch.equal(euler, ancestral)
    again = render(net, enc.encode, ["a"], "", [5], 16, 16, sampler="euler_a", **opts)
    assert torch.equal(ancestral, again)
    # two steps at t = 0 and 0.5: the first keeps nothing of the initial noise (r = 0), so
    # z(0.5) = 0.5 x_hat + 0.5 xi with xi the stream's second draw; the network's constant
    # velocity v gives x_hat = z + (1 - t) v at each step, and the result is x_hat(0.5)
    v = torch.tensor((0.1, -0.2, 0.3)).view(3, 1, 1)
    stream = torch.Generator().manual_seed(5)
    z0 = torch.randn(3, 16, 16, generator=stream)
    xi = torch.randn(3, 16, 16, generator=stream)
    z_half = 0.5 * (z0 + v) + 0.5 * xi
    torch.testing.assert_close(ancestral[0], (z_half + 0.5 * v).clamp(-1, 1), atol=1e-5,
                               rtol=0)


def test_seed_alone_vs_batch_and_different_seeds(pipe):
    batch = pipe.generate("a red circle", seed=7, n=3, **FAST)
    alone = pipe.generate("a red circle", seed=8, n=1, **FAST)
    assert [r.params["seed"] for r in batch] == [7, 8, 9]
    assert alone[0].params["seed"] == 8
    # equal up to the rounding of batched matrix kernels (1e-7), i.e. at most one level
    diff = np.abs(pixels(batch[1].image) - pixels(alone[0].image))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert np.abs(pixels(batch[0].image) - pixels(batch[1].image)).mean() > 5


def test_random_seed_is_recorded_and_reproduces(pipe):
    first = pipe.generate("a blue square", seed=-1, **FAST)[0]
    seed = first.params["seed"]
    assert isinstance(seed, int) and seed >= 0
    again = pipe.generate("a blue square", seed=seed, **FAST)[0]
    assert np.array_equal(pixels(first.image), pixels(again.image))


def test_several_prompts_with_n_images(pipe):
    out = pipe.generate(["a red circle", "a blue square"], seed=100, n=2, batch_size=3, **FAST)
    assert [(r.params["prompt"], r.params["seed"]) for r in out] == [
        ("a red circle", 100), ("a red circle", 101), ("a blue square", 102),
        ("a blue square", 103)]
    # chunked batches give the same images as one batch
    whole = pipe.generate(["a red circle", "a blue square"], seed=100, n=2, **FAST)
    for a, b in zip(out, whole):
        assert np.abs(pixels(a.image) - pixels(b.image)).max() <= 1


def test_starting_noise_is_per_seed():
    both = NoiseStreams([3, 4], 8, 16).draw()
    assert both.shape == (2, 3, 16, 8) and both.dtype == torch.float32
    assert torch.equal(both[1], NoiseStreams([4], 8, 16).draw()[0])


# --------------------------------------------------------------------------------------
# Requests checked with clear messages
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(width=20), r"width = 20 .*multiple of the patch size 8 from 8 to 128 "
                     r"\(nearest: 16 or 24\)"),
    (dict(height=0), r"height = 0 .*from 8 to 128"),
    (dict(width=136), r"width = 136 .*from 8 to 128 \(nearest: 128\)"),
    (dict(sampler="ddim"), r"sampler = 'ddim': allowed euler, heun, dpmpp_2m, ab2, euler_a"),
    (dict(steps=0), r"steps = 0"),
    (dict(rescale=1.5), r"rescale = 1\.5"),
    (dict(interval=(0.8, 0.2)), r"interval = \[0\.8, 0\.2\]"),
    (dict(ramp=1.5), r"ramp = 1\.5"),
    (dict(pag=-0.5), r"pag = -0\.5: allowed a number >= 0"),
    (dict(coarse=-1.0), r"cfg_coarse = -1\.0: allowed a number >= 0"),
    (dict(coarse=2.0, coarse_sigma=0.0), r"cfg_coarse_sigma = 0\.0: allowed 0\.1 to 64"),
    (dict(seed=-5), r"seed = -5"),
    (dict(n=0), r"n = 0"),
])
def test_bad_requests_name_the_value(pipe, kwargs, message):
    with pytest.raises(GenerateError, match=message):
        pipe.generate("a red circle", **{**dict(steps=2), **kwargs})


# --------------------------------------------------------------------------------------
# img2img
# --------------------------------------------------------------------------------------

def _init_image(w: int = 24, h: int = 16) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_img2img_strength_0_returns_the_init_image(pipe):
    init = _init_image()
    out = pipe.generate("a red circle", seed=1, steps=4, init_image=init, strength=0.0)[0]
    assert out.image.size == (24, 16)  # the init image's size by default
    assert np.array_equal(pixels(out.image), pixels(init))
    assert out.params["strength"] == 0.0


def test_img2img_strength_1_equals_text_to_image(pipe):
    init = _init_image()
    i2i = pipe.generate("a red circle", seed=3, steps=3, init_image=init, strength=1.0)[0]
    t2i = pipe.generate("a red circle", seed=3, steps=3, width=24, height=16)[0]
    assert np.array_equal(pixels(i2i.image), pixels(t2i.image))
    half = pipe.generate("a red circle", seed=3, steps=3, init_image=init, strength=0.5)[0]
    assert not np.array_equal(pixels(half.image), pixels(t2i.image))
    assert not np.array_equal(pixels(half.image), pixels(init))


def test_img2img_default_size_and_cover_crop(pipe):
    init = _init_image(41, 30)
    out = pipe.generate("x", seed=0, steps=2, init_image=init, strength=0.0)[0]
    assert out.image.size == (40, 32)  # rounded to multiples of the patch size 8
    big = pipe.generate("x", seed=0, steps=1, init_image=_init_image(300, 150), strength=0.0)[0]
    assert big.image.size == (128, 64)  # scaled down to the 128 px limit first


def test_pil_round_trip_is_exact():
    image = _init_image()
    assert np.array_equal(pixels(to_pil(from_pil(image))[0]), pixels(image))


# --------------------------------------------------------------------------------------
# Progress, preview and cancelling
# --------------------------------------------------------------------------------------

def test_progress_callback_counts_over_batches_and_can_cancel(pipe):
    seen = []
    pipe.generate("a red circle", seed=0, n=2, batch_size=1, sampler="heun",
                  callback=lambda step, total, im: seen.append((step, total, im and im.size)),
                  **FAST)
    assert [(s, t) for s, t, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    # a preview at the first step and the last, and in between at most every 0.5 s
    assert seen[0][2] == seen[-1][2] == (16, 16)

    def cancel(step, total, image):
        raise Cancelled()
    with pytest.raises(Cancelled):
        pipe.generate("a red circle", seed=0, n=3, callback=cancel, **FAST)
    grid = []
    pipe.generate("a", seed=0, n=3, callback=lambda s, t, im: grid.append(im and im.size),
                  **FAST)
    assert grid[0] == (32, 32)  # three images tiled 2 x 2


def test_noise_goes_to_a_gpu_through_pinned_memory_without_waiting(monkeypatch):
    """Fresh noise is drawn on the CPU (an image depends only on its seed, on any device)
    and copied to the GPU at every step of a stochastic sampler: from pinned memory and
    non-blocking, since a copy from pageable memory first drains the GPU's queue."""
    import engine.generate as generate
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)
    real_to = torch.Tensor.to

    def to(t, *args, **kwargs):
        calls.append(("to", str(args[0]), kwargs.get("non_blocking", False)))
        return t if str(args[0]).startswith("cuda") else real_to(t, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", to)
    generate.to_device(torch.zeros(2), torch.device("cuda", 0))
    assert calls == ["pin", ("to", "cuda:0", True)]
    calls.clear()
    generate.to_device(torch.zeros(2), "cpu")
    assert calls == [("to", "cpu", False)]


def test_previews_are_made_at_most_every_half_second(pipe, monkeypatch):
    """A preview copies the batch from the GPU and is encoded for the browser: on a fast
    GPU, at every step both would cost more than the step. Steps in between get None."""
    import engine.generate as generate
    clock = iter([0.0, 0.1, 0.2, 0.6, 0.7, 0.8, 0.9, 1.0])
    monkeypatch.setattr(generate.time, "monotonic", lambda: next(clock))
    seen = []
    pipe.generate("a red circle", seed=0, n=1, sampler="euler", steps=8,
                  callback=lambda step, total, im: seen.append(im is not None),
                  **{k: v for k, v in FAST.items() if k not in ("steps", "sampler")})
    assert seen == [True, False, False, True, False, False, False, True]


# --------------------------------------------------------------------------------------
# PNG metadata and recall
# --------------------------------------------------------------------------------------

def test_png_metadata_round_trip(pipe, tmp_path):
    out = pipe.generate("a red circle, flat colours", negative="blurry, dark", seed=42, n=2,
                        cfg=2.5, rescale=0.7, interval=(0.1, 0.9), shift=2.0, sampler="dpmpp_2m",
                        steps=2, width=24, height=16, ramp=0.4)
    paths = [save_png(r.image, r.params, tmp_path) for r in out]
    assert [p.name for p in paths] == ["00001-42.png", "00002-43.png"]
    for r, path in zip(out, paths):
        recalled = read_png_parameters(path)
        assert {k: v for k, v in recalled.items() if k != "format"} == r.params
        assert read_png_parameters(r.image) == recalled  # in-memory images carry it too
        with Image.open(path) as im:
            assert np.array_equal(pixels(im.convert("RGB")), pixels(r.image))
    p = out[1].params
    assert p["seed"] == 43 and p["run_id"] == "run-a" and p["checkpoint_step"] == 10
    assert p["weights"] == "ema" and len(p["checkpoint_hash"]) == 10
    assert p["engine_version"] == __version__ and p["strength"] is None
    # the `parameters` text alone recalls the settings other tools understand, and ours
    with Image.open(paths[1]) as im:
        text = im.text["parameters"]
    assert text.splitlines()[:2] == ["a red circle, flat colours", "Negative prompt: blurry, dark"]
    parsed = parse_parameters(text)
    for key in ("prompt", "negative", "steps", "sampler", "cfg", "seed", "width", "height",
                "rescale", "interval", "ramp", "shift", "checkpoint_hash", "run_id",
                "checkpoint_step", "weights", "prediction", "engine_version"):
        assert parsed[key] == p[key], key


def test_save_png_never_overwrites(pipe, tmp_path):
    r = pipe.generate("a", seed=5, **FAST)[0]
    (tmp_path / "00007-1.png").write_bytes(b"keep")
    path = save_png(r.image, r.params, tmp_path)
    assert path.name == "00008-5.png"
    assert (tmp_path / "00007-1.png").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00007-1.png", "00008-5.png"]


def test_parse_foreign_parameters_text(tmp_path):
    text = ("masterpiece, a cat sitting on a chair\nsecond line of the prompt\n"
            "Negative prompt: blurry, lowres\nugly\n"
            "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 3141592653, "
            "Size: 832x1216, Model hash: 1a2b3c4d5e, Model: someModel_v10, "
            "Denoising strength: 0.4, Lora hashes: \"foo: abc, bar: def\", Version: v1.10.1")
    image = Image.new("RGB", (8, 8))
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", text)
    image.save(tmp_path / "a1111.png", pnginfo=info)
    p = read_png_parameters(tmp_path / "a1111.png")
    assert p["prompt"] == "masterpiece, a cat sitting on a chair\nsecond line of the prompt"
    assert p["negative"] == "blurry, lowres\nugly"
    assert (p["steps"], p["sampler"], p["cfg"], p["seed"]) == (28, "dpmpp_2m", 7.0, 3141592653)
    assert (p["width"], p["height"], p["strength"]) == (832, 1216, 0.4)
    assert (p["checkpoint_hash"], p["run_id"]) == ("1a2b3c4d5e", "someModel_v10")
    assert p["other"] == {"Lora hashes": "foo: abc, bar: def", "Version": "v1.10.1"}
    assert parse_parameters("just a prompt") == {"prompt": "just a prompt", "negative": ""}
    assert parse_parameters("p\nSteps: 20, Sampler: Euler a, Seed: 1")["sampler"] == "euler_a"
    assert parse_parameters("p\nSteps: 20, Sampler: DPM++ SDE, Seed: 1")["sampler"] == "DPM++ SDE"
    assert read_png_parameters(Image.new("RGB", (4, 4))) == {}


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------

def test_run_folder_resolves_to_the_newest_checkpoint(tmp_path):
    cfg = tiny_cfg()
    net, enc = build(cfg)
    for step in (20, 100, 3):
        save(tmp_path / "run-b", cfg, weights(net, enc), step=step)
    newest = tmp_path / "run-b" / "checkpoints" / "step_0000100.safetensors"
    assert resolve_checkpoint(tmp_path / "run-b") == newest
    assert resolve_checkpoint(tmp_path / "run-b" / "checkpoints") == newest
    loaded = Pipeline.load(tmp_path / "run-b", device="cpu")
    assert loaded.step == 100 and loaded.weights == "raw"  # saved without EMA
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        Pipeline.load(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="damaged"):
        Pipeline.load(tmp_path / "bad.safetensors")


def test_ema_and_raw_weights(run, pipe):
    raw = Pipeline.load(run, ema=False, device="cpu")
    assert (pipe.weights, raw.weights) == ("ema", "raw")
    a = pipe.generate("a red circle", seed=1, **FAST)[0]
    b = raw.generate("a red circle", seed=1, **FAST)[0]
    assert b.params["weights"] == "raw"
    assert np.abs(pixels(a.image) - pixels(b.image)).mean() > 1


def test_builtin_text_weights_come_from_the_checkpoint(tmp_path):
    cfg = tiny_cfg()
    net, enc = build(cfg)
    save(tmp_path / "one", cfg, weights(net, enc))
    with torch.no_grad():
        enc.embed.weight.mul_(-3.0)
    save(tmp_path / "two", cfg, weights(net, enc))
    a = Pipeline.load(tmp_path / "one", device="cpu").generate("a red circle", seed=2, **FAST)[0]
    b = Pipeline.load(tmp_path / "two", device="cpu").generate("a red circle", seed=2, **FAST)[0]
    assert np.abs(pixels(a.image) - pixels(b.image)).mean() > 1
    save(tmp_path / "three", cfg, weights(net, None))
    with pytest.raises(EncoderLoadError, match="no text.* weights"):
        Pipeline.load(tmp_path / "three", device="cpu")
    save(tmp_path / "four", tiny_cfg("model.hidden_dim=64", "model.num_heads=4"), weights(net, enc))
    with pytest.raises(CheckpointError, match="do not fit the network its config describes"):
        Pipeline.load(tmp_path / "four", device="cpu")


def test_qwen3_text_encoder_from_the_config(tmp_path, tiny_qwen3):
    cfg = tiny_cfg("text.encoder=qwen3", f"text.name_or_path={tiny_qwen3}")
    torch.manual_seed(0)
    net = PixelHDM(cfg.model, 64)
    save(tmp_path / "q", cfg, weights(net, None), text_dim=64)
    out = Pipeline.load(tmp_path / "q", device="cpu").generate("a red circle", seed=0, **FAST)
    assert out[0].image.size == (16, 16)
    save(tmp_path / "w", cfg, weights(PixelHDM(cfg.model, 48), None), text_dim=48)
    with pytest.raises(EncoderLoadError, match="has hidden size 64, but checkpoint 'step_00000"
                       "10.safetensors' was trained with one of hidden size 48"):
        Pipeline.load(tmp_path / "w", device="cpu")


# --------------------------------------------------------------------------------------
# Both prediction types (closed form) and render_grid
# --------------------------------------------------------------------------------------

C = (0.25, -0.5, 0.75)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_v_prediction_integrates_a_constant_velocity_exactly(sampler):
    cfg = tiny_cfg()
    net, enc = build(cfg)
    constant_output(net, C)
    out = render(net, enc.encode, ["a"], "", [9], 16, 16, steps=4, sampler=sampler, cfg=4.0,
                 rescale=0.0, interval=(0.0, 1.0), shift=3.0)
    expected = (NoiseStreams([9], 16, 16).draw() + torch.tensor(C).view(1, 3, 1, 1)).clamp(-1, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_x_prediction_returns_the_predicted_image(tmp_path):
    cfg = tiny_cfg("model.prediction=x")
    net, enc = build(cfg)
    constant_output(net, C)
    save(tmp_path / "x", cfg, weights(net, enc))
    for sampler in SAMPLERS:
        out = Pipeline.load(tmp_path / "x", device="cpu").generate(
            "a", seed=4, sampler=sampler, **FAST)[0]
        expected = np.round((np.array(C) + 1) * 127.5)
        assert np.array_equal(pixels(out.image), np.broadcast_to(expected, (16, 16, 3)))
        assert out.params["prediction"] == "x"


def test_guidance_ramp_changes_the_image_and_defaults_to_the_run(pipe):
    """ramp=None takes the checkpoint's sample.cfg_ramp (0 in this run); a ramp weakens the
    guidance near noise and so changes the picture; the PNG says which ramp made it."""
    kw = dict(seed=5, steps=3, cfg=4.0, interval=(0.0, 1.0))
    plain, default, ramped = (pipe.generate("a red circle", ramp=r, **kw)[0]
                              for r in (0.0, None, 0.6))
    assert pipe.cfg.sample.cfg_ramp == 0.0 and default.params["ramp"] == 0.0
    assert np.array_equal(pixels(plain.image), pixels(default.image))
    assert not np.array_equal(pixels(plain.image), pixels(ramped.image))
    assert ramped.params["ramp"] == 0.6 and "CFG ramp: 0.6" in format_parameters(ramped.params)


def test_perturbed_attention_guidance_changes_the_image_and_defaults_to_the_run(pipe,
                                                                               monkeypatch):
    """pag=None takes the checkpoint's sample.pag (0: off); a scale changes the picture
    and the PNG says which; layers the network does not have are refused."""
    monkeypatch.setattr(pipe.cfg.sample, "pag_layers", [1])   # this network has one block
    monkeypatch.setattr(pipe.cfg.sample, "pag_interval", [0.0, 1.0])   # 3 steps: t = 0, 1/3, 2/3
    kw = dict(seed=5, steps=3, cfg=4.0, interval=(0.0, 1.0))
    plain, default, guided = (pipe.generate("a red circle", pag=g, **kw)[0]
                              for g in (0.0, None, 2.0))
    assert pipe.cfg.sample.pag == 0.0 and default.params["pag"] == 0.0
    assert np.array_equal(pixels(plain.image), pixels(default.image))
    assert not np.array_equal(pixels(plain.image), pixels(guided.image))
    assert guided.params["pag"] == 2.0 and "PAG scale: 2" in format_parameters(guided.params)
    assert parse_parameters(format_parameters(guided.params))["pag"] == 2.0
    with pytest.raises(GenerateError, match=r"pag_layers = \[2\]: allowed patch blocks 1 to 1"):
        render(pipe.net, pipe.encode, ["a red circle"], "", [0], 16, 16, steps=2,
               sampler="heun", cfg=4.0, rescale=0.0, interval=(0.0, 1.0), shift=1.0, pag=1.0,
               pag_layers=(2,))


def test_coarse_guidance_changes_the_image_and_defaults_to_the_run(pipe, monkeypatch):
    """coarse=None takes the checkpoint's sample.cfg_coarse and cfg_coarse_sigma; a coarse
    scale changes the picture, and the PNG says which scale and blur made it."""
    monkeypatch.setattr(pipe.cfg.sample, "cfg_coarse", 0.0)
    kw = dict(seed=5, steps=3, cfg=4.0, interval=(0.0, 1.0))
    plain, default, coarse = (pipe.generate("a red circle", coarse=g, **kw)[0]
                              for g in (0.0, None, 2.0))
    assert default.params["coarse"] == 0.0
    assert np.array_equal(pixels(plain.image), pixels(default.image))
    assert not np.array_equal(pixels(plain.image), pixels(coarse.image))
    text = format_parameters(coarse.params)
    assert "CFG coarse: 2.0" in text and "CFG coarse blur: 1.5" in text
    assert parse_parameters(text)["coarse"] == 2.0
    assert "CFG coarse blur" not in format_parameters(plain.params)
    monkeypatch.setattr(pipe.cfg.sample, "cfg_coarse", 2.0)
    assert np.array_equal(pixels(pipe.generate("a red circle", **kw)[0].image),
                          pixels(coarse.image))
    monkeypatch.setattr(pipe.cfg.sample, "cfg_coarse_sigma", 3.0)
    run = pipe.generate("a red circle", **kw)[0]
    assert run.params["coarse"] == 2.0 and run.params["coarse_sigma"] == 3.0
    assert not np.array_equal(pixels(run.image), pixels(coarse.image))   # another blur
    # a blur given with the request wins over the run's, and the PNG records it
    asked = pipe.generate("a red circle", coarse_sigma=1.5, **kw)[0]
    assert asked.params["coarse_sigma"] == 1.5
    assert np.array_equal(pixels(asked.image), pixels(coarse.image))
    assert parse_parameters(format_parameters(run.params))["coarse_sigma"] == 3.0


def test_noise_interval_of_stochastic_samplers_defaults_to_the_run(pipe, monkeypatch):
    """noise_interval=None takes the checkpoint's sample.noise_interval; with euler_a an
    interval that holds no step draws the Euler picture, a wider one another; the PNG
    names the interval of a stochastic sampler (and reads it back), a deterministic
    sampler's PNG names none; a bad interval is refused."""
    kw = dict(seed=5, steps=4, cfg=4.0, interval=(0.0, 1.0))
    monkeypatch.setattr(pipe.cfg.sample, "noise_interval", [0.8, 0.9])
    default = pipe.generate("a red circle", sampler="euler_a", **kw)[0]
    euler = pipe.generate("a red circle", sampler="euler", **kw)[0]
    wide = pipe.generate("a red circle", sampler="euler_a", noise_interval=(0.0, 0.5), **kw)[0]
    assert np.array_equal(pixels(default.image), pixels(euler.image))
    assert not np.array_equal(pixels(wide.image), pixels(euler.image))
    assert default.params["noise_interval"] == [0.8, 0.9] and euler.params["noise_interval"] is None
    text = format_parameters(wide.params)
    assert "Noise interval: 0.0-0.5" in text and "Noise interval" not in \
        format_parameters(euler.params)
    assert parse_parameters(text)["noise_interval"] == [0.0, 0.5]
    with pytest.raises(GenerateError, match=r"noise_interval = \[0.5, 0.2\]: allowed"):
        pipe.generate("a red circle", sampler="euler_a", noise_interval=(0.5, 0.2), **kw)


def test_render_grid_matches_the_pipeline(pipe):
    grid = render_grid(pipe.net, pipe.encode, pipe.cfg, "cpu", "bf16")
    s = pipe.cfg.sample
    assert grid.shape == (2, 3, 16, 16) and grid.dtype == torch.float32
    assert grid.min() >= -1 and grid.max() <= 1
    assert torch.equal(grid, render_grid(pipe.net, pipe.encode, pipe.cfg, "cpu", "fp32"))
    out = pipe.generate(list(s.prompts), seed=s.seed)
    for image, r in zip(to_pil(grid), out):
        assert np.array_equal(pixels(image), pixels(r.image))


# --------------------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_end_to_end(run, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "engine.generate", "--checkpoint", str(run), "--prompt",
           "a red circle", "--n", "2", "--steps", "2", "--seed", "3", "--out", str(tmp_path),
           "--device", "cpu", "--cfg-coarse", "2", "--cfg-coarse-blur", "2.5"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    paths = [Path(line) for line in done.stdout.splitlines()]
    assert [p.name for p in paths] == ["00001-3.png", "00002-4.png"]
    params = read_png_parameters(paths[1])
    assert params["seed"] == 4 and (params["width"], params["height"]) == (16, 16)
    cfg = load_preset("tiny-cpu").sample                         # the run's sample settings
    assert params["cfg"] == cfg.cfg and params["sampler"] == cfg.sampler
    assert params["noise_interval"] == cfg.noise_interval
    assert (params["coarse"], params["coarse_sigma"]) == (2.0, 2.5)
    bad = subprocess.run(cmd[:4] + [str(tmp_path / "missing"), *cmd[5:]], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""   # a file that cannot be used
    assert len(bad.stderr.strip().splitlines()) == 1 and "does not exist" in bad.stderr


def test_cli_bad_arguments_exit_2(run, tmp_path, capsys):
    base = ["--checkpoint", str(run), "--prompt", "a", "--out", str(tmp_path)]
    assert main(base + ["--width", "20", "--device", "cpu"]) == 2
    assert "width = 20" in capsys.readouterr().err
    assert main(base + ["--noise-interval", "0.6,0.2", "--device", "cpu"]) == 2
    assert "noise_interval = [0.6, 0.2]: allowed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(base + ["--strength", "0.5"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--strength needs --init" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_bench_sample_reports_every_sampler_and_size(capsys):
    code = bench_main(["sample", "--preset", "tiny-cpu", *sum((["--set", o] for o in TINY), []),
                       "--sizes", "16x16,24x16", "--steps", "2", "--samplers", "euler,heun",
                       "--repeats", "1", "--device", "cpu", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["rows"]
    assert [(r["sampler"], r["size"]) for r in rows] == [
        ("euler", "16x16"), ("heun", "16x16"), ("euler", "24x16"), ("heun", "24x16")]
    assert [r["model_evals"] for r in rows] == [2, 3, 2, 3]
    assert all(r["seconds_per_image"] > 0 for r in rows)
    assert bench_main(["sample", "--preset", "tiny-cpu", "--sizes", "30x30"]) == 2
    assert "width = 30" in capsys.readouterr().err
