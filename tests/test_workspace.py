"""The studio's workspace layer. Uploaded files added to a dataset: only trainable images
and UTF-8 captions are copied, under clean names, into the dataset folder and nowhere
else; nothing is overwritten, and every file left out is named with the reason. Checkpoint
ids are parsed and written in one place, and a checkpoint is listed, pinned, deleted (not
while its run trains) and exported through the Studio."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from engine.config import load_preset
from engine.data import scan_dataset
from studio.paths import PathError
from studio.workspace import add_files, clean_file_name


def png(path, size=(40, 32), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def uploads(tmp_path):
    """Files as the browser hands them over: temporary copies under their own names."""
    up = tmp_path / "upload"
    png(up / "My Photo (1).png")
    (up / "My Photo (1).txt").write_text("a red picture, café", encoding="utf-8")
    png(up / "second.jpg")
    good = (up / "good.png")
    png(good)
    (up / "cut.png").write_bytes(good.read_bytes()[:60])
    (up / "empty.webp").write_bytes(b"")
    (up / "notes.pdf").write_bytes(b"%PDF-1.7")
    (up / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (up / "page.jpg").write_text("<html>not an image</html>")
    return up


def test_images_and_captions_are_added_and_the_rest_is_named(tmp_path, uploads):
    datasets = tmp_path / "workspace" / "datasets"
    report = add_files(datasets, "holiday", sorted(uploads.iterdir()))
    folder = datasets / "holiday"
    assert sorted(report.images) == ["My_Photo_1.png", "good.png", "second.jpg"]
    assert report.captions == ["My_Photo_1.txt"]
    why = dict(report.skipped)
    assert set(why) == {"cut.png", "empty.webp", "notes.pdf", "latin.txt", "page.jpg"}
    assert "stops early" in why["cut.png"] and "copy it again" in why["cut.png"]
    assert "empty file" in why["empty.webp"]
    assert "not an image or a caption" in why["notes.pdf"]
    assert "not UTF-8" in why["latin.txt"] and "save it again as UTF-8" in why["latin.txt"]
    assert "HTML" in why["page.jpg"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(report.images + report.captions)
    # the image and its caption still pair up, and the dataset scans as one captioned image
    scan = scan_dataset(folder, load_preset("tiny-cpu").data)
    caps = {r.path.rsplit("/", 1)[-1]: r.caption for r in scan.records}
    assert caps["My_Photo_1.png"] == "a red picture, café"
    md = report.markdown()
    assert "3 image(s)" in md and "5 not added" in md and "`cut.png`" in md


def test_nothing_is_overwritten(tmp_path, uploads):
    datasets = tmp_path / "datasets"
    png(datasets / "set" / "good.png", colour=(1, 2, 3))
    report = add_files(datasets, "set", [uploads / "good.png", uploads / "second.jpg"])
    assert report.images == ["second.jpg"]
    assert "already in the dataset" in dict(report.skipped)["good.png"]
    kept = np.asarray(Image.open(datasets / "set" / "good.png"))
    assert tuple(kept[0, 0]) == (1, 2, 3)


def test_two_uploaded_files_of_one_name_never_overwrite_each_other(tmp_path):
    datasets = tmp_path / "datasets"
    files = [png(tmp_path / "a" / "x.png", colour=(255, 0, 0)),
             png(tmp_path / "b" / "x.png", colour=(0, 0, 255)),
             png(tmp_path / "my pic.png"), png(tmp_path / "c" / "my_pic.png"),
             png(tmp_path / "d" / "X.PNG")]
    report = add_files(datasets, "set", files)
    assert report.images == ["x.png", "my_pic.png"]
    why = dict(report.skipped)
    assert len(report.skipped) == 3 and "another file of this upload is added as 'x.png'" \
        in why["X.PNG"]
    kept = np.asarray(Image.open(datasets / "set" / "x.png"))
    assert tuple(kept[0, 0]) == (255, 0, 0)                       # the first one's


def test_a_caption_whose_picture_was_refused_is_not_added_alone(tmp_path, uploads):
    """A caption would caption nothing when its picture, uploaded with it, was refused; one
    whose picture is already in the dataset (or added in the same upload) is added."""
    datasets = tmp_path / "datasets"
    (uploads / "photo.tiff").write_bytes(b"II*\x00")
    (uploads / "photo.txt").write_text("a photo")
    (uploads / "cut.txt").write_text("a cut picture")
    png(datasets / "set" / "empty.png")
    (uploads / "empty.txt").write_text("a picture already there")
    report = add_files(datasets, "set", [uploads / n for n in (
        "photo.tiff", "photo.txt", "cut.png", "cut.txt", "empty.webp", "empty.txt", "good.png")])
    why = dict(report.skipped)
    assert "its picture photo.tiff was not added" in why["photo.txt"]
    assert "its picture cut.png was not added" in why["cut.txt"]
    assert report.captions == ["empty.txt"] and report.images == ["good.png"]
    assert not (datasets / "set" / "photo.txt").exists()
    assert report.unpaired == [] and "no picture" not in report.markdown()


def test_captions_without_any_picture_are_added_and_named(tmp_path, uploads):
    """Captions dropped before their pictures are kept (the pictures may follow), and the
    report names them."""
    datasets = tmp_path / "datasets"
    (uploads / "later.caption").write_text("a picture to come")
    report = add_files(datasets, "set", [uploads / "later.caption", uploads / "good.png"])
    assert report.captions == ["later.caption"] and report.unpaired == ["later.caption"]
    assert "1 caption(s) have no picture of the same name yet (`later.caption`)" \
        in report.markdown()
    png(uploads / "later.png")
    assert add_files(datasets, "set", [uploads / "later.png"]).unpaired == []
    # a sidecar caption named after the whole file name pairs with its picture
    (uploads / "side.png.txt").write_text("a sidecar caption")
    png(uploads / "side.png")
    report = add_files(datasets, "set", [uploads / "side.png.txt", uploads / "side.png"])
    assert report.captions == ["side.png.txt"] and report.unpaired == []
    # names the upload cleans: the sidecar follows its picture's new name
    png(uploads / "猫 cat.JPG")
    (uploads / "猫 cat.JPG.txt").write_text("a cat")
    report = add_files(datasets, "set", [uploads / "猫 cat.JPG", uploads / "猫 cat.JPG.txt"])
    picture, = report.images
    assert report.captions == [f"{picture}.txt"] and report.unpaired == []
    caps = {r.rel: r.caption for r in scan_dataset(datasets / "set",
                                                   load_preset("tiny-cpu").data).records}
    assert caps[picture] == "a cat"


@pytest.mark.parametrize("name", ["../escape", "..", "/tmp/x", "a/b", "", ".hidden", "x\x00"])
def test_a_dataset_name_that_leaves_the_datasets_folder_is_refused(tmp_path, uploads, name):
    datasets = tmp_path / "datasets"
    with pytest.raises(PathError):
        add_files(datasets, name, [uploads / "good.png"])
    assert not (tmp_path / "escape").exists() and not (tmp_path / "good.png").exists()


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_a_dataset_folder_that_links_elsewhere_is_not_written_through(tmp_path, uploads):
    datasets, outside = tmp_path / "datasets", tmp_path / "outside"
    datasets.mkdir()
    outside.mkdir()
    (datasets / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathError, match="outside"):
        add_files(datasets, "linked", [uploads / "good.png"])
    assert not list(outside.iterdir())


@pytest.mark.parametrize("given, clean", [
    ("My Photo (1).PNG", "My_Photo_1.png"), ("../../etc/passwd.txt", "passwd.txt"),
    ("C:\\Users\\me\\cat.jpg", "cat.jpg"), (".hidden.png", "hidden.png"),
    ("ünïcödé.webp", "unicode.webp"), ("con.png", None), ("...", "file")])
def test_upload_file_names_are_cleaned_or_refused(given, clean):
    if clean is None:
        with pytest.raises(PathError):
            clean_file_name(given)
    else:
        assert clean_file_name(given) == clean


def test_names_in_other_scripts_stay_apart_and_keep_their_captions(tmp_path):
    """猫.png and 犬.png are two files, each with its own caption (not both 'file.png')."""
    up = tmp_path / "up"
    for stem, colour in (("猫", (255, 0, 0)), ("犬", (0, 0, 255))):
        png(up / f"{stem}.png", colour=colour)
        (up / f"{stem}.txt").write_text(f"a picture of {stem}", encoding="utf-8")
    report = add_files(tmp_path / "datasets", "pets", sorted(up.iterdir()))
    assert len(report.images) == 2 and len(report.captions) == 2 and not report.skipped
    folder = tmp_path / "datasets" / "pets"
    for image in report.images:
        caption = (folder / image).with_suffix(".txt").read_text(encoding="utf-8")
        red = tuple(np.asarray(Image.open(folder / image))[0, 0]) == (255, 0, 0)
        assert caption == ("a picture of 猫" if red else "a picture of 犬")


# --------------------------------------------------------------------------------------
# Checkpoint ids, and what the studio does with a checkpoint
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, run_id, step, model", [
    ("run/20260101-tiny/40", "20260101-tiny", 40, ""),
    ("run/a-b.c/0007", "a-b.c", 7, ""),
    ("run/odd/name/5", "odd/name", 5, ""),          # the runner judges the name
    ("model/shapes.safetensors", "", None, "shapes.safetensors"),
    ("model/../x.safetensors", "", None, "../x.safetensors"),   # checkpoint_path judges it
])
def test_checkpoint_ids_are_parsed_and_written_back(text, run_id, step, model):
    from studio.workspace import CheckpointId
    cid = CheckpointId.parse(text)
    assert (cid.run_id, cid.step, cid.model) == (run_id, step, model)
    assert CheckpointId.written_as_id(text)
    assert CheckpointId.parse(str(cid)) == cid
    assert str(cid) == text.replace("/0007", "/7")


@pytest.mark.parametrize("text", ["run/x/abc", "run/x/", "run//5", "run/5", "run/x/-1",
                                  "run/x/²", "model/", "/etc/passwd", "runs/x/5", "", None, 5])
def test_what_is_not_a_checkpoint_id_is_refused_by_name(text):
    from studio.workspace import CheckpointId
    with pytest.raises(PathError, match="is not a checkpoint id"):
        CheckpointId.parse(text)


def test_checkpoint_ids_are_formatted_in_one_place():
    from studio.workspace import CheckpointId, format_model, format_run_checkpoint
    assert format_run_checkpoint("r1", 40) == "run/r1/40" == format_run_checkpoint("r1", "40")
    assert format_model("m.safetensors") == "model/m.safetensors"
    assert CheckpointId.parse(format_run_checkpoint("r1", 40)) == CheckpointId("r1", 40)
    assert not CheckpointId.written_as_id("runs/r1") and not CheckpointId.written_as_id(None)
    for run_id, step in (("r1", None), ("r1", 1.5), ("r1", True), ("r1", "4a"), ("r1", -3),
                         ("", 4), (None, 4)):
        with pytest.raises(ValueError):
            format_run_checkpoint(run_id, step)


@pytest.fixture
def studio_with_run(tmp_path):
    """A studio whose workspace holds run 'r1' (stopped) with checkpoints at steps 10 and
    20, a sample grid of step 10, and a training state for step 20 only."""
    import time

    from engine.config import dump_yaml
    from engine.job import RunDir, Status
    from studio.workspace import Studio
    from tests.test_generate import build, save, tiny_cfg, weights

    studio = Studio(tmp_path / "ws")
    run = RunDir(studio.runner.runs_root / "r1")
    run.create()
    cfg = tiny_cfg()
    run.config.write_text(dump_yaml(cfg))
    model = weights(*build(cfg))
    for step in (10, 20):
        save(run.root, cfg, model, step=step)
    (run.checkpoints / "step_0000010.state.safetensors").unlink()
    png(run.root / "samples" / "step_0000010.png")
    run.write_status(Status(state="stopped", step=20, pid=0, heartbeat=time.time()))
    return studio, run


def test_the_studio_lists_pins_and_deletes_checkpoints(studio_with_run):
    from engine.checkpoint import CheckpointError, list_checkpoints, pinned_steps
    from studio.runner import RunnerError
    studio, run = studio_with_run
    entries = studio.run_checkpoints("r1")
    assert [(c.step, c.pinned, c.resumable) for c in entries] == [(10, False, False),
                                                                 (20, False, True)]
    assert entries[0].sample == run.root / "samples" / "step_0000010.png"
    assert entries[1].sample is None and entries[1].meta["run_id"] == "r1"
    assert [cid for _, cid in studio.checkpoint_choices()] == ["run/r1/20", "run/r1/10"]

    assert studio.toggle_pin("r1", 10) is True and pinned_steps(run.checkpoints) == {10}
    assert [c.pinned for c in studio.run_checkpoints("r1")] == [True, False]
    assert studio.toggle_pin("r1", 10) is False and pinned_steps(run.checkpoints) == set()
    studio.toggle_pin("r1", 20)

    studio.delete_checkpoint("r1", 20)
    assert [c.step for c in list_checkpoints(run.checkpoints)] == [10]
    assert not (run.checkpoints / "step_0000020.state.safetensors").exists()
    assert pinned_steps(run.checkpoints) == set()
    with pytest.raises(CheckpointError, match="no checkpoint of step 20"):
        studio.delete_checkpoint("r1", 20)
    for bad in ("../r1", "", "nope"):
        with pytest.raises(RunnerError):
            studio.delete_checkpoint(bad, 10)
        with pytest.raises(RunnerError):
            studio.toggle_pin(bad, 10)


def test_a_checkpoint_of_a_run_that_trains_is_not_deleted(studio_with_run):
    """The runner's liveness rule decides: a run whose trainer reports and beats is alive."""
    import time

    from engine.job import Status
    from studio.runner import RunnerError
    studio, run = studio_with_run
    run.write_status(Status(state="running", step=20, pid=os.getpid(), heartbeat=time.time()))
    assert studio.runner.info("r1").alive
    with pytest.raises(RunnerError, match="'r1' is running; stop it before deleting its "
                                          "checkpoints"):
        studio.delete_checkpoint("r1", 10)
    assert (run.checkpoints / "step_0000010.safetensors").exists()
    assert studio.toggle_pin("r1", 10) is True          # pinning goes on while it trains


