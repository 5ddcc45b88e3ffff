"""Sampling: time grids, ODE and ancestral samplers and classifier-free guidance.

The samplers integrate the probability-flow ODE dz/dt = v(z, t) from ts[0] to clean data
at t = 1 (time convention in engine/flow.py). Like k-diffusion's samplers they are plain
functions with one signature:

    sample_x(model_fn, x, ts, callback=None) -> Tensor

and the stochastic samplers (STOCHASTIC) take a source of fresh noise as well, `noise=`.

* model_fn(z, t) -> x_hat: the clean-image estimate for a state z (B, C, H, W) at times
  t (B,). The times live on the CPU whatever the state's device, so a wrapper can decide
  on them (the guidance interval) without waiting for the GPU; the network's side moves
  them over. The pipeline builds it with engine.flow.to_clean from whatever the network
  predicts and wraps it with cfg_model() for guidance; samplers never see conditioning.
* x: the state at ts[0] (pure noise for text-to-image, a noised image for img2img).
* ts: strictly increasing times ending at exactly 1 (time_grid, img2img_grid). The model
  is never evaluated at t = 1, where a velocity is undefined: every last step returns
  the clean estimate.
* callback(step, total, x_hat) runs after each step, step = 1..total, with the model's
  clean estimate at the start of that step (after the last step it is the result).
  An exception raised by the callback cancels sampling and propagates to the caller.

Every update below is a step from (z, t) towards a clean estimate d:

    z_next = z + (t_next - t) / (1 - t) * (d - z)

With d = x_hat this is Euler on v = (x_hat - z) / (1 - t). It is also DDIM and
DPM-Solver++(1) for alpha_t = t, sigma_t = 1 - t, because with c = (t_next - t) / (1 - t)
their coefficients are sigma_next / sigma_t = 1 - c and alpha_next (1 - e^-h) = c.
At t_next = 1 it returns d itself.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.config import SAMPLER_NAMES, RunConfig, is_time_interval
from engine.flow import interpolate, resolution_shift, shift_time

ModelFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, int, Tensor], None]
NoiseFn = Callable[[int], Tensor]   # step i -> fresh standard normal noise shaped like x


# --------------------------------------------------------------------------------------
# Time grids
# --------------------------------------------------------------------------------------

def time_grid(steps: int, shift: float = 1.0, t_start: float = 0.0) -> Tensor:
    """`steps + 1` increasing times from t_start to 1 (float64, CPU): uniform in the
    unshifted time u, then mapped through t = u / (u + (1 - u) s). The uniform part starts
    at the unshifted image of t_start, so the grid starts at exactly t_start for any shift
    while its spacing follows the shift."""
    if steps < 1:
        raise ValueError(f"time_grid: steps = {steps}; use at least 1 step")
    if not 0.0 <= t_start < 1.0:
        raise ValueError(f"time_grid: t_start = {t_start}; allowed: 0 <= t_start < 1 "
                         f"(0 = pure noise)")
    if shift <= 0.0:
        raise ValueError(f"time_grid: shift = {shift}; allowed: a number > 0 (1 = no shift)")
    u_start = float(shift_time(torch.tensor(t_start, dtype=torch.float64), 1.0 / shift))
    ts = shift_time(torch.linspace(u_start, 1.0, steps + 1, dtype=torch.float64), shift)
    ts[0], ts[-1] = t_start, 1.0  # exact endpoints, free of round-off in the shift map
    return ts


def sample_shift(cfg: RunConfig, width: int, height: int) -> float:
    """The sampling time shift for an image size: `sample.shift` when set, else the
    training shift (`loss.time_shift`, scaled with the image size when
    `loss.shift_reference` is set)."""
    if cfg.sample.shift > 0.0:
        return cfg.sample.shift
    return resolution_shift(width, height, cfg.loss.time_shift, cfg.loss.shift_reference)


def img2img_grid(steps: int, strength: float, shift: float = 1.0) -> Tensor:
    """Image-to-image grid: starts at t_start = 1 - strength and takes
    max(1, round(steps * strength)) steps. Strength 0 gives the one-point grid [1.0] (zero
    steps, the image comes back unchanged); strength 1 is the text-to-image grid."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"img2img_grid: strength = {strength}; allowed: 0 (keep the image) "
                         f"to 1 (ignore it)")
    if strength == 0.0:
        return torch.ones(1, dtype=torch.float64)
    return time_grid(max(1, round(steps * strength)), shift, 1.0 - strength)


