"""Checkpoint files (safetensors only) and the job-directory protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from engine.checkpoint import (
    CheckpointError,
    apply_retention,
    delete_checkpoint,
    export_inference,
    flatten_optimizer,
    latest_resumable,
    list_checkpoints,
    load_state,
    load_weights,
    pinned_steps,
    read_meta,
    read_modelspec,
    save_checkpoint,
    set_pinned,
    unflatten_optimizer,
)
from engine.fileio import file_hash
from engine.job import REQUESTS, RunDir, Status, effective_state, pid_alive

ROOT = Path(__file__).resolve().parent.parent


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"net.a": torch.randn(3, 4, generator=g), "text.b": torch.randn(5, generator=g)}


def save(ckdir, step, ema=True, state=True):
    path = save_checkpoint(ckdir, step, weights(step), weights(100 + step) if ema else None,
                           {"run_id": "r1", "config": "model: {}\n"},
                           {"opt.0.exp_avg": torch.ones(2)}, {"step": step})
    if not state:
        path.with_name(path.name.replace(".safetensors", ".state.safetensors")).unlink()
    return path


def test_round_trip_raw_ema_meta_and_state(tmp_path):
    path = save(tmp_path, 7)
    meta = read_meta(path)
    assert meta["step"] == 7 and meta["has_ema"] and meta["run_id"] == "r1" and meta["format"] == 1
    raw, _ = load_weights(path, ema=False)
    ema, _ = load_weights(path, ema=True)
    assert set(raw) == {"net.a", "text.b"}
    assert torch.equal(raw["net.a"], weights(7)["net.a"])
    assert torch.equal(ema["net.a"], weights(107)["net.a"])
    tensors, info = load_state(path.with_name("step_0000007.state.safetensors"))
    assert info == {"step": 7} and torch.equal(tensors["opt.0.exp_avg"], torch.ones(2))
    # no EMA saved: asking for EMA gives the raw weights
    path = save(tmp_path, 8, ema=False)
    assert torch.equal(load_weights(path, ema=True)[0]["net.a"], weights(8)["net.a"])


def test_files_hold_no_pickle_and_are_written_atomically(tmp_path):
    path = save(tmp_path, 1)
    assert path.read_bytes()[:8] != b"\x80\x04\x95"          # not a pickle stream
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_mode_of_any_file_the_user_writes(tmp_path, umask, monkeypatch):
    """Temporary files are created private; what replaces a target is as readable as a file
    created plainly under the user's umask (checkpoints, configs, generated images)."""
    from PIL import Image

    import engine.pngmeta as pngmeta
    from engine.fileio import atomic_write_text
    monkeypatch.setattr(pngmeta, "png_text", lambda params: {})   # the text: tested elsewhere
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        ckpt = save(tmp_path, 1)
        png = pngmeta.save_png(Image.new("RGB", (4, 4)), {"seed": 3}, tmp_path / "out")
    finally:
        os.umask(old)
    for path in (tmp_path / "config.yaml", ckpt, png):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_meta(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="damaged"):
        read_meta(bad)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(other))
    with pytest.raises(CheckpointError, match="not a PixelHDM checkpoint"):
        load_weights(other)
    with pytest.raises(CheckpointError, match="training state"):
        load_state(tmp_path / "missing.state.safetensors")


def test_listing_latest_and_retention_with_pins(tmp_path):
    for step in (10, 20, 30, 40, 50):
        save(tmp_path, step)
    save(tmp_path, 60, state=False)                          # weights only: not resumable
    infos = list_checkpoints(tmp_path)
    assert [c.step for c in infos] == [10, 20, 30, 40, 50, 60]
    assert latest_resumable(tmp_path).step == 50
    (tmp_path / "keep.txt").write_text("20\n")
    deleted = apply_retention(tmp_path, keep_last=2, keep={30})
    assert [c.step for c in list_checkpoints(tmp_path)] == [20, 30, 50, 60]
    assert len(deleted) == 4                                  # 10 and 40, weights and state


def test_pins_are_set_and_cleared_and_retention_keeps_them(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step)
    assert set_pinned(tmp_path, 10, True) == {10}
    assert set_pinned(tmp_path, 20, True) == {10, 20}
    assert set_pinned(tmp_path, 20, True) == {10, 20}                # pinning twice: once
    assert (tmp_path / "keep.txt").read_text() == "10\n20\n"
    assert set_pinned(tmp_path, 10, False) == {20} == pinned_steps(tmp_path)
    assert set_pinned(tmp_path, 99, False) == {20}                   # not pinned: no change
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp file
    apply_retention(tmp_path, keep_last=1)
    assert [c.step for c in list_checkpoints(tmp_path)] == [20, 30]