def test_the_studio_exports_a_checkpoint_under_a_checked_name(studio_with_run):
    from engine.checkpoint import CheckpointError, read_meta
    studio, _ = studio_with_run
    dst = studio.export("run/r1/20", "shapes", "fp16", ema=False, title="Shapes")
    assert dst == studio.models_dir / "shapes.safetensors"
    meta = read_meta(dst)
    assert (meta["exported_dtype"], meta["exported_weights"]) == ("float16", "raw")
    assert [(p.name, spec["title"]) for p, _, spec in studio.exported_models()] == [
        ("shapes.safetensors", "Shapes")]
    assert "model/shapes.safetensors" in [cid for _, cid in studio.checkpoint_choices()]
    assert studio.checkpoint_path("model/shapes.safetensors") == dst
    with pytest.raises(PathError, match="already exists"):
        studio.export("run/r1/20", "shapes.safetensors")
    for name in ("../up", "a/b", ""):
        with pytest.raises(PathError):
            studio.export("run/r1/20", name)
    with pytest.raises(CheckpointError, match="unknown precision 'fp8'"):
        studio.export("run/r1/20", "other", "fp8")
    with pytest.raises(PathError, match="no longer exists"):
        studio.export("run/r1/30", "other")
    assert [p.name for p in studio.models_dir.iterdir()] == ["shapes.safetensors"]


