"""PixelHDM: a pixel-space dual-path diffusion transformer, the whole network in one file.

    noisy image z_t (B, 3, H, W), time t, text (tokens, mask, pooled)
      |
      +-- patch path: p x p patches -> bottleneck embedding -> joint sequence
      |   [text tokens ; image tokens] -> N blocks (sandwich RMSNorm, AdaLN from
      |   time + pooled text, gated GQA attention with QK-norm and 3-axis mRoPE, SwiGLU)
      |   -> semantic token per patch s_N
      |
      +-- pixel path: every pixel -> Linear(3 -> pixel_dim) -> M blocks, each with
          pixel-wise AdaLN (a separate scale/shift/gate for every pixel, expanded from
          the patch's condition RMSNorm(s_N) + c) and token compaction (the p*p pixels
          of a patch are flattened, compressed to one token, attended over the patch
          grid, expanded back), then a per-pixel SwiGLU
          -> RMSNorm -> Linear(pixel_dim -> 3) per pixel = the prediction (v or x)

Sources: PixelDiT (arXiv 2511.20645) for the dual path, pixel-wise AdaLN and token
compaction; JiT (arXiv 2511.13720) for the bottleneck patch embedding and x-prediction;
Lumina-Image 2.0 for the joint sequence and mRoPE; Qwen's gated attention.

Conventions: images NCHW in [-1, 1]; t = 0 noise, t = 1 data (see engine/flow.py).
Every residual branch is x + alpha * s * F(modulate(norm(x))) with s = 1/sqrt(k * blocks
in that path) and modulate(x) = (1 + gamma) * x + beta; alpha starts at 1, gamma and
beta near 0, so each path starts as a well-scaled residual stack at any depth.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from engine.attention import GatedAttention, RMSNorm, angles_from, rope_frequencies
from engine.config import ModelConfig

# --------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------

@dataclass
class TextCond:
    """Encoded prompts. Padding rows of `tokens` are zero; an empty prompt has an
    all-False mask and a zero pooled vector (the unconditional input).

    `dense` is known on the host: True when every mask entry is True, so the network can
    drop the attention mask without reading the mask back from the GPU (a sync). It is
    derived for free while the mask is still on the CPU (encoders build masks there, and
    `to()` keeps the answer when moving); None means unknown."""

    tokens: Tensor  # (B, T, C) with T >= 1
    mask: Tensor    # (B, T) bool, True = real token
    pooled: Tensor  # (B, C)
    dense: bool | None = None

    def __post_init__(self):
        if self.dense is None and self.mask.device.type == "cpu":
            self.dense = bool(self.mask.all())

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def is_dense(self) -> bool:
        """Every prompt fills every token slot (one device read when not known)."""
        if self.dense is None:
            self.dense = bool(self.mask.all())
        return self.dense

    @staticmethod
    def cat(items: list["TextCond"]) -> "TextCond":
        """Concatenate along the batch, padding every item to the longest prompt."""
        T = max(it.tokens.shape[1] for it in items)
        tokens = torch.cat([F.pad(it.tokens, (0, 0, 0, T - it.tokens.shape[1])) for it in items])
        mask = torch.cat([F.pad(it.mask, (0, T - it.mask.shape[1])) for it in items])
        known = [it.dense for it in items]
        dense = (None if None in known else
                 all(known) and all(it.tokens.shape[1] == T for it in items))
        return TextCond(tokens, mask, torch.cat([it.pooled for it in items]), dense)

    def select(self, index: Tensor | list[int]) -> "TextCond":
        """Rows `index` (e.g. one prompt repeated for several images)."""
        index = torch.as_tensor(index, device=self.tokens.device)
        return TextCond(self.tokens[index], self.mask[index], self.pooled[index],
                        True if self.dense else None)

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "TextCond":
        """Moved and/or cast. `non_blocking` is for copies from the CPU to a GPU: the
        host then does not wait for the GPU's queue to drain (a sync)."""
        move = dict(device=device, non_blocking=non_blocking)
        return TextCond(self.tokens.to(dtype=dtype, **move), self.mask.to(**move),
                        self.pooled.to(dtype=dtype, **move), self.dense)


