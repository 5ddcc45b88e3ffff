"""A plain single-path patch transformer, the yardstick of `python -m engine.bench
network`: how fast PixelHDM runs per FLOP next to a network that is nothing but large
matmuls over patch tokens.

JiT-style (arXiv 2511.13720): bottleneck patch embedding, the joint sequence
[text tokens; image tokens], N blocks of adaLN (shift, scale, gate) around attention
and SwiGLU, a modulated final norm and a linear unpatchify. Width, depth
(patch_layers), heads, kv heads, patch size, mRoPE and attention kernel come from the
same ModelConfig as PixelHDM, and its blocks compile the same way; the attention has no
output gate, and there is no pixel path. The modulation starts small rather than at
zero (adaLN-Zero), so that every gradient is as non-trivial as in a network that has
trained a while. Used by benchmarks only; its FLOPs are engine.flops.baseline_flops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from engine.attention import GatedAttention, RMSNorm, rope_angles
from engine.config import ModelConfig
from engine.model import (
    SwiGLU,
    TextCond,
    TimestepEmbedder,
    compile_regions,
    modulate,
    patchify,
    unpatchify,
)


class PlainBlock(nn.Module):
    """x += g1 * attn(modulate(norm(x))); x += g2 * mlp(modulate(norm(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden_dim
        self.norm1, self.norm2 = RMSNorm(D), RMSNorm(D)
        self.attn = GatedAttention(D, cfg.num_heads, cfg.num_kv_heads, "none", cfg.attention)
        self.mlp = SwiGLU(D, int(D * cfg.mlp_ratio))
        self.ada = nn.Linear(D, 6 * D)
        nn.init.normal_(self.ada.weight, std=0.02)

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor,
                mask: Tensor | None) -> Tensor:
        b1, g1, a1, b2, g2, a2 = self.ada(F.silu(c))[:, None].chunk(6, dim=-1)  # each (B, 1, D)
        x = x + a1 * self.attn(modulate(self.norm1(x), b1, g1), cos, sin, mask)
        return x + a2 * self.mlp(modulate(self.norm2(x), b2, g2))


class PlainDiT(nn.Module):
    def __init__(self, cfg: ModelConfig, text_dim: int):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.hidden_dim, cfg.patch_size
        self.grad_checkpointing = False
        self.t_embed = TimestepEmbedder(D, cfg.time_embed_dim)
        self.pooled_proj = nn.Linear(text_dim, D)
        self.text_norm = RMSNorm(text_dim)
        self.text_proj = nn.Linear(text_dim, D, bias=False)
        self.patch_in = nn.Linear(p * p * 3, cfg.bottleneck, bias=False)
        self.patch_out = nn.Linear(cfg.bottleneck, D)
        self.blocks = nn.ModuleList(PlainBlock(cfg) for _ in range(cfg.patch_layers))
        self.out_norm = RMSNorm(D)
        self.out_ada = nn.Linear(D, 2 * D)
        self.out = nn.Linear(D, p * p * 3)
        for lin in (self.out_ada, self.out):
            nn.init.normal_(lin.weight, std=0.02)

    def compile_blocks(self) -> None:
        """Each block compiled as a whole graph, as PixelHDM.compile_blocks does."""
        compile_regions(self.blocks)

    def forward(self, z: Tensor, t: Tensor, text: TextCond) -> Tensor:
        """The prediction (B, 3, H, W) for noisy images z (B, 3, H, W) at times t (B,)."""
        cfg, p = self.cfg, self.cfg.patch_size
        B, _, H, W = z.shape
        h, w = H // p, W // p
        L, T = h * w, text.tokens.shape[1]
        dtype = self.patch_in.weight.dtype
        z, text = z.to(dtype), text.to(dtype=dtype)
        c = self.t_embed(t) + self.pooled_proj(text.pooled)                    # (B, D)
        img = self.patch_out(self.patch_in(patchify(z, p).flatten(2)))        # (B, L, D)
        txt = self.text_proj(self.text_norm(text.tokens))                      # (B, T, D)
        x = torch.cat([txt.to(img.dtype), img], dim=1)                         # (B, T+L, D)
        mask = torch.cat([text.mask, text.mask.new_ones(B, L)], dim=1)        # (B, T+L)
        mask = None if bool(mask.all()) else mask
        # mRoPE ids as in PixelHDM: text n -> (n, 0, 0), patch (i, j) -> (n_text, i, j)
        rows = torch.arange(h, device=z.device).repeat_interleave(w)
        cols = torch.arange(w, device=z.device).repeat(h)
        pos = torch.zeros(B, T + L, 3, device=z.device, dtype=torch.long)
        pos[:, :T, 0] = torch.arange(T, device=z.device)
        pos[:, T:, 0] = text.mask.sum(1)[:, None]
        pos[:, T:, 1:] = torch.stack([rows, cols], dim=-1)
        ang = rope_angles(pos, tuple(cfg.mrope_split), cfg.rope_theta)[:, None]  # (B, 1, T+L, hd/2)
        cos, sin = ang.cos(), ang.sin()
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, c, cos, sin, mask)
        shift, scale = self.out_ada(F.silu(c))[:, None].chunk(2, dim=-1)      # each (B, 1, D)
        out = self.out(modulate(self.out_norm(x[:, T:]), shift, scale))        # (B, L, p*p*3)
        return unpatchify(out.view(B, L, p * p, 3), p, h, w)                   # (B, 3, H, W)
