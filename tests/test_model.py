"""The network: shapes, masks, mRoPE, GQA, initialisation, kernels, gradients, size."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import learner_cfg, learner_net, make_text

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


@pytest.mark.parametrize("H,W", [(32, 32), (32, 64), (48, 16), (8, 8)])
def test_shapes_square_and_non_square(H, W):
    net = learner_net()
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
    assert learner_cfg().place_embed is False
    z = torch.randn(1, 3, 8, 8).repeat(1, 1, 4, 4)                 # one patch repeated 4x4
    t, text = torch.full((1,), 0.5), make_text([0])
    plain = learner_net(learner_cfg())(z, t, text)
    placed = learner_net(learner_cfg(place_embed=True))(z, t, text)
    def spread(out):
        return patchify(out, 8).flatten(2).std(1).mean().item()   # across patches
    assert spread(plain) < 1e-5 and spread(placed) > 1e-2


def test_rejects_sizes_that_are_not_patch_multiples():
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        learner_net()(torch.randn(1, 3, 20, 16), torch.rand(1), make_text([2]))


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
    net = learner_net()
    z, t = torch.randn(2, 3, 16, 32), torch.rand(2)
    short = make_text([3, 2], T=3)
    padded = TextCond(F.pad(short.tokens, (0, 0, 0, 9)), F.pad(short.mask, (0, 9)), short.pooled)
    # garbage in padded rows must not matter either
    padded.tokens[:, 5:] = 7.0
    with torch.no_grad():
        a, b = net(z, t, short), net(z, t, padded)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_batch_mix_of_prompt_lengths_matches_single_runs():
    net = learner_net()
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
    net = learner_net()
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


def test_a_gpu_older_than_ampere_gets_the_kernel_it_has(monkeypatch):
    """Below compute capability 8.0 only SDPA's memory-efficient kernel runs (no flash-attn,
    no SDPA flash or cuDNN kernel, no bf16): attention repeats K/V on every call and never
    picks flash-attn, the trainer computes bf16 presets in fp16, and the generator's
    default is fp16. The capability is read from a plain dict, which a compiled block
    reads as a constant (traced here with fullgraph, no graph break)."""
    import engine.attention as attention
    from engine.attention import pre_ampere
    from engine.distributed import compute_precision
    from engine.generate import GenerateError, resolve_precision
    monkeypatch.setattr(attention, "flash_attn_func", lambda *a: None)   # "installed"
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    q = type("Q", (), {"device": cuda, "dtype": torch.bfloat16})()
    for capability, old in (((7, 5), True), ((8, 6), False), ((12, 0), False)):
        monkeypatch.setattr(attention, "_CAPABILITY", {0: capability})
        assert pre_ampere(cuda) is old and not pre_ampere(cpu)
        assert needs_expanded_kv(q, None) is old
        assert attention.resolve_backend("auto", cuda, torch.bfloat16) == (
            "sdpa" if old else "flash")
        precision, why = compute_precision("bf16", cuda)
        assert (precision, bool(why)) == (("fp16", True) if old else ("bf16", False))
        assert compute_precision("fp16", cuda) == ("fp16", "")
        assert resolve_precision(None, cuda) == ("fp16" if old else "bf16")
        if old:
            assert "compute capability 7.5" in why and "fp16 with a gradient scaler" in why
            with pytest.raises(GenerateError, match="no bf16 arithmetic.*use fp16"):
                resolve_precision("bf16", cuda)
        assert torch.compile(lambda x: x + pre_ampere(cuda), backend="eager",
                             fullgraph=True)(torch.zeros(1)).item() == float(old)
    monkeypatch.setattr(attention, "_CAPABILITY", {})
    assert not pre_ampere(cuda)                          # not seen: a current GPU is assumed
    # the frozen encoders stay out of fp16, whose range their outlier activations exceed
    from engine.distributed import frozen_dtype
    assert frozen_dtype(torch.float16) == torch.float32
    assert frozen_dtype(torch.bfloat16) == torch.bfloat16
    assert frozen_dtype(torch.float32) == torch.float32


def test_cuda_kernels_never_math_and_masked_calls_not_cudnn(monkeypatch):
    """On CUDA no call may fall to the math kernel, and masked calls stay off cuDNN, whose
    masked backward gives NaN gradients on Hopper (pytorch/pytorch#196678): the
    memory-efficient kernel, which takes masks on every GPU, runs them."""
    from torch.nn.attention import SDPBackend

    import engine.attention as attention
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert attention.cuda_kernels(mask) == [SDPBackend.EFFICIENT_ATTENTION]
    unmasked = attention.cuda_kernels(None)
    assert SDPBackend.MATH not in unmasked and SDPBackend.FLASH_ATTENTION in unmasked
    # a GPU that no device resolution registered is read on first use, not assumed current
    monkeypatch.setattr(attention, "_CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 5))
    assert attention.pre_ampere(torch.device("cuda"))


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


def test_a_prompt_of_unknown_density_is_read_once_not_at_every_sampling_step():
    """Text whose mask was made on a GPU (density unknown) is read back at its first
    forward and the answer kept on the caller's object, which the sampler passes to every
    step: one read per prompt, not one per step."""
    net = learner_net()
    text = make_text([3, 2])
    text.dense = None                                   # as if its mask were made on a GPU
    with torch.no_grad():
        net(torch.randn(2, 3, 16, 16), torch.rand(2), text)
    assert text.dense is False


def test_forward_and_backward_read_nothing_back_from_the_device():
    """On the meta device any read of a value (bool(), .item(), .tolist()) raises, so a
    training forward + backward that runs there has no host-device sync in it."""
    net = learner_net().train().to("meta")
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
    net = learner_net()
    with torch.no_grad():
        torch.testing.assert_close(net(z, t, text), net(z, t, unknown))
    assert TextCond.cat([text, make_text([2, 1], T=2)]).dense is False
    assert TextCond.cat([text, make_text([4], T=4)]).dense is True


def test_rope_tables_are_built_once_per_grid_and_match_the_explicit_ids():
    net = learner_net()
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
    net = learner_net(learner_cfg(rope_grid=8))
    _, coarse, _, _ = net._rope_tables(4, 4, cpu)                       # (16, hd/2)
    _, fine, _, _ = net._rope_tables(8, 8, cpu)                         # (64, hd/2)
    pooled = fine.view(4, 2, 4, 2, -1).mean((1, 3)).reshape(16, -1)
    torch.testing.assert_close(coarse, pooled)
    torch.testing.assert_close(fine, learner_net()._rope_tables(8, 8, cpu)[1])
    default = learner_net()
    assert not torch.allclose(net._rope_tables(4, 6, cpu)[1], default._rope_tables(4, 6, cpu)[1])
    z, t, text = torch.randn(1, 3, 32, 48), torch.full((1,), 0.5), make_text([3])
    assert net(z, t, text).shape == z.shape


def test_rope_grid_keep_aspect_spaces_rows_and_columns_alike():
    """model.rope_grid_aspect = keep: on a wide grid rows and columns are one spacing
    apart (a circle stays round), the grid covers N x N cells in area and is centred where
    a square image's centre lies; a square grid gets the same positions as 'stretch', and a
    wide one does not (stretch squeezes its columns)."""
    cpu = torch.device("cpu")
    keep = learner_net(learner_cfg(rope_grid=8, rope_grid_aspect="keep"))
    stretch = learner_net(learner_cfg(rope_grid=8))
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
        a = learner_net(learner_cfg(attention="sdpa"))(z, t, text)
        b = learner_net(learner_cfg(attention="math"))(z, t, text)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_flash_request_without_flash_attn_is_a_clear_error():
    net = learner_net(learner_cfg(attention="flash"))
    with pytest.raises(RuntimeError, match="flash-attn"):
        net(torch.randn(1, 3, 16, 16), torch.rand(1), make_text([2]))


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_gates_start_at_one_half(gate):
    net = learner_net(learner_cfg(gate=gate))
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
    cfg = learner_cfg(hidden_dim=128, pixel_dim=16, num_heads=4, mrope_split=[8, 12, 12])
    stds = []
    for seed in range(3):
        net = learner_net(cfg, seed)
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
    net = learner_net().train()
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
        net = learner_net().train()
        net.grad_checkpointing = ckpt
        net(z, t, text).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_time_and_text_change_the_output():
    net = learner_net()
    z = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        a = net(z, torch.tensor([0.2]), make_text([3], seed=1))
        b = net(z, torch.tensor([0.8]), make_text([3], seed=1))
        c = net(z, torch.tensor([0.2]), make_text([3], seed=2))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_x_prediction_config_builds_and_runs():
    net = learner_net(learner_cfg(prediction="x"))
    assert net(torch.randn(1, 3, 16, 16), torch.rand(1), make_text([1])).shape == (1, 3, 16, 16)


def test_bf16_autocast_forward_is_finite():
    net = learner_net()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 3, 16, 16), torch.rand(2), make_text([2, 0]))
    assert torch.isfinite(out.float()).all()


def test_matmul_weights_stored_in_bf16_draw_the_same_images_under_autocast():
    """Generation on a GPU stores the matmul weights in the autocast dtype once instead of
    casting them at every step (engine.generate.for_inference): autocast casts them to it
    anyway, so the images are the same bit for bit (here on the CPU's bf16 autocast)."""
    import copy

    from engine.generate import render
    net = learner_net().eval().requires_grad_(False)
    half = copy.deepcopy(net)
    half.matmul_weights_to(torch.bfloat16)
    assert half.patch_in.weight.dtype == torch.bfloat16
    assert half.text_norm.weight.dtype == torch.float32              # norms stay
    assert half.pixel_blocks[0].ada.bias.dtype == torch.float32      # and biases

    def encode(prompts):
        return make_text([3] * len(prompts), seed=len(prompts[0]))
    kwargs = dict(steps=2, sampler="heun", cfg=3.0, rescale=0.0, interval=(0.0, 1.0),
                  shift=1.0, amp_dtype=torch.bfloat16)
    a = render(net, encode, ["a b", "a b c"], "", [1, 2], 16, 16, **kwargs)
    b = render(half, encode, ["a b", "a b c"], "", [1, 2], 16, 16, **kwargs)
    assert torch.equal(a, b)


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
    eager, compiled = learner_net(seed=3).train(), learner_net(seed=3).train()
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


def test_compiled_blocks_under_gradient_checkpointing_match_eager(monkeypatch):
    """The GPU presets train compiled blocks with gradient checkpointing: each compiled
    block is recomputed in backward (non-reentrant checkpoint around a compiled graph).
    Through AOTAutograd (the `aot_eager` backend: the graphs and their backward as the
    compiler gets them, without code generation) it gives the eager network's numbers."""
    import torch._dynamo
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: real_compile(self, **{**kw, "backend": "aot_eager"}))
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    try:
        eager, compiled = learner_net(seed=5).train(), learner_net(seed=5).train()
        compiled.compile_blocks()
        compiled.grad_checkpointing = True
        z, t, text = torch.randn(2, 3, 16, 24), torch.rand(2), make_text([3, 1])
        outs = []
        for net in (eager, compiled):
            out = net.forward_train(z, t, text)
            (out.pred.square().mean() + out.gamma_sq).backward()
            outs.append((out.pred.detach(), [p.grad for p in net.parameters()]))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
        for a, b in zip(outs[1][1], outs[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert counters["stats"]["unique_graphs"] >= 2     # the blocks did run compiled
    finally:
        torch._dynamo.reset()


def test_compiled_blocks_take_every_call_a_run_makes(traced_compile):
    """A run calls its compiled blocks with gradients (training) and without (validation,
    sample grids, quality), for batches of one and of many, with and without a text mask
    (a prompt that fills every token slot has none), on several bucket grids and prompt
    lengths. Each is a separate compiled variant; more than torch's default limit of eight
    must not fail (fullgraph turns the limit into an error: a run died at its first
    validation). Traced only (`traced_compile`): the variants and their limit are dynamo's,
    and code generation (checked above) would only make this slow."""
    eager, compiled = learner_net(seed=4), learner_net(seed=4)
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