def test_deleting_a_checkpoint_removes_its_pair_and_its_pin(tmp_path):
    for step in (10, 20):
        save(tmp_path, step)
    save(tmp_path, 30, state=False)
    set_pinned(tmp_path, 10, True)
    set_pinned(tmp_path, 20, True)
    deleted = delete_checkpoint(tmp_path, 10)
    assert [p.name for p in deleted] == ["step_0000010.safetensors",
                                         "step_0000010.state.safetensors"]
    assert [c.step for c in list_checkpoints(tmp_path)] == [20, 30]
    assert pinned_steps(tmp_path) == {20}
    assert [p.name for p in delete_checkpoint(tmp_path, 30)] == ["step_0000030.safetensors"]
    assert pinned_steps(tmp_path) == {20}                             # untouched
    # a training state left without its weights is still removed with its step
    (tmp_path / "step_0000020.safetensors").unlink()
    assert [p.name for p in delete_checkpoint(tmp_path, 20)] == ["step_0000020.state.safetensors"]
    assert pinned_steps(tmp_path) == set() and list_checkpoints(tmp_path) == []
    with pytest.raises(CheckpointError, match="no checkpoint of step 20"):
        delete_checkpoint(tmp_path, 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_the_time_based_resume_point_rotates_and_stays_outside_retention(tmp_path):
    def latest(step):
        return save_checkpoint(tmp_path, step, weights(step), None, {"run_id": "r1"},
                               {"opt.0.exp_avg": torch.ones(2)}, {"step": step}, latest=True)
    save(tmp_path, 10)
    latest(13)
    assert latest_resumable(tmp_path).path.name == "latest_0000013.safetensors"
    latest(17)                                                # the older entry goes
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest_0000017.safetensors", "latest_0000017.state.safetensors",
                     "step_0000010.safetensors", "step_0000010.state.safetensors"]
    assert [c.step for c in list_checkpoints(tmp_path)] == [10]   # not a listed checkpoint
    apply_retention(tmp_path, keep_last=1)
    assert (tmp_path / "latest_0000017.safetensors").is_file()
    # a weights file not yet written (a crash between the two files) is not resumable
    (tmp_path / "latest_0000017.safetensors").unlink()
    assert latest_resumable(tmp_path).step == 10
    latest(19)
    save(tmp_path, 20)                                        # a newer step supersedes it
    assert latest_resumable(tmp_path).path.name == "step_0000020.safetensors"
    assert not list(tmp_path.glob("latest_*"))


def test_export_inference_file(tmp_path):
    src = save(tmp_path, 5)
    dst = export_inference(src, tmp_path / "model.safetensors", torch.bfloat16, ema=True)
    w, meta = load_weights(dst, ema=True)
    assert w["net.a"].dtype == torch.bfloat16
    assert torch.allclose(w["net.a"].float(), weights(105)["net.a"], atol=1e-2)
    assert meta["exported_weights"] == "ema" and not meta["has_ema"] and meta["step"] == 5
    # a config of defaults only still gives every ModelSpec key a value
    spec = read_modelspec(dst)
    assert (spec["title"], spec["architecture"], spec["resolution"]) == \
        ("r1 step 5", "pixelhdm/custom", "512x512")
    assert spec["sai_model_spec"] == "1.0.0" and spec["prediction_type"] == "v_prediction"
    raw = export_inference(src, tmp_path / "raw.safetensors", torch.float32, ema=False)
    assert torch.equal(load_weights(raw)[0]["net.a"], weights(5)["net.a"])
    assert len(file_hash(dst)) == 10 and file_hash(dst) == file_hash(dst)


