"""Classifier-free guidance as the samplers call it (engine.sampling.cfg_model): one
batched forward per step, the guidance interval, rescale, ramp, perturbed-attention
guidance and guidance by detail scale, against the closed-form Gaussian oracle of
test_sampling, and a guided run on the meta device that reads nothing back."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from engine.sampling import SAMPLERS, cfg_model, gaussian_blur, sample_euler, time_grid
from tests.test_sampling import F64, SHAPE, col, gaussian_clean, noise

torch.set_num_threads(1)


@dataclass
class Cond:
    """A stand-in for the model's conditioning: a per-sample offset and scale of the clean
    estimate, and a mask that only travels along."""
    offset: Tensor  # (B, C, 1, 1)
    gain: Tensor  # (B, 1, 1, 1)
    mask: Tensor  # (B, 4) bool
    cat_calls = 0

    @staticmethod
    def cat(conds):
        Cond.cat_calls += 1
        keys = ("offset", "gain", "mask")
        return Cond(*(torch.cat([getattr(c, k) for c in conds]) for k in keys))


def make_cond(b: int, seed: int) -> Cond:
    g = torch.Generator().manual_seed(seed)
    return Cond(torch.randn(b, SHAPE[0], 1, 1, generator=g, dtype=F64),
                torch.rand(b, 1, 1, 1, generator=g, dtype=F64) + 0.5,
                torch.rand(b, 4, generator=g) > 0.5)


class Denoiser:
    """denoise(z, t, c) that records each call (batch size, times, conditioning)."""

    def __init__(self):
        self.calls = []

    def __call__(self, z, t, c):
        self.calls.append((z.shape[0], t.clone(), c))
        return c.gain * gaussian_clean(z, t) + c.offset


@pytest.fixture
def conds():
    Cond.cat_calls = 0
    return make_cond(3, 10), make_cond(3, 11)


def test_scale_one_is_the_conditional_model(conds):
    cond, uncond = conds
    den = Denoiser()
    z, t = noise(3), torch.full((3,), 0.4, dtype=F64)
    out = cfg_model(den, cond, uncond, 1.0, rescale=0.7)(z, t)
    assert torch.equal(out, Denoiser()(z, t, cond))
    assert [(b, c) for b, _, c in den.calls] == [(3, cond)] and Cond.cat_calls == 0


def test_standard_guidance_in_one_batched_forward_per_step(conds):
    cond, uncond = conds
    den = Denoiser()
    model = cfg_model(den, cond, uncond, 4.0)
    z, t = noise(3), torch.full((3,), 0.3, dtype=F64)
    c, u = Denoiser()(z, t, cond), Denoiser()(z, t, uncond)
    assert torch.allclose(model(z, t), u + 4.0 * (c - u), atol=1e-12)
    batch, _, both = den.calls[0]
    assert batch == 6  # cond and uncond concatenated along the batch, cond first
    for key in ("offset", "gain", "mask"):
        expected = torch.cat([getattr(cond, key), getattr(uncond, key)])
        assert torch.equal(getattr(both, key), expected)
    den.calls.clear()
    sample_euler(model, noise(3), time_grid(8))
    assert [b for b, _, _ in den.calls] == [6] * 8
    assert Cond.cat_calls == 1  # concatenated once, not per step


def test_interval_switches_guidance_exactly_at_its_ends(conds):
    cond, uncond = conds
    den = Denoiser()
    model = cfg_model(den, cond, uncond, 3.0, interval=(0.25, 0.75))
    sample_euler(model, noise(3), time_grid(8))  # t = k / 8, exact in binary
    branches = [(t[0].item(), b) for b, t, _ in den.calls]
    guided = {0.25, 0.375, 0.5, 0.625, 0.75}
    assert branches == [(k / 8, 6 if k / 8 in guided else 3) for k in range(8)]
    assert all(c is cond for b, _, c in den.calls if b == 3)
    # outside the interval the output is the conditional prediction itself
    z, t = noise(3), torch.full((3,), 0.125, dtype=F64)
    assert torch.equal(model(z, t), Denoiser()(z, t, cond))


def test_interval_per_sample_in_a_mixed_batch(conds):
    cond, uncond = conds
    model = cfg_model(Denoiser(), cond, uncond, 3.0, interval=(0.3, 1.0))
    z, t = noise(3), torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    c, u = Denoiser()(z, t, cond), Denoiser()(z, t, uncond)
    expected = torch.cat([c[:1], (u + 3.0 * (c - u))[1:]])
    assert torch.allclose(model(z, t), expected, atol=1e-12)


def test_rescale_keeps_the_conditional_velocity_std(conds):
    cond, uncond = conds
    z, t = noise(3), torch.tensor([0.2, 0.5, 0.8], dtype=F64)

    def velocity(x_hat):
        return (x_hat - z) / (1 - col(t))

    def std(v):
        return v.flatten(1).std(1)

    v_cond = velocity(Denoiser()(z, t, cond))
    plain = velocity(cfg_model(Denoiser(), cond, uncond, 5.0)(z, t))
    full = velocity(cfg_model(Denoiser(), cond, uncond, 5.0, rescale=1.0)(z, t))
    half = velocity(cfg_model(Denoiser(), cond, uncond, 5.0, rescale=0.5)(z, t))
    assert not torch.allclose(std(plain), std(v_cond), rtol=0.05)
    assert torch.allclose(std(full), std(v_cond), rtol=1e-9)
    assert torch.allclose(full, col(std(full) / std(plain)) * plain, atol=1e-12)
    assert torch.allclose(half, 0.5 * full + 0.5 * plain, atol=1e-12)
    zero = velocity(cfg_model(Denoiser(), cond, uncond, 5.0, rescale=0.0)(z, t))
    assert torch.equal(zero, plain)


def test_ramp_grows_the_scale_linearly_until_full(conds):
    """w(t) = 1 + (scale - 1) min(1, t / ramp), per sample, inside the interval only."""
    cond, uncond = conds
    model = cfg_model(Denoiser(), cond, uncond, 5.0, interval=(0.1, 0.8), ramp=0.5)
    z, t = noise(3), torch.tensor([0.2, 0.45, 0.6], dtype=F64)
    c, u = Denoiser()(z, t, cond), Denoiser()(z, t, uncond)
    w = col(torch.tensor([1.0 + 4.0 * 0.4, 1.0 + 4.0 * 0.9, 5.0], dtype=F64))
    assert torch.allclose(model(z, t), u + w * (c - u), atol=1e-12)
    # outside the interval: the conditional prediction, as without a ramp
    t_out = torch.full((3,), 0.05, dtype=F64)
    assert torch.equal(model(z, t_out), Denoiser()(z, t_out, cond))
    # ramp 0 is plain guidance
    assert torch.equal(cfg_model(Denoiser(), cond, uncond, 5.0, ramp=0.0)(z, t),
                       cfg_model(Denoiser(), cond, uncond, 5.0)(z, t))


class PerturbedDenoiser(Denoiser):
    """A Denoiser whose perturbed branch (perturbed-attention guidance) predicts 0.3 less
    gain: denoise(z, t, c, perturbed=True)."""

    def __call__(self, z, t, c, perturbed=False):
        self.calls.append((z.shape[0], t.clone(), c, perturbed))
        gain = c.gain - (0.3 if perturbed else 0.0)
        return gain * gaussian_clean(z, t) + c.offset


def test_perturbed_attention_guidance_moves_away_from_the_perturbed_estimate(conds):
    """+ pag (c - p) for samples with t in pag_interval, on top of classifier-free
    guidance where that applies; nothing else changes, and the perturbed branch runs only
    when a sample is inside its interval."""
    cond, uncond = conds
    z = noise(3)
    t = torch.tensor([0.05, 0.3, 0.6], dtype=F64)     # before guidance, both, CFG only
    den = PerturbedDenoiser()
    out = cfg_model(den, cond, uncond, 5.0, interval=(0.1, 0.8), pag=2.0,
                    pag_interval=(0.0, 0.4))(z, t)
    c, u = Denoiser()(z, t, cond), Denoiser()(z, t, uncond)
    p = PerturbedDenoiser()(z, t, cond, perturbed=True)
    inside = col(torch.tensor([0.0, 1.0, 1.0], dtype=F64))
    perturb = col(torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    want = c + inside * 4.0 * (c - u) + perturb * 2.0 * (c - p)
    assert torch.allclose(out, want, atol=1e-12)
    assert [(b, perturbed) for b, _, _, perturbed in den.calls] == [(6, False), (3, True)]
    # without CFG the term is added to the conditional estimate
    alone = cfg_model(PerturbedDenoiser(), cond, uncond, 1.0, pag=2.0)(z, t)
    assert torch.allclose(alone, c + 2.0 * (c - p), atol=1e-12)
    # outside its interval, and at scale 0, the perturbed branch does not run
    den = PerturbedDenoiser()
    late = torch.full((3,), 0.6, dtype=F64)
    assert torch.equal(cfg_model(den, cond, uncond, 5.0, pag=2.0, pag_interval=(0.0, 0.4))(
        z, late), cfg_model(Denoiser(), cond, uncond, 5.0)(z, late))
    assert not any(perturbed for *_, perturbed in den.calls)
    assert torch.equal(cfg_model(PerturbedDenoiser(), cond, uncond, 5.0, pag=0.0)(z, t),
                       cfg_model(Denoiser(), cond, uncond, 5.0)(z, t))


def test_gaussian_blur_keeps_flat_areas_and_removes_pixel_grain():
    flat = torch.full((2, 3, 9, 7), 0.3, dtype=F64)
    assert torch.allclose(gaussian_blur(flat, 1.5), flat, atol=1e-12)
    i, j = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    checker = ((-1.0) ** (i + j)).to(F64).expand(1, 3, 24, 24)
    assert gaussian_blur(checker, 1.5).abs().max() < 1e-3
    # an impulse spreads over sigma pixels per axis and keeps its mass
    impulse = torch.zeros(1, 1, 31, 31, dtype=F64)
    impulse[..., 15, 15] = 1.0
    for sigma in (0.7, 1.5, 3.0):
        out = gaussian_blur(impulse, sigma)[0, 0]
        assert out.sum().item() == pytest.approx(1.0, abs=1e-12)
        rows = out.sum(1)
        var = (rows * (torch.arange(31, dtype=F64) - 15) ** 2).sum().item()
        assert var == pytest.approx(sigma ** 2, rel=0.02)
    tiny = torch.randn(2, 3, 2, 2, dtype=F64)       # smaller than the kernel: edges repeated
    assert gaussian_blur(tiny, 1.5).shape == tiny.shape


def test_coarse_guidance_scales_the_blurred_update_and_the_rest_apart(conds):
    """c + (coarse - 1) blur(d) + (scale - 1) (d - blur(d)) with d = c - u: coarse = scale
    and coarse = 0 are plain guidance, a ramp scales both parts alike, and coarse alone
    (scale 1) guides only the coarse part."""
    cond, uncond = conds
    z, t = noise(3), torch.tensor([0.2, 0.5, 0.7], dtype=F64)
    c, u = Denoiser()(z, t, cond), Denoiser()(z, t, uncond)
    d = c - u
    b = gaussian_blur(d, 1.5)
    assert (d - b).abs().max() > 0.05 and b.abs().max() > 0.05     # both parts present
    out = cfg_model(Denoiser(), cond, uncond, 5.0, coarse=2.0, coarse_sigma=1.5)(z, t)
    assert torch.allclose(out, c + 1.0 * b + 4.0 * (d - b), atol=1e-12)
    plain = cfg_model(Denoiser(), cond, uncond, 5.0)(z, t)
    assert torch.allclose(cfg_model(Denoiser(), cond, uncond, 5.0, coarse=5.0)(z, t), plain,
                          atol=1e-12)
    assert torch.equal(cfg_model(Denoiser(), cond, uncond, 5.0, coarse=0.0)(z, t), plain)
    # another blur radius is another split
    wide = gaussian_blur(d, 3.0)
    out = cfg_model(Denoiser(), cond, uncond, 5.0, coarse=2.0, coarse_sigma=3.0)(z, t)
    assert torch.allclose(out, c + 1.0 * wide + 4.0 * (d - wide), atol=1e-12)
    # a ramp: both scales grow from 1 at t = 0, full from t = ramp
    f = col(torch.tensor([0.4, 1.0, 1.0], dtype=F64))
    out = cfg_model(Denoiser(), cond, uncond, 5.0, ramp=0.5, coarse=2.0)(z, t)
    assert torch.allclose(out, c + f * (1.0 * b + 4.0 * (d - b)), atol=1e-12)
    # scale 1 with a coarse scale runs both branches and guides the coarse part only
    den = Denoiser()
    out = cfg_model(den, cond, uncond, 1.0, coarse=3.0)(z, t)
    assert torch.allclose(out, c + 2.0 * b, atol=1e-12)
    assert [batch for batch, _, _ in den.calls] == [6]


@pytest.mark.parametrize("kwargs", [dict(interval=(0.8, 0.2)), dict(interval=(0.0, 1.5)),
                                    dict(rescale=1.5), dict(ramp=1.5),
                                    dict(ramp=-0.1), dict(pag=-1.0), dict(pag=float("nan")),
                                    dict(pag=1.0, pag_interval=(0.5, 0.2)),
                                    dict(coarse=-1.0), dict(coarse=2.0, coarse_sigma=0.0),
                                    dict(coarse=float("nan"))])
def test_cfg_rejects_bad_settings(conds, kwargs):
    with pytest.raises(ValueError):
        cfg_model(Denoiser(), *conds, 3.0, **kwargs)




@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.3, 0.7)])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guided_sampling_reads_nothing_back_from_the_device(interval, rescale):
    """The samplers hand model_fn CPU times, so the guidance interval is decided without a
    read from the device: a whole guided run on the meta device (where any read raises)
    goes through and reaches the network with the state's device."""
    seen = []

    class Cond:
        def __init__(self, v):
            self.v = v

        @staticmethod
        def cat(items):
            return Cond(torch.cat([i.v for i in items]))

    def denoise(z, t, c):
        seen.append((t.device.type, z.device.type))
        return z * 0.5 + c.v.view(-1, 1, 1, 1)

    model = cfg_model(denoise, Cond(torch.ones(2, device="meta")),
                      Cond(torch.zeros(2, device="meta")), 3.0, rescale, interval,
                      ramp=0.5 if rescale else 0.0, coarse=2.0 if rescale else 0.0)
    for name in SAMPLERS:
        out = SAMPLERS[name](model, torch.zeros(2, 3, 4, 4, device="meta"), time_grid(6, 2.0))
        assert out.device.type == "meta"
    assert seen and all(t == "cpu" and z == "meta" for t, z in seen)
