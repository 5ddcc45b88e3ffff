"""Warnings before training: a GPU-sized config started on a machine that would train it
on the CPU is named, with the time it would take and what to do instead."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import load_preset
from engine.preflight import cpu_warning


def test_a_gpu_preset_on_the_cpu_is_warned_about_and_the_cpu_preset_is_not():
    home = load_preset("home-8gb")
    text = cpu_warning(home, "cpu", step_seconds=60.0)
    assert text.startswith("this config is sized for a GPU") and "139 days" in text
    assert "Use the tiny-cpu preset" in text and "200,000" in text
    assert cpu_warning(home, "cuda", step_seconds=60.0) == ""
    assert cpu_warning(load_preset("tiny-cpu"), "cpu") == ""          # measured here
    assert cpu_warning(home, "cpu") != ""                             # measured here


def test_the_trainer_and_the_train_tab_say_it(tmp_path, monkeypatch):
    from trainhelp import sets

    import engine.preflight as preflight
    from engine.demo_data import write_demo_dataset
    from engine.train import main as train_main
    from studio.train_setup import estimate_markdown
    preflight._cpu_tflops.cache_clear()
    monkeypatch.setattr(preflight, "measured_tflops", lambda *a, **k: 1e-9)   # a slow CPU
    monkeypatch.setattr(preflight, "CPU_TFLOPS_CEILING", 1e-9)
    try:
        data = write_demo_dataset(tmp_path / "demo", count=8, seed=1)
        run = tmp_path / "run"
        assert train_main(["--preset", "tiny-cpu", "--data", str(data), "--run-dir", str(run),
                           "--max-steps", "1", *sets("train.batch_size=4")]) == 0
        assert "warning: this config is sized for a GPU" in (run / "log.txt").read_text()
        assert "**Warning:** this config is sized for a GPU" in estimate_markdown(
            load_preset("tiny-cpu"), 1)
    finally:
        preflight._cpu_tflops.cache_clear()


def test_the_dry_run_hands_its_memory_back(monkeypatch):
    """The dry run runs in the studio's process: what it allocated goes back to the system
    (the CPU otherwise keeps freed memory for reuse), even when it fails."""
    import engine.preflight as preflight
    released = []
    monkeypatch.setattr(preflight, "release_memory", lambda dev: released.append(dev.type))
    out = preflight.dry_run(load_preset("tiny-cpu", ["train.batch_size=2"]), device="cpu",
                            steps=1)
    assert out and released == ["cpu"]
    monkeypatch.setattr(preflight, "_dry_run", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        preflight.dry_run(load_preset("tiny-cpu"), device="cpu", steps=1)
    assert released == ["cpu", "cpu"]


def test_the_dry_run_computes_in_what_the_trainer_would(monkeypatch):
    """On a CPU without bf16 arithmetic the dry run of a bf16 config runs in fp32, as the
    trainer would, not emulated (over 10x slower)."""
    import engine.distributed as distributed
    import engine.preflight as preflight
    used = []
    real = preflight.autocast_for
    monkeypatch.setattr(preflight, "autocast_for", lambda p, d: used.append(p) or real(p, d))
    monkeypatch.setattr(distributed, "native_half", lambda precision: False)
    cfg = load_preset("tiny-cpu", ["train.batch_size=2", "train.precision=bf16"])
    assert preflight.dry_run(cfg, device="cpu", steps=1)
    assert used and set(used) == {"fp32"}
    monkeypatch.setattr(distributed, "native_half", lambda precision: True)
    used.clear()
    assert preflight.dry_run(cfg, device="cpu", steps=1)
    assert set(used) == {"bf16"}


def test_the_memory_line_speaks_of_the_device_this_machine_trains_on(monkeypatch):
    """On a machine without a GPU the New-run form's memory is the machine's own: no CUDA
    context counted, no 'fits a 8 GB GPU', and a warning when it would not fit."""
    import engine.preflight as preflight
    from studio.train_setup import estimate_markdown
    cfg = load_preset("tiny-cpu")
    gpu, cpu = preflight.estimate(cfg, device="cuda"), preflight.estimate(cfg, device="cpu")
    assert gpu["memory_gib"]["total"] - cpu["memory_gib"]["total"] == pytest.approx(0.5)
    assert gpu["fits"] == "fits a 8 GB GPU"
    monkeypatch.setattr(preflight, "machine_memory_gib", lambda: 16.0)
    assert preflight.estimate(cfg, device="cpu")["fits"] == "within this machine's 16 GiB of memory"
    monkeypatch.setattr(preflight, "machine_memory_gib", lambda: 0.05)
    assert preflight.estimate(cfg, device="cpu")["fits"].startswith(
        "more than 80 % of this machine's 0.05 GiB of memory: lower the batch size")
    monkeypatch.setattr(preflight, "machine_memory_gib", lambda: None)
    assert preflight.estimate(cfg, device="cpu")["fits"] == ""
    monkeypatch.setattr(preflight.torch.cuda, "is_available", lambda: False)
    text = estimate_markdown(cfg, 1)
    assert "Memory on this CPU about" in text and "GPU" not in text.split("Memory")[1]
    monkeypatch.setattr(preflight, "machine_memory_gib", lambda: 16.0)
    assert "within this machine's 16 GiB of memory." in estimate_markdown(cfg, 1)
    # a bf16 preset on a CPU without bf16 arithmetic trains in fp32: twice the activations
    import engine.distributed as distributed
    home = load_preset("home-8gb")
    for native, ratio in ((False, 2.0), (True, 1.0)):
        monkeypatch.setattr(distributed, "native_half", lambda precision, n=native: n)
        acts = [preflight.estimate(home, device=d)["memory_gib"]["activations"]
                for d in ("cpu", "cuda")]
        assert acts[0] == pytest.approx(ratio * acts[1])


def test_a_dry_run_out_of_memory_hands_its_memory_back(monkeypatch):
    """When the dry run runs out of memory, its error reaches the studio as text only: the
    failed step's frames (network, optimizer, activations) are gone by the time memory is
    released, so the studio's process does not keep the GPU memory the real run needs."""
    import gc
    import weakref

    import engine.preflight as preflight

    class Held:   # stands for the failed step's tensors
        pass

    alive_at_release = []

    def step(cfg, dev, steps):
        held = Held()
        ref.append(weakref.ref(held))
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as e:
            raise RuntimeError("batch 16 at 512x512 does not fit: lower train.batch_size") from e

    def release(dev):
        gc.collect()
        alive_at_release.append(ref[0]() is not None)

    ref: list = []
    monkeypatch.setattr(preflight, "_dry_run", step)
    monkeypatch.setattr(preflight, "release_memory", release)
    with pytest.raises(RuntimeError, match="does not fit: lower train.batch_size") as info:
        preflight.dry_run(load_preset("tiny-cpu"), "cpu")
    assert alive_at_release == [False]
    assert info.value.__cause__ is None and info.value.__context__ is None

    def bug(cfg, dev, steps):     # any other error keeps its traceback
        raise RuntimeError("shape mismatch")
    monkeypatch.setattr(preflight, "_dry_run", bug)
    with pytest.raises(RuntimeError, match="shape mismatch") as info:
        preflight.dry_run(load_preset("tiny-cpu"), "cpu")
    assert info.traceback[-1].name == "bug"


