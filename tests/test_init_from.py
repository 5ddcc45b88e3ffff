"""New runs from a checkpoint's weights (--init-from / train.init_from): the weights come
along, the optimizer and schedule start fresh, the data, resolution and schedule may
change, the network and text encoder may not, and the runs record their origin."""

from __future__ import annotations

import pytest
import torch
from trainhelp import sets

from engine.checkpoint import list_checkpoints, load_weights, read_meta
from engine.demo_data import write_demo_dataset
from engine.train import main as train_main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", count=24, seed=5)


@pytest.fixture(scope="module")
def source(demo, tmp_path_factory):
    run = tmp_path_factory.mktemp("src") / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "6", *sets()]) == 0
    return run


def newest(run):
    return list_checkpoints(run / "checkpoints")[-1].path


@pytest.mark.parametrize("which", ["ema", "raw"])
def test_a_new_run_starts_from_the_checkpoints_weights(source, demo, tmp_path, which):
    run = tmp_path / "run"
    # a learning rate too small to move anything: the first step keeps the loaded weights
    assert train_main(["--init-from", str(source), "--init-weights", which, "--data",
                       str(demo), "--run-dir", str(run), "--max-steps", "1",
                       "--set", "train.lr=1e-30", "--set", "train.min_lr=0",
                       "--set", "train.warmup_steps=1",
                       "--set", "data.max_side=32"]) == 0
    start, _ = load_weights(newest(source), ema=which == "ema")
    now, meta = load_weights(newest(run), ema=False)
    assert set(now) == set(start)
    assert all(torch.allclose(now[k], start[k], atol=1e-6) for k in start)
    assert meta["init_from"] == {"file": newest(source).name, "run_id": "run", "step": 6,
                                 "weights": which}
    assert meta["step"] == 1                          # its own step count, from 0
    log = (run / "log.txt").read_text()
    assert f"weights: from {newest(source)} (step 6 of run 'run', {which} weights)" in log


def test_the_origin_is_kept_across_a_resume(source, demo, tmp_path):
    run = tmp_path / "run"
    assert train_main(["--init-from", str(newest(source)), "--data", str(demo), "--run-dir",
                       str(run), "--max-steps", "2"]) == 0
    assert train_main(["--run-dir", str(run), "--resume", "--max-steps", "3"]) == 0
    assert read_meta(newest(run))["init_from"]["step"] == 6
    assert "weights: from" not in (run / "log.txt").read_text().split("resumed from")[-1]


def test_another_network_or_text_encoder_is_refused_by_name(source, demo, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(["--init-from", str(source), "--data", str(demo), "--run-dir", str(run),
                       "--set", "model.pixel_dim=8", "--set", "text.builtin_layers=2"]) == 2
    err = capsys.readouterr().err
    assert "may change the data, resolution, schedule and losses, but not the network" in err
    assert "model.pixel_dim (4 in the checkpoint, 8 here)" in err
    assert "text.builtin_layers (1 in the checkpoint, 2 here)" in err
    assert not list_checkpoints(run / "checkpoints") if run.exists() else True


def test_another_text_encoder_is_refused_before_it_is_loaded(source, demo, tmp_path, capsys):
    """Refused before the data and the encoder: a Qwen3 encoder would first be fetched (here,
    offline, it failed to load instead) and encode every caption. Nothing is written."""
    run = tmp_path / "run"
    assert train_main(["--init-from", str(source), "--data", str(demo), "--run-dir", str(run),
                       "--set", "text.encoder=qwen3"]) == 2
    err = capsys.readouterr().err
    assert "text.encoder ('builtin' in the checkpoint, 'qwen3' here)" in err
    assert "could not be loaded" not in err and not run.exists()


@pytest.mark.parametrize("args, message", [
    (["--resume"], "drop one of the two"),
    (["--init-weights", "raw"], None),
])
def test_init_from_goes_with_a_new_run_only(source, demo, tmp_path, capsys, args, message):
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(run),
                       "--max-steps", "1", *sets()]) == 0
    if message:
        assert train_main(["--run-dir", str(run), "--init-from", str(source), *args]) == 1
        assert message in capsys.readouterr().err
    else:   # --init-weights alone
        assert train_main(["--run-dir", str(tmp_path / "r2"), "--data", str(demo),
                           "--preset", "tiny-cpu", *args]) == 1
        assert "--init-weights needs --init-from" in capsys.readouterr().err


def test_the_studio_fills_a_new_run_from_a_checkpoint_and_checks_it(demo, tmp_path):
    from engine.generate_io import checkpoint_config
    from studio.paths import PathError
    from studio.workspace import Studio, init_overrides
    studio = Studio(tmp_path / "ws", [demo.parent])
    src = studio.runner.runs_root / "src"
    assert train_main(["--preset", "tiny-cpu", "--data", str(demo), "--run-dir", str(src),
                       "--max-steps", "2", *sets()]) == 0
    cid = "run/src/2"
    _, source, _ = checkpoint_config(studio.checkpoint_path(cid))
    preset, text = init_overrides(source, cid)
    assert preset == "tiny-cpu" and text.endswith(f"train.init_from={cid}")
    assert "model.hidden_dim=64" in text and "text.builtin_dim=64" in text
    cfg = studio.run_config(preset, text, typed=str(demo))
    assert cfg.train.init_from == str(src / "checkpoints" / "step_0000002.safetensors")
    with pytest.raises(Exception, match=r"model\.pixel_dim \(4 in the checkpoint, 8 here\)"):
        studio.run_config(preset, text + "\nmodel.pixel_dim=8", typed=str(demo))
    for bad in ("run/nope/2", "../outside", "/etc"):
        with pytest.raises(PathError, match="train.init_from"):
            studio.run_config(preset, text.replace(cid, bad), typed=str(demo))


def test_a_failed_run_from_a_checkpoint_can_be_started_again(source, demo, tmp_path, capsys,
                                                              monkeypatch):
    """As a failed new --preset run does, it forgets its config.yaml: the same command is
    not refused with "already holds a run"."""
    import engine.train

    def broken(*args, **kwargs):
        raise RuntimeError("the first step broke")
    run = tmp_path / "run"
    args = ["--init-from", str(source), "--data", str(demo), "--run-dir", str(run),
            "--max-steps", "1", "--set", "train.sample_every=0"]
    with monkeypatch.context() as m:
        m.setattr(engine.train, "MetricWindow", broken)   # built after the config is written
        assert train_main(args) == 1
    assert "the first step broke" in capsys.readouterr().err
    assert not (run / "config.yaml").exists()
    assert train_main(args) == 0
