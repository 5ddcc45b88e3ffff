"""The stochastic samplers (engine.sampling.STOCHASTIC): each step is the DDPM posterior
draw its docstring names, checked against the forward process's own transition; the
multistep estimate of DPM++ 2M SDE earns its keep on a Gaussian with a known answer;
fresh noise only inside a noise interval, the deterministic sampler's steps outside; and
without a noise source a sampler is reproducible. The contract every sampler keeps
(distributions, callbacks, call counts) is in tests/test_sampling.py."""

import math

import pytest
import torch

from engine.sampling import (
    SAMPLERS,
    STOCHASTIC,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    time_grid,
)
from tests.test_sampling import F64, S, gaussian_clean, noise, points_clean

torch.set_num_threads(1)


def test_euler_ancestral_step_samples_the_ddpm_posterior():
    """Each step of euler_a is z_next = mean + std * xi for the posterior q(z_next | z, x)
    of the forward process at x = x_hat, derived here from the transition z_t = (t / t')
    z_t' + s e between t < t' (s^2 = (1 - t)^2 - (t / t')^2 (1 - t')^2, Ho et al. eq. 7):
        mean = (t / t') (1 - t')^2 / (1 - t)^2 z + t' s^2 / (1 - t)^2 x,
        std = (1 - t') s / (1 - t)."""
    x_hat = noise(1, seed=30)
    ts = torch.tensor([0.0, 0.2, 0.35, 0.7, 0.9, 1.0], dtype=F64)
    draws = [noise(1, seed=40 + i) for i in range(len(ts))]
    states = []

    def model(z, t):
        states.append((t[0].item(), z))
        return x_hat

    sample_euler_ancestral(model, noise(1, seed=31), ts, noise=lambda i: draws[i])
    for i in range(len(states) - 1):
        (t, z), (t_next, z_next) = states[i], states[i + 1]
        s2 = (1 - t) ** 2 - (t / t_next) ** 2 * (1 - t_next) ** 2
        mean = ((t / t_next) * (1 - t_next) ** 2 * z + t_next * s2 * x_hat) / (1 - t) ** 2
        std = (1 - t_next) * math.sqrt(s2) / (1 - t)
        assert torch.allclose(z_next, mean + std * draws[i], atol=1e-12), i


def test_dpmpp_2m_sde_step_samples_the_posterior_around_the_multistep_estimate():
    """Each step of dpmpp_2m_sde is the posterior draw of euler_a (mean and std as in the
    test above) around D = (1 + 1/(2r)) x_i - (1/(2r)) x_{i-1}, r = h_{i-1} / h_i in
    lambda = log(t / (1 - t)) (Lu et al. 2022, Algorithm 2): x_hat itself on the first step
    and on the step after one that left t = 0. The model's estimate changes from call to
    call, so a missing or misweighted correction shows."""
    ts = torch.tensor([0.0, 0.2, 0.35, 0.5, 0.7, 0.9, 1.0], dtype=F64)
    draws = [noise(1, seed=70 + i) for i in range(len(ts))]
    estimates = [noise(1, seed=80 + i) for i in range(len(ts))]
    states = []

    def model(z, t):
        states.append((t[0].item(), z))
        return estimates[len(states) - 1]

    sample_dpmpp_2m_sde(model, noise(1, seed=32), ts, noise=lambda i: draws[i])
    lam = [math.log(t / (1 - t)) if 0 < t < 1 else None for t in ts.tolist()]
    for i in range(len(states) - 1):
        (t, z), (t_next, z_next) = states[i], states[i + 1]
        d = estimates[i]
        if i >= 2:
            r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
            d = (1 + 1 / (2 * r)) * estimates[i] - estimates[i - 1] / (2 * r)
        s2 = (1 - t) ** 2 - (t / t_next) ** 2 * (1 - t_next) ** 2
        mean = ((t / t_next) * (1 - t_next) ** 2 * z + t_next * s2 * d) / (1 - t) ** 2
        std = (1 - t_next) * math.sqrt(s2) / (1 - t)
        assert torch.allclose(z_next, mean + std * draws[i], atol=1e-12), i


@pytest.mark.parametrize("steps,shift", [(10, 1.0), (20, 1.0), (20, 3.0)])
def test_dpmpp_2m_sde_reaches_the_data_spread_sooner_than_euler_ancestral(steps, shift):
    """Both stochastic samplers draw the Gaussian data with the same noise; the multistep
    estimate gets the spread of the samples closer to the data's at few steps."""
    ts, start = time_grid(steps, shift), noise(4000, seed=1)
    errors = [(SAMPLERS[name](gaussian_clean, start, ts,
                              noise=lambda i: noise(4000, seed=100 + i)).std(0) / S - 1)
              .abs().max().item() for name in ("euler_a", "dpmpp_2m_sde")]
    assert errors[1] < 0.6 * errors[0], errors


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_sampler_without_fresh_noise_source_is_reproducible(name):
    """Without `noise=` the sampler draws from a generator of its own, seeded: the same
    call gives the same samples, while other noise gives others."""
    start, ts = noise(4, seed=50), time_grid(8)
    first = SAMPLERS[name](points_clean, start, ts)
    assert torch.equal(first, SAMPLERS[name](points_clean, start, ts))
    other = SAMPLERS[name](points_clean, start, ts, noise=lambda i: noise(4, seed=60 + i))
    assert not torch.equal(first, other)


PAIRS = [(sample_euler_ancestral, sample_euler), (sample_dpmpp_2m_sde, sample_dpmpp_2m)]


@pytest.mark.parametrize("stochastic,deterministic", PAIRS)
def test_noise_interval_draws_fresh_noise_only_on_the_steps_inside(stochastic, deterministic):
    """A step gets fresh noise when it lies inside [lo, hi] (lo <= t, t_next <= hi); the
    others are the deterministic sampler's steps of the same order: with an interval
    that holds no step the result is that sampler's exactly, and with one that holds
    steps 2-5 of ten only those draw noise and the result differs."""
    ts, start = time_grid(10), noise(4, seed=5)
    calls = []

    def fresh(i):
        calls.append(i)
        return noise(4, seed=200 + i)

    none_inside = stochastic(points_clean, start, ts, noise=fresh, noise_interval=(0.92, 0.98))
    assert calls == [] and torch.equal(none_inside, deterministic(points_clean, start, ts))
    some = stochastic(points_clean, start, ts, noise=fresh, noise_interval=(0.2, 0.6))
    assert calls == [2, 3, 4, 5]
    assert not torch.allclose(some, none_inside)
    calls.clear()
    everywhere = stochastic(points_clean, start, ts, noise=fresh)
    assert calls == list(range(9))   # the last step returns the clean estimate
    assert torch.equal(everywhere, stochastic(points_clean, start, ts, noise=fresh,
                                              noise_interval=(0.0, 1.0)))


@pytest.mark.parametrize("span", [(0.5, 0.5), (0.6, 0.2), (-0.1, 0.5), (0.2, 1.5)])
def test_noise_interval_out_of_range_is_refused(span):
    with pytest.raises(ValueError, match="noise_interval"):
        sample_euler_ancestral(points_clean, noise(1), time_grid(4), noise_interval=span)