def test_a_windows_pid_that_now_runs_another_program_is_not_a_trainer(monkeypatch):
    """After a crash Windows soon gives the trainer's pid to another program: the studio
    must not call the run alive, nor stop (kill) that program for it."""
    import os

    import studio.liveness as liveness
    for image, trainer in ((r"C:\Program Files\Google\Chrome\Application\chrome.exe", False),
                           (r"C:\Users\me\PixelHDM Studio\.venv\Scripts\python.exe", True),
                           (r"C:\Python312\PYTHONW.EXE", True)):
        monkeypatch.setattr(liveness, "process_image", lambda pid, i=image: i)
        assert liveness.looks_like_trainer(1234) is trainer
    monkeypatch.setattr(liveness, "process_image", lambda pid: None)    # Linux: command line
    assert not liveness.looks_like_trainer(os.getpid())                 # pytest, no trainer


@pytest.mark.skipif(os.name == "nt", reason="ps: macOS and Linux")
def test_a_mac_tells_a_reused_pid_from_a_trainer_by_its_command_line(monkeypatch):
    """macOS has no /proc: `ps` shows the command line that says whether a pid still is a
    trainer, so a stale launch cannot keep a run 'starting' (and block new runs)."""
    import subprocess
    import sys

    import studio.liveness as liveness
    monkeypatch.setattr(liveness, "process_image", lambda pid: None)
    monkeypatch.setattr(liveness.sys, "platform", "darwin")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: (_ for _ in ()).throw(
        FileNotFoundError(path)) if str(path).startswith("/proc/") else real_open(path, *a, **k))
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                                "engine.train"])
    try:
        assert liveness.looks_like_trainer(trainer.pid)
        assert not liveness.looks_like_trainer(os.getpid())            # pytest, no trainer
    finally:
        trainer.kill()
        trainer.wait()
