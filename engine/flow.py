"""Flow matching: the time convention, training-time sampling and the conversions
between what the network predicts and what samplers and losses need.

Time convention (used everywhere in the engine; papers and diffusers often use the
opposite, so convert at every boundary):

    t = 0 is pure noise, t = 1 is clean data.
    z_t = t * x + (1 - t) * eps,          eps ~ N(0, I)
    v   = dz_t/dt = x - eps               (velocity, the regression target)
    x   = z_t + (1 - t) * v               (clean estimate from a velocity)
    v   = (x - z_t) / (1 - t)             (velocity from a clean estimate)

Images are NCHW float tensors in [-1, 1]. A time shift s maps t to
t / (t + (1 - t) * s); s > 1 spends more of the trajectory near noise, which larger
images need because they keep more signal at the same noise level (SD3, sec. 5.3.2).

Training losses (all computed in fp32, each returned apart so it can be logged):
    v      mean (v_hat - v)^2; an x-prediction is turned into a velocity first (JiT),
           so the loss lives in v space for both prediction types
    freq   the same error seen through an orthonormal 8x8 block DCT in YCbCr, each
           coefficient weighted by the inverse JPEG quantisation step (DeCo-style)
    repa   iREPA: 1 - cos between a 3x3-conv projection of a patch block's tokens and
           the spatially z-scored tokens of a frozen DINOv3 teacher
    sra    self-representation alignment: smooth L1 between an MLP projection of a patch
           block's tokens and the layer-normed tokens of a later block of the EMA network,
           which sees the same image at less noise (engine/self_align.py)
    gamma  L2 penalty on the pixel path's AdaLN scales (the model reports the sum)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import LossConfig

# --------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------

def shift_time(t: Tensor, shift: float) -> Tensor:
    """t' = t / (t + (1 - t) * s). Keeps 0 and 1 fixed; s = 1 is the identity."""
    if shift == 1.0:
        return t
    return t / (t + (1.0 - t) * shift)


def resolution_shift(width: int, height: int, time_shift: float, shift_reference: int) -> float:
    """The time shift for an image size: constant when `shift_reference` is 0, else
    `time_shift * sqrt(width * height) / shift_reference` (the SD3 rule s = sqrt(m / n),
    relative to a reference image side)."""
    if shift_reference <= 0:
        return time_shift
    return time_shift * math.sqrt(width * height) / shift_reference


def sample_t(n: int, p_mean: float, p_std: float, shift: float = 1.0, *,
             uniform: float = 0.0, generator: torch.Generator | None = None,
             device=None) -> Tensor:
    """Training times: logit-normal, t = sigmoid(u) with u ~ N(p_mean, p_std^2), then
    shifted. Returns (n,) float32 on the whole of (0, 1): samplers start from pure noise
    at t = 0, so training must reach down to it (a squeeze into [0.05, 0.95], as the
    original PixelHDM did, leaves the first sampling steps outside what the network
    has seen). With `uniform` > 0 that share of the times (each with that probability)
    is drawn uniformly on (0, 1) instead: a logit-normal with a negative mean all but
    never reaches the last sampling steps near clean data (P(t > 0.85) is 2e-4 for
    N(-0.8, 0.8)), which the sampler still takes. Times are kept 1e-5 away from 0 and 1
    only for float safety."""
    u = torch.randn(n, generator=generator, device=device) * p_std + p_mean
    t = shift_time(torch.sigmoid(u), shift)
    if uniform > 0.0:
        flat = torch.rand(n, generator=generator, device=device)
        pick = torch.rand(n, generator=generator, device=device) < uniform
        t = torch.where(pick, flat, t)
    return t.clamp(1e-5, 1.0 - 1e-5)


# --------------------------------------------------------------------------------------
# Path and conversions
# --------------------------------------------------------------------------------------