def test_the_dry_run_line_leaves_out_a_memory_the_system_did_not_report():
    from studio.train_setup import dry_run_markdown
    res = {"device": "cpu", "bucket": [64, 64], "batch_size": 16, "seconds_per_step": 0.2,
           "images_s": 80.0, "peak_memory_mib": 512.0, "peak_is_process_rss": True}
    assert dry_run_markdown(res).endswith("80.0 images/s, process memory 512.0 MiB.")
    res["peak_memory_mib"] = 0.0      # Windows: no peak resident memory to read
    assert dry_run_markdown(res).endswith("80.0 images/s.")


def test_the_peak_memory_reading_starts_afresh(monkeypatch):
    """The dry run and the trainer read the peak from where they reset it: the process's
    resident high-water mark on Linux (the GPU's allocation peak on CUDA)."""
    from engine.distributed import peak_rss_mb, release_memory, reset_peak_memory
    blob = torch.ones(300 * 2 ** 18)   # 300 MiB, touched
    before = peak_rss_mb()
    del blob
    # handed back, as the trainer does with the text encoder's memory (with glibc's reuse
    # of freed memory, which earlier tests switch on, the heap may have served the blob)
    release_memory(torch.device("cpu"))
    reset_peak_memory(torch.device("cpu"))
    if not Path("/proc/self/clear_refs").exists():
        assert peak_rss_mb() >= before   # elsewhere it keeps counting from the start
        return
    assert 0 < peak_rss_mb() < before - 200


def test_a_run_shorter_than_its_validation_period_or_warm_up_is_told_so():
    from engine.preflight import schedule_notes
    short = load_preset("tiny-cpu", ["train.max_steps=60"])     # val every 250, warm-up 100
    notes = schedule_notes(short)
    assert len(notes) == 2
    assert "before its first validation (train.val_every = 250)" in notes[0]
    assert "within the learning-rate warm-up (train.warmup_steps = 100)" in notes[1]
    assert schedule_notes(short, stop_at=300)[0].startswith("train.max_steps = 60 ends")
    assert schedule_notes(load_preset("tiny-cpu")) == []
    assert schedule_notes(load_preset("tiny-cpu", ["train.max_steps=60", "train.val_every=20",
                                                   "train.warmup_steps=10"])) == []
    assert schedule_notes(load_preset("tiny-cpu", ["train.max_steps=60",
                                                   "data.val_images=0",
                                                   "train.warmup_steps=10"])) == []
