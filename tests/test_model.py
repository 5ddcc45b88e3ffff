"""The network: shapes, masks, mRoPE, GQA, initialisation, kernels, gradients, size."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import LEARNER

from engine.attention import (
    GatedAttention,
    apply_rope,
    attention,
    needs_expanded_kv,
    reference_attention,
    rope_angles,
    sdpa_attention,
)
from engine.config import load_preset
from engine.model import PixelHDM, TextCond, patchify, place_code, unpatchify

TEXT_DIM = 32


def tiny_cfg(**changes):
    """The LEARNER network (tests/tiny.py) with two pixel blocks and `changes`."""
    cfg = load_preset("tiny-cpu", LEARNER).model
    return dataclasses.replace(cfg, **{"pixel_layers": 2, "bottleneck_dim": 16, **changes})


def make_text(lengths, T=None, dim=TEXT_DIM, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = T or max(max(lengths), 1)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    tokens = torch.randn(len(lengths), T, dim, generator=g) * mask[..., None]
    pooled = torch.randn(len(lengths), dim, generator=g) * (torch.tensor(lengths) > 0)[:, None]
    return TextCond(tokens, mask, pooled)


def model(cfg=None, seed=0):
    torch.manual_seed(seed)
    return PixelHDM(cfg or tiny_cfg(), TEXT_DIM).eval()


@pytest.mark.parametrize("H,W", [(32, 32), (32, 64), (48, 16), (8, 8)])
def test_shapes_square_and_non_square(H, W):
    net = model()
    z = torch.randn(3, 3, H, W)
    out = net.forward_train(z, torch.rand(3), make_text([3, 0, 5]), repa_layer=1)
    assert out.pred.shape == (3, 3, H, W)
    assert out.features.shape == (3, (H // 8) * (W // 8), 64)
    assert out.gamma_sq.ndim == 0 and torch.isfinite(out.pred).all()


def test_place_code_tells_every_patch_of_a_grid_apart_at_any_aspect():
    for h, w in [(8, 8), (4, 8), (8, 2), (1, 1)]:
        code = place_code(h, w, 64)
        assert code.shape == (h * w, 64) and code.abs().max() <= 1.0
        assert len({tuple(r) for r in code.round(decimals=5).tolist()}) == h * w
    # the same place in the image gets the same code at any grid: the centre of a 3x3
    # grid and of a 5x5 grid, the top-left quarter's centre of 2x2 and 4x4 (rows 0-1 of 4)
    assert torch.allclose(place_code(3, 3, 32)[4], place_code(5, 5, 32)[12], atol=1e-6)
    assert place_code(2, 3, 10)[:, 8:].abs().max() == 0          # dims left over are zeros


def test_place_embed_makes_where_a_patch_is_visible_to_the_network():
    """With the same input in every patch and no text, a network without the place code
    gives every patch the same output: RoPE only tells relative positions, and attention
    over identical values returns them whatever its weights. The place code gives each
    patch its own output. It is off by default (old checkpoints keep their behaviour)."""
    assert tiny_cfg().place_embed is False
    z = torch.randn(1, 3, 8, 8).repeat(1, 1, 4, 4)                 # one patch repeated 4x4
    t, text = torch.full((1,), 0.5), make_text([0])
    plain = model(tiny_cfg())(z, t, text)
    placed = model(tiny_cfg(place_embed=True))(z, t, text)
    def spread(out):
        return patchify(out, 8).flatten(2).std(1).mean().item()   # across patches
    assert spread(plain) < 1e-5 and spread(placed) > 1e-2


def test_rejects_sizes_that_are_not_patch_multiples():
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        model()(torch.randn(1, 3, 20, 16), torch.rand(1), make_text([2]))


def test_patchify_round_trip_and_order():
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float).view(2, 3, 8, 12)
    p = patchify(x, 4)                                   # (2, 6, 16, 3)
    assert p.shape == (2, 6, 16, 3)
    # patch 1 is the second patch of the first row; its pixel 0 is x[:, :, 0, 4]
    assert torch.equal(p[:, 1, 0], x[:, :, 0, 4])
    # pixel 5 of patch 0 is row 1, column 1
    assert torch.equal(p[:, 0, 5], x[:, :, 1, 1])
    assert torch.equal(unpatchify(p, 4, 2, 3), x)


def test_padding_tokens_do_not_change_the_output():
    net = model()
    z, t = torch.randn(2, 3, 16, 32), torch.rand(2)
    short = make_text([3, 2], T=3)
    padded = TextCond(F.pad(short.tokens, (0, 0, 0, 9)), F.pad(short.mask, (0, 9)), short.pooled)
    # garbage in padded rows must not matter either
    padded.tokens[:, 5:] = 7.0
    with torch.no_grad():
        a, b = net(z, t, short), net(z, t, padded)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_batch_mix_of_prompt_lengths_matches_single_runs():
    net = model()
    z, t = torch.randn(3, 3, 16, 16), torch.rand(3)
    text = make_text([1, 6, 0])
    with torch.no_grad():
        together = net(z, t, text)
        for i in range(3):
            n = max(int(text.mask[i].sum()), 1)
            alone = TextCond(text.tokens[i:i + 1, :n], text.mask[i:i + 1, :n], text.pooled[i:i + 1])
            torch.testing.assert_close(net(z[i:i + 1], t[i:i + 1], alone), together[i:i + 1],
                                       rtol=1e-5, atol=1e-5)


def test_mrope_depends_only_on_relative_offsets():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    split = (4, 6, 6)

    def score(pq, pk):
        aq = rope_angles(torch.tensor([[pq]]), split, 10000.0)[:, None]
        ak = rope_angles(torch.tensor([[pk]]), split, 10000.0)[:, None]
        return (apply_rope(q, aq.cos(), aq.sin()) * apply_rope(k, ak.cos(), ak.sin())).sum()

    base = score((3, 2, 5), (1, 4, 4))
    for shift in [(10, 0, 0), (0, 7, 0), (0, 0, 3), (5, 9, 11)]:
        moved = score(tuple(a + s for a, s in zip((3, 2, 5), shift)),
                      tuple(a + s for a, s in zip((1, 4, 4), shift)))
        torch.testing.assert_close(moved, base, rtol=1e-4, atol=1e-5)
    # a different offset gives a different score
    assert not torch.allclose(score((3, 2, 6), (1, 4, 4)), base, atol=1e-4)
    # rotation keeps norms
    a = rope_angles(torch.tensor([[(4, 5, 6)]]), split, 10000.0)[:, None]
    torch.testing.assert_close(apply_rope(q, a.cos(), a.sin()).norm(), q.norm())


def _plain_mha(layer: GatedAttention, x, cos, sin, mask):
    """Multi-head attention written out from the layer's weights, one head at a time."""
    B, S, _ = x.shape
    hd = layer.head_dim
    q = layer.q_norm(layer.q(x).view(B, S, layer.heads, hd).transpose(1, 2))
    k = layer.k_norm(layer.k(x).view(B, S, layer.heads, hd).transpose(1, 2))
    v = layer.v(x).view(B, S, layer.heads, hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    heads = []
    for h in range(layer.heads):
        s = q[:, h] @ k[:, h].transpose(-1, -2) / math.sqrt(hd)
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
        heads.append(s.softmax(-1) @ v[:, h])
    out = torch.stack(heads, 1).transpose(1, 2)           # (B, S, H, hd)
    g = torch.sigmoid(layer.gate(x)).view(B, S, layer.heads, 1)
    return layer.o((out * g).reshape(B, S, -1))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_gqa_with_kv_equal_q_heads_is_plain_mha(backend):
    torch.manual_seed(0)
    layer = GatedAttention(32, 4, 4, "headwise", backend)
    torch.nn.init.normal_(layer.gate.weight, std=0.3)
    x = torch.randn(2, 7, 32)
    pos = torch.stack([torch.arange(7), torch.zeros(7, dtype=torch.long), torch.arange(7)], -1)
    a = rope_angles(pos[None], (2, 2, 4), 10000.0)[:, None]
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 1], [1] * 7]).bool()
    torch.testing.assert_close(layer(x, a.cos(), a.sin(), mask),
                               _plain_mha(layer, x, a.cos(), a.sin(), mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_identity_attention_is_each_token_attending_to_itself_alone(kv):
    """The perturbed branch of perturbed-attention guidance: token i's output is what
    the layer gives a sequence of token i alone, whatever the other tokens and the mask."""
    torch.manual_seed(0)
    layer = GatedAttention(32, 4, kv, "headwise", "sdpa")
    torch.nn.init.normal_(layer.gate.weight, std=0.3)
    x = torch.randn(2, 7, 32)
    pos = torch.stack([torch.arange(7), torch.zeros(7, dtype=torch.long), torch.arange(7)], -1)
    a = rope_angles(pos[None], (2, 2, 4), 10000.0)[:, None]
    cos, sin = a.cos(), a.sin()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 1], [1] * 7]).bool()
    out = layer(x, cos, sin, mask, identity=True)
    alone = torch.cat([layer(x[:, i:i + 1], cos[..., i:i + 1, :], sin[..., i:i + 1, :])
                       for i in range(7)], dim=1)
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, layer(x, cos, sin, mask), atol=1e-3)