def _bcast(t: Tensor, like: Tensor) -> Tensor:
    """(B,) times -> (B, 1, 1, 1) so they broadcast over an image batch."""
    return t.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def interpolate(x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """z_t = t x + (1 - t) eps."""
    tb = _bcast(t, x)
    return tb * x + (1.0 - tb) * eps


def to_clean(pred: Tensor, z: Tensor, t: Tensor, prediction: str) -> Tensor:
    """The network's output as a clean-image estimate x_hat."""
    if prediction == "x":
        return pred
    return z + (1.0 - _bcast(t, z)) * pred


def to_velocity(pred: Tensor, z: Tensor, t: Tensor, prediction: str, t_eps: float = 0.0) -> Tensor:
    """The network's output as a velocity. For x-prediction v = (x_hat - z) / (1 - t),
    with 1 - t clamped below at t_eps (JiT): near t = 1 the division would otherwise
    amplify tiny errors of x_hat without bound."""
    if prediction == "v":
        return pred
    return (pred - z) / (1.0 - _bcast(t, z)).clamp_min(t_eps if t_eps > 0 else 1e-6)


def velocity_target(x: Tensor, eps: Tensor, t: Tensor, prediction: str,
                    t_eps: float = 0.0) -> Tensor:
    """The velocity the loss compares `to_velocity` with: x - eps, which is (x - z) / (1 - t).
    For x-prediction the same clamp of 1 - t at t_eps as in to_velocity applies, so that for
    t > 1 - t_eps both sides are divided alike and the loss stays a (weighted) error of the
    clean estimate. Unclamped, matching the target there takes x_hat = z + t_eps (x - eps),
    which overshoots the image by (t + t_eps - 1) (x - eps): noise of the opposite sign,
    added where the image is nearly clean. Where 1 - t >= t_eps the factor is exactly 1."""
    v = x - eps
    if prediction != "x" or t_eps <= 0:
        return v
    gap = 1.0 - _bcast(t, x)
    return v * (gap / gap.clamp_min(t_eps))


# --------------------------------------------------------------------------------------
# V-loss
# --------------------------------------------------------------------------------------

def v_loss(v_pred: Tensor, v_target: Tensor) -> Tensor:
    """Mean squared velocity error over every element, in fp32 (no weighting over t)."""
    return F.mse_loss(v_pred.float(), v_target.float())


def v_loss_per_sample(v_pred: Tensor, v_target: Tensor) -> Tensor:
    """(B,) mean squared velocity error of each sample, for loss-by-time logging."""
    err = (v_pred.float() - v_target.float()).square()
    return err.flatten(1).mean(dim=1)  # (B, C*H*W) -> (B,)


def t_bin_index(t: Tensor, n_bins: int) -> Tensor:
    """(B,) long index of the equal-width bin of [0, 1] holding each time."""
    return (t.float() * n_bins).long().clamp_(0, n_bins - 1)


# --------------------------------------------------------------------------------------
# Frequency loss: JPEG-weighted 8x8 block DCT
# --------------------------------------------------------------------------------------

# JPEG example quantisation tables (ITU-T T.81 Annex K, tables K.1 and K.2), natural
# row-major order, at the reference quality 50.
JPEG_LUMA_TABLE: tuple[tuple[int, ...], ...] = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
JPEG_CHROMA_TABLE: tuple[tuple[int, ...], ...] = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
)

# RGB -> YCbCr, ITU-R BT.601 full range, without the +128 offsets (the loss sees
# differences of velocities, where an offset would cancel anyway).
YCBCR_MATRIX: tuple[tuple[float, float, float], ...] = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)

DCT_BLOCK = 8

# (quality, ycbcr, device, dtype) -> (DCT matrix (8, 8), weights (3, 8, 8), YCbCr matrix
# (3, 3)): built once per device, since a tensor made from Python numbers on a GPU is a
# blocking copy that would stall every step
_FREQ_CACHE: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}


def jpeg_table(base: Tensor, quality: int) -> Tensor:
    """A quantisation table scaled for a JPEG quality in [1, 100], as the IJG library
    does it: S = 5000 / q (integer division) below 50, S = 200 - 2q from 50 on;
    Q = clamp(floor((base * S + 50) / 100), 1, 255). Quality 50 returns `base`."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return torch.floor((base.double() * scale + 50) / 100).clamp(1, 255)


def dct_matrix(n: int = DCT_BLOCK, *, device=None, dtype=torch.float32) -> Tensor:
    """Orthonormal DCT-II matrix D (n, n): D[k, i] = a_k cos(pi (2i + 1) k / (2n)),
    a_0 = sqrt(1/n), a_k = sqrt(2/n); the 2-D transform of a block X is D X D^T."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] = math.sqrt(1.0 / n)
    return d.to(device=device, dtype=dtype)