class NoiseStreams:
    """One generator per image, seeded with its seed: the first draw is the image's
    starting noise, later draws the fresh noise of an ancestral sampler's steps. So an
    image depends only on its own seed, whatever else is in the batch, on any device."""

    def __init__(self, seeds: list[int], width: int, height: int):
        self.shape = (3, height, width)
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def draw(self) -> Tensor:
        """(B, 3, H, W) float32 on the CPU: the next draw of every stream."""
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])


def noise_image(image: Tensor, noise: Tensor, t: float) -> Tensor:
    """An init image noised to time t along the path z_t = t x + (1 - t) eps: the image
    itself at t = 1, the noise itself at t = 0. Use t = float(ts[0]) of img2img_grid."""
    return interpolate(image, noise, _t(image, float(t)).to(image.device))


# --------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------

def _times(ts: Tensor | Sequence[float]) -> list[float]:
    """The grid as Python floats (step coefficients in double precision), checked."""
    times = [float(t) for t in ts]
    if (not times or times[0] < 0.0 or times[-1] != 1.0
            or any(b <= a for a, b in zip(times, times[1:]))):
        shown = times if len(times) <= 6 else times[:3] + ["..."] + times[-2:]
        raise ValueError(f"sampler: ts = {shown} must increase strictly from t >= 0 to "
                         f"exactly 1; build it with time_grid() or img2img_grid()")
    return times


