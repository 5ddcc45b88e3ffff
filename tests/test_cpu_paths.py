"""The CPU's fast paths of the network against their plain formulas: products cut into
pieces by splitting the weight, the pixel block's fused modulation, the lean RMSNorm backward.
Each gives the same output and gradients up to rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import learner_net, make_text


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
    """With more rows than features (here every product: 4 x 20 tokens of 64), the
    SwiGLU's gate and up and the six pixel-wise AdaLN terms come from products with
    parts of one weight, so backward sums input gradients as narrow as the input: one
    product chunked into pieces would concatenate a gradient as wide as all pieces, per
    token or per pixel, in every step. (The patch blocks' AdaLN cuts one vector per
    image, which costs nothing.)"""
    net = learner_net().train()
    out = net.forward_train(torch.randn(4, 3, 32, 32), torch.rand(4), make_text([3, 4, 2, 4]))
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


def _slices(t: torch.Tensor) -> int:
    """How many slice nodes lie behind `t`."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(f for f, _ in node.next_functions)
    return sum(type(node).__name__.startswith("Slice") for node in seen)


@pytest.mark.parametrize("rows", [12, 6])
def test_piecewise_linear_copies_the_smaller_gradient(rows):
    """On the CPU, with more rows than input features the weight is split into the
    pieces' parts, so backward concatenates weight gradients (never a slice's zero fill as
    large as the whole weight per piece); with as many or fewer (the patch path's SwiGLU
    at batch 1: 288 rows of 1024) one product is chunked, so it concatenates output
    gradients. The gradients are those of one product, chunked, either way."""
    from engine.model import PiecewiseLinear
    torch.manual_seed(0)
    lin = PiecewiseLinear(8, 24, pieces=3)
    x = torch.randn(2, rows // 2, 8, requires_grad=True)

    def loss_of(pieces):
        return sum((k + 1) * p.square().sum() for k, p in enumerate(pieces))

    loss = loss_of(lin(x, bias_offset=torch.ones(24)))
    assert _slices(loss) == 0
    assert _wide_splits(loss) == ([] if rows > 8 else [(2, rows // 2, 24)])
    got = torch.autograd.grad(loss, (x, lin.weight, lin.bias))
    want = torch.autograd.grad(loss_of(_chunked(lin, x, bias_offset=torch.ones(24))),
                               (x, lin.weight, lin.bias))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def _chunked(self, x, bias_offset=None):
    bias = self.bias if bias_offset is None else self.bias + bias_offset
    return F.linear(x, self.weight, bias).chunk(self.pieces, dim=-1)


def _pred_penalty_grads(perturb: bool = False):
    """A training forward and backward of a fixed small network on a fixed batch: its
    prediction, pixel-path penalty and parameter gradients. With `perturb` every weight
    moves away from its initial value, so that terms that start at zero matter too."""
    net = learner_net().train()
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
def test_rms_norm_cpu_backward_equals_pytorchs(shape, weight_grad, monkeypatch):
    """Training on the CPU takes the lean backward (its node is in the graph), with
    PyTorch's gradients for x and w up to rounding; without gradients PyTorch's own runs."""
    from engine.attention import RMSNorm, _LeanRMSNorm
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

    def not_here(*args):
        raise AssertionError("inference took the training path")
    monkeypatch.setattr(_LeanRMSNorm, "apply", not_here)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), y_ref)