def freq_weights(quality: int, ycbcr: bool) -> Tensor:
    """(3, 8, 8) coefficient weights w = (1/Q) / mean(1/Q) per channel: the luminance
    table for Y and the chrominance table for Cb and Cr, or the luminance table on all
    three channels in RGB mode. Each channel's weights have mean 1."""
    luma = jpeg_table(torch.tensor(JPEG_LUMA_TABLE), quality)
    chroma = jpeg_table(torch.tensor(JPEG_CHROMA_TABLE), quality) if ycbcr else luma
    q = torch.stack([luma, chroma, chroma])  # (3, 8, 8)
    inv = 1.0 / q
    return (inv / inv.mean(dim=(1, 2), keepdim=True)).float()


def _freq_tables(quality: int, ycbcr: bool, device, dtype) -> tuple[Tensor, Tensor, Tensor]:
    key = (quality, ycbcr, torch.device(device), dtype)
    if key not in _FREQ_CACHE:
        _FREQ_CACHE[key] = (dct_matrix(device=device, dtype=dtype),
                            freq_weights(quality, ycbcr).to(device=device, dtype=dtype),
                            torch.tensor(YCBCR_MATRIX, dtype=dtype).to(device))
    return _FREQ_CACHE[key]


def rgb_to_ycbcr(x: Tensor, m: Tensor | None = None) -> Tensor:
    """(B, 3, H, W) RGB -> YCbCr with the BT.601 matrix (`m`, built when None), no
    offsets."""
    if m is None:
        m = torch.tensor(YCBCR_MATRIX, device=x.device, dtype=x.dtype)
    return torch.einsum("oc,bchw->bohw", m, x)