def _t(x: Tensor, t: float) -> Tensor:
    """A time as the (B,) CPU tensor model_fn takes: float32 (float64 for a float64 state)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.full((x.shape[0],), t, dtype=dtype)


def _toward(z: Tensor, t: float, t_next: float, d: Tensor) -> Tensor:
    """One step from (z, t) towards the clean estimate d (module docstring)."""
    if t_next == 1.0:
        return d
    return z + ((t_next - t) / (1.0 - t)) * (d - z)


def _lambda(t: float) -> float:
    """Half log-SNR log(alpha_t / sigma_t) = log(t / (1 - t)) for t < 1; -inf at t = 0."""
    return -math.inf if t == 0.0 else math.log(t / (1.0 - t))


def _multistep_estimate(times: list[float], i: int, x_hat: Tensor,
                        x_hat_prev: Tensor | None) -> Tensor:
    """The second-order multistep estimate of DPM-Solver++(2M) for step i (Lu et al. 2022,
    Algorithm 2), with r = h_{i-1} / h_i and h = the step in lambda = log(t / (1 - t)):

        D = (1 + 1/(2r)) x_hat_i - (1/(2r)) x_hat_{i-1}

    x_hat itself on the first step (no history), after a step that left t = 0 (h_{i-1}
    infinite: the correction 1/(2r) tends to 0) and on the last step (h_i infinite)."""
    t, t_next = times[i], times[i + 1]
    if x_hat_prev is None or times[i - 1] == 0.0 or t_next == 1.0:
        return x_hat
    r = (_lambda(t) - _lambda(times[i - 1])) / (_lambda(t_next) - _lambda(t))
    return (1.0 + 0.5 / r) * x_hat - (0.5 / r) * x_hat_prev


def _posterior_step(z: Tensor, t: float, t_next: float, d: Tensor, xi: Tensor) -> Tensor:
    """A draw from the DDPM posterior q(z_next | z, x = d) of this path (Ho et al. 2020,
    eq. 7; DDIM with eta = 1; the SDE-DPM-Solver++ step of Lu et al. 2022 with
    h = lambda_next - lambda), for fresh standard normal noise xi and t_next < 1:

        z_next = (sigma_next / sigma) e^-h z + alpha_next (1 - e^-2h) d
                 + sigma_next sqrt(1 - e^-2h) xi,     alpha = t, sigma = 1 - t.

    e^-h = t (1 - t_next) / (t_next (1 - t)) is the share of the current noise that the
    posterior keeps: 0 at t = 0, near 1 for small steps."""
    keep = t * (1.0 - t_next) / (t_next * (1.0 - t))
    return ((1.0 - t_next) / (1.0 - t) * keep) * z + (t_next * (1.0 - keep * keep)) * d \
        + ((1.0 - t_next) * math.sqrt(1.0 - keep * keep)) * xi.to(z.dtype)


def _fresh_noise(x: Tensor, noise: NoiseFn | None) -> NoiseFn:
    """The source of fresh noise of a stochastic sampler: `noise` when given, else a
    generator of its own seeded with 0 (reproducible, one stream for the whole batch)."""
    if noise is not None:
        return noise
    gen = torch.Generator().manual_seed(0)
    return lambda _: torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)


@torch.no_grad()
def sample_euler(model_fn: ModelFn, x: Tensor, ts: Tensor,
                 callback: Callback | None = None) -> Tensor:
    """Euler steps on dz/dt = v (rectified flow, Liu et al. 2022), written as a step towards
    x_hat; identical to DDIM (Song et al. 2021, eq. 12) on this path. One call per step."""
    times = _times(ts)
    total = len(times) - 1
    for i in range(total):
        t, t_next = times[i], times[i + 1]
        x_hat = model_fn(x, _t(x, t))
        x = _toward(x, t, t_next, x_hat)
        if callback is not None:
            callback(i + 1, total, x_hat)
    return x


@torch.no_grad()
def sample_heun(model_fn: ModelFn, x: Tensor, ts: Tensor,
                callback: Callback | None = None) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1) on the velocity, as JiT
    samples: an Euler predictor, then the average of the slopes at both ends. The last step
    is plain Euler, which returns x_hat. 2 * steps - 1 calls."""
    times = _times(ts)
    total = len(times) - 1
    for i in range(total):
        t, t_next = times[i], times[i + 1]
        x_hat = model_fn(x, _t(x, t))
        x_pred = _toward(x, t, t_next, x_hat)
        if t_next < 1.0:
            v = (x_hat - x) / (1.0 - t)
            v_next = (model_fn(x_pred, _t(x, t_next)) - x_pred) / (1.0 - t_next)
            x = x + (t_next - t) * 0.5 * (v + v_next)
        else:
            x = x_pred
        if callback is not None:
            callback(i + 1, total, x_hat)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model_fn: ModelFn, x: Tensor, ts: Tensor,
                    callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M) in data-prediction form (Lu et al. 2022, "DPM-Solver++", Algorithm 2)
    for alpha_t = t, sigma_t = 1 - t, lambda = log(t / (1 - t)), h_i = lambda_{i+1} - lambda_i:

        D = (1 + 1/(2r)) x_hat_i - (1/(2r)) x_hat_{i-1},   r = h_{i-1} / h_i
        z_{i+1} = (sigma_{i+1} / sigma_i) z_i + alpha_{i+1} (1 - e^{-h_i}) D

    The first step has no history and is first order. A step that follows one leaving t = 0
    (lambda = -inf, h_{i-1} infinite) is first order too: the correction 1/(2r) tends to 0.
    The last step (h = inf) returns x_hat, as k-diffusion does at sigma = 0. One call per step."""
    times = _times(ts)
    total = len(times) - 1
    x_hat_prev = None
    for i in range(total):
        t, t_next = times[i], times[i + 1]
        x_hat = model_fn(x, _t(x, t))
        x = _toward(x, t, t_next, _multistep_estimate(times, i, x_hat, x_hat_prev))
        x_hat_prev = x_hat
        if callback is not None:
            callback(i + 1, total, x_hat)
    return x


@torch.no_grad()
def sample_ab2(model_fn: ModelFn, x: Tensor, ts: Tensor,
               callback: Callback | None = None) -> Tensor:
    """Two-step Adams-Bashforth on the velocity (PixelDiT's "FlowDPMSolver", there for equal
    steps only), with the variable-step coefficients (Hairer, Norsett & Wanner, "Solving
    ODEs I", III.5), since a shifted grid is not uniform: with w = dt_i / (2 dt_{i-1}),

        z_{i+1} = z_i + dt_i ((1 + w) v_i - w v_{i-1})

    (3/2 and -1/2 for equal steps). The first step is Euler and the last returns x_hat.
    One call per step."""
    times = _times(ts)
    total = len(times) - 1
    v_prev, dt_prev = None, 0.0
    for i in range(total):
        t, t_next = times[i], times[i + 1]
        dt = t_next - t
        x_hat = model_fn(x, _t(x, t))
        v = (x_hat - x) / (1.0 - t)
        if v_prev is not None and t_next < 1.0:
            w = dt / (2.0 * dt_prev)
            x_next = x + dt * ((1.0 + w) * v - w * v_prev)
        else:
            x_next = _toward(x, t, t_next, x_hat)
        x, v_prev, dt_prev = x_next, v, dt
        if callback is not None:
            callback(i + 1, total, x_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model_fn: ModelFn, x: Tensor, ts: Tensor,
                           callback: Callback | None = None, *,
                           noise: NoiseFn | None = None,
                           noise_interval: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Euler ancestral: each step draws the next state from the DDPM posterior around the
    clean estimate (_posterior_step with d = x_hat): the noise the state implies, mixed
    with fresh noise xi = noise(i) so that the mix is again standard normal; as the steps
    shrink it becomes the reverse SDE. Fresh noise lets a trajectory leave a state the
    deterministic samplers carry to the end: on the demo, a shape the ODE draws twice at
    two places when the prompt leaves the place open (docs/demo-quality.md, "Where the
    demo's last misses are"). `noise` defaults to a generator seeded with 0. Only the steps that lie
    inside noise_interval (lo <= t and t_next <= hi) draw fresh noise; the others are
    Euler steps (the posterior step without fresh noise). The last step returns x_hat.
    One call per step."""
    return _sample_posterior(model_fn, x, ts, callback, noise, noise_interval,
                             multistep=False)


@torch.no_grad()
def sample_dpmpp_2m_sde(model_fn: ModelFn, x: Tensor, ts: Tensor,
                        callback: Callback | None = None, *,
                        noise: NoiseFn | None = None,
                        noise_interval: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, sec. 5 with the multistep estimate; the
    "DPM++ 2M SDE" of other tools, midpoint form, eta = 1): the posterior step of euler_a
    towards the second-order multistep estimate of dpmpp_2m instead of x_hat: fresh noise
    as in euler_a, with the accuracy of a second-order estimate. `noise` defaults to a
    generator seeded with 0. Only the steps inside noise_interval draw fresh noise, as in
    euler_a; the others are DPM-Solver++(2M) steps. The last step returns x_hat. One call
    per step."""
    return _sample_posterior(model_fn, x, ts, callback, noise, noise_interval,
                             multistep=True)


def noise_setting(sampler: str, noise_interval: Sequence[float]) -> list[float] | None:
    """The fresh-noise interval as an image's setting: what a stochastic sampler used,
    None for a deterministic one (it draws no fresh noise, so no interval applies)."""
    return [float(v) for v in noise_interval] if sampler in STOCHASTIC else None


def check_noise_interval(noise_interval: tuple[float, float]) -> None:
    """Refuse an interval that is not (lo, hi) with 0 <= lo < hi <= 1."""
    if not is_time_interval(noise_interval):
        raise ValueError(f"noise_interval = {tuple(noise_interval)}; allowed: (lo, hi) with "
                         f"0 <= lo < hi <= 1")


def _sample_posterior(model_fn: ModelFn, x: Tensor, ts: Tensor, callback: Callback | None,
                      noise: NoiseFn | None, noise_interval: tuple[float, float],
                      multistep: bool) -> Tensor:
    """The loop of both stochastic samplers: a posterior draw towards x_hat (euler_a) or
    towards the multistep estimate (dpmpp_2m_sde) at each step inside noise_interval, the
    deterministic step towards the same estimate elsewhere; the last returns x_hat.
    Fresh noise only where the layout is still open keeps what the deterministic steps
    settle near the data end (sizes, flat areas) while letting a trajectory leave a shape
    drawn at two places (docs/demo-quality.md, "Where the demo's last misses are")."""
    check_noise_interval(noise_interval)
    lo, hi = noise_interval
    times = _times(ts)
    total = len(times) - 1
    noise = _fresh_noise(x, noise)
    x_hat_prev = None
    for i in range(total):
        t, t_next = times[i], times[i + 1]
        x_hat = model_fn(x, _t(x, t))
        if t_next == 1.0:
            x = x_hat
        else:
            d = _multistep_estimate(times, i, x_hat, x_hat_prev) if multistep else x_hat
            if lo <= t and t_next <= hi:
                x = _posterior_step(x, t, t_next, d, noise(i))
            else:
                x = _toward(x, t, t_next, d)
        x_hat_prev = x_hat
        if callback is not None:
            callback(i + 1, total, x_hat)
    return x


# the samplers under the names the config allows (engine.config.SAMPLER_NAMES, in order)
SAMPLERS: dict[str, Callable[..., Tensor]] = dict(zip(
    SAMPLER_NAMES, (sample_euler, sample_heun, sample_dpmpp_2m, sample_ab2,
                    sample_euler_ancestral, sample_dpmpp_2m_sde), strict=True))
# the samplers that take fresh noise (`noise=`); the others are deterministic
STOCHASTIC = frozenset({"euler_a", "dpmpp_2m_sde"})
# how other tools name each sampler in a PNG's `parameters` text (engine/pngmeta.py)
SAMPLER_LABELS: dict[str, str] = dict(zip(
    SAMPLER_NAMES, ("Euler", "Heun", "DPM++ 2M", "Adams-Bashforth 2", "Euler a",
                    "DPM++ 2M SDE"),
    strict=True))


def model_evals(sampler: str, steps: int) -> int:
    """Model calls `sampler` makes on a grid of `steps` steps (for progress bars). With
    cfg_model a call is one forward (cond and uncond batched)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}' (available: {', '.join(SAMPLERS)})")
    if steps < 0:
        raise ValueError(f"model_evals: steps = {steps}; allowed: 0 or more")
    if steps == 0:
        return 0
    return 2 * steps - 1 if sampler == "heun" else steps


