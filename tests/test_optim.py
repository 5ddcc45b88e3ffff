"""Learning-rate schedules, ZClip, gradient clipping, EMA and parameter groups."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from engine.config import TrainConfig
from engine.optim import (
    EMA,
    ZClip,
    build_optimizer,
    clip_gradients,
    grad_norm,
    lr_at,
    param_groups,
)


def cfg(**kw) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), **kw)


def test_warmup_then_constant():
    c = cfg(schedule="constant", lr=1e-3, warmup_steps=10)
    assert lr_at(0, c) == pytest.approx(1e-4)
    assert lr_at(9, c) == pytest.approx(1e-3)
    assert lr_at(500, c) == 1e-3


def test_cosine_reaches_min_lr_at_max_steps():
    c = cfg(schedule="cosine", lr=1e-3, min_lr=1e-5, warmup_steps=0, max_steps=100)
    assert lr_at(0, c) == pytest.approx(1e-3)
    assert lr_at(50, c) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(100, c) == pytest.approx(1e-5)
    assert lr_at(1000, c) == pytest.approx(1e-5)
    values = [lr_at(s, c) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_restarts_decay_per_cycle():
    c = cfg(schedule="cosine_restarts", lr=1e-3, min_lr=1e-5, warmup_steps=0,
            restart_every=10, restart_decay=0.5)
    assert lr_at(0, c) == pytest.approx(1e-3)
    assert lr_at(10, c) == pytest.approx(5e-4)
    assert lr_at(20, c) == pytest.approx(2.5e-4)
    assert lr_at(9, c) < lr_at(10, c)          # the restart jumps back up
    assert lr_at(5, c) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)


def test_zclip_clips_spikes_reciprocally_and_learns_from_the_clipped_norm():
    z = ZClip(z_thr=2.5, alpha=0.9, warmup=5)
    for g in [1.0, 1.2, 0.8, 1.1, 0.9]:
        assert z.target(g) == g                  # warm-up only collects
    mean, var = z.mean, z.var
    assert mean == pytest.approx(1.0) and var == pytest.approx(0.02)
    assert z.target(1.05) == 1.05                # a normal norm passes
    mean, std = z.mean, math.sqrt(z.var)
    spike = 10.0
    zscore = (spike - mean) / std
    clipped = z.target(spike)
    assert clipped == pytest.approx(mean + 2.5 ** 2 / zscore * std)
    assert clipped < mean + 2.5 * std            # reciprocal: harder than the threshold
    # the statistics moved with the clipped value, not with the spike
    assert z.mean == pytest.approx(0.9 * mean + 0.1 * clipped)
    state = z.state_dict()
    z2 = ZClip(2.5, 0.9, 5)
    z2.load_state_dict(state)
    assert z2.target(3.0) == z.target(3.0)


def test_clip_gradients_scales_to_the_target():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    before = math.sqrt(27 + 64)
    assert float(grad_norm([a, b])) == pytest.approx(before)
    norm, after = clip_gradients([a, b], None, 1.0, float(grad_norm([a, b])))
    assert norm == pytest.approx(before) and after == pytest.approx(1.0)
    total = torch.cat([a.grad, b.grad]).norm()
    assert float(total) == pytest.approx(1.0, rel=1e-4)
    a.grad, b.grad = torch.full((3,), 0.1), torch.full((4,), 0.1)
    assert clip_gradients([a, b], None, 1.0, float(grad_norm([a, b])))[1] == \
        pytest.approx(math.sqrt(0.07))
    a.grad = torch.tensor([float("nan"), 0.0, 0.0])
    n, m = clip_gradients([a, b], None, 1.0, float(grad_norm([a, b])))
    assert math.isnan(n) and math.isnan(m)


def test_ema_warmup_and_update():
    p = nn.Parameter(torch.zeros(2))
    ema = EMA({"p": p}, decay=0.99, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()
    assert torch.allclose(ema.shadow["p"], torch.full((2,), 0.9))
    for _ in range(2000):
        ema.update()
    assert ema.current_decay() == 0.99
    target = nn.Parameter(torch.zeros(2))
    ema.copy_to({"p": target})
    assert torch.allclose(target, torch.ones(2), atol=1e-6)
    plain = EMA({"p": p}, decay=0.5, warmup=False)
    assert plain.current_decay() == 0.5


def test_no_weight_decay_on_norms_biases_and_embeddings():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.emb = nn.Embedding(10, 4)
            self.pos = nn.Parameter(torch.zeros(3, 4))

    m = M()
    decay, plain = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(m.lin.weight)]
    assert {id(p) for p in plain["params"]} == {id(m.lin.bias), id(m.norm.weight), id(m.norm.bias),
                                               id(m.emb.weight), id(m.pos)}


def test_8bit_adamw_without_bitsandbytes_falls_back_with_a_note():
    opt, note = build_optimizer(nn.Linear(2, 2), cfg(optimizer="adamw8bit"), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert "bitsandbytes" in note and "32-bit AdamW" in note
    opt, note = build_optimizer(nn.Linear(2, 2), cfg(optimizer="adamw", betas=[0.8, 0.9]),
                                torch.device("cpu"))
    assert note == "" and opt.param_groups[0]["betas"] == (0.8, 0.9)