def block_dct(x: Tensor, d: Tensor | None = None) -> Tensor:
    """Orthonormal 2-D DCT-II of the non-overlapping 8x8 blocks of (B, C, H, W), as two
    batched matrix products D X D^T (`d` = a cached `dct_matrix`, built when None).
    Sides that are not multiples of 8 are reflect-padded (replicate-padded when a side
    is too short to reflect). Returns (B, C, ceil(H/8), ceil(W/8), 8, 8) coefficients."""
    b, c, h, w = x.shape
    n = DCT_BLOCK
    pad_h, pad_w = (-h) % n, (-w) % n
    if pad_h or pad_w:
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        h, w = h + pad_h, w + pad_w
    if d is None:
        d = dct_matrix(n, device=x.device, dtype=x.dtype)
    blocks = x.reshape(b, c, h // n, n, w // n, n)  # (B, C, h/8, 8, w/8, 8)
    blocks = blocks.permute(0, 1, 2, 4, 3, 5)  # (B, C, h/8, w/8, 8, 8)
    return d @ blocks @ d.T


def freq_loss(v_pred: Tensor, v_target: Tensor, quality: int = 90, ycbcr: bool = True) -> Tensor:
    """mean(w * (DCT(v_pred) - DCT(v_target))^2) over all 8x8 block coefficients,
    channels and blocks, with the JPEG weights of `freq_weights`. Inputs (B, 3, H, W).
    The colour transform, padding and DCT are linear, so the transform is applied once
    to the difference. Because the DCT is orthonormal and w has mean 1, the loss is of
    the order of the pixel MSE (equal to it for uniform weights in RGB)."""
    if v_pred.shape != v_target.shape or v_pred.dim() != 4 or v_pred.shape[1] != 3:
        raise ValueError(f"freq_loss needs two (B, 3, H, W) tensors of one shape, got "
                         f"{tuple(v_pred.shape)} and {tuple(v_target.shape)}")
    # fp32 even under mixed precision: the DCT is a matmul that autocast would lower.
    with torch.autocast(device_type=v_pred.device.type, enabled=False):
        diff = v_pred.float() - v_target.float()
        d, w, m = _freq_tables(quality, ycbcr, diff.device, diff.dtype)
        if ycbcr:
            diff = rgb_to_ycbcr(diff, m)
        coeffs = block_dct(diff, d)  # (B, 3, H/8, W/8, 8, 8)
        return (w[:, None, None] * coeffs.square()).mean()


# --------------------------------------------------------------------------------------
# iREPA: representation alignment with a conv projector and spatially normalised targets
# --------------------------------------------------------------------------------------

class IREPAProjector(nn.Module):
    """3x3 convolution from the patch tokens' width to the teacher's width, applied on
    the token grid (iREPA replaces REPA's per-token MLP with it to keep spatial
    structure). Trainable: it belongs in the optimizer and in checkpoints."""

    def __init__(self, hidden_dim: int, teacher_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.teacher_dim = teacher_dim
        self.conv = nn.Conv2d(hidden_dim, teacher_dim, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, L, hidden_dim) image tokens on the row-major grid (h, w), L = h * w ->
        (B, teacher_dim, h, w) projected map."""
        b, n, dim = features.shape
        h, w = grid
        if n != h * w or dim != self.hidden_dim:
            raise ValueError(f"iREPA projector expects (B, h*w = {h * w}, {self.hidden_dim}) "
                             f"tokens for grid {(h, w)}, got {tuple(features.shape)}")
        x = features.transpose(1, 2).reshape(b, dim, h, w)  # (B, D, h, w)
        return self.conv(x)


def zscore_tokens(tokens: Tensor, alpha: float) -> Tensor:
    """iREPA spatial normalisation of teacher tokens (B, L, C), per sample and channel
    over the L tokens: (y - alpha * mean) / (std + 1e-6). alpha = 1 is a full z-score;
    alpha < 1 keeps part of the global component that the token mean carries."""
    y = tokens.float()
    return (y - alpha * y.mean(dim=1, keepdim=True)) / (y.std(dim=1, keepdim=True) + 1e-6)


def repa_loss(features: Tensor, grid: tuple[int, int], teacher_tokens: Tensor,
              teacher_grid: tuple[int, int], projector: IREPAProjector,
              zscore_alpha: float) -> Tensor:
    """Unweighted iREPA loss: mean over tokens of 1 - cos(projected feature, z-scored
    teacher token), in [0, 2]. `features` (B, L, D) are a patch block's image tokens on
    `grid`; `teacher_tokens` (B, L_t, C) are the teacher's patch tokens (no CLS or
    register tokens) on `teacher_grid`. When the grids differ the projected map is
    resized bilinearly to the teacher grid. The teacher receives no gradient."""
    ht, wt = teacher_grid
    b, n_t, c = teacher_tokens.shape
    if n_t != ht * wt or c != projector.teacher_dim or b != features.shape[0]:
        raise ValueError(f"teacher tokens must be (B = {features.shape[0]}, h_t*w_t = {ht * wt}, "
                         f"{projector.teacher_dim}) for teacher grid {(ht, wt)}, "
                         f"got {tuple(teacher_tokens.shape)}")
    pred = projector(features, grid)  # (B, C, h, w)
    if tuple(pred.shape[-2:]) != (ht, wt):
        pred = F.interpolate(pred, size=(ht, wt), mode="bilinear", align_corners=False)
    pred = pred.float().flatten(2).transpose(1, 2)  # (B, C, h_t, w_t) -> (B, L_t, C)
    target = zscore_tokens(teacher_tokens.detach(), zscore_alpha)
    return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()


class SRAProjector(nn.Module):
    """Per-token MLP (D -> 2D -> D) from a patch block's tokens to the self-alignment
    target. Trainable, saved with the model (`sra.`), not needed for sampling."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_dim, 2 * hidden_dim), nn.SiLU(),
                                 nn.Linear(2 * hidden_dim, hidden_dim))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


SRA_BETA = 0.05   # smooth L1's switch from squared to absolute error (Jiang et al. 2025)


def sra_loss(features: Tensor, targets: Tensor, projector: SRAProjector) -> Tensor:
    """Unweighted self-alignment loss: smooth L1 (beta SRA_BETA) between the projected
    tokens (B, L, D) and the targets (B, L, D), which receive no gradient."""
    if features.shape != targets.shape:
        raise ValueError(f"self-alignment features {tuple(features.shape)} and targets "
                         f"{tuple(targets.shape)} must have one shape")
    return F.smooth_l1_loss(projector(features).float(), targets.detach().float(),
                            beta=SRA_BETA)


def repa_active(loss_cfg: LossConfig, step: int) -> bool:
    """Whether the iREPA term is computed at this optimizer step: a teacher is configured,
    the weight is positive and the early stop `repa_until` is not reached. The trainer
    skips the teacher forward when this is False."""
    return bool(loss_cfg.repa_teacher) and loss_cfg.repa_weight > 0 and step < loss_cfg.repa_until


# --------------------------------------------------------------------------------------
# Caption dropout (classifier-free guidance)
# --------------------------------------------------------------------------------------

