"""Analytic forward FLOPs of PixelHDM (engine/model.py) and of the plain single-path
network it is benchmarked against (engine/baseline.py), per image, split by part.

A multiply-add counts as 2 FLOPs, so a Linear(i -> o) applied to n tokens costs 2 n i o
(biases, norms, activations, RoPE and the softmax are elementwise and not counted, as
in torch.utils.flop_counter, which tests/test_bench.py checks these formulas against).
Attention over S tokens costs its projections plus 2 S^2 head_dim per query head for
q k^T and again for the weighted sum of v; GQA shrinks only the k and v projections.

Parts of PixelHDM (N patch blocks over S = T + L tokens, M pixel blocks over L patches
of p*p pixels of width d):
    patch_attn   gated GQA attention of the patch blocks (q, k, v, gate, o + matmuls)
    patch_mlp    SwiGLU of the patch blocks
    pixel_adaln  cond_expand (D -> p*p*d per patch) + ada (d -> 6d per pixel)
    compaction   compress (p*p*d -> D) + expand (D -> p*p*d) per patch
    pixel_attn   attention over the L compacted tokens, projections included
    pixel_mlp    per-pixel SwiGLU
    other        time and pooled-text conditioning, text projection, bottleneck patch
                 embedding, the patch blocks' AdaLN, pixel embedding and output
"""

from __future__ import annotations

from engine.config import ModelConfig, RunConfig, sra_layers

PARTS = ("patch_attn", "patch_mlp", "pixel_adaln", "compaction", "pixel_attn", "pixel_mlp",
         "other")


def linear(tokens: int, fan_in: int, fan_out: int) -> int:
    """FLOPs of a Linear(fan_in -> fan_out) over `tokens` rows."""
    return 2 * tokens * fan_in * fan_out


def attention(m: ModelConfig, seq: int, gate: str | None = None) -> int:
    """GatedAttention over `seq` tokens: projections plus the two attention matmuls."""
    D, hd = m.hidden_dim, m.head_dim
    q, kv = m.num_heads * hd, m.num_kv_heads * hd
    gate_out = {"headwise": m.num_heads, "elementwise": q, "none": 0}[gate or m.gate]
    proj = linear(seq, D, q) + 2 * linear(seq, D, kv) + linear(seq, D, gate_out) + linear(seq, q, D)
    return proj + 2 * (2 * m.num_heads * seq * seq * hd)


def swiglu(tokens: int, dim: int, mlp_ratio: float) -> int:
    hidden = int(dim * mlp_ratio)
    return linear(tokens, dim, 2 * hidden) + linear(tokens, hidden, dim)


def _grid(m: ModelConfig, width: int, height: int) -> int:
    return (height // m.patch_size) * (width // m.patch_size)


def _embeddings(m: ModelConfig, text_dim: int, text_tokens: int, patches: int,
                channels: int = 3) -> int:
    """What both networks spend before their blocks: the time MLP, the text tokens'
    projection and the bottleneck patch embedding of `channels` per pixel (pooled text is
    counted apart)."""
    D, pp3 = m.hidden_dim, channels * m.patch_size ** 2
    time = linear(1, m.time_embed_dim, D) + linear(1, D, D)
    return (time + linear(text_tokens, text_dim, D)
            + linear(patches, pp3, m.bottleneck) + linear(patches, m.bottleneck, D))


def pixelhdm_flops(m: ModelConfig, text_dim: int, width: int, height: int,
                   text_tokens: int) -> dict[str, int]:
    """Forward FLOPs of one image, keyed by PARTS."""
    D, d, pp = m.hidden_dim, m.pixel_dim, m.patch_size ** 2
    N, M = m.patch_layers, m.pixel_layers
    L = _grid(m, width, height)
    S = text_tokens + L
    D4 = max(1, D // 4)
    pooled = linear(1, text_dim, D4) + linear(1, D4, D)
    C = m.in_channels
    other = (_embeddings(m, text_dim, text_tokens, L, C) + pooled + N * linear(1, D, 6 * D)
             + linear(L * pp, C, d) + linear(L * pp, d, 3))
    return {
        "patch_attn": N * attention(m, S),
        "patch_mlp": N * swiglu(S, D, m.mlp_ratio),
        "pixel_adaln": M * (linear(L, D, pp * d) + linear(L * pp, d, 6 * d)),
        "compaction": M * (linear(L, pp * d, D) + linear(L, D, pp * d)),
        "pixel_attn": M * attention(m, L),
        "pixel_mlp": M * swiglu(L * pp, d, m.mlp_ratio),
        "other": other,
    }


def extra_forward_share(cfg: RunConfig, parts: dict[str, int]) -> float:
    """Inference work a training step adds on average to its forward and backward, in
    forwards of the network whose FLOPs by part are `parts` (pixelhdm_flops):
    loss.self_cond_p with model.self_cond (the estimate fed back), plus with
    loss.sra_weight > 0 the self-alignment teacher's patch blocks up to its target
    block."""
    share = cfg.loss.self_cond_p if cfg.model.self_cond else 0.0
    if cfg.loss.sra_weight > 0:
        blocks = sra_layers(cfg.loss, cfg.model.patch_layers)[1] / cfg.model.patch_layers
        share += blocks * (parts["patch_attn"] + parts["patch_mlp"]) / sum(parts.values())
    return share


def baseline_flops(m: ModelConfig, text_dim: int, width: int, height: int,
                   text_tokens: int) -> dict[str, int]:
    """Forward FLOPs of one image through engine.baseline.PlainDiT (no output gate, no
    pixel path), with the same part names; the pixel parts are zero."""
    D, N, pp3 = m.hidden_dim, m.patch_layers, 3 * m.patch_size ** 2
    L = _grid(m, width, height)
    S = text_tokens + L
    other = (_embeddings(m, text_dim, text_tokens, L) + linear(1, text_dim, D)
             + N * linear(1, D, 6 * D) + linear(1, D, 2 * D) + linear(L, D, pp3))
    flops = dict.fromkeys(PARTS, 0)
    flops.update(patch_attn=N * attention(m, S, gate="none"),
                 patch_mlp=N * swiglu(S, D, m.mlp_ratio), other=other)
    return flops