@dataclass
class TrainOutput:
    pred: Tensor             # (B, 3, H, W): v or x, as config.prediction says
    features: Tensor | None  # (B, h*w, D) image tokens after the REPA block, if asked for
    gamma_sq: Tensor         # scalar: sum over pixel blocks of mean(gamma1^2) + mean(gamma2^2)
    sra_features: Tensor | None = None   # (B, h*w, D) after the SRA block, if asked for


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def _mean_square(x: Tensor) -> Tensor:
    """mean(x^2) in fp32."""
    return torch.linalg.vector_norm(x, dtype=torch.float32).square() / x.numel()


def _init_modulation(lin: nn.Linear, chunks: int, gain: float) -> None:
    """AdaLN projection: random weights of std gain / sqrt(fan_in) (every parameter
    upstream of the modulation gets a gradient from the first step, and the conditioning
    acts from the start), biases gamma = beta = 0 and alpha = 1 for the chunks
    (gamma1, beta1, alpha1, gamma2, beta2, alpha2)."""
    nn.init.normal_(lin.weight, std=gain / math.sqrt(lin.in_features))
    with torch.no_grad():
        bias = lin.bias.view(chunks, -1)
        bias.zero_()
        bias[2].fill_(1.0)
        bias[5].fill_(1.0)


# --------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """Sinusoidal features of 1000 t (sin first) -> Linear -> SiLU -> Linear."""

    def __init__(self, dim: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        for lin in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        a = 1000.0 * t.float()[:, None] * freqs[None]                      # (B, half)
        emb = torch.cat([torch.sin(a), torch.cos(a)], dim=-1)              # (B, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))                  # (B, D)


PLACE_TOP_FREQUENCY = 64.0   # highest frequency of the place code, in half-waves per image side


def place_code(h: int, w: int, dim: int, device=None) -> Tensor:
    """(h*w, dim) fixed sin-cos code of where each patch of a (h, w) grid lies in the image:
    its centre as fractions (y, x) of the height and width, each through dim // 4
    frequencies geometric from pi to pi * PLACE_TOP_FREQUENCY (the lowest is half a wave
    across the image, so it tells top from bottom and left from right at any size or
    aspect); zeros fill dims left over. Row-major like the tokens."""
    n = dim // 4
    ys = (torch.arange(h, device=device, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float64) + 0.5) / w
    ratio = PLACE_TOP_FREQUENCY ** (1.0 / max(n - 1, 1))
    freqs = math.pi * ratio ** torch.arange(n, device=device, dtype=torch.float64)
    ya = ys.repeat_interleave(w)[:, None] * freqs                         # (L, n)
    xa = xs.repeat(h)[:, None] * freqs                                    # (L, n)
    code = torch.cat([ya.sin(), ya.cos(), xa.sin(), xa.cos()], dim=1)      # (L, 4n)
    return F.pad(code, (0, dim - 4 * n)).float()


def _grid_positions(n: int, grid: int, device, scale: float | None = None) -> Tensor:
    """RoPE positions of n tokens along an axis: 0..n-1, or with model.rope_grid = N their
    centres on N positions, (i + 1/2) N / n - 1/2 (n = N gives 0..N-1 again). With `scale`
    the spacing is `scale` instead of N / n, and the tokens stay centred on the grid."""
    i = torch.arange(n, device=device, dtype=torch.float32)
    if not grid:
        return i
    step = grid / n if scale is None else scale
    return (i + 0.5 - n / 2) * step + (grid - 1) / 2


def patch_grid(x: Tensor, p: int) -> tuple[int, int]:
    """The patch grid (h, w) = (H / p, W / p) of images (..., H, W); ValueError for a size
    that is not a multiple of p."""
    H, W = x.shape[-2:]
    if H % p or W % p:
        raise ValueError(f"image size {W}x{H} is not a multiple of the patch size {p}")
    return H // p, W // p


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, h*w, p*p, C): patches in raster order, pixels row-major."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // p, p, W // p, p)                                 # (B, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p, C)


def unpatchify(x: Tensor, p: int, h: int, w: int) -> Tensor:
    """(B, h*w, p*p, C) -> (B, C, h*p, w*p); the inverse of patchify."""
    B, _, _, C = x.shape
    x = x.view(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)                # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, w * p)


