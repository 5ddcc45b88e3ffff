"""The training state on its own: TrainState's round trip, and save (payload), restore and
rollback over a small model, without a training loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engine.checkpoint import list_checkpoints, save_checkpoint
from engine.distributed import Dist, restore_rng_states
from engine.optim import EMA, ZClip
from engine.train_state import Parts, RestoreError, TrainState, payload, restore, rollback

CPU = torch.device("cpu")


class Sampler:
    """Stands in for the bucket sampler: remembers its epoch and where it was."""

    def __init__(self, fingerprint="data-1"):
        self.epoch, self.position, self.fingerprint = 0, 0, fingerprint

    def state_dict(self, position):
        return {"epoch": self.epoch, "position": position, "data": self.fingerprint}

    def load_state_dict(self, sd):
        if sd["data"] != self.fingerprint:
            raise ValueError("another batching")
        self.epoch, self.position = sd["epoch"], sd["position"]

    def set_epoch(self, epoch):
        self.epoch, self.position = epoch, 0


def make_parts(seed=0, width=4) -> Parts:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width, 3), nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    ema = EMA(dict(model.named_parameters()), 0.9)
    return Parts(model, opt, ema, ZClip(2.5, 0.97, 5), torch.amp.GradScaler("cpu",
                                                                            enabled=False),
                 Sampler(), torch.Generator().manual_seed(7))


def train_a_little(parts: Parts, steps=3):
    for _ in range(steps):
        parts.optimizer.zero_grad()
        parts.model(torch.randn(5, 4, generator=parts.noise_gen)).square().mean().backward()
        parts.optimizer.step()
        parts.ema.update()


def save(tmp_path, state: TrainState, parts: Parts, fingerprint="fp"):
    tensors, info = payload(state, parts, parts.rng_states(Dist(), CPU), fingerprint)
    save_checkpoint(tmp_path, state.step, parts.model.state_dict(), parts.ema.shadow,
                    {"init_from": {"step": 9}}, tensors, info)
    return list_checkpoints(tmp_path)[-1]


def test_the_state_round_trips_through_json():
    st = TrainState(step=12, stop_at=40, epoch=2, position=3, lr_scale=0.25, loss_avg=0.5,
                    loss_count=12, best_step=10, last_val=0.7)
    sd = st.state_dict()
    assert sd["best_val"] is None and "origin" not in sd     # inf is not JSON
    back = TrainState()
    back.load_state_dict(sd)
    back.stop_at = st.stop_at
    assert back == st
    st.best_val = 0.3
    back.load_state_dict(st.state_dict())
    assert back.best_val == 0.3 and math.isinf(TrainState().best_val)


def test_restore_brings_back_weights_optimizer_ema_counters_and_randomness(tmp_path):
    parts = make_parts()
    train_a_little(parts)
    st = TrainState(step=3, stop_at=10, epoch=1, position=2, lr_scale=0.5, loss_avg=0.4,
                    loss_count=3, best_val=0.9, best_step=2, last_val=0.9)
    parts.sampler.epoch = 1
    ckpt = save(tmp_path, st, parts)
    expected_next = torch.randn(3, generator=parts.noise_gen)
    weights = {k: v.clone() for k, v in parts.model.state_dict().items()}
    shadow = {k: v.clone() for k, v in parts.ema.shadow.items()}

    other = make_parts(seed=1)                         # a fresh process
    fresh, events = TrainState(), []
    restore(ckpt, fresh, other, d=Dist(), device=CPU, fingerprint="fp", seed=0, max_steps=10,
            requested=None, event=lambda *e: events.append(e))
    assert fresh == st and fresh.origin == {"step": 9} and not events
    assert all(torch.equal(other.model.state_dict()[k], v) for k, v in weights.items())
    assert all(torch.equal(other.ema.shadow[k], v) for k, v in shadow.items())
    assert other.ema.updates == 3 and other.sampler.epoch == 1
    assert torch.equal(torch.randn(3, generator=other.noise_gen), expected_next)
    # the two go on identically
    train_a_little(parts, 2)
    train_a_little(other, 2)
    assert all(torch.equal(other.model.state_dict()[k], v)
               for k, v in parts.model.state_dict().items())


def test_the_host_generator_beside_a_gpu_one_is_saved_and_restored(tmp_path):
    """On a GPU, caption dropout and self-conditioning draw from a per-rank CPU generator
    of their own (not the global one, which the data loader draws from when it starts):
    the checkpoint carries it, and a resume draws what the run would have drawn."""
    parts = make_parts()
    parts.host_gen = torch.Generator().manual_seed(11)
    torch.rand(5, generator=parts.host_draws)
    ckpt = save(tmp_path, TrainState(step=2, stop_at=5), parts)
    expected = torch.rand(4, generator=parts.host_draws)
    other = make_parts(seed=1)
    other.host_gen = torch.Generator().manual_seed(99)
    events = []
    restore(ckpt, TrainState(), other, d=Dist(), device=CPU, fingerprint="fp", seed=0,
            max_steps=5, requested=None, event=lambda *e: events.append(e))
    assert not events and torch.equal(torch.rand(4, generator=other.host_draws), expected)
    cpu = make_parts()
    assert cpu.host_draws is cpu.noise_gen


def test_random_states_from_another_kind_of_device_are_reported_not_raised():
    """A run started on the CPU and resumed on a GPU (or back) holds a noise state of
    another size (a CPU generator's is 5056 bytes, a CUDA one's 16), which torch refuses:
    the states are left alone with the reason, and `restore` seeds afresh and says so."""
    gen = torch.Generator().manual_seed(3)
    saved = {"rng.torch.0": torch.get_rng_state(),
             "rng.noise.0": torch.zeros(16, dtype=torch.uint8)}        # a CUDA generator's
    before = gen.get_state()
    why = restore_rng_states(Dist(), gen, CPU, saved)
    assert why == "the checkpoint's random state is from another kind of device than this run's cpu"
    assert torch.equal(gen.get_state(), before)
    assert "the number of processes changed" in restore_rng_states(Dist(), gen, CPU, {})
    saved["rng.noise.0"] = torch.Generator().manual_seed(5).get_state()
    assert restore_rng_states(Dist(), gen, CPU, saved) == ""


def test_a_changed_dataset_restarts_the_epoch_and_says_so(tmp_path):
    parts = make_parts()
    st = TrainState(step=1, stop_at=5, epoch=2, position=4)
    ckpt = save(tmp_path, st, parts)
    fresh, events = TrainState(), []
    restore(ckpt, fresh, make_parts(), d=Dist(), device=CPU, fingerprint="another", seed=0,
            max_steps=5, requested=8, event=lambda *e: events.append(e))
    assert fresh.position == 0 and fresh.epoch == 2 and fresh.stop_at == 8
    assert events[0][0] == "epoch-restarted" and "dataset differs" in events[0][1]


def test_a_checkpoint_of_another_shape_is_refused(tmp_path):
    ckpt = save(tmp_path, TrainState(step=1), make_parts())
    with pytest.raises(RestoreError, match="does not fit this config"):
        restore(ckpt, TrainState(), make_parts(width=6), d=Dist(), device=CPU,
                fingerprint="fp", seed=0, max_steps=5, requested=None, event=print)


def test_rollback_restores_weights_halves_the_rate_and_keeps_the_counters(tmp_path):
    parts = make_parts()
    st = TrainState(step=4, stop_at=10, epoch=1, position=3, loss_count=4)
    ckpt = save(tmp_path, st, parts)
    good = {k: v.clone() for k, v in parts.model.state_dict().items()}
    train_a_little(parts, 2)                           # the steps that went bad
    st.step = 6
    assert rollback(ckpt, st, parts, None, CPU) == ckpt.path.name
    assert all(torch.equal(parts.model.state_dict()[k], v) for k, v in good.items())
    assert (st.step, st.position, st.lr_scale) == (6, 3, 0.5)
    # before any checkpoint: back to the initial weights, EMA and optimizer reset
    initial = {k: v.clone() for k, v in make_parts().model.state_dict().items()}
    fresh = make_parts()
    train_a_little(fresh)
    assert rollback(None, st, fresh, initial, CPU) == "the initial weights"
    assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in initial.items())
    assert fresh.ema.updates == 0 and not fresh.optimizer.state and st.lr_scale == 0.25


def test_rank_zero_goes_first_and_the_others_wait_in_the_patient_group(monkeypatch):
    """What rank 0 fills (the text features' cache) the others read after it: they wait
    in the gloo group whose timeout is days, not in the process group's hour."""
    import torch.distributed as dist

    from engine.distributed import PATIENT_TIMEOUT, main_rank_first
    calls, patient = [], object()
    monkeypatch.setattr(dist, "barrier", lambda group=None: calls.append(("wait", group)))
    for rank in (0, 1):
        with main_rank_first(Dist(rank, 2, rank, patient=patient)):
            calls.append(("work", rank))
    assert calls == [("work", 0), ("wait", patient), ("wait", patient), ("work", 1)]
    assert PATIENT_TIMEOUT.days >= 1
    calls.clear()
    with main_rank_first(Dist()):   # one process: no wait at all
        calls.append(("work", 0))
    assert calls == [("work", 0)]


def test_a_steps_read_agrees_on_loss_norm_and_requests_over_ranks(monkeypatch):
    """Under DDP each rank's loss differs (its own batch); the norm of the all-reduced
    gradients may differ in the last bit (GPUs of two kinds); the requests are rank 0's
    and a stop signal any rank's. One collective makes them the same on every rank. (The
    other rank is simulated: its numbers are added in the all-reduce.)"""
    import torch.distributed as dist

    from engine.distributed import read_step
    other = torch.tensor([3.0, 2.0, 0.0, 1.0, 0.0], dtype=torch.float64)   # loss, norm, flags
    calls = []

    def all_reduce(t):
        calls.append(t.shape)
        t.add_(other)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    loss, norm, flags = read_step(Dist(0, 2, 0), torch.tensor(1.0), torch.tensor(2.5),
                                  [True, False, False])
    assert (loss, norm, flags) == (2.0, 2.25, [True, True, False]) and len(calls) == 1
    # one process: no collective, its own numbers
    assert read_step(Dist(), torch.tensor(1.0), torch.tensor(2.5), [False, True]) == \
        (1.0, 2.5, [False, True]) and len(calls) == 1


def test_torchrun_with_more_processes_than_gpus_is_refused_by_name(monkeypatch):
    import engine.distributed as distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(distributed, "note_gpu_capabilities", lambda: None)
    monkeypatch.setattr(distributed, "allow_tf32", lambda: None)
    for k, v in {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(distributed.DeviceError) as e:
        distributed.setup_device("cuda")
    text = " ".join(str(e.value).split())
    assert "(2; this is local rank 2)" in text and "--nproc_per_node" in text


def test_logged_losses_are_every_ranks_not_rank_0s(monkeypatch):
    """A metric line's loss terms and loss by time are the means over every rank's
    batches (one collective per line); with one process, its own."""
    from engine.train_io import MetricWindow

    def window() -> MetricWindow:
        w = MetricWindow(2)
        for total, bins in ((1.0, [1.0, 0.0]), (3.0, [0.0, 3.0])):
            w.add({"total": torch.tensor(total), "v": torch.tensor(total / 2)}, 1.0, 1.0, 4,
                  64, 0.5, torch.tensor(bins), torch.tensor([1.0, 0.0]) if bins[0] else
                  torch.tensor([0.0, 1.0]))
        return w
    mine = window().flush()
    assert mine["loss"] == 2.0 and mine["loss_v"] == 1.0 and mine["loss_t"] == [1.0, 3.0]
    # the other rank's sums: loss 6 + 10, v 3 + 5, bins (5 over 2 images, 0 over 0)
    other = torch.tensor([16.0, 8.0, 5.0, 0.0, 2.0, 0.0], dtype=torch.float64)
    both = window().flush(lambda t: t + other, world=2)
    assert both["loss"] == (4.0 + 16.0) / 4 and both["loss_v"] == (2.0 + 8.0) / 4
    assert both["loss_t"] == [2.0, 3.0]
    assert both["grad_norm"] == mine["grad_norm"] and both["images_s"] == mine["images_s"]


def test_a_run_that_waits_for_its_images_says_what_to_do(monkeypatch):
    """A metric line carries the share of the step time spent waiting for batches. At
    DATA_WAIT_HINT or more in two lines in a row (one alone may be the loader starting its
    workers) the log says once what to do: on a GPU with cores to spare, more workers;
    on the CPU, whose cores the training itself uses, smaller image files."""
    import os

    from engine.config import DataConfig
    from engine.crop_cache import uncached_advice
    from engine.train_io import DATA_WAIT_HINT, DataWaitHint, MetricWindow
    w = MetricWindow(1)
    for waited in (0.1, 0.3):
        w.add({"total": torch.tensor(1.0)}, 1.0, 1.0, 4, 64, 0.5, torch.zeros(1),
              torch.zeros(1), waited)
    assert w.flush()["data_wait"] == pytest.approx(0.4)

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    said = []
    random_crops = uncached_advice(DataConfig(crop="random"), None, 10)
    gpu = DataWaitHint(2, torch.device("cuda"), said.append, uncached=lambda: random_crops)
    for step, wait in ((10, 0.9), (20, 0.05), (30, DATA_WAIT_HINT), (40, 0.5), (50, 0.9)):
        gpu(wait, step)
    assert len(said) == 1 and said[0].startswith("step 40: 50% of the training time went to "
                                                 "waiting for images (data.workers = 2)")
    assert "raise data.workers (this machine has 16 CPU cores" in said[0]
    assert "data.crop = random" in said[0] and "twice the largest training size" in said[0]
    # every crop in the crop cache: no decoding left to advise on
    for hint in (DataWaitHint(0, torch.device("cpu"), said.append),
                 DataWaitHint(15, torch.device("cuda"), said.append)):
        hint(0.2, 1)
        hint(0.2, 2)
        assert "every crop already comes from the crop cache" in said[-1]
        assert "raise data.workers" not in said[-1]
    assert len(said) == 3


def test_suggested_commands_quote_paths_as_the_shell_reads_them(monkeypatch):
    import engine.train_io as train_io
    assert train_io.shell_arg("/data/my photos") == "'/data/my photos'"
    assert train_io.shell_arg("/data/plain") == "/data/plain"
    monkeypatch.setattr(train_io.os, "name", "nt")      # cmd.exe's quoting
    assert train_io.shell_arg(r"C:\my data") == r'"C:\my data"'
    assert train_io.shell_arg(r"C:\R&D") == r'"C:\R&D"'       # cmd would cut at the &
    assert train_io.shell_arg(r"C:\data") == r"C:\data"


@pytest.mark.parametrize("name, says", [
    ("mps", "on cpu or cuda"), ("xpu", "on cpu or cuda"), ("gpu", "not a device name")])
def test_a_device_this_engine_never_ran_on_is_refused_by_name(name, says):
    from engine.distributed import DeviceError, resolve_device
    with pytest.raises(DeviceError, match=says):
        resolve_device(name)
