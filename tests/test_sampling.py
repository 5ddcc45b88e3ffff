"""Samplers, time grids, CFG and img2img helpers, checked against closed-form flows.

Oracles (time convention of engine/flow.py: z_t = t x + (1 - t) eps, t = 1 is data):

* Data N(mu, diag(s^2)). The posterior mean is
      x_hat(z, t) = mu + t s^2 (z - t mu) / (t^2 s^2 + (1 - t)^2)
  and the probability-flow ODE started from eps at t = 0 is
      z_t = t mu + sqrt(t^2 s^2 + (1 - t)^2) eps,   ending at z_1 = mu + s eps.
* Data = a few weighted points p_j. The posterior mean is
      x_hat(z, t) = sum_j softmax_j(log w_j - |z - t p_j|^2 / (2 (1 - t)^2)) p_j.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from engine.config import RunConfig
from engine.flow import resolution_shift, shift_time, to_clean
from engine.sampling import (
    SAMPLERS,
    STOCHASTIC,
    cfg_model,
    gaussian_blur,
    img2img_grid,
    model_evals,
    noise_image,
    sample_dpmpp_2m,
    sample_euler,
    sample_shift,
    time_grid,
)

torch.set_num_threads(1)

F64 = torch.float64
_gen = torch.Generator().manual_seed(1234)
SHAPE = (2, 2, 2)  # (C, H, W) of the toy images
MU = torch.randn(1, *SHAPE, generator=_gen, dtype=F64) * 0.5
S = torch.rand(1, *SHAPE, generator=_gen, dtype=F64) * 0.3 + 0.3
POINTS = torch.randn(5, *SHAPE, generator=_gen, dtype=F64) * 0.8
WEIGHTS = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25], dtype=F64)


def noise(n: int, seed: int = 0, dtype=F64) -> Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def col(t: Tensor) -> Tensor:
    return t.view(-1, 1, 1, 1)


def gaussian_clean(z: Tensor, t: Tensor) -> Tensor:
    tb = col(t).to(z.dtype)
    return MU + tb * S**2 * (z - tb * MU) / (tb**2 * S**2 + (1 - tb) ** 2)


def gaussian_flow(eps: Tensor, t: float) -> Tensor:
    """The exact ODE solution at time t for the trajectory that starts at eps at t = 0."""
    return t * MU + torch.sqrt(t**2 * S**2 + (1 - t) ** 2) * eps


def points_clean(z: Tensor, t: Tensor) -> Tensor:
    tb = t.to(z.dtype).view(-1, 1, 1, 1, 1)
    dist2 = ((z[:, None] - tb * POINTS[None]) ** 2).flatten(2).sum(-1)  # (B, K)
    logits = WEIGHTS.log()[None] - dist2 / (2 * (1 - t.to(z.dtype).view(-1, 1)) ** 2)
    return torch.einsum("bk,kchw->bchw", logits.softmax(-1), POINTS)


def as_model(clean_fn, prediction: str):
    """Wrap an oracle as an x- or v-predicting network, then convert back to x_hat the way
    the pipeline does (engine.flow.to_clean)."""
    def network(z, t):
        x_hat = clean_fn(z, t)
        return x_hat if prediction == "x" else (x_hat - z) / (1 - col(t).to(z.dtype))

    return lambda z, t: to_clean(network(z, t), z, t, prediction)


class Counting:
    """model_fn that records the times it was called with."""

    def __init__(self, clean_fn):
        self.clean_fn, self.times = clean_fn, []

    def __call__(self, z, t):
        self.times.append(t.clone())
        return self.clean_fn(z, t)


def rms(a: Tensor, b: Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


# --------------------------------------------------------------------------------------
# Time grids
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("t_start", [0.0, 0.3])
def test_grid_shape_endpoints_and_monotonicity(shift, t_start):
    ts = time_grid(12, shift, t_start)
    assert ts.shape == (13,) and ts.dtype == F64
    assert ts[0].item() == t_start and ts[-1].item() == 1.0
    assert bool((ts[1:] > ts[:-1]).all())


def test_grid_shift():
    uniform = time_grid(10)
    assert torch.allclose(uniform, torch.linspace(0, 1, 11, dtype=F64), atol=1e-15)
    shifted = time_grid(10, shift=3.0)
    assert torch.allclose(shifted, shift_time(uniform, 3.0), atol=1e-15)
    # s > 1 spends more of the steps near noise (smaller t), s < 1 near the data
    assert bool((shifted[1:-1] < uniform[1:-1]).all())
    assert bool((time_grid(10, shift=0.5)[1:-1] > uniform[1:-1]).all())
    # a start time keeps the shifted spacing: the grid is the tail of a shifted uniform grid
    tail = time_grid(20, 3.0, t_start=0.5)
    full = shift_time(torch.linspace(shift_time(torch.tensor(0.5, dtype=F64), 1 / 3.0).item(),
                                     1, 21, dtype=F64), 3.0)
    assert torch.allclose(tail, full, atol=1e-12)


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(steps=5, t_start=1.0),
                                    dict(steps=5, t_start=-0.1), dict(steps=5, shift=0.0)])
def test_grid_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        time_grid(**kwargs)


def test_sample_shift_defaults_to_the_training_shift_for_the_size():
    cfg = RunConfig()
    cfg.loss.time_shift, cfg.loss.shift_reference = 1.5, 256
    assert sample_shift(cfg, 512, 512) == pytest.approx(3.0)
    assert sample_shift(cfg, 512, 512) == resolution_shift(512, 512, 1.5, 256)
    cfg.sample.shift = 2.0
    assert sample_shift(cfg, 512, 512) == 2.0


# --------------------------------------------------------------------------------------
# Accuracy against exact solutions
# --------------------------------------------------------------------------------------

DETERMINISTIC = [name for name in SAMPLERS if name not in STOCHASTIC]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_constant_velocity_field_is_integrated_exactly(name):
    v = noise(3, seed=5)

    def model(z, t):  # the clean estimate for the constant velocity v
        return z + (1 - col(t).to(z.dtype)) * v

    start = noise(3, seed=6)
    for ts in (time_grid(1), time_grid(7, shift=3.0), time_grid(5, 0.5, t_start=0.2)):
        out = SAMPLERS[name](model, start, ts)
        assert torch.allclose(out, start + (1 - ts[0].item()) * v, atol=1e-12)


@pytest.mark.parametrize("name,order", [("euler", 1.0), ("heun", 2.0), ("ab2", 2.0)])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_observed_order_of_convergence(name, order, shift):
    eps = noise(32)
    exact = gaussian_flow(eps, 1.0)
    err = [rms(SAMPLERS[name](gaussian_clean, eps, time_grid(n, shift)), exact) for n in (40, 80)]
    assert abs(math.log2(err[0] / err[1]) - order) < 0.25, err


def log_snr(t):
    return math.log(t / (1 - t))


def irregular_grid(n: int, t_a: float = 0.02, t_b: float = 0.98) -> Tensor:
    """n steps from t_a to t_b whose lambda = log(t / (1 - t)) steps alternate h, 2h, then
    the final step to t = 1 (a grid on which fixed multistep coefficients lose an order)."""
    steps = torch.tensor([1.0, 2.0] * (n // 2), dtype=F64)
    frac = torch.cat([torch.zeros(1, dtype=F64), steps.cumsum(0) / steps.sum()])
    ts = torch.sigmoid(log_snr(t_a) + (log_snr(t_b) - log_snr(t_a)) * frac)
    ts[0], ts[-1] = t_a, t_b
    return torch.cat([ts, torch.ones(1, dtype=F64)])


def visited_states(name: str, ts: Tensor, clean_fn, start: Tensor) -> list[tuple[float, Tensor]]:
    """The (t, z) pairs a sampler hands to the model."""
    states = []

    def model(z, t):
        states.append((t[0].item(), z))
        return clean_fn(z, t)

    SAMPLERS[name](model, start, ts)
    return states


@pytest.mark.parametrize("name,order", [("euler", 1.0), ("heun", 2.0), ("ab2", 2.0),
                                        ("dpmpp_2m", 2.0)])
def test_observed_order_on_an_irregular_grid(name, order):
    """Every state a sampler visits lies on the exact trajectory up to O(h^order), also on a
    grid with unequal steps (AB2 with the equal-step coefficients 3/2, -1/2 is first order
    here; the upstream DPM update does not converge at all)."""
    eps = noise(32)
    errors = []
    for n in (20, 40, 80):
        ts = irregular_grid(n)
        states = visited_states(name, ts, gaussian_clean, gaussian_flow(eps, ts[0].item()))
        errors.append(max(rms(z, gaussian_flow(eps, t)) for t, z in states))
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(o - order) < 0.25 for o in orders), errors


def test_dpmpp_2m_update_is_lu_et_al_algorithm_2():
    """DPM-Solver++(2M) for alpha = t, sigma = 1 - t: z_{i+1} = (sigma_{i+1} / sigma_i) z_i +
    alpha_{i+1} (1 - e^{-h_i}) D_i. For a clean estimate linear in lambda the 2M combination
    D_i = (1 + 1/(2 r_i)) x_hat_i - 1/(2 r_i) x_hat_{i-1}, r_i = h_{i-1} / h_i, is that line
    at the lambda-midpoint of the step, whatever the step ratio."""
    a, b = noise(1, seed=20), noise(1, seed=21)

    def line(lam):
        return a + b * lam

    ts = torch.tensor([0.05, 0.1, 0.15, 0.3, 0.7, 0.75, 0.9, 1.0], dtype=F64)
    states = visited_states("dpmpp_2m", ts, lambda z, t: line(log_snr(t[0].item())),
                            noise(1, seed=22))
    for i in range(1, len(states) - 1):
        (t, z), (t_next, z_next) = states[i], states[i + 1]
        h = log_snr(t_next) - log_snr(t)
        d = line(log_snr(t) + h / 2)
        expected = (1 - t_next) / (1 - t) * z + t_next * (1 - math.exp(-h)) * d
        assert torch.allclose(z_next, expected, atol=1e-12), i


def test_dpmpp_2m_converges_faster_than_first_order_on_uniform_grid():
    eps = noise(32)
    exact = gaussian_flow(eps, 1.0)
    err = [rms(sample_dpmpp_2m(gaussian_clean, eps, time_grid(n)), exact) for n in (40, 160)]
    assert math.log2(err[0] / err[1]) / 2 > 1.4, err


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "ab2"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_second_order_samplers_beat_euler(name, shift):
    eps = noise(64)
    exact = gaussian_flow(eps, 1.0)
    for steps in (10, 20):
        ts = time_grid(steps, shift)
        assert rms(SAMPLERS[name](gaussian_clean, eps, ts), exact) < \
            rms(sample_euler(gaussian_clean, eps, ts), exact)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_reach_the_gaussian_data_distribution(name):
    out = SAMPLERS[name](gaussian_clean, noise(4000, seed=1), time_grid(100))
    assert (out.mean(0, keepdim=True) - MU).abs().max() < 0.04
    assert (out.std(0, keepdim=True) / S - 1).abs().max() < 0.06


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_reach_the_point_mixture(name):
    out = SAMPLERS[name](points_clean, noise(4000, seed=2), time_grid(30, shift=2.0))
    dist2 = ((out[:, None] - POINTS[None]) ** 2).flatten(2).sum(-1)  # (B, K)
    assert dist2.min(1).values.sqrt().max() < 1e-3  # every sample lands on a data point
    freq = torch.bincount(dist2.argmin(1), minlength=len(POINTS)).to(F64) / len(out)
    assert (freq - WEIGHTS).abs().max() < 0.03
    mean = (WEIGHTS.view(-1, 1, 1, 1) * POINTS).sum(0)
    var = (WEIGHTS.view(-1, 1, 1, 1) * (POINTS - mean) ** 2).sum(0)
    assert (out.mean(0) - mean).abs().max() < 0.05
    assert (out.var(0) - var).abs().max() < 0.06


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("oracle", [gaussian_clean, points_clean])
def test_x_and_v_prediction_give_the_same_samples(name, oracle):
    eps, ts = noise(16, seed=3), time_grid(15, shift=3.0)
    out_x = SAMPLERS[name](as_model(oracle, "x"), eps, ts)
    out_v = SAMPLERS[name](as_model(oracle, "v"), eps, ts)
    assert torch.allclose(out_x, out_v, atol=1e-9)
    assert torch.allclose(out_x, SAMPLERS[name](oracle, eps, ts), atol=1e-9)


# --------------------------------------------------------------------------------------
# Interface: times, callbacks, evaluation counts
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SAMPLERS))
def test_model_sees_batch_times_below_one_and_dtype_is_kept(name):
    model = Counting(lambda z, t: gaussian_clean(z, t).to(z.dtype))
    x = noise(3, dtype=torch.float32)
    out = SAMPLERS[name](model, x, time_grid(6))
    assert out.dtype == torch.float32 and out.shape == x.shape
    for t in model.times:
        assert t.shape == (3,) and t.dtype == torch.float32 and bool((t < 1).all())


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_model_evals_matches_the_calls_made(name, steps):
    model = Counting(gaussian_clean)
    SAMPLERS[name](model, noise(2), time_grid(steps, 2.0))
    assert len(model.times) == model_evals(name, steps)
    assert model_evals(name, 0) == 0


def test_model_evals_rejects_unknown_sampler():
    with pytest.raises(ValueError, match="euler"):
        model_evals("dpm_pp", 10)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_once_per_step_and_last_preview_is_the_result(name):
    seen = []
    out = SAMPLERS[name](gaussian_clean, noise(2), time_grid(9),
                         callback=lambda step, total, x_hat: seen.append((step, total, x_hat)))
    assert [(s, n) for s, n, _ in seen] == [(i, 9) for i in range(1, 10)]
    assert all(x_hat.shape == out.shape for _, _, x_hat in seen)
    assert torch.equal(seen[-1][2], out)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_last_step_returns_the_clean_estimate_exactly(name):
    x_hat = noise(4, seed=30, dtype=torch.float32) / 3
    start = noise(4, seed=31, dtype=torch.float32) * 1e4  # z + (x_hat - z) would round
    for ts in (torch.tensor([0.5, 1.0], dtype=F64), time_grid(3)):
        seen = []
        out = SAMPLERS[name](lambda z, t: x_hat, start, ts, callback=lambda *a: seen.append(a))
        assert torch.equal(out, x_hat) and torch.equal(seen[-1][2], x_hat)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_exception_from_callback_cancels_sampling(name):
    class Cancelled(Exception):
        pass

    def callback(step, total, x_hat):
        if step == 3:
            raise Cancelled

    model = Counting(gaussian_clean)
    with pytest.raises(Cancelled):
        SAMPLERS[name](model, noise(2), time_grid(10), callback=callback)
    assert len(model.times) == (6 if name == "heun" else 3)  # the first 3 steps, no more


@pytest.mark.parametrize("ts", [[0.0, 0.5, 0.95], [0.0, 0.5, 0.5, 1.0], [0.5, 0.2, 1.0],
                                [-0.1, 1.0], []])
def test_sampler_rejects_grid_not_ending_at_one(ts):
    with pytest.raises(ValueError, match="time_grid"):
        sample_euler(gaussian_clean, noise(1), torch.tensor(ts, dtype=F64))


# --------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# Image-to-image
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SAMPLERS))
def test_img2img_strength_zero_returns_the_image(name):
    init, eps = noise(2, seed=7), noise(2, seed=8)
    ts = img2img_grid(30, 0.0, shift=3.0)
    assert ts.tolist() == [1.0]
    z = noise_image(init, eps, ts[0].item())
    assert torch.equal(z, init)
    model, seen = Counting(gaussian_clean), []
    out = SAMPLERS[name](model, z, ts, callback=lambda *a: seen.append(a))
    assert torch.equal(out, init) and not model.times and not seen


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_img2img_strength_one_is_text_to_image(name):
    init, eps = noise(2, seed=7), noise(2, seed=8)
    ts = img2img_grid(12, 1.0, shift=3.0)
    assert torch.equal(ts, time_grid(12, 3.0))
    z = noise_image(init, eps, ts[0].item())
    assert torch.equal(z, eps)
    assert torch.equal(SAMPLERS[name](gaussian_clean, z, ts),
                       SAMPLERS[name](gaussian_clean, eps, time_grid(12, 3.0)))


def test_img2img_partial_strength():
    ts = img2img_grid(30, 0.4, shift=3.0)
    assert ts.shape == (13,) and ts[0].item() == 0.6 and ts[-1].item() == 1.0
    assert bool((ts[1:] > ts[:-1]).all())
    init, eps = noise(2, seed=7), noise(2, seed=8)
    assert torch.allclose(noise_image(init, eps, 0.6), 0.6 * init + 0.4 * eps, atol=1e-15)
    assert img2img_grid(30, 0.01).shape == (2,)  # at least one step
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="strength"):
            img2img_grid(30, bad)


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