def test_perturbed_patch_blocks_change_the_prediction_only_when_asked():
    net = model()
    z, t, text = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.6]), make_text([3, 5])
    with torch.no_grad():
        plain = net(z, t, text)
        assert torch.equal(net(z, t, text, perturb=()), plain)
        for layer in range(1, net.cfg.patch_layers + 1):
            assert not torch.allclose(net(z, t, text, perturb={layer}), plain, atol=1e-4)


@pytest.mark.parametrize("kv", [1, 2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_backends_agree(kv, masked):
    g = torch.Generator().manual_seed(kv)
    q = torch.randn(2, 4, 9, 8, generator=g)
    k, v = torch.randn(2, kv, 9, 8, generator=g), torch.randn(2, kv, 9, 8, generator=g)
    mask = torch.rand(2, 9, generator=g) > 0.4 if masked else None
    if mask is not None:
        mask[:, 0] = True
    torch.testing.assert_close(attention(q, k, v, mask, "sdpa"), attention(q, k, v, mask, "math"),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention(q, k, v, mask, "auto"), attention(q, k, v, mask, "math"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv", [1, 2, 4])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_sdpa_path_with_repeated_kv_equals_the_reference(kv, masked, dtype):
    """The path CUDA takes for masked and fp32 calls (K/V repeated to the query heads, so
    the memory-efficient kernel can run) gives the reference's numbers."""
    g = torch.Generator().manual_seed(kv)
    q = torch.randn(2, 4, 19, 8, generator=g).to(dtype)
    k, v = (torch.randn(2, kv, 19, 8, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(2, 19, generator=g) > 0.4 if masked else None
    if mask is not None:
        mask[:, 0] = True
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    want = reference_attention(q, k, v, mask)
    for expand in (True, False):
        torch.testing.assert_close(sdpa_attention(q, k, v, mask, expand_kv=expand), want, **tol)


def test_kv_is_repeated_only_where_cuda_would_otherwise_run_the_math_kernel():
    cpu = torch.zeros(1, 4, 3, 8)
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert not needs_expanded_kv(cpu, mask) and not needs_expanded_kv(cpu, None)
    cuda = torch.zeros(1, 4, 3, 8, device="meta")   # device type is all that is read
    cuda_like = type("Q", (), {"device": torch.device("cuda", 0), "dtype": torch.bfloat16})()
    assert needs_expanded_kv(cuda_like, mask)            # masked: efficient kernel, no GQA
    assert not needs_expanded_kv(cuda_like, None)        # flash kernel reads shared heads
    cuda_like.dtype = torch.float32
    assert needs_expanded_kv(cuda_like, None)            # fp32: no flash kernel
    assert not needs_expanded_kv(cuda, mask)


@pytest.mark.parametrize("masked", [False, True])
def test_cpu_attention_runs_the_flash_kernel_not_the_math_one(masked):
    """Which SDPA kernel runs, from the profiler: masked and grouped-query calls too."""
    from torch.profiler import ProfilerActivity, profile
    q, k, v = torch.randn(2, 4, 70, 16), torch.randn(2, 2, 70, 16), torch.randn(2, 2, 70, 16)
    mask = (torch.arange(70) < 60).expand(2, 70).clone() if masked else None
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        attention(q, k, v, mask, "auto")
    names = {e.key for e in prof.key_averages()}
    assert any("flash_attention_for_cpu" in n for n in names), names
    assert not any("_scaled_dot_product_attention_math" in n for n in names), names


def test_forward_and_backward_read_nothing_back_from_the_device():
    """On the meta device any read of a value (bool(), .item(), .tolist()) raises, so a
    training forward + backward that runs there has no host-device sync in it."""
    net = model().train().to("meta")
    for lengths in ([3, 0, 5], [4, 4, 4]):
        text = make_text(lengths).to("meta")       # masks built on the CPU: density known
        z = torch.randn(3, 3, 32, 16, device="meta", requires_grad=True)
        out = net.forward_train(z, torch.rand(3, device="meta"), text, repa_layer=1)
        (out.pred.square().mean() + out.gamma_sq).backward()
        assert z.grad.shape == z.shape


def test_dense_text_drops_the_mask_and_gives_the_same_output():
    z, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    text = make_text([4, 4])
    assert text.dense is True and make_text([4, 2]).dense is False
    assert text.to("meta").dense is True and make_text([4, 2]).to("meta").dense is False
    unknown = TextCond(text.tokens, text.mask, text.pooled)
    unknown.dense = None
    net = model()
    with torch.no_grad():
        torch.testing.assert_close(net(z, t, text), net(z, t, unknown))
    assert TextCond.cat([text, make_text([2, 1], T=2)]).dense is False
    assert TextCond.cat([text, make_text([4], T=4)]).dense is True


def test_rope_tables_are_built_once_per_grid_and_match_the_explicit_ids():
    net = model()
    a = net._rope_tables(3, 5, torch.device("cpu"))
    assert net._rope_tables(3, 5, torch.device("cpu")) is a
    freqs, grid_ang, cos_px, _ = a
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(5), indexing="ij")
    ids = torch.stack([torch.full((15,), 7), rows.flatten(), cols.flatten()], dim=-1)
    split = tuple(net.cfg.mrope_split)
    want = rope_angles(ids, split, net.cfg.rope_theta)
    torch.testing.assert_close(grid_ang + 7 * freqs[0], want)
    # the float64 formula of the angles, for a large position
    big = torch.tensor([[4000, 90, 130]])
    exact = []
    for axis, dim in enumerate(split):
        j = torch.arange(0, dim, 2, dtype=torch.float64)
        exact.append(big[0, axis].double() * 10000.0 ** (-j / dim))
    torch.testing.assert_close(rope_angles(big, split, 10000.0)[0].double(), torch.cat(exact),
                               rtol=1e-6, atol=1e-4)


def test_rope_grid_puts_a_place_at_the_same_angle_at_every_resolution():
    """model.rope_grid = 8: a token of a 4 x 4 grid rotates by the mean angle of the 2 x 2
    tokens of an 8 x 8 grid that cover its area; on an 8 x 8 grid the positions are the
    plain rows and columns (what rope_grid = 0 uses at every size)."""
    cpu = torch.device("cpu")
    net = model(tiny_cfg(rope_grid=8))
    _, coarse, _, _ = net._rope_tables(4, 4, cpu)                       # (16, hd/2)
    _, fine, _, _ = net._rope_tables(8, 8, cpu)                         # (64, hd/2)
    pooled = fine.view(4, 2, 4, 2, -1).mean((1, 3)).reshape(16, -1)
    torch.testing.assert_close(coarse, pooled)
    torch.testing.assert_close(fine, model()._rope_tables(8, 8, cpu)[1])
    assert not torch.allclose(net._rope_tables(4, 6, cpu)[1], model()._rope_tables(4, 6, cpu)[1])
    z, t, text = torch.randn(1, 3, 32, 48), torch.full((1,), 0.5), make_text([3])
    assert net(z, t, text).shape == z.shape


def test_rope_grid_keep_aspect_spaces_rows_and_columns_alike():
    """model.rope_grid_aspect = keep: on a wide grid rows and columns are one spacing
    apart (a circle stays round), the grid covers N x N cells in area and is centred where
    a square image's centre lies; a square grid gets the same positions as 'stretch', and a
    wide one does not (stretch squeezes its columns)."""
    cpu = torch.device("cpu")
    keep = model(tiny_cfg(rope_grid=8, rope_grid_aspect="keep"))
    stretch = model(tiny_cfg(rope_grid=8))
    freqs, wide, _, _ = keep._rope_tables(2, 8, cpu)                    # 2 rows x 8 columns
    # the first pair of each axis turns at frequency 1: its angle is the position itself
    row_pos = wide[:, freqs[1].nonzero()[0, 0]]
    col_pos = wide[:, freqs[2].nonzero()[0, 0]]
    step = torch.tensor(8 / 4.0)                                        # N / sqrt(2 * 8)
    torch.testing.assert_close(col_pos[1] - col_pos[0], step)
    torch.testing.assert_close(row_pos[8] - row_pos[0], step)
    torch.testing.assert_close(row_pos.mean(), torch.tensor(3.5))
    torch.testing.assert_close(col_pos.mean(), torch.tensor(3.5))
    torch.testing.assert_close(keep._rope_tables(4, 4, cpu)[1], stretch._rope_tables(4, 4, cpu)[1])
    assert not torch.allclose(keep._rope_tables(2, 8, cpu)[1], stretch._rope_tables(2, 8, cpu)[1])
    z, t, text = torch.randn(1, 3, 16, 64), torch.full((1,), 0.5), make_text([3])
    assert keep(z, t, text).shape == z.shape


def test_whole_model_agrees_across_backends():
    z, t, text = torch.randn(2, 3, 16, 24), torch.rand(2), make_text([2, 5])
    with torch.no_grad():
        a = model(tiny_cfg(attention="sdpa"))(z, t, text)
        b = model(tiny_cfg(attention="math"))(z, t, text)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_flash_request_without_flash_attn_is_a_clear_error():
    net = model(tiny_cfg(attention="flash"))
    with pytest.raises(RuntimeError, match="flash-attn"):
        net(torch.randn(1, 3, 16, 16), torch.rand(1), make_text([2]))


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_gates_start_at_one_half(gate):
    net = model(tiny_cfg(gate=gate))
    seen = []
    for mod in net.modules():
        if isinstance(mod, GatedAttention):
            mod.gate.register_forward_hook(lambda m, i, o: seen.append(torch.sigmoid(o)))
    with torch.no_grad():
        net(torch.randn(2, 3, 16, 16), torch.rand(2), make_text([3, 1]))
    assert len(seen) == 4
    for g in seen:
        assert torch.equal(g, torch.full_like(g, 0.5))


def test_initial_output_has_the_intended_scale():
    """Output RMS near 1 for a noisy input, at the default width (the v target has
    RMS sqrt(1 + var(x)) ~ 1.1-1.4), and modulation starts near identity."""
    cfg = tiny_cfg(hidden_dim=128, pixel_dim=16, num_heads=4, mrope_split=[8, 12, 12])
    stds = []
    for seed in range(3):
        net = model(cfg, seed)
        with torch.no_grad():
            out = net(torch.randn(4, 3, 32, 32), torch.rand(4), make_text([3, 4, 0, 2]))
            stds.append(out.std())
    assert 0.6 < float(torch.stack(stds).mean()) < 1.5
    ada = net.patch_blocks[0].ada
    c = torch.randn(8, 128)
    g1, b1, a1, *_ = ada(F.silu(c)).chunk(6, -1)
    assert g1.abs().max() < 0.5 and b1.abs().max() < 0.5
    assert (a1 - 1).abs().max() < 0.5


def test_every_trainable_parameter_receives_a_gradient():
    net = model().train()
    out = net.forward_train(torch.randn(2, 3, 16, 32), torch.rand(2), make_text([3, 2]),
                            repa_layer=1)
    (out.pred.square().mean() + out.features.square().mean() + out.gamma_sq).backward()
    missing = [n for n, p in net.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []


def test_gradient_checkpointing_gives_the_same_gradients():
    z, t, text = torch.randn(2, 3, 16, 16), torch.rand(2), make_text([2, 3])
    grads = []
    for ckpt in (False, True):
        net = model().train()
        net.grad_checkpointing = ckpt
        net(z, t, text).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_time_and_text_change_the_output():
    net = model()
    z = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        a = net(z, torch.tensor([0.2]), make_text([3], seed=1))
        b = net(z, torch.tensor([0.8]), make_text([3], seed=1))
        c = net(z, torch.tensor([0.2]), make_text([3], seed=2))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_x_prediction_config_builds_and_runs():
    net = model(tiny_cfg(prediction="x"))
    assert net(torch.randn(1, 3, 16, 16), torch.rand(1), make_text([1])).shape == (1, 3, 16, 16)


def test_bf16_autocast_forward_is_finite():
    net = model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 3, 16, 16), torch.rand(2), make_text([2, 0]))
    assert torch.isfinite(out.float()).all()


def test_pixelhdm_default_parameter_count():
    cfg = load_preset("pixelhdm-default")
    with torch.device("meta"):
        net = PixelHDM(cfg.model, 1024)
    n = sum(p.numel() for p in net.parameters())
    # upstream: 356,364,355; ours adds the text projection and the pooled-text MLP
    assert abs(n / 356_364_355 - 1) < 0.01
    assert n == 357_941_635


def test_compiled_blocks_match_eager_forward_and_gradients():
    """Regional compilation (fullgraph: a graph break in a block fails here) computes what
    the eager network computes, for a masked prompt batch on a non-square grid."""
    from engine.distributed import compiler_problem
    if problem := compiler_problem(torch.device("cpu")):
        pytest.skip(f"torch.compile cannot run on this machine: {problem}")
    eager, compiled = model(seed=3).train(), model(seed=3).train()
    compiled.compile_blocks()
    for H, W, lengths in ((16, 32, [3, 0]),):
        z, t, text = torch.randn(2, 3, H, W), torch.rand(2), make_text(lengths)
        outs = []
        for net in (eager, compiled):
            net.zero_grad()
            out = net.forward_train(z, t, text)
            (out.pred.square().mean() + out.gamma_sq).backward()
            outs.append((out.pred.detach(), [p.grad.clone() for p in net.parameters()]))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
        for a, b in zip(outs[1][1], outs[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_compiled_blocks_take_every_call_a_run_makes(traced_compile):
    """A run calls its compiled blocks with gradients (training) and without (validation,
    sample grids, quality), for batches of one and of many, with and without a text mask
    (a prompt that fills every token slot has none), on several bucket grids and prompt
    lengths. Each is a separate compiled variant; more than torch's default limit of eight
    must not fail (fullgraph turns the limit into an error: a run died at its first
    validation). Traced only (`traced_compile`): the variants and their limit are dynamo's,
    and code generation (checked above) would only make this slow."""
    eager, compiled = model(seed=4), model(seed=4)
    compiled.compile_blocks()
    for grad in (True, False):
        for lengths in ([3, 3, 3], [3, 1, 2], [3], [5, 2, 5, 1, 3, 3]):
            for H, W in ((16, 16), (16, 8), (8, 16)):
                z, t = torch.randn(len(lengths), 3, H, W), torch.rand(len(lengths))
                text = make_text(lengths)
                with torch.set_grad_enabled(grad):
                    for net in (eager, compiled):
                        net.train(grad)
                    want, got = (net.forward_train(z, t, text).pred for net in (eager, compiled))
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)



def _wide_splits(t: torch.Tensor) -> list[tuple[int, ...]]:
    """Input sizes of every chunk/split behind `t` that cuts a tensor with more than one
    position (token or pixel) along the second-to-last axis."""
    seen, found, todo = set(), [], [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith("Split"):
            sizes = tuple(node._saved_self_sym_sizes)
            if len(sizes) > 2 and sizes[-2] > 1:
                found.append(sizes)
        todo.extend(f for f, _ in node.next_functions)
    return found


def test_pixel_and_mlp_products_are_not_cut_from_one_wide_output():
    """The SwiGLU's gate and up, and the six pixel-wise AdaLN terms, come from products
    with slices of one weight, so backward sums input gradients as narrow as the input:
    one product chunked into pieces would concatenate a gradient as wide as all pieces,
    per token or per pixel, in every step. (The patch blocks' AdaLN cuts one vector per
    image, which costs nothing.)"""
    net = model().train()
    out = net.forward_train(torch.randn(2, 3, 32, 32), torch.rand(2), make_text([3, 4]))
    assert _wide_splits(out.pred.sum() + out.gamma_sq) == []


def test_piecewise_linear_stays_one_product_off_the_cpu():
    """Off the CPU (here the meta device, standing in for a GPU) one product is chunked."""
    from engine.model import PiecewiseLinear
    lin = PiecewiseLinear(4, 12, pieces=3).to("meta")
    pieces = lin(torch.randn(2, 5, 4, device="meta"))
    assert [p.shape for p in pieces] == [(2, 5, 4)] * 3
    assert _wide_splits(sum(p.sum() for p in pieces)) == [(2, 5, 12)]
    with pytest.raises(ValueError, match="do not split into 5 pieces"):
        PiecewiseLinear(4, 12, pieces=5)


def _chunked(self, x, bias_offset=None):
    bias = self.bias if bias_offset is None else self.bias + bias_offset
    return F.linear(x, self.weight, bias).chunk(self.pieces, dim=-1)


def _pred_penalty_grads(perturb: bool = False):
    """A training forward and backward of a fixed small network on a fixed batch: its
    prediction, pixel-path penalty and parameter gradients. With `perturb` every weight
    moves away from its initial value, so that terms that start at zero matter too."""
    net = model().train()
    if perturb:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    z = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = net.forward_train(z, torch.tensor([0.3, 0.8]), make_text([3, 4]))
    (out.pred.square().mean() + out.gamma_sq).backward()
    return out.pred.detach(), out.gamma_sq.detach(), {
        n: p.grad for n, p in net.named_parameters() if p.grad is not None}


def _assert_same_outputs(got, want) -> None:
    (pred, gamma, grads), (ref_pred, ref_gamma, ref_grads) = got, want
    torch.testing.assert_close(pred, ref_pred)
    torch.testing.assert_close(gamma, ref_gamma)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], msg=n)


def test_sliced_products_equal_one_product_cut_in_pieces(monkeypatch):
    """The network's output, penalty and gradients are those of one product per layer,
    chunked."""
    from engine.model import PiecewiseLinear

    got = _pred_penalty_grads()
    monkeypatch.setattr(PiecewiseLinear, "forward", _chunked)
    _assert_same_outputs(got, _pred_penalty_grads())


def _reference_pixel_block(self, x, s_cond, cos, sin):
    """The pixel block as its docstring and the paper write it: modulate(x) = (1 + gamma)
    * x + beta with (gamma, beta, alpha) x 2 from one product, the penalty on gamma."""
    B, L, pp, d = x.shape
    cond = self.cond_expand(s_cond).view(B, L, pp, d)
    g1, b1, a1, g2, b2, a2 = F.linear(F.silu(cond), self.ada.weight, self.ada.bias).chunk(6, -1)
    h = ((1 + g1) * self.norm1(x) + b1).reshape(B, L, pp * d)
    h = self.attn(self.compress_norm(self.compress(h)), cos, sin)
    x = x + a1 * self.res_scale * self.expand(self.expand_norm(h)).view(B, L, pp, d)
    x = x + a2 * self.res_scale * self.mlp((1 + g2) * self.norm2(x) + b2)
    return x, g1.square().mean() + g2.square().mean()


def test_pixel_block_equals_its_plain_formula(monkeypatch):
    """The pixel block's fused passes (the 1 of 1 + gamma folded into the AdaLN bias, one
    addcmul per modulation, the residual scale applied before the expand) give the plain
    formula's output, penalty and gradients."""
    from engine.model import PixelBlock

    got = _pred_penalty_grads(perturb=True)
    monkeypatch.setattr(PixelBlock, "forward", _reference_pixel_block)
    _assert_same_outputs(got, _pred_penalty_grads(perturb=True))


@pytest.mark.parametrize("shape", [(3, 5, 16), (2, 4, 9, 16), (7, 128)])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_rms_norm_cpu_backward_equals_pytorchs(shape, weight_grad):
    """Training on the CPU takes the lean backward (its node is in the graph), with
    PyTorch's gradients for x and w up to rounding; without gradients PyTorch's own runs."""
    from engine.attention import RMSNorm
    gen = torch.Generator().manual_seed(3)
    norm = RMSNorm(shape[-1])
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(shape[-1], generator=gen))
    norm.weight.requires_grad_(weight_grad)
    x = (2 * torch.randn(shape, generator=gen)).requires_grad_()
    g = torch.randn(shape, generator=gen)
    y = norm(x)
    assert "LeanRMSNorm" in type(y.grad_fn).__name__
    dx, = torch.autograd.grad(y, x, g, retain_graph=True)
    dw = torch.autograd.grad(y, norm.weight, g)[0] if weight_grad else None

    x_ref = x.detach().clone().requires_grad_()
    w_ref = norm.weight.detach().clone().requires_grad_(weight_grad)
    y_ref = F.rms_norm(x_ref, (shape[-1],), w_ref, norm.eps)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, torch.autograd.grad(y_ref, x_ref, g, retain_graph=True)[0])
    if weight_grad:
        torch.testing.assert_close(dw, torch.autograd.grad(y_ref, w_ref, g)[0])
    with torch.no_grad():
        assert norm(x).grad_fn is None