def drop_captions(captions: list[str], p: float,
                  generator: torch.Generator | None = None) -> list[str]:
    """Each caption replaced by "" with probability p; the empty prompt is the
    unconditional input that guidance contrasts with. Reproducible with a seeded
    CPU generator."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout probability must be in [0, 1], got {p}")
    drop = torch.rand(len(captions), generator=generator) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]


# --------------------------------------------------------------------------------------
# Combined training loss and validation loss
# --------------------------------------------------------------------------------------

def flow_losses(pred: Tensor, z: Tensor, t: Tensor, x: Tensor, eps: Tensor, prediction: str,
                loss_cfg: LossConfig, *, features: Tensor | None = None,
                grid: tuple[int, int] | None = None, teacher: Tensor | None = None,
                teacher_grid: tuple[int, int] | None = None,
                projector: IREPAProjector | None = None, gamma_sq: Tensor | None = None,
                step: int = 0, sra_features: Tensor | None = None,
                sra_targets: Tensor | None = None, sra_projector: SRAProjector | None = None
                ) -> dict[str, Tensor]:
    """All training terms of one micro-batch, each already weighted, plus their sum.

    pred: the network output for z = interpolate(x, eps, t) (a velocity for
    prediction "v", a clean image for "x"); x, eps: (B, 3, H, W); t: (B,).
    Keys: "v" always; "freq" when freq_weight > 0; "repa" when `teacher` is given and
    `repa_active(loss_cfg, step)` (then features, grid, teacher_grid and projector are
    required); "sra" when `sra_targets` are given (then sra_features and sra_projector
    are required); "gamma" when gamma_sq is given and gamma_l2 > 0; "total". A term that is
    off is absent rather than zero, so logs never show a switched-off term as a
    perfect score. All values are fp32 scalars."""
    v_hat = to_velocity(pred, z, t, prediction, loss_cfg.t_eps)
    v_star = velocity_target(x, eps, t, prediction, loss_cfg.t_eps)
    terms = {"v": v_loss(v_hat, v_star)}
    if loss_cfg.freq_weight > 0:
        terms["freq"] = loss_cfg.freq_weight * freq_loss(
            v_hat, v_star, loss_cfg.freq_quality, loss_cfg.freq_ycbcr)
    if teacher is not None and repa_active(loss_cfg, step):
        if features is None or grid is None or teacher_grid is None or projector is None:
            raise ValueError("the iREPA term needs features, grid, teacher_grid and projector "
                             "along with the teacher tokens")
        terms["repa"] = loss_cfg.repa_weight * repa_loss(
            features, grid, teacher, teacher_grid, projector, loss_cfg.repa_zscore_alpha)
    if sra_targets is not None:
        if sra_features is None or sra_projector is None:
            raise ValueError("the self-alignment term needs sra_features and sra_projector "
                             "along with its targets")
        terms["sra"] = loss_cfg.sra_weight * sra_loss(sra_features, sra_targets, sra_projector)
    if gamma_sq is not None and loss_cfg.gamma_l2 > 0:
        terms["gamma"] = loss_cfg.gamma_l2 * gamma_sq.float()
    terms["total"] = sum(terms.values())
    return terms


def validation_times(n_times: int, t_eps: float) -> Tensor:
    """(n_times,) evenly spaced times on [t_eps, 1 - t_eps], the fixed validation grid."""
    return torch.linspace(t_eps, 1.0 - t_eps, n_times)


@torch.no_grad()
def validation_loss(model_fn, x: Tensor, eps: Tensor, prediction: str, t_eps: float,
                    n_times: int = 8) -> Tensor:
    """Deterministic validation v-loss: the mean over the `validation_times` grid of the
    v-loss at every image in `x` (B, 3, H, W) with the fixed noise `eps` (draw it once
    from a seeded generator and keep it). `model_fn(z, t)` returns the network output for
    z (B, 3, H, W) at t (B,) with conditioning bound in; put the model in eval mode.
    Returns an fp32 scalar."""
    if eps.shape != x.shape:
        raise ValueError(f"validation noise must have the images' shape {tuple(x.shape)}, "
                         f"got {tuple(eps.shape)}")
    total = torch.zeros((), device=x.device)
    for t_k in validation_times(n_times, t_eps).tolist():
        t = torch.full((x.shape[0],), t_k, device=x.device)
        z = interpolate(x, eps, t)
        total += v_loss(to_velocity(model_fn(z, t), z, t, prediction, t_eps),
                        velocity_target(x, eps, t, prediction, t_eps))
    return total / n_times
