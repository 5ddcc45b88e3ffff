"""Samplers, time grids and img2img helpers, checked against closed-form flows (guidance:
test_guidance.py).

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

import pytest
import torch
from torch import Tensor

from engine.config import RunConfig
from engine.flow import resolution_shift, shift_time, to_clean
from engine.sampling import (
    SAMPLERS,
    STOCHASTIC,
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
