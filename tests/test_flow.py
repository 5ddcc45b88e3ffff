"""Flow matching: time convention, time sampling, and every training loss term."""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.config import LossConfig
from engine.flow import (
    JPEG_CHROMA_TABLE,
    JPEG_LUMA_TABLE,
    YCBCR_MATRIX,
    IREPAProjector,
    block_dct,
    dct_matrix,
    drop_captions,
    flow_losses,
    freq_loss,
    freq_weights,
    interpolate,
    jpeg_table,
    repa_active,
    repa_loss,
    resolution_shift,
    rgb_to_ycbcr,
    sample_t,
    shift_time,
    t_bin_index,
    to_clean,
    to_velocity,
    v_loss,
    v_loss_per_sample,
    validation_loss,
    validation_times,
    velocity_target,
    zscore_tokens,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _pair(shape=(2, 3, 16, 16), seed=0):
    g = _gen(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# --------------------------------------------------------------------------------------
# Time convention
# --------------------------------------------------------------------------------------

def test_interpolate_endpoints_and_velocity():
    x, eps = _pair()
    b = x.shape[0]
    assert torch.equal(interpolate(x, eps, torch.zeros(b)), eps)
    assert torch.equal(interpolate(x, eps, torch.ones(b)), x)
    t, h = torch.full((b,), 0.3), 1e-3
    dz = (interpolate(x, eps, t + h) - interpolate(x, eps, t)) / h
    torch.testing.assert_close(dz, x - eps, atol=1e-3, rtol=0)


@pytest.mark.parametrize("prediction", ["v", "x"])
def test_clean_velocity_round_trip(prediction):
    x, eps = _pair()
    t = torch.tensor([0.2, 0.7])
    z = interpolate(x, eps, t)
    exact = x - eps if prediction == "v" else x
    torch.testing.assert_close(to_velocity(exact, z, t, prediction), x - eps, atol=1e-5, rtol=0)
    torch.testing.assert_close(to_clean(exact, z, t, prediction), x, atol=1e-5, rtol=0)
    # any output: clean estimate -> velocity -> clean estimate is the identity
    pred = torch.randn(x.shape, generator=_gen(1))
    v = to_velocity(pred, z, t, prediction)
    torch.testing.assert_close(to_clean(v, z, t, "v"), to_clean(pred, z, t, prediction),
                               atol=1e-5, rtol=0)


def test_x_prediction_velocity_clamps_at_t_eps():
    x, eps = _pair((1, 3, 4, 4))
    t = torch.ones(1)
    z = interpolate(x, eps, t)
    v = to_velocity(x + 1.0, z, t, "x", t_eps=0.05)
    torch.testing.assert_close(v, torch.full_like(v, 1.0 / 0.05))


def test_sample_t_uniform_share_reaches_the_data_end():
    """A logit-normal N(-0.8, 0.8) all but never draws t > 0.85; a uniform share does, in
    proportion, and uniform = 0 leaves the times (and the generator's stream) unchanged."""
    plain = sample_t(40000, -0.8, 0.8, generator=_gen())
    assert (plain > 0.85).float().mean().item() < 1e-3
    mixed = sample_t(40000, -0.8, 0.8, uniform=0.2, generator=_gen())
    assert (mixed > 0.85).float().mean().item() == pytest.approx(0.2 * 0.15, abs=0.005)
    assert torch.equal(sample_t(100, -0.8, 0.8, uniform=0.0, generator=_gen()),
                       sample_t(100, -0.8, 0.8, generator=_gen()))
    everything = sample_t(40000, -0.8, 0.8, uniform=1.0, generator=_gen())
    assert everything.mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("prediction", ["x", "v"])
def test_velocity_target_is_clamped_like_the_prediction(prediction):
    """For t > 1 - t_eps an x-prediction's velocity divides by t_eps; the target must too,
    else the best clean estimate overshoots the image by noise of the opposite sign."""
    x, eps = _pair((3, 3, 4, 4))
    t = torch.tensor([0.3, 0.95, 0.99])
    z = interpolate(x, eps, t)
    target = velocity_target(x, eps, t, prediction, t_eps=0.05)
    assert torch.equal(target[0], (x - eps)[0])      # factor exactly 1 where unclamped
    if prediction == "v":
        assert torch.equal(target, x - eps)
        return
    # the exact clean image is a perfect prediction at every t, the clamped ones included
    loss = flow_losses(x, z, t, x, eps, "x", LossConfig(t_eps=0.05, freq_weight=0.0))["v"]
    assert loss.item() < 1e-10
    torch.testing.assert_close(target[2], (x - eps)[2] * (0.01 / 0.05), rtol=1e-4, atol=1e-6)
    # the old unclamped target made x itself look wrong there and rewarded an overshoot
    old = v_loss(to_velocity(x, z, t, "x", 0.05)[2:], (x - eps)[2:])
    assert old.item() > 0.1


def test_sample_t_range_and_centre():
    t = sample_t(20000, 0.0, 1.0, generator=_gen())
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert 0.0 < t.min() < 0.03 and 0.97 < t.max() < 1.0   # not squeezed into [0.05, 0.95]
    assert abs(t.median().item() - 0.5) < 0.02
    assert abs(t.mean().item() - 0.5) < 0.01
    # logit-normal: P(t < sigmoid(-1.645)) = 5 %
    assert abs((t < torch.sigmoid(torch.tensor(-1.645))).float().mean().item() - 0.05) < 0.01
    # a negative mean puts more samples near noise; a shift > 1 too
    assert sample_t(20000, -0.8, 1.0, generator=_gen()).median() < 0.4
    shifted = sample_t(20000, 0.0, 1.0, 3.0, generator=_gen())
    assert shifted.median() == pytest.approx(0.25, abs=0.02)


def test_shift_time_monotonic_and_fixes_endpoints():
    t = torch.linspace(0, 1, 101)
    for s in (0.5, 1.0, 3.0):
        ts = shift_time(t, s)
        assert ts[0] == 0 and ts[-1] == 1
        assert (ts[1:] > ts[:-1]).all()
    assert shift_time(torch.tensor([0.5]), 3.0).item() == pytest.approx(0.25)
    # s > 1 moves every interior time towards noise
    assert (shift_time(t[1:-1], 3.0) < t[1:-1]).all()


def test_resolution_shift_values():
    assert resolution_shift(512, 512, 2.5, 0) == 2.5
    assert resolution_shift(256, 256, 1.0, 256) == pytest.approx(1.0)
    assert resolution_shift(512, 512, 1.0, 256) == pytest.approx(2.0)
    assert resolution_shift(1024, 256, 1.5, 256) == pytest.approx(3.0)


# --------------------------------------------------------------------------------------
# V-loss
# --------------------------------------------------------------------------------------

def test_v_loss_and_per_sample():
    a, b = _pair((3, 3, 8, 8))
    per = v_loss_per_sample(a, b)
    assert per.shape == (3,)
    torch.testing.assert_close(per[1], ((a[1] - b[1]) ** 2).mean())
    torch.testing.assert_close(per.mean(), v_loss(a, b))
    assert v_loss(a.bfloat16(), b.bfloat16()).dtype == torch.float32


def test_t_bin_index():
    t = torch.tensor([0.0, 0.09, 0.1, 0.55, 0.999, 1.0])
    assert t_bin_index(t, 10).tolist() == [0, 0, 1, 5, 9, 9]


# --------------------------------------------------------------------------------------
# Frequency loss
# --------------------------------------------------------------------------------------

def test_dct_matrix_is_orthonormal_and_parseval_holds():
    d = dct_matrix()
    torch.testing.assert_close(d @ d.T, torch.eye(8), atol=1e-6, rtol=0)
    a, b = _pair((2, 3, 16, 24))
    coeffs = block_dct(a - b)
    assert coeffs.shape == (2, 3, 2, 3, 8, 8)
    torch.testing.assert_close(coeffs.square().mean(), ((a - b) ** 2).mean())


def test_block_dct_of_a_constant_block_is_dc_only():
    x = torch.full((1, 1, 8, 8), 0.5)
    c = block_dct(x)[0, 0, 0, 0]
    assert c[0, 0].item() == pytest.approx(8 * 0.5)
    c[0, 0] = 0
    assert c.abs().max() < 1e-6


def test_jpeg_table_scaling():
    base = torch.tensor(JPEG_LUMA_TABLE)
    assert torch.equal(jpeg_table(base, 50), base.double())
    expected = torch.floor((base.double() * 20 + 50) / 100).clamp(1, 255)  # q = 90: S = 20
    assert torch.equal(jpeg_table(base, 90), expected)
    assert torch.equal(jpeg_table(base, 100), torch.ones(8, 8, dtype=torch.float64))
    assert jpeg_table(base, 1).max() == 255
    with pytest.raises(ValueError, match="quality"):
        jpeg_table(base, 0)


@pytest.mark.parametrize("quality", [10, 30, 75, 90])
def test_jpeg_tables_match_libjpeg(quality):
    """Pillow's libjpeg writes the same scaled Annex K tables into a saved file."""
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    tables = Image.open(io.BytesIO(buf.getvalue())).quantization
    for index, base in ((0, JPEG_LUMA_TABLE), (1, JPEG_CHROMA_TABLE)):
        ours = jpeg_table(torch.tensor(base), quality).flatten().tolist()
        assert ours == list(tables[index])


def test_freq_weights_mean_one_low_frequencies_heavier():
    w = freq_weights(90, ycbcr=True)
    assert w.shape == (3, 8, 8)
    torch.testing.assert_close(w.mean(dim=(1, 2)), torch.ones(3))
    assert (w[:, 0, 0] > w[:, 7, 7]).all()
    assert not torch.equal(w[0], w[1]) and torch.equal(w[1], w[2])
    rgb = freq_weights(90, ycbcr=False)
    assert torch.equal(rgb[0], w[0]) and torch.equal(rgb[1], w[0]) and torch.equal(rgb[2], w[0])
    torch.testing.assert_close(freq_weights(100, ycbcr=True), torch.ones(3, 8, 8))


def test_ycbcr_matrix_rows():
    m = torch.tensor(YCBCR_MATRIX)
    torch.testing.assert_close(m.sum(dim=1), torch.tensor([1.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    white = torch.ones(1, 3, 2, 2)
    torch.testing.assert_close(rgb_to_ycbcr(white)[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]),
                               atol=1e-6, rtol=0)
    red = torch.zeros(1, 3, 1, 1)
    red[0, 0] = 1.0
    torch.testing.assert_close(rgb_to_ycbcr(red).flatten(), m[:, 0])


def test_freq_loss_zero_for_equal_inputs():
    a, _ = _pair()
    assert freq_loss(a, a.clone()).item() == 0.0


def test_freq_loss_builds_its_tables_once(monkeypatch):
    """Every table of the frequency loss (DCT, weights, colour matrix) is made once per
    device: a tensor made from Python numbers on a GPU is a blocking copy, which in every
    micro-batch would stall the host until the forward pass had run."""
    a, b = _pair()
    for ycbcr in (True, False):
        freq_loss(a, b, ycbcr=ycbcr)
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *x, **k: made.append(x) or real(*x, **k))
    for ycbcr in (True, False):
        freq_loss(a, b, ycbcr=ycbcr)
    assert made == []


def _slow_freq_loss(pred, target, quality, ycbcr):
    """Reference: explicit loops over blocks and DCT basis functions."""
    diff = (pred - target).double()
    if ycbcr:
        m = torch.tensor(YCBCR_MATRIX, dtype=torch.float64)
        diff = torch.einsum("oc,bchw->bohw", m, diff)
    h, w = diff.shape[-2:]
    diff = F.pad(diff, (0, (-w) % 8, 0, (-h) % 8), mode="reflect")
    chroma = JPEG_CHROMA_TABLE if ycbcr else JPEG_LUMA_TABLE
    tables = [JPEG_LUMA_TABLE, chroma, chroma]
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    weights = []
    for table in tables:
        q = [[min(max((v * scale + 50) // 100, 1), 255) for v in row] for row in table]
        inv = torch.tensor(q, dtype=torch.float64).reciprocal()
        weights.append(inv / inv.mean())

    def a(k):
        return math.sqrt(1 / 8) if k == 0 else math.sqrt(2 / 8)

    basis = torch.zeros(8, 8, 8, 8, dtype=torch.float64)
    for u in range(8):
        for v in range(8):
            for i in range(8):
                for j in range(8):
                    basis[u, v, i, j] = (a(u) * a(v) * math.cos(math.pi * (2 * i + 1) * u / 16)
                                         * math.cos(math.pi * (2 * j + 1) * v / 16))
    total, count = 0.0, 0
    for b in range(diff.shape[0]):
        for c in range(3):
            for by in range(0, diff.shape[2], 8):
                for bx in range(0, diff.shape[3], 8):
                    block = diff[b, c, by:by + 8, bx:bx + 8]
                    coeff = (basis * block).sum(dim=(2, 3))
                    total += (weights[c] * coeff ** 2).sum().item()
                    count += 64
    return total / count


@pytest.mark.parametrize("quality,ycbcr,shape", [(90, True, (1, 3, 8, 16)),
                                                 (30, False, (2, 3, 16, 8)),
                                                 (75, True, (1, 3, 12, 10))])
def test_freq_loss_matches_slow_reference(quality, ycbcr, shape):
    a, b = _pair(shape, seed=3)
    fast = freq_loss(a, b, quality, ycbcr).item()
    assert fast == pytest.approx(_slow_freq_loss(a, b, quality, ycbcr), rel=1e-5)


def test_freq_loss_stays_fp32_under_autocast():
    a, b = _pair()
    plain = freq_loss(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = freq_loss(a.bfloat16(), b)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(plain.item(), rel=1e-2)


def test_freq_loss_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="freq_loss"):
        freq_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


# --------------------------------------------------------------------------------------
# iREPA
# --------------------------------------------------------------------------------------

def _identity_projector(dim):
    """A projector whose 3x3 conv passes each token through unchanged (centre tap = I)."""
    proj = IREPAProjector(dim, dim)
    with torch.no_grad():
        proj.conv.weight.zero_()
        proj.conv.weight[:, :, 1, 1] = torch.eye(dim)
    return proj


def test_projector_shapes_and_init_on_non_square_grid():
    torch.manual_seed(0)
    proj = IREPAProjector(16, 12)
    out = proj(torch.randn(2, 8, 16), (2, 4))
    assert out.shape == (2, 12, 2, 4)
    assert proj.conv.weight.shape == (12, 16, 3, 3)
    assert torch.equal(proj.conv.bias, torch.zeros(12))
    fan_in = 16 * 9
    assert proj.conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.15)
    assert {n for n, _ in proj.named_parameters()} == {"conv.weight", "conv.bias"}
    with pytest.raises(ValueError, match="grid"):
        proj(torch.randn(2, 8, 16), (3, 3))


def test_projector_keeps_row_major_token_order():
    feats = torch.randn(1, 8, 4, generator=_gen())
    out = _identity_projector(4)(feats, (2, 4))
    torch.testing.assert_close(out.flatten(2).transpose(1, 2), feats)


def test_zscore_tokens():
    y = torch.randn(2, 12, 5, generator=_gen()) * 3 + 7
    z = zscore_tokens(y, 1.0)
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=1), torch.ones(2, 5), atol=1e-4, rtol=0)
    half = zscore_tokens(y, 0.5)
    torch.testing.assert_close(half.mean(dim=1), 0.5 * y.mean(dim=1) / y.std(dim=1),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("alpha", [1.0, 0.8])
def test_repa_loss_zero_when_aligned_and_two_when_opposite(alpha):
    teacher = torch.randn(2, 8, 6, generator=_gen())
    aligned = zscore_tokens(teacher, alpha) * 2.5  # any positive scale per token
    proj = _identity_projector(6)
    same = repa_loss(aligned, (2, 4), teacher, (2, 4), proj, alpha)
    opposite = repa_loss(-aligned, (2, 4), teacher, (2, 4), proj, alpha)
    assert same.item() == pytest.approx(0, abs=1e-6)
    assert opposite.item() == pytest.approx(2, abs=1e-6)


def test_repa_loss_range_and_gradients():
    torch.manual_seed(0)
    proj = IREPAProjector(16, 6)
    feats = torch.randn(2, 8, 16, requires_grad=True)
    teacher = torch.randn(2, 8, 6, requires_grad=True)
    loss = repa_loss(feats, (2, 4), teacher, (2, 4), proj, 0.8)
    assert 0.0 <= loss.item() <= 2.0
    loss.backward()
    assert proj.conv.weight.grad.abs().sum() > 0 and proj.conv.bias.grad is not None
    assert feats.grad.abs().sum() > 0
    assert teacher.grad is None


def test_repa_loss_accepts_teacher_tokens_from_inference_mode():
    proj = IREPAProjector(4, 6)
    with torch.inference_mode():
        teacher = torch.randn(1, 8, 6)
    feats = torch.randn(1, 8, 4, requires_grad=True)
    repa_loss(feats, (2, 4), teacher, (2, 4), proj, 1.0).backward()
    assert feats.grad is not None


def test_repa_loss_resizes_to_teacher_grid():
    torch.manual_seed(0)
    proj = IREPAProjector(4, 6)
    feats = torch.randn(2, 8, 4)
    teacher = torch.randn(2, 32, 6)
    loss = repa_loss(feats, (2, 4), teacher, (4, 8), proj, 1.0)
    mapped = F.interpolate(proj(feats, (2, 4)), size=(4, 8), mode="bilinear", align_corners=False)
    expected = 1 - F.cosine_similarity(mapped.flatten(2).transpose(1, 2),
                                       zscore_tokens(teacher, 1.0), dim=-1)
    torch.testing.assert_close(loss, expected.mean())
    with pytest.raises(ValueError, match="teacher"):
        repa_loss(feats, (2, 4), teacher, (4, 4), proj, 1.0)


def test_repa_active_and_early_stop():
    cfg = LossConfig(repa_teacher="dinov3", repa_until=100)
    assert repa_active(cfg, 99) and not repa_active(cfg, 100)
    assert not repa_active(LossConfig(repa_teacher=""), 0)
    assert not repa_active(LossConfig(repa_teacher="dinov3", repa_weight=0.0), 0)


# --------------------------------------------------------------------------------------
# Combined loss
# --------------------------------------------------------------------------------------

def _batch(prediction, seed=0):
    x, eps = _pair((2, 3, 16, 16), seed)
    t = torch.tensor([0.3, 0.8])
    z = interpolate(x, eps, t)
    pred = torch.randn(x.shape, generator=_gen(seed + 1))
    return pred, z, t, x, eps


@pytest.mark.parametrize("prediction", ["v", "x"])
def test_flow_losses_terms_and_total(prediction):
    pred, z, t, x, eps = _batch(prediction)
    cfg = LossConfig(repa_teacher="dinov3", repa_weight=0.5, freq_weight=2.0, gamma_l2=1e-2)
    torch.manual_seed(0)
    proj = IREPAProjector(16, 6)
    feats = torch.randn(2, 4, 16)
    teacher = torch.randn(2, 4, 6)
    gamma_sq = torch.tensor(3.0)
    out = flow_losses(pred, z, t, x, eps, prediction, cfg, features=feats, grid=(1, 4),
                      teacher=teacher, teacher_grid=(1, 4), projector=proj, gamma_sq=gamma_sq)
    assert set(out) == {"v", "freq", "repa", "gamma", "total"}
    v_hat = to_velocity(pred, z, t, prediction, cfg.t_eps)
    torch.testing.assert_close(out["v"], v_loss(v_hat, x - eps))
    torch.testing.assert_close(out["freq"], 2.0 * freq_loss(v_hat, x - eps, 90, True))
    repa = repa_loss(feats, (1, 4), teacher, (1, 4), proj, 1.0)
    torch.testing.assert_close(out["repa"], 0.5 * repa)
    torch.testing.assert_close(out["gamma"], torch.tensor(3e-2))
    torch.testing.assert_close(out["total"], out["v"] + out["freq"] + out["repa"] + out["gamma"])
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in out.values())


@pytest.mark.parametrize("prediction", ["v", "x"])
def test_flow_losses_perfect_prediction_is_zero(prediction):
    _, z, t, x, eps = _batch(prediction)
    exact = x - eps if prediction == "v" else x
    out = flow_losses(exact, z, t, x, eps, prediction, LossConfig())
    assert out["v"].item() < 1e-10 and out["freq"].item() < 1e-10


def test_flow_losses_switched_off_terms_are_absent():
    pred, z, t, x, eps = _batch("v")
    cfg = LossConfig(repa_teacher="dinov3", repa_until=10, freq_weight=0.0, gamma_l2=0.0)
    proj = IREPAProjector(16, 6)
    out = flow_losses(pred, z, t, x, eps, "v", cfg, features=torch.randn(2, 4, 16), grid=(2, 2),
                      teacher=torch.randn(2, 4, 6), teacher_grid=(2, 2), projector=proj,
                      gamma_sq=torch.tensor(1.0), step=10)
    assert set(out) == {"v", "total"}
    torch.testing.assert_close(out["total"], out["v"])
    with pytest.raises(ValueError, match="iREPA"):
        flow_losses(pred, z, t, x, eps, "v", cfg, teacher=torch.randn(2, 4, 6), step=0)


# --------------------------------------------------------------------------------------
# Caption dropout
# --------------------------------------------------------------------------------------

def test_drop_captions_rate_and_determinism():
    caps = [f"caption {i}" for i in range(4000)]
    out = drop_captions(caps, 0.1, _gen(7))
    rate = sum(c == "" for c in out) / len(caps)
    assert abs(rate - 0.1) < 0.02
    assert all(o in ("", c) for o, c in zip(out, caps, strict=True))
    assert drop_captions(caps, 0.1, _gen(7)) == out
    assert drop_captions(caps, 0.1, _gen(8)) != out
    assert drop_captions(caps[:50], 0.0, _gen()) == caps[:50]
    assert drop_captions(caps[:50], 1.0, _gen()) == [""] * 50
    with pytest.raises(ValueError, match="probability"):
        drop_captions(caps, 1.5)


# --------------------------------------------------------------------------------------
# Validation loss
# --------------------------------------------------------------------------------------

def test_validation_times():
    ts = validation_times(5, 0.05)
    torch.testing.assert_close(ts, torch.tensor([0.05, 0.275, 0.5, 0.725, 0.95]))


def test_validation_loss_closed_form_and_deterministic():
    x, eps = _pair((2, 3, 8, 8))
    seen = []

    def zero_velocity(z, t):
        seen.append(t[0].item())
        return torch.zeros_like(z)

    val = validation_loss(zero_velocity, x, eps, "v", 0.05, n_times=4)
    torch.testing.assert_close(val, ((x - eps) ** 2).mean())
    assert seen == pytest.approx(validation_times(4, 0.05).tolist())

    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)

    def model_fn(z, t):
        return net(z) * t.view(-1, 1, 1, 1)

    first = validation_loss(model_fn, x, eps, "x", 0.05)
    torch.manual_seed(123)  # global RNG state must not matter
    assert torch.equal(validation_loss(model_fn, x, eps, "x", 0.05), first)
    assert first.dtype == torch.float32 and first.dim() == 0
