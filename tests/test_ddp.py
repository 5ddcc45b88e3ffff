"""Training on several processes (torchrun, DDP over gloo on the CPU): the ranks stay
identical and in step, share what rank 0 builds, and end together."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainhelp import ROOT, ends_with_parent, records, sets, wait_for

from engine.demo_data import write_demo_dataset
from engine.job import RunDir
from engine.train import main as train_main


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", count=64, seed=3)


@pytest.mark.slow
def test_ddp_two_processes_stay_in_sync(demo, tmp_path, tiny_qwen3):
    """Two ranks (gloo) with a Qwen3 text encoder, self-alignment and two micro-batches a
    step (the first without DDP's gradient exchange). Rank 0 fills the text-feature cache
    while rank 1 waits, then rank 1 reads it without loading the encoder; every parameter
    takes part in every step (DDP is not told to look for unused ones, and would stop if
    one were); the studio's requests, which rank 0 reads, are acted on by both ranks at
    the same step; a batch whose one image fails keeps the ranks in step; the replicas stay
    identical."""
    run, rd = tmp_path / "run", RunDir(tmp_path / "run")
    data = tmp_path / "data"   # with an image that fails in training: its batch of one is empty
    shutil.copytree(demo, data)
    damaged = bytearray((data / "shape_0000.png").read_bytes())
    idat = damaged.index(b"IDAT")
    damaged[idat + 8:idat + 40] = b"\xff" * 32
    (data / "broken.png").write_bytes(bytes(damaged))
    (data / "broken.txt").write_text("a broken picture")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "engine.train", "--preset", "tiny-cpu", "--data", str(data), "--run-dir",
             str(run), "--max-steps", "100000", "--device", "cpu",
             *sets("train.save_every=3", "train.batch_size=1", "train.grad_accum=2",
                   "text.encoder=qwen3",
                   f"text.name_or_path={tiny_qwen3}", f"text.cache_dir={tmp_path / 'features'}",
                   "text.max_tokens=16", "loss.sra_weight=0.5")],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=ends_with_parent())
    try:
        wait_for(lambda: (s := rd.read_status()) and s.state == "running" and s.step >= 40,
                 timeout=180, what="both ranks past their first epoch")
        rid = rd.request("save-now")
        wait_for(lambda: rd.read_status().handled.get("save-now") == rid, what="save-now")
        rd.request("pause")
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):   # torchrun and both ranks
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log = log_path.read_text()
    status = rd.read_status()
    assert status.state == "paused" and status.world_size == 2
    # every save (every 3 steps, the request, the pause) checked both ranks, together
    # (the two ranks' lines may run together in torchrun's output: counted, not split)
    ranked = log.count("[rank 1] 2 ranks in sync")
    assert ranked >= 3 and log.count("2 ranks in sync") == 2 * ranked, log[-3000:]
    assert "self-alignment on" in log
    # the rank whose batch held only the broken image trained its last batch again: both
    # ranks began each epoch at the same step
    assert "broken.png" in log and "its last batch is trained again" in log
    began = re.findall(r"(\[rank 1\] )?epoch (\d+) begins at step (\d+)", log)
    rank0 = [(e, s) for tag, e, s in began if not tag]
    rank1 = [(e, s) for tag, e, s in began if tag]
    assert len(rank0) >= 2 and rank0 == rank1, began
    assert "did not find any unused parameters" not in log   # no needless search for them
    assert "FutureWarning" not in log   # (DDP's deprecated broadcast_buffers)
    assert log.count("captions encoded in") == 1                      # by one rank: rank 0
    assert not re.search(r"\[rank 1\] text features: \d+ captions encoded", log)
    assert re.search(r"\[rank 1\] text features: all \d+ captions found in the feature "
                     r"cache .*; the text encoder is not loaded", log)
    assert all(r["images_s"] > 0 for r in records(run, "images_s"))
    # every rank's random state is saved, so a resume continues each rank's own noise
    from engine.checkpoint import latest_resumable, load_state
    last = latest_resumable(run / "checkpoints")
    assert last.step == status.step
    tensors, info = load_state(last.state_path)
    assert {"rng.noise.0", "rng.noise.1", "rng.torch.0", "rng.torch.1"} <= set(tensors)
    assert not torch.equal(tensors["rng.noise.0"], tensors["rng.noise.1"])


@pytest.mark.parametrize("world", [1, 2])
def test_a_stop_before_training_began_ends_torchruns_other_ranks(demo, tmp_path, monkeypatch,
                                                                 world):
    """A stop during setup reaches each rank on its own: one that took it must not end
    as a success under torchrun, which ends the others (waiting for it in a collective,
    where no request reaches them) only when a rank fails. The run says stopped."""
    import engine.train_cli as train_cli_module
    from engine.train_io import StoppedEarly

    def stopped(*args, **kwargs):
        raise StoppedEarly("stopped by a stop request before training began", requested=True)
    monkeypatch.setattr(train_cli_module, "train", stopped)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    run = tmp_path / "run"
    code = train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run)])
    assert code == (0 if world == 1 else train_cli_module.STOPPED_EARLY_RANK) and code != 1
    status = RunDir(run).read_status()
    assert status.state == "stopped" and "before training began" in status.message


def test_a_rank_that_fails_in_setup_fails_the_run_not_stops_it(demo, tmp_path, monkeypatch):
    """torchrun signals every rank when one fails: rank 0, still setting up, records that
    rank's error as the run's failure instead of a stop by a signal."""
    import engine.train_cli as train_cli_module
    from engine.train_io import StoppedEarly
    run = tmp_path / "run"

    def signalled(*args, **kwargs):
        with open(RunDir(run).log_file, "a", encoding="utf-8") as f:
            f.write("[rank 1] error: dataset folder '/data' does not exist\n")
        raise StoppedEarly("stopped by signal SIGTERM before training began")
    monkeypatch.setattr(train_cli_module, "train", signalled)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run)])
    status = RunDir(run).read_status()
    assert code == 1 and status.state == "failed"
    assert status.error == ("ended by torchrun before training began: rank 1 failed: dataset "
                            "folder '/data' does not exist")


def test_ranks_other_than_0_need_no_features_of_what_only_rank_0_encodes(demo):
    """Validation and sample grids are rank 0's: its captions, prompts and negative are
    not encoded on the other ranks (where a prompt file that differs from the config's
    prompts would otherwise load the text encoder on every GPU)."""
    from engine.buckets import plan_buckets
    from engine.config import load_preset
    from engine.data import scan_dataset
    from engine.train_io import run_captions
    cfg = load_preset("tiny-cpu", [f"data.path={demo}", "data.val_images=4",
                                   "sample.negative=blurry"])
    plan = plan_buckets(scan_dataset(demo, cfg.data).records, cfg.data, cfg.model.patch_size,
                        cfg.train.batch_size)
    main = run_captions(plan, cfg, ["a file prompt"])
    other = run_captions(plan, cfg, ["a file prompt"], samples=False)
    trained = {im.caption for im in plan.images}
    assert set(other) == trained | {"", cfg.data.default_caption}
    assert {"a file prompt", "blurry", *cfg.sample.prompts,
            *(im.caption for im in plan.val_images)} <= set(main) - set(other) | trained


def test_a_failing_rank_other_than_0_says_which_in_the_log(tmp_path, monkeypatch, capsys):
    """Only rank 0 writes status.json; torchrun ends it when another rank fails, and the
    studio finds that rank's error in the log by its tag."""
    from engine.train_cli import _fail
    run = RunDir(tmp_path / "run")
    run.create()
    monkeypatch.setenv("RANK", "1")
    _fail(run, "CUDA out of memory\n at 512x512")
    err = capsys.readouterr().err
    assert err == "[rank 1] error: CUDA out of memory at 512x512\n"
    assert run.read_status() is None   # rank 0's file, untouched
    run.log_file.write_text(err, encoding="utf-8")
    assert run.rank_error() == "rank 1 failed: CUDA out of memory at 512x512"
    # an error of an earlier launch of the run (before the studio's latest launch line)
    with open(run.log_file, "a", encoding="utf-8") as f:
        f.write("2026-12-05 10:00:00 studio: python -m torch.distributed.run ...\n")
    assert run.rank_error() == ""