class PiecewiseLinear(nn.Linear):
    """A linear layer whose output is used in `pieces` equal parts along its last axis.
    Same parameters and the same numbers as nn.Linear followed by chunk().

    Backward of one product chunked concatenates the pieces' output gradients, a copy of
    rows x out_features; backward of one product per part of the weight (split)
    concatenates the pieces' weight gradients instead, out_features x in_features. On
    the CPU the layer takes the smaller copy: per pixel in the pixel path (many rows of
    16 features) the output-gradient copy took about a third of the pixel MLP's time,
    while the patch path's SwiGLU at batch 1 (288 rows, 1024 features) copies 4x more
    weight gradient than output gradient. On a GPU the copy is cheap, and compiled
    blocks fuse it into the operations that produce the gradients, so there the layer
    stays one product (fewer, larger kernels)."""

    def __init__(self, in_features: int, out_features: int, pieces: int, bias: bool = True):
        if out_features % pieces:
            raise ValueError(f"{out_features} outputs do not split into {pieces} pieces")
        super().__init__(in_features, out_features, bias=bias)
        self.pieces = pieces

    def forward(self, x: Tensor, bias_offset: Tensor | None = None) -> tuple[Tensor, ...]:
        """The pieces of x W^T + b (+ bias_offset, a constant added to the bias: folding
        a constant into the bias costs nothing per row, adding it to the output a pass)."""
        bias = self.bias if bias_offset is None else self.bias + bias_offset
        rows = x.numel() // max(x.shape[-1], 1)
        if x.device.type != "cpu" or rows <= self.in_features:
            return F.linear(x, self.weight, bias).chunk(self.pieces, dim=-1)
        # split, not slices: the weight's gradient is then one concatenation of the
        # pieces' gradients, where each slice's backward would fill a zero tensor as large
        # as the whole weight. Also without gradients: one product's pieces are strided
        # views, which slowed generation (Heun at 64x64: 0.197 against 0.178 s per image)
        weights = self.weight.split(self.out_features // self.pieces)
        biases = [None] * self.pieces if bias is None else bias.split(len(bias) // self.pieces)
        return tuple(F.linear(x, w, b) for w, b in zip(weights, biases))


class SwiGLU(nn.Module):
    """W_down(SiLU(W_gate x) * W_up x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = PiecewiseLinear(dim, 2 * hidden, pieces=2, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        nn.init.xavier_uniform_(self.gate_up.weight)
        nn.init.xavier_uniform_(self.down.weight)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x)
        return self.down(F.silu(gate) * up)


# --------------------------------------------------------------------------------------
# Patch path
# --------------------------------------------------------------------------------------

class PatchBlock(nn.Module):
    """Single-stream block over [text; image] with sandwich RMSNorm:
        x += alpha1 * s * norm(attn(modulate(norm(x))))
        x += alpha2 * s * norm(mlp(modulate(norm(x))))"""

    def __init__(self, cfg: ModelConfig, res_scale: float):
        super().__init__()
        D = cfg.hidden_dim
        self.res_scale = res_scale
        self.norm1, self.norm2, self.norm3, self.norm4 = (RMSNorm(D) for _ in range(4))
        self.attn = GatedAttention(D, cfg.num_heads, cfg.num_kv_heads, cfg.gate, cfg.attention)
        self.mlp = SwiGLU(D, int(D * cfg.mlp_ratio))
        self.ada = nn.Linear(D, 6 * D)
        # time and pooled text only nudge the patch path: near-identity modulation
        _init_modulation(self.ada, 6, gain=0.1)

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor,
                mask: Tensor | None, identity: bool = False) -> Tensor:
        g1, b1, a1, g2, b2, a2 = self.ada(F.silu(c))[:, None].chunk(6, dim=-1)  # each (B, 1, D)
        h = self.attn(modulate(self.norm1(x), b1, g1), cos, sin, mask, identity)
        x = x + (a1 * self.res_scale) * self.norm2(h)
        h = self.mlp(modulate(self.norm3(x), b2, g2))
        return x + (a2 * self.res_scale) * self.norm4(h)


# --------------------------------------------------------------------------------------
# Pixel path
# --------------------------------------------------------------------------------------

class PixelBlock(nn.Module):
    """Pixel-wise AdaLN + token compaction + pixel SwiGLU on x (B, L, p*p, Dpix).

    The condition of each patch (B, L, D) is expanded to one Dpix vector per pixel,
    from which every pixel gets its own (gamma, beta, alpha) x 2. Compaction flattens
    the p*p*Dpix values of a patch, compresses them to one D-wide token, runs gated
    attention over the patch grid and expands back: attention costs O(L^2), not
    O((L p^2)^2).
    """

    def __init__(self, cfg: ModelConfig, res_scale: float):
        super().__init__()
        D, d, pp = cfg.hidden_dim, cfg.pixel_dim, cfg.patch_size ** 2
        self.res_scale = res_scale
        self.cond_expand = nn.Linear(D, pp * d, bias=False)
        self.ada = PiecewiseLinear(d, 6 * d, pieces=6)
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.compress = nn.Linear(pp * d, D, bias=False)
        self.compress_norm = RMSNorm(D)
        self.attn = GatedAttention(D, cfg.num_heads, cfg.num_kv_heads, cfg.gate, cfg.attention)
        self.expand_norm = RMSNorm(D)
        self.expand = nn.Linear(D, pp * d, bias=False)
        self.mlp = SwiGLU(d, int(d * cfg.mlp_ratio))
        nn.init.xavier_uniform_(self.cond_expand.weight)
        nn.init.xavier_uniform_(self.compress.weight)
        # a small expand gain keeps the compacted attention a gentle update at the start
        nn.init.xavier_uniform_(self.expand.weight, gain=0.1)
        # the per-pixel condition is how the patch path's meaning reaches the pixels: a
        # unit-gain map, or the pixel path learns for a long time without it (measured on
        # the demo set: shapes appear several times sooner than with a 0.1 gain)
        _init_modulation(self.ada, 6, gain=1.0)
        offset = torch.zeros(6, d)
        offset[0] = offset[3] = 1.0
        self.register_buffer("scale_offset", offset.flatten(), persistent=False)

    def forward(self, x: Tensor, s_cond: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        B, L, pp, d = x.shape
        cond = self.cond_expand(s_cond).view(B, L, pp, d)                      # (B, L, p*p, d)
        # the scales come out as 1 + gamma (the 1 folded into the bias), so that each
        # modulation is one fused pass per pixel, beta + norm(x) * (1 + gamma)
        s1, b1, a1, s2, b2, a2 = self.ada(F.silu(cond), self.scale_offset)    # each (B, L, p*p, d)
        h = torch.addcmul(b1, self.norm1(x), s1).reshape(B, L, pp * d)         # (B, L, p*p*d)
        h = self.attn(self.compress_norm(self.compress(h)), cos, sin)         # (B, L, D)
        # the residual scale applied before the (linear) expand touches D values per
        # patch instead of p*p*d, and leaves one fused x + a1 * h per pixel
        h = self.expand(self.expand_norm(h) * self.res_scale).view(B, L, pp, d)  # (B, L, p*p, d)
        x = torch.addcmul(x, a1, h)
        h = self.mlp(torch.addcmul(b2, self.norm2(x), s2))
        x = torch.addcmul(x, a2, h, value=self.res_scale)
        # the penalty (on gamma = scale - 1) only acts through its gradient: skipped at
        # inference. Under bf16 autocast gamma is then known to 1/256 of 1, not of gamma,
        # as the modulation's 1 + gamma always was.
        gamma_sq = (_mean_square(s1 - 1) + _mean_square(s2 - 1) if torch.is_grad_enabled()
                    else x.new_zeros((), dtype=torch.float32))
        return x, gamma_sq


# --------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------

# Compiled variants one block class may need in a run: with and without gradients
# (training, then validation, sample grids and quality), a batch of one or of many (torch
# specialises size 1), a text mask or none, first static then dynamic sizes; a run took 9
# at its first validation, past torch's default of 8, which fullgraph turns into an error.
RECOMPILE_LIMIT = 64


def compile_regions(blocks) -> None:
    """Regional compilation: each block compiled as one whole graph (fullgraph: a graph
    break inside a block is an error, not a silent slowdown), with sizes made dynamic after
    the first new shape, so the buckets' grids and prompt lengths share compiled code."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(fullgraph=True, dynamic=None)


def with_estimate_inputs(weight: Tensor) -> Tensor:
    """A plain input weight (out, pixels * 3) as a self-conditioned one (out, pixels * 6):
    per pixel the image's three channels, kept, then the estimate's three, zero. The one
    place that knows this layout (the model's initialisation, engine/init_from.py)."""
    out = weight.shape[0]
    wide = weight.new_zeros(out, weight.shape[1] // 3, 6)
    wide[..., :3] = weight.view(out, -1, 3)
    return wide.view(out, -1)


class PixelHDM(nn.Module):
    def __init__(self, cfg: ModelConfig, text_dim: int):
        super().__init__()
        self.cfg = cfg
        D, p, d = cfg.hidden_dim, cfg.patch_size, cfg.pixel_dim
        self.grad_checkpointing = False
        # per (grid, device): mRoPE tables and the place code, built once each
        self._grid_cache: dict[tuple, Tensor | tuple[Tensor, ...]] = {}
        # conditioning: time + projected pooled text (upstream added the raw pooled
        # vector to every patch, which drowned the per-patch semantics)
        self.t_embed = TimestepEmbedder(D, cfg.time_embed_dim)
        self.pooled_proj = nn.Sequential(RMSNorm(text_dim), nn.Linear(text_dim, max(1, D // 4)),
                                         nn.SiLU(), nn.Linear(max(1, D // 4), D))
        # text tokens enter the joint sequence through RMSNorm + Linear
        self.text_norm = RMSNorm(text_dim)
        self.text_proj = nn.Linear(text_dim, D, bias=False)
        # patch path
        self.patch_in = nn.Linear(p * p * cfg.in_channels, cfg.bottleneck, bias=False)
        self.patch_out = nn.Linear(cfg.bottleneck, D, bias=False)
        self.patch_blocks = nn.ModuleList(
            PatchBlock(cfg, 1.0 / math.sqrt(cfg.residual_k * cfg.patch_layers))
            for _ in range(cfg.patch_layers))
        self.semantic_norm = RMSNorm(D)
        # pixel path
        self.pixel_in = nn.Linear(cfg.in_channels, d)
        self.pixel_blocks = nn.ModuleList(
            PixelBlock(cfg, 1.0 / math.sqrt(cfg.residual_k * cfg.pixel_layers))
            for _ in range(cfg.pixel_layers))
        self.out_norm = RMSNorm(d)
        self.out = nn.Linear(d, 3)
        self._init_embeddings(text_dim)

    def _init_embeddings(self, text_dim: int) -> None:
        """Each module above initialises itself once; only the layers created inline here
        are set here, so no intended init is overwritten."""
        for lin in (self.patch_in, self.patch_out, self.text_proj, self.pooled_proj[1]):
            nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(self.pooled_proj[1].bias)
        # the pooled vector joins the time embedding gently
        last = self.pooled_proj[3]
        nn.init.normal_(last.weight, std=0.1 / math.sqrt(last.in_features))
        nn.init.zeros_(self.pooled_proj[3].bias)
        nn.init.xavier_uniform_(self.pixel_in.weight)
        nn.init.zeros_(self.pixel_in.bias)
        if self.cfg.self_cond:
            self._init_self_cond_inputs()
        # output RMS ~1 per pixel: unit-RMS features times weights of std 1/sqrt(Dpix)
        nn.init.normal_(self.out.weight, std=1.0 / math.sqrt(self.out.in_features))
        nn.init.zeros_(self.out.bias)

    def _init_self_cond_inputs(self) -> None:
        """With self_cond the input weights read 6 channels per pixel: the noisy image's
        three get the scale a plain network's get (Xavier over a 3-channel fan-in), the
        estimate's three start at zero, so the estimate changes nothing until training
        teaches the network to read it."""
        with torch.no_grad():
            for lin in (self.patch_in, self.pixel_in):
                plain = lin.weight.new_empty(lin.out_features, lin.in_features // 2)
                nn.init.xavier_uniform_(plain)
                lin.weight.copy_(with_estimate_inputs(plain))

    # ---------------------------------------------------------------------------------
    def forward(self, z: Tensor, t: Tensor, text: TextCond, prev: Tensor | None = None,
                perturb: Collection[int] = ()) -> Tensor:
        """The prediction (B, 3, H, W) for noisy images z (B, 3, H, W) at times t (B,);
        `prev`: with model.self_cond, the previous clean estimate (B, 3, H, W) of the same
        images (None = none yet); `perturb`: patch blocks (1-based) whose attention is the
        identity, the perturbed branch of perturbed-attention guidance."""
        return self.forward_train(z, t, text, prev=prev, perturb=perturb).pred

    def forward_train(self, z: Tensor, t: Tensor, text: TextCond,
                      repa_layer: int | None = None, prev: Tensor | None = None,
                      perturb: Collection[int] = (), sra_layer: int | None = None
                      ) -> TrainOutput:
        """The prediction plus what the losses need: the image tokens after patch blocks
        `repa_layer` and `sra_layer` (1-based; None = not asked for) and the pixel-AdaLN
        gamma penalty."""
        taps = {n for n in (repa_layer, sra_layer) if n is not None}
        x, tapped, (c, pix, T, h, w, cos_px, sin_px) = self._patch_path(
            z, t, text, prev, perturb, taps, len(self.patch_blocks))
        s_cond = self.semantic_norm(x[:, T:]) + c[:, None]                     # (B, L, D)

        # pixel path; compacted tokens use mRoPE ids (0, i, j): cos_px, sin_px
        y = self.pixel_in(pix)                                                 # (B, L, p*p, d)
        gamma_sq = torch.zeros((), device=z.device)
        for block in self.pixel_blocks:
            y, g = self._run(block, y, s_cond, cos_px, sin_px)
            gamma_sq = gamma_sq + g
        out = self.out(self.out_norm(y))                                       # (B, L, p*p, 3)
        return TrainOutput(unpatchify(out, self.cfg.patch_size, h, w), tapped.get(repa_layer),
                           gamma_sq, tapped.get(sra_layer))

    def patch_tokens(self, z: Tensor, t: Tensor, text: TextCond, layer: int) -> Tensor:
        """The image tokens (B, L, D) after patch block `layer` (1-based), without running
        the blocks after it or the pixel path: the target of self-alignment."""
        if not 1 <= layer <= len(self.patch_blocks):
            raise ValueError(f"patch block {layer} does not exist (1 to "
                             f"{len(self.patch_blocks)})")
        x, _, ctx = self._patch_path(z, t, text, None, (), (), layer)
        return x[:, ctx[2]:]

    def _patch_path(self, z: Tensor, t: Tensor, text: TextCond, prev: Tensor | None,
                    perturb: Collection[int], taps: Collection[int], depth: int):
        """The joint [text; image] sequence through the first `depth` patch blocks.
        Returns it, the image tokens after each block in `taps`, and what the pixel path
        needs: (c, pixels, T, h, w, and the compacted tokens' cos and sin)."""
        cfg = self.cfg
        B, C, H, W = z.shape
        p = cfg.patch_size
        if C != 3 or H % p or W % p:
            raise ValueError(f"model input must be (B, 3, H, W) with H and W multiples of the "
                             f"patch size {p}; got {tuple(z.shape)}")
        h, w = H // p, W // p
        L, T = h * w, text.tokens.shape[1]
        # inputs in the parameters' dtype (autocast then picks the compute dtype); a norm's
        # weight says it, which matmul_weights_to leaves as it is
        dtype = self.text_norm.weight.dtype
        text.is_dense()   # answered on the caller's object, which every sampling step reuses
        z, text = self._input(z, prev).to(dtype), text.to(dtype=dtype)

        # conditioning vector c: time + pooled text
        c = self.t_embed(t) + self.pooled_proj(text.pooled)                    # (B, D)

        # joint sequence [text; image]
        pix = patchify(z, p)                                                   # (B, L, p*p, C)
        img = self.patch_out(F.silu(self.patch_in(pix.flatten(2))))          # (B, L, D)
        if cfg.place_embed:
            img = img + self._place(h, w, z.device).to(img.dtype)               # (L, D)
        txt = self.text_proj(self.text_norm(text.tokens))                      # (B, T, D)
        x = torch.cat([txt.to(img.dtype), img], dim=1)                         # (B, T+L, D)
        mask = (None if text.is_dense() else
                torch.cat([text.mask, text.mask.new_ones(B, L)], dim=1))       # (B, T+L)

        # mRoPE ids: text n -> (n, 0, 0); patch (i, j) -> (valid text tokens, i, j)
        freqs, grid_ang, cos_px, sin_px = self._rope_tables(h, w, z.device)
        txt_ang = torch.arange(T, device=z.device, dtype=torch.float32)[:, None] * freqs[0]
        n_text = text.mask.sum(1).float()                                      # (B,)
        img_ang = grid_ang + n_text[:, None, None] * freqs[0]                  # (B, L, hd/2)
        ang = torch.cat([txt_ang.expand(B, -1, -1), img_ang], dim=1)[:, None]  # (B, 1, T+L, hd/2)
        cos, sin = ang.cos(), ang.sin()

        tapped = {}
        for i, block in enumerate(self.patch_blocks):
            if i == depth:
                break
            x = self._run(block, x, c, cos, sin, mask, i + 1 in perturb)
            if i + 1 in taps:
                tapped[i + 1] = x[:, T:]                                       # (B, L, D)
        return x, tapped, (c, pix, T, h, w, cos_px, sin_px)

    def _input(self, z: Tensor, prev: Tensor | None) -> Tensor:
        """What the embeddings read: z, or with self_cond z beside the previous estimate,
        clamped to the image range and without its per-channel mean (zeros when None).
        The mean goes because a fed-back background colour is copied rather than read
        from the prompt: with it, a demo model swapped white and black backgrounds in
        11 % of the wide probe's images (README, "Self-conditioning")."""
        if not self.cfg.self_cond:
            if prev is not None:
                raise ValueError("a previous estimate was given to a network without "
                                 "model.self_cond")
            return z
        if prev is None:
            return torch.cat([z, torch.zeros_like(z)], dim=1)
        if prev.shape != z.shape:
            raise ValueError(f"the previous estimate {tuple(prev.shape)} must have the shape "
                             f"of the noisy images {tuple(z.shape)}")
        prev = prev.to(z.dtype).clamp(-1.0, 1.0)
        return torch.cat([z, prev - prev.mean(dim=(2, 3), keepdim=True)], dim=1)

    def matmul_weights_to(self, dtype: torch.dtype) -> None:
        """Store the weights of every linear layer in `dtype` (bf16 or fp16) for inference
        under autocast to that dtype, which would otherwise cast each of them from fp32 at
        every network call (the whole weight set read and written again per sampling step:
        2 GB for `pixelhdm-default`). Autocast casts a matmul's weight to that dtype in any
        case, so every result is the same bit for bit; biases, norms and embeddings stay as
        they are. The network must then only ever run under that autocast."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight.dtype != dtype:
                module.weight = nn.Parameter(module.weight.detach().to(dtype),
                                             requires_grad=False)

    def compile_blocks(self) -> None:
        """Regional compilation (`compile_regions`) of every patch and pixel block.
        Everything between blocks stays eager."""
        compile_regions((*self.patch_blocks, *self.pixel_blocks))

    def _run(self, block: nn.Module, *args):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _place(self, h: int, w: int, device: torch.device) -> Tensor:
        """place_code of a (h, w) grid at the patch width, built once per grid and device."""
        key = ("place", h, w, str(device))
        if key not in self._grid_cache:
            self._grid_cache[key] = place_code(h, w, self.cfg.hidden_dim, device)
        return self._grid_cache[key]

    def _rope_tables(self, h: int, w: int, device: torch.device
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """mRoPE tables of a (h, w) patch grid, built once per grid and device: the
        frequency matrix (3, hd/2), the grid's angles (L, hd/2) with sequence position 0,
        and their cos/sin (1, 1, L, hd/2) for the pixel path's compacted tokens."""
        key = (h, w, str(device))
        if key not in self._grid_cache:
            freqs = rope_frequencies(tuple(self.cfg.mrope_split), self.cfg.rope_theta).to(device)
            # 'keep': one spacing for both axes, so the grid's area is N x N cells
            scale = (self.cfg.rope_grid / math.sqrt(h * w)
                     if self.cfg.rope_grid_aspect == "keep" else None)
            rows = _grid_positions(h, self.cfg.rope_grid, device, scale).repeat_interleave(w)
            cols = _grid_positions(w, self.cfg.rope_grid, device, scale).repeat(h)
            ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)    # (L, 3)
            grid_ang = angles_from(ids, freqs)                                 # (L, hd/2)
            px = grid_ang[None, None]                                          # (1, 1, L, hd/2)
            self._grid_cache[key] = (freqs, grid_ang, px.cos(), px.sin())
        return self._grid_cache[key]