# --------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------

def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """x (B, C, H, W) blurred per channel by a Gaussian of `sigma` pixels (two separable
    passes; the image mirrored at its edges, or its edge pixels repeated where it is
    smaller than the kernel's reach of 3 sigma)."""
    r = max(1, math.ceil(3.0 * sigma))
    k = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (k / sigma) ** 2)
    k = k / k.sum()
    C = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect" if r < min(x.shape[-2:]) else "replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def cfg_model(denoise: Callable[..., Tensor], cond, uncond, scale: float,
              rescale: float = 0.0, interval: tuple[float, float] = (0.0, 1.0),
              ramp: float = 0.0, pag: float = 0.0,
              pag_interval: tuple[float, float] = (0.0, 1.0),
              coarse: float = 0.0, coarse_sigma: float = 1.5) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022) as a model_fn for the samplers, with
    optional perturbed-attention guidance.

    `denoise(z, t, c) -> x_hat` runs the network for a conditioning object c; cond and
    uncond are of one type with a `cat(list)` method that concatenates along the batch
    (a negative prompt is just another uncond). Both branches run in one batched forward
    on `type(cond).cat([cond, uncond])`, built once here. The guided prediction is
    u + scale (c - u). With rescale phi > 0 it is rescaled per sample so that its velocity
    has the std of the conditional velocity, then blended with weight phi (Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4). Samples with
    t outside [lo, hi] = interval get the conditional prediction; when no sample of the batch
    is inside, only the conditional branch runs. scale == 1 (with coarse 0 or 1) runs only
    the conditional branch.

    With ramp > 0 the scale rises linearly with t, w(t) = 1 + (scale - 1) min(1, t / ramp),
    and is full from t = ramp on (Wang et al. 2024, "Analysis of Classifier-Free Guidance
    Weight Schedulers": schedules that grow towards the data end). Near noise the conditional
    clean estimate of a prompt that leaves the composition open is the average of its
    possible layouts; full guidance there sharpens all of them at once, and a sample can
    keep two (docs/demo-quality.md, "Where the demo's last misses are").

    With coarse > 0 the guidance update c - u is split by a Gaussian blur of coarse_sigma
    pixels into a coarse part (the blurred update: where and how large things are) and
    the fine rest (edges and details): the coarse part is guided with scale `coarse`,
    the fine part with `scale`, c + (coarse - 1) blur(c - u) + (scale - 1) (c - u -
    blur(c - u)) (Sadat et al. 2025, "Guidance in the Frequency Domain Enables
    High-Fidelity Sampling at Low CFG Scales"). coarse = scale is plain guidance. Full
    guidance of the coarse part draws small shapes too large; the fine part draws their
    outlines (docs/demo-quality.md, "Guidance by detail scale"). A ramp scales both
    parts alike.

    With pag > 0, samples with t in pag_interval also move away from a perturbed
    conditional estimate p = denoise(z, t, c, perturbed=True), in which chosen layers'
    attention is the identity (each token sees only itself): + pag (c - p) (Ahn et al.
    2024, "Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance"). The
    perturbed network cannot weigh one place of the image against another, so what it
    lacks is the image's coordination: near noise, where the layout is decided, the term
    favours one drawing over a shape drawn at two places. It costs one more forward of
    the batch at each step inside pag_interval.
    """
    lo, hi = interval
    for name, span in (("interval", interval), ("pag_interval", pag_interval)):
        if not is_time_interval(span):
            raise ValueError(f"cfg_model: {name} = {tuple(span)}; allowed: (lo, hi) with "
                             f"0 <= lo < hi <= 1")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"cfg_model: rescale = {rescale}; allowed: 0 (plain CFG) to 1")
    if not 0.0 <= ramp <= 1.0:
        raise ValueError(f"cfg_model: ramp = {ramp}; allowed: 0 (no ramp) to 1")
    if not pag >= 0.0:
        raise ValueError(f"cfg_model: pag = {pag}; allowed: 0 (off) or more")
    if not (coarse >= 0.0 and coarse_sigma > 0.0):
        raise ValueError(f"cfg_model: coarse = {coarse}, coarse_sigma = {coarse_sigma}; "
                         f"allowed: coarse 0 (off) or more, coarse_sigma > 0")
    guiding = scale != 1.0 or coarse not in (0.0, 1.0)
    if not guiding and pag == 0.0:
        def conditional(z: Tensor, t: Tensor) -> Tensor:
            return denoise(z, t, cond)
        return conditional
    both = type(cond).cat([cond, uncond])

    def per_sample(flags: Tensor, like: Tensor) -> Tensor:
        return flags.to(like.device).view(-1, *([1] * (like.dim() - 1)))

    def classifier_free(z: Tensor, t: Tensor, inside: Tensor) -> tuple[Tensor, Tensor]:
        """(guided estimate, conditional estimate)."""
        out = denoise(torch.cat([z, z]), torch.cat([t, t]), both)  # (2B, C, H, W)
        c, u = out.chunk(2)  # (B, C, H, W) each

        def strength(w: float) -> float | Tensor:
            """w, or with a ramp per-sample 1 + (w - 1) min(1, t / ramp), from the CPU
            times and copied without a wait."""
            if ramp <= 0.0:
                return w
            w = 1.0 + (w - 1.0) * (t.double() / ramp).clamp(max=1.0)
            return w.to(c.device, c.dtype, non_blocking=True).view(-1, *([1] * (z.dim() - 1)))

        w, update = strength(scale), c - u
        x_cfg = u + w * update
        if coarse > 0.0:   # the coarse part of the update at `coarse` instead of `scale`
            x_cfg = x_cfg + (strength(coarse) - w) * gaussian_blur(update, coarse_sigma)
        if rescale > 0.0:
            # velocity = (x_hat - z) / (1 - t): the per-sample 1 - t cancels in the std ratio
            dims = tuple(range(1, z.dim()))
            ratio = (c - z).std(dim=dims, keepdim=True) / \
                (x_cfg - z).std(dim=dims, keepdim=True).clamp_min(1e-12)
            x_cfg = z + (x_cfg - z) * (rescale * ratio + (1.0 - rescale))
        if bool(inside.all()):
            return x_cfg, c
        return torch.where(per_sample(inside, z), x_cfg, c), c

    def guided(z: Tensor, t: Tensor) -> Tensor:
        # t on the CPU: deciding here reads nothing back
        inside = (t >= lo) & (t <= hi) if guiding else torch.zeros_like(t, dtype=torch.bool)
        perturb = ((t >= pag_interval[0]) & (t <= pag_interval[1]) if pag > 0.0
                   else torch.zeros_like(t, dtype=torch.bool))
        if bool(inside.any()):
            x, c = classifier_free(z, t, inside)
        else:
            x = c = denoise(z, t, cond)
        if not bool(perturb.any()):
            return x
        away = pag * (c - denoise(z, t, cond, perturbed=True))
        if not bool(perturb.all()):
            away = torch.where(per_sample(perturb, z), away, torch.zeros_like(away))
        return x + away

    return guided
