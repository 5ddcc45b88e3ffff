"""Self-representation alignment (loss.sra_weight): an early patch block's tokens, through
a trained MLP, follow a later block of the EMA network at less noise. The teacher is the
EMA network cut at its target block; the trainer refreshes it each step, logs the term,
trains and saves the projector apart from the EMA and resumes exactly; the estimates
count the teacher; wrong settings are named."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_cfg
from trainhelp import losses, sets

from engine import preflight
from engine.checkpoint import load_weights
from engine.config import ConfigError, sra_layers
from engine.demo_data import write_demo_dataset
from engine.flops import extra_forward_share, pixelhdm_flops
from engine.flow import SRAProjector, flow_losses, interpolate, sra_loss
from engine.model import PixelHDM, TextCond
from engine.self_align import SelfAlignTeacher
from engine.train import main as train_main
from engine.trainable import Trainable

C = 32
TWO = ["model.patch_layers=2"]
ON = ["loss.sra_weight=0.5", "loss.sra_layer=1", "loss.sra_target_layer=2"]


class Words:
    """A frozen text encoder that gives every caption the same random tokens."""
    dim = C

    def __init__(self):
        self.tok = torch.randn(1, 5, C)

    def encode(self, captions):
        tok = self.tok.expand(len(captions), -1, -1)
        return TextCond(tok, torch.ones(len(captions), 5, dtype=torch.bool), tok[:, -1])


def test_patch_tokens_stop_at_the_block_the_full_forward_taps():
    torch.manual_seed(0)
    net = PixelHDM(tiny_cfg(*TWO).model, C).eval()
    z, t, text = torch.randn(2, 3, 16, 24), torch.rand(2), Words().encode(["a", "b"])
    with torch.no_grad():
        out = net.forward_train(z, t, text, repa_layer=2, sra_layer=1)
        assert torch.equal(out.sra_features, net.patch_tokens(z, t, text, 1))
        assert torch.equal(out.features, net.patch_tokens(z, t, text, 2))
        assert not torch.equal(out.features, out.sra_features)
        assert out.sra_features.shape == (2, 2 * 3, 32)
        assert net.forward_train(z, t, text).sra_features is None
    with pytest.raises(ValueError, match="patch block 3 does not exist"):
        net.patch_tokens(z, t, text, 3)


def test_the_teacher_is_the_ema_network_at_less_noise():
    torch.manual_seed(0)
    cfg = tiny_cfg(*TWO, *ON, "loss.sra_dt=0.3")
    words = Words()
    net = PixelHDM(cfg.model, C)
    teacher = SelfAlignTeacher(cfg, words, torch.device("cpu"))
    shadow = {f"net.{k}": v.detach().clone() for k, v in net.named_parameters()}
    teacher.refresh(shadow)
    x, eps = torch.rand(3, 3, 16, 16) * 2 - 1, torch.randn(3, 3, 16, 16)
    t = torch.tensor([0.1, 0.5, 0.95])
    gen = torch.Generator().manual_seed(5)
    got = teacher(x, eps, t, ["a"] * 3, gen)
    later = (t + 0.3 * torch.rand(3, generator=torch.Generator().manual_seed(5))).clamp(max=1)
    assert (later >= t).all() and later[2] == 1.0
    with torch.no_grad():
        want = net.patch_tokens(interpolate(x, eps, later), later, words.encode(["a"] * 3), 2)
    assert torch.allclose(got, F.layer_norm(want, want.shape[-1:]), atol=1e-6)
    assert not got.requires_grad
    # the teacher follows the EMA weights it is given, not the network's own
    shadow["net.patch_out.weight"].mul_(2)
    teacher.refresh(shadow)
    assert not torch.allclose(teacher(x, eps, t, ["a"] * 3, torch.Generator().manual_seed(5)),
                              got)
    with pytest.raises(ValueError, match="lack"):
        teacher.refresh({})


def test_the_term_trains_the_student_and_the_projector_only():
    torch.manual_seed(0)
    cfg = tiny_cfg(*TWO, *ON)
    model = Trainable(PixelHDM(cfg.model, C), Words(), None, SRAProjector(C))
    x, eps, t = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 3, 16, 16), torch.rand(2)
    targets = torch.randn(2, 4, C)
    terms, _ = model(x, ["a", "b"], t, eps, cfg, 0, None, None, sra_targets=targets)
    out = model.net.forward_train(interpolate(x, eps, t), t, model.encode(["a", "b"]),
                                  sra_layer=1)
    with torch.no_grad():
        assert float(terms["sra"]) == pytest.approx(
            0.5 * float(sra_loss(out.sra_features, targets, model.sra)), rel=1e-5)
        assert float(terms["total"]) == pytest.approx(
            sum(float(v) for k, v in terms.items() if k != "total"), rel=1e-5)
    terms["sra"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.sra.parameters())
    block2 = [p for p in model.net.patch_blocks[1].parameters()]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in block2)
    assert all(p.grad.abs().sum() > 0 for p in model.net.patch_blocks[0].parameters()
               if p.grad is not None)
    assert sum(p.grad is not None for p in model.net.patch_blocks[0].parameters()) > 2
    assert not any(k.startswith("sra.") for k in model.ema_params())
    # off: no term, absent rather than zero
    terms, _ = model(x, ["a", "b"], t, eps, cfg, 0, None, None)
    assert "sra" not in terms
    with pytest.raises(ValueError, match="sra_features and sra_projector"):
        flow_losses(x, x, t, x, eps, "x", cfg.loss, sra_targets=targets)


def test_automatic_blocks_follow_the_papers_share_of_the_depth():
    lo = tiny_cfg().loss
    assert [sra_layers(lo, n) for n in (1, 4, 8, 28)] == [(1, 1), (1, 3), (2, 6), (8, 20)]
    lo = tiny_cfg("loss.sra_layer=2", "loss.sra_target_layer=4").loss
    assert sra_layers(lo, 28) == (2, 4)


@pytest.mark.parametrize("lines, message", [
    (["loss.sra_target_layer=3"], "loss.sra_target_layer = 3: allowed: 1 to "
                                  "model.patch_layers = 2, or 0 (auto)"),
    (["loss.sra_layer=2", "loss.sra_target_layer=1"], "loss.sra_layer = 2: allowed: 1 to "
                                                      "the target block 1"),
    (["train.ema_decay=0"], "self-alignment learns from the EMA weights: set "
                            "train.ema_decay > 0"),
    (["loss.sra_dt=1.5"], "loss.sra_dt"),
])
def test_wrong_settings_are_named(lines, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_cfg(*TWO, "loss.sra_weight=0.2", *lines)
    # switched off, the blocks are not checked
    if "sra_dt" not in lines[0] and "ema" not in lines[0]:
        tiny_cfg(*TWO, *lines)


def test_training_logs_the_term_saves_the_projector_and_resumes_exactly(tmp_path,
                                                                        monkeypatch):
    demo = write_demo_dataset(tmp_path / "demo", count=16, seed=3)
    opts = sets(*ON, "train.save_every=3")
    run = tmp_path / "run"
    refresh, seen = SelfAlignTeacher.refresh, []

    def spy(self, shadow):
        # each step's teacher is the EMA of the steps before it, not the raw weights
        seen.append({k: v.clone() for k, v in shadow.items()})
        refresh(self, shadow)
        assert all(torch.equal(p, shadow[k]) for k, p in self._params.items())

    monkeypatch.setattr(SelfAlignTeacher, "refresh", spy)
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "8", *opts]) == 0
    assert len(seen) == 8 and not torch.equal(seen[0]["net.patch_out.weight"],
                                              seen[-1]["net.patch_out.weight"])
    third = run / "checkpoints" / "step_0000003.safetensors"
    key = "net.patch_out.weight"
    assert torch.equal(seen[3][key], load_weights(third, ema=True)[0][key])
    assert not torch.equal(seen[3][key], load_weights(third, ema=False)[0][key])
    monkeypatch.undo()
    reference = losses(run)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    sra = [r["loss_sra"] for r in metrics if "loss_sra" in r]
    assert len(sra) == 8 and all(v > 0 for v in sra)
    assert "self-alignment on" in (run / "log.txt").read_text()
    raw, _ = load_weights(run / "checkpoints" / "step_0000008.safetensors", ema=False)
    ema, _ = load_weights(run / "checkpoints" / "step_0000008.safetensors", ema=True)
    assert any(k.startswith("sra.") for k in raw) and not any(k.startswith("sra.") for k in ema)

    again = tmp_path / "again"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(again),
                       "--max-steps", "3", *opts]) == 0
    assert train_main(["--run-dir", str(again), "--resume", "--max-steps", "8"]) == 0
    assert losses(again) == reference

    # a new run from these weights without self-alignment drops the projector quietly;
    # one with it, from weights without a projector, starts the projector fresh
    plain = tmp_path / "plain"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(plain),
                       "--max-steps", "2", *sets(), "--init-from", str(run)]) == 0
    fresh = tmp_path / "fresh"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(fresh),
                       "--max-steps", "2", *opts, "--init-from", str(plain)]) == 0
    assert "the self-alignment projector starts fresh" in (fresh / "log.txt").read_text()


def test_the_estimates_count_the_teacher():
    off, on = tiny_cfg(*TWO), tiny_cfg(*TWO, *ON)
    parts = pixelhdm_flops(on.model, C, 32, 32, 8)
    patch = parts["patch_attn"] + parts["patch_mlp"]
    assert extra_forward_share(off, parts) == 0
    assert extra_forward_share(on, parts) == pytest.approx(patch / sum(parts.values()))
    half = tiny_cfg(*TWO, *ON[:2], "loss.sra_target_layer=1")
    assert extra_forward_share(half, parts) == pytest.approx(patch / 2 / sum(parts.values()))
    a, b = preflight.estimate(off), preflight.estimate(on)
    assert a["memory_gib"]["self_alignment_teacher"] == 0
    assert b["memory_gib"]["self_alignment_teacher"] == pytest.approx(
        b["parameters"] * 4 / 2 ** 30)
    assert b["tflops_per_step"] > a["tflops_per_step"]
