"""Self-conditioning (model.self_cond): the network reads its previous clean estimate
beside the noisy image. The estimate enters through zero-initialised weights, clamped
and without its per-channel mean; sampling feeds each guidance branch its own; the
trainer feeds it on a share of the micro-batches, reproducibly across a resume; the
benchmark counts the extra forward; a self-conditioned checkpoint generates."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_cfg
from trainhelp import losses, sets

from engine import perf, preflight
from engine.demo_data import write_demo_dataset
from engine.flow import to_clean
from engine.generate import Pipeline, render
from engine.init_from import ESTIMATE_INPUTS
from engine.model import PixelHDM, TextCond, with_estimate_inputs
from engine.train import main as train_main
from engine.trainable import Trainable

B, H, W, C = 2, 16, 24, 32


def text(batch: int = B) -> TextCond:
    tok = torch.randn(batch, 5, C)
    return TextCond(tok, torch.ones(batch, 5, dtype=torch.bool), tok[:, -1])


def net_reading_its_estimate(*extra: str) -> PixelHDM:
    """A self-conditioned network whose estimate weights are no longer zero, as after
    training."""
    torch.manual_seed(0)
    net = PixelHDM(tiny_cfg("model.self_cond=true", *extra).model, C).eval()
    with torch.no_grad():
        for lin in (net.patch_in, net.pixel_in):
            lin.weight.view(lin.out_features, -1, 6)[..., 3:].normal_(0.0, 0.3)
    return net


def test_the_estimate_enters_through_zero_initialised_weights():
    torch.manual_seed(0)
    net = PixelHDM(tiny_cfg("model.self_cond=true").model, C).eval()
    p = net.cfg.patch_size
    assert net.patch_in.in_features == p * p * 6 and net.pixel_in.in_features == 6
    for lin in (net.patch_in, net.pixel_in):
        w = lin.weight.view(lin.out_features, -1, 6)
        assert w[..., 3:].abs().max() == 0 and w[..., :3].abs().min() > 0
    z, t, tc = torch.randn(B, 3, H, W), torch.rand(B), text()
    with torch.no_grad():
        assert torch.equal(net(z, t, tc), net(z, t, tc, prev=torch.rand(B, 3, H, W)))
        trained = net_reading_its_estimate()
        assert not torch.allclose(trained(z, t, tc), trained(z, t, tc, prev=torch.rand(B, 3, H, W)))


def test_the_estimate_is_clamped_and_loses_its_channel_means():
    net = net_reading_its_estimate()
    z, t, tc = torch.randn(B, 3, H, W), torch.rand(B), text()
    prev = torch.rand(B, 3, H, W) - 0.5
    shifted = prev + torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)
    wild = prev * 4
    with torch.no_grad():
        out = net(z, t, tc, prev=prev)
        assert torch.allclose(out, net(z, t, tc, prev=shifted), atol=1e-5)
        assert torch.equal(net(z, t, tc, prev=wild), net(z, t, tc, prev=wild.clamp(-1, 1)))
        # no estimate is the same as a flat one
        flat = torch.full((B, 3, H, W), 0.7)
        assert torch.allclose(net(z, t, tc), net(z, t, tc, prev=flat), atol=1e-6)


def test_a_misplaced_estimate_is_a_clear_error():
    torch.manual_seed(0)
    plain = PixelHDM(tiny_cfg().model, C)
    z, t, tc = torch.randn(B, 3, H, W), torch.rand(B), text()
    with pytest.raises(ValueError, match="without model.self_cond"):
        plain(z, t, tc, prev=torch.zeros_like(z))
    with pytest.raises(ValueError, match=r"shape of the noisy images"):
        net_reading_its_estimate()(z, t, tc, prev=torch.zeros(B, 3, H, W + 8))


def test_sampling_feeds_each_guidance_branch_its_own_previous_estimate():
    net = net_reading_its_estimate()
    calls = []
    forward = net.forward

    def recording(z, t, tc, prev=None, perturb=()):
        out = forward(z, t, tc, prev=prev, perturb=perturb)
        calls.append((z, t, prev, to_clean(out.float(), z, t, net.cfg.prediction), perturb))
        return out

    net.forward = recording
    encode = lambda prompts: text(len(prompts))   # noqa: E731
    # guidance only for t >= 0.4: the first steps run the conditional branch alone;
    # perturbed-attention guidance for t <= 0.6 adds a perturbed conditional branch
    render(net, encode, ["a", "b"], "", [1, 2], 16, 16, steps=6, sampler="heun", cfg=3.0,
           rescale=0.0, interval=(0.4, 1.0), shift=1.0, pag=2.0, pag_layers=(1,),
           pag_interval=(0.0, 0.6))
    cond = uncond = None
    kinds = []
    for z, _, prev, x_hat, perturb in calls:
        if perturb:   # reads the conditional branch's estimate and keeps none of its own
            assert perturb == {1} and z.shape[0] == B
            assert (prev is None) == (cond is None) and (cond is None or torch.equal(prev, cond))
            kinds.append("perturbed")
            continue
        both = z.shape[0] == 2 * B
        if cond is None:
            assert prev is None
        else:
            expected = [cond, torch.zeros_like(cond) if uncond is None else uncond][:1 + both]
            assert torch.equal(prev, torch.cat(expected))
        kinds.append((both, uncond is not None))
        cond = x_hat[:B]
        if both:
            uncond = x_hat[B:]
    # seen: conditional alone, the first guided call (no unconditional estimate yet), and
    # guided calls that feed back both
    assert {(False, False), (True, False), (True, True), "perturbed"} <= set(kinds)


def test_training_feeds_back_a_share_of_micro_batches_and_resumes_exactly(tmp_path,
                                                                          monkeypatch):
    demo = write_demo_dataset(tmp_path / "demo", count=16, seed=3)
    flags, prevs = [], []
    forward, forward_train = Trainable.forward, PixelHDM.forward_train

    def spy_forward(self, *args, **kw):
        flags.append(args[-1])
        return forward(self, *args, **kw)

    estimate = {}

    def spy_forward_train(self, z, t, tc, repa_layer=None, prev=None, perturb=(), **kw):
        out = forward_train(self, z, t, tc, repa_layer, prev=prev, perturb=perturb, **kw)
        if not torch.is_grad_enabled():   # the estimating forward: its clean estimate
            estimate["x"] = to_clean(out.pred.float(), z, t, self.cfg.prediction)
        else:
            prevs.append(prev)
            assert prev is None or torch.equal(prev, estimate.pop("x"))
        return out

    monkeypatch.setattr(Trainable, "forward", spy_forward)
    monkeypatch.setattr(PixelHDM, "forward_train", spy_forward_train)
    # v-prediction: its clean estimate differs from its output
    opts = sets("model.self_cond=true", "loss.self_cond_p=0.5", "model.prediction=v")
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "12", *opts]) == 0
    assert len(flags) == len(prevs) == 12 and 2 <= sum(flags) <= 10
    for fed, prev in zip(flags, prevs, strict=True):
        assert (prev is not None) == fed
        assert prev is None or not prev.requires_grad
    reference = losses(run)

    again = tmp_path / "again"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(again),
                       "--max-steps", "5", *opts]) == 0
    assert train_main(["--run-dir", str(again), "--resume", "--max-steps", "12"]) == 0
    assert losses(again) == reference
    assert flags[12:] == flags[:12]

    flags.clear()
    none = tmp_path / "none"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(none),
                       "--max-steps", "3", *sets("model.self_cond=true",
                                                 "loss.self_cond_p=0")]) == 0
    assert flags == [False] * 3

    pipe = Pipeline.load(run)
    assert pipe.net.cfg.self_cond and pipe.net.pixel_in.in_features == 6
    [made] = pipe.generate("a red circle", seed=3, steps=4)
    assert made.image.size == (48, 48)   # data.max_side of the run


def test_the_benchmark_counts_the_extra_forward(monkeypatch):
    fixed = {"train": 1.0, "infer": 0.4, "base_train": 0.5, "base_infer": 0.2}
    monkeypatch.setattr(perf, "median_seconds", lambda fns, *a, **k: {n: fixed[n] for n in fns})
    device = torch.device("cpu")
    for self_cond, train_s in ((False, 1.0), (True, 1.2)):
        cfg = tiny_cfg(f"model.self_cond={str(self_cond).lower()}", "loss.self_cond_p=0.5",
                       "train.compile=false")
        row = perf.measure_network(cfg, C, [(16, 16)], 2, 4, 1, device, "fp32")["rows"][0]
        assert row["train_s"] == pytest.approx(train_s)
        assert row["train_flops_s"] == pytest.approx(
            (3.5 if self_cond else 3) * row["gflop_image"] * 1e9 * 2 / train_s)
        # the overhead benchmark's bare steps: a training step 1.0 s, a forward 0.4 s
        bare = perf.BareSteps(cfg, C, 4, device, "fp32", compiled=False)
        monkeypatch.setattr(perf, "timed",
                            lambda fn, device: fn() or (1.0 if bare.net.training else 0.4))
        assert bare((2, 16, 16)) is None                     # the warm-up at a new shape
        assert bare((2, 16, 16)) == pytest.approx(train_s)
        monkeypatch.undo()
        monkeypatch.setattr(perf, "median_seconds",
                            lambda fns, *a, **k: {n: fixed[n] for n in fns})


def test_the_cost_estimate_counts_the_extra_forward():
    for self_cond, forwards in ((False, 3.0), (True, 3.5)):
        cfg = tiny_cfg(f"model.self_cond={str(self_cond).lower()}", "loss.self_cond_p=0.5")
        est = preflight.estimate(cfg)
        w, h = est["bucket"]
        per_image = sum(preflight.forward_flops(cfg, w, h, est["text_tokens"]).values())
        assert est["tflops_per_step"] * 1e12 == pytest.approx(
            forwards * per_image * cfg.train.batch_size * cfg.train.grad_accum)


def test_a_plain_network_widens_into_a_self_conditioned_one():
    torch.manual_seed(0)
    plain = PixelHDM(tiny_cfg().model, C).eval()
    sc = PixelHDM(tiny_cfg("model.self_cond=true").model, C).eval()
    state = plain.state_dict()
    for key in ESTIMATE_INPUTS:
        name = key.removeprefix("net.")
        state[name] = with_estimate_inputs(state[name])
    sc.load_state_dict(state)
    z, t, tc = torch.randn(B, 3, H, W), torch.rand(B), text()
    with torch.no_grad():
        assert torch.allclose(sc(z, t, tc, prev=torch.rand(B, 3, H, W)), plain(z, t, tc),
                              atol=1e-6)


def test_a_new_run_from_a_checkpoint_may_add_self_conditioning_only(tmp_path, capsys):
    demo = write_demo_dataset(tmp_path / "demo", count=16, seed=3)
    source = tmp_path / "plain"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(source),
                       "--max-steps", "2", *sets()]) == 0
    run = tmp_path / "sc"
    assert train_main(["--init-from", str(source), "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "2", *sets("model.self_cond=true")]) == 0
    assert "the ones that read the previous estimate start at zero" in (run / "log.txt").read_text()
    back = tmp_path / "back"
    assert train_main(["--init-from", str(run), "--data", str(demo), "--run-dir", str(back),
                       "--max-steps", "2", *sets("model.self_cond=false")]) == 2
    assert "model.self_cond (True in the checkpoint, False here)" in capsys.readouterr().err