def test_optimizer_state_round_trip_continues_identically():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    for _ in range(3):
        net(torch.randn(4, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    tensors, info = flatten_optimizer(opt.state_dict())
    info = json.loads(json.dumps(info))                       # what the file stores
    tensors = {k: v.clone() for k, v in tensors.items()}
    twin = nn.Linear(3, 2)
    twin.load_state_dict(net.state_dict())
    opt2 = torch.optim.AdamW(twin.parameters(), lr=0.1)
    opt2.load_state_dict(unflatten_optimizer(tensors, info))
    x = torch.randn(4, 3)
    for model, o in ((net, opt), (twin, opt2)):
        model(x).square().sum().backward()
        o.step()
    assert torch.equal(net.weight, twin.weight)


# --------------------------------------------------------------------------------------
# job directory
# --------------------------------------------------------------------------------------

def test_status_round_trip_and_bad_files(tmp_path):
    run = RunDir(tmp_path / "r")
    run.create()
    assert run.read_status() is None
    run.write_status(Status(state="running", step=3, pid=os.getpid(), heartbeat=time.time()))
    assert run.read_status().step == 3
    data = json.loads(run.status_file.read_text())
    data["from_a_newer_version"] = 1
    run.status_file.write_text(json.dumps(data))
    assert run.read_status().state == "running"
    run.status_file.write_text("{half")
    assert run.read_status() is None


def test_metrics_are_read_incrementally_and_partial_lines_wait(tmp_path):
    run = RunDir(tmp_path / "r")
    run.create()
    run.append_metrics({"step": 1, "loss": 1.0})
    recs, off = run.read_metrics()
    assert recs == [{"step": 1, "loss": 1.0}]
    with open(run.metrics_file, "a") as f:
        f.write('{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    recs, off = run.read_metrics(off)
    assert recs == [{"step": 2, "loss": 0.5}]
    with open(run.metrics_file, "a") as f:
        f.write('ss": 0.25}\n')
    recs, off = run.read_metrics(off)
    assert recs == [{"step": 3, "loss": 0.25}]
    assert run.read_metrics(off) == ([], off)


def test_a_line_cut_short_never_swallows_the_next_and_a_failed_append_is_taken_back(
        tmp_path, monkeypatch):
    import errno

    import engine.fileio as fileio
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')   # a writer killed mid-line
    fileio.append_line(path, '{"step": 3}')
    assert path.read_text().splitlines()[-1] == '{"step": 3}'
    before = path.read_bytes()
    real_open = open

    class HalfThenFull:   # a disk that fills up halfway through the write
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "open", lambda *a, **k: HalfThenFull(real_open(*a, **k)),
                        raising=False)
    with pytest.raises(fileio.DiskFull, match=r"the disk holding .* is full .* m\.jsonl"):
        fileio.append_line(path, '{"step": 4, "loss": 0.5}')
    assert path.read_bytes() == before


@pytest.mark.skipif(os.name == "nt", reason="uses a POSIX file-size limit")
def test_an_append_that_the_disk_takes_only_in_part_is_taken_back(tmp_path):
    """A real file and a real partial write (the process's file-size limit stands in for
    the disk filling up mid-line): the file keeps whole lines only."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n')
    code = (f"import resource, sys; from pathlib import Path; from engine import fileio\n"
            f"p = Path({str(path)!r}); n = p.stat().st_size + 8\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))\n"
            f"try:\n    fileio.append_line(p, '{{\"step\": 2, \"loss\": 0.123456}}')\n"
            f"except OSError as e:\n    print('refused', e.errno)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert "refused" in out.stdout and "Traceback" not in out.stderr, out.stderr
    assert path.read_text() == '{"step": 1}\n'


def test_checkpoint_files_reach_the_disk_before_they_replace_older_ones(tmp_path, monkeypatch):
    """A power cut right after a save must leave the old checkpoint or the whole new one:
    each file is flushed before its rename, and the folder after it (retention deletes
    older checkpoints next)."""
    synced = []
    real_fsync = os.fsync

    def fsync(fd):   # which file or folder: its name, from /proc where there is one
        where = f"/proc/self/fd/{fd}"
        synced.append(os.path.basename(os.readlink(where)) if os.path.exists(where) else fd)
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    save(tmp_path / "c", 5)
    assert len(synced) >= 2
    if sys.platform.startswith("linux"):
        assert [n for n in synced if str(n).startswith(".step_0000005.")] and "c" in synced
        assert synced.index("c") > min(i for i, n in enumerate(synced)
                                       if str(n).startswith(".step_0000005."))


def test_the_last_logged_step_reads_the_metric_lines_not_the_status(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    assert run.last_logged_step() == 0
    lines = [json.dumps({"step": i, "loss": 0.5, "pad": "x" * 200}) for i in range(1, 200)]
    run.metrics_file.write_text("\n".join(lines) + '\n{"step": 200, "lo')   # cut short
    assert run.last_logged_step() == 199
    # a resume from step 150 that was killed at 170: the last trainer's lines count
    again = [json.dumps({"step": i, "loss": 0.5}) for i in range(150, 171)]
    run.metrics_file.write_text("\n".join(lines + again) + "\n")
    assert run.last_logged_step() == 170


def test_a_full_disk_is_named_before_a_checkpoint_is_written(tmp_path, monkeypatch):
    import engine.fileio as fileio
    monkeypatch.setattr(fileio, "free_bytes", lambda folder: 1000)
    with pytest.raises(fileio.DiskFull) as e:
        save(tmp_path / "c", 5)
    assert "1000 B free" in str(e.value) and "step_0000005.safetensors" in str(e.value)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def test_requests_are_pending_until_handled(tmp_path):
    run = RunDir(tmp_path / "r")
    run.create()
    rid = run.request("sample-now")
    assert run.pending_requests({}) == {"sample-now": rid}
    assert run.pending_requests({"sample-now": rid}) == {}
    rid2 = run.request("sample-now")
    assert run.pending_requests({"sample-now": rid}) == {"sample-now": rid2}
    run.clear_requests()
    assert run.pending_requests({}) == {}
    with pytest.raises(ValueError, match="unknown request"):
        run.request("explode")
    assert set(REQUESTS) == {"stop", "pause", "save-now", "sample-now"}


def test_effective_state_detects_crashes():
    now = time.time()
    assert effective_state(None) == "none"
    assert effective_state(Status(state="completed", pid=1)) == "completed"
    alive = Status(state="running", pid=os.getpid(), heartbeat=now)
    assert effective_state(alive, now) == "running"
    assert effective_state(alive, now + 3600) == "crashed"       # heartbeat stale
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not pid_alive(dead.pid)
    assert effective_state(Status(state="running", pid=dead.pid, heartbeat=now), now) == "crashed"


def test_recovery_removes_the_unfinished_files_of_both_writers(tmp_path):
    """A kill during a write leaves atomic_target's '.<name>.<8 characters>' or, when it
    lands inside safetensors' own writer, its '.tmp<6 characters>' beside the target; the
    next trainer's recovery removes both kinds and nothing else."""
    run = RunDir(tmp_path / "run")
    run.create()
    ours = run.checkpoints / ".step_0000008.safetensors.ab12cd_9"
    theirs = run.checkpoints / ".tmp2SoGaD"
    kept = [run.checkpoints / ".tmp2SoGaDx", run.checkpoints / "step_0000004.safetensors",
            run.root / ".hidden"]
    for p in (ours, theirs, *kept):
        p.write_bytes(b"x" * 10)
    notes = run.recover()
    assert not ours.exists() and not theirs.exists()
    assert all(p.exists() for p in kept)
    assert sum("unfinished file" in n for n in notes) == 2


def test_a_file_held_open_on_windows_is_replaced_once_it_is_closed(tmp_path, monkeypatch):
    """On Windows os.replace fails with PermissionError while another process has the
    target open (the studio reading status.json): the write waits for it instead of
    failing the run. Elsewhere the error stands at once; a file held for good still
    fails, and leaves no temporary file behind."""
    import engine.fileio as fileio
    real = os.replace
    calls = []

    def held(times):
        def fake(src, dst):
            calls.append(dst)
            if len(calls) <= times:
                raise PermissionError(13, "The process cannot access the file", str(dst))
            real(src, dst)
        return fake

    target = tmp_path / "status.json"
    target.write_text("old")
    monkeypatch.setattr(fileio, "REPLACE_WAIT_S", 0.0)
    monkeypatch.setattr(fileio, "_WINDOWS", True)
    monkeypatch.setattr(fileio.os, "replace", held(3))
    fileio.atomic_write_text(target, "new")
    assert target.read_text() == "new" and len(calls) == 4
    calls.clear()
    monkeypatch.setattr(fileio.os, "replace", held(10 ** 6))
    with pytest.raises(PermissionError):
        fileio.atomic_write_text(target, "newer")
    assert len(calls) == fileio.REPLACE_TRIES
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [
        "status.json"]
    calls.clear()
    monkeypatch.setattr(fileio, "_WINDOWS", False)
    monkeypatch.setattr(fileio.os, "replace", held(1))
    with pytest.raises(PermissionError):
        fileio.atomic_write_text(target, "newer")
    assert len(calls) == 1


def test_the_log_tail_reads_windows_line_ends_as_one_line_each(tmp_path):
    """A trainer's stderr redirected on Windows ends its lines with \\r\\n; a progress line
    redrawn with \\r ends one too."""
    run = RunDir(tmp_path / "run")
    run.create()
    run.log_file.write_bytes(b"".join(b"line %d\r\n" % i for i in range(10)) + b"a\rb\n")
    assert run.log_tail(4) == "line 8\nline 9\na\nb"


def test_command_lines_print_any_name_to_a_narrow_output(monkeypatch):
    """Output redirected to a file on Windows is cp1252: a file name in another script is
    written as an escape instead of stopping the command."""
    import io
    import sys

    from engine.fileio import readable_output
    narrow = io.TextIOWrapper(io.BytesIO(), encoding="cp1252", newline="\n")
    monkeypatch.setattr(sys, "stdout", narrow)
    readable_output()
    print("skipped 猫.png")
    narrow.flush()
    assert narrow.buffer.getvalue() == b"skipped \\u732b.png\n"
