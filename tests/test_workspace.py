"""Uploaded files added to a dataset: only trainable images and UTF-8 captions are copied,
under clean names, into the dataset folder and nowhere else; nothing is overwritten, and
every file left out is named with the reason."""

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
    ("ünïcödé.webp", "n_c_d.webp"), ("con.png", None), ("...", "file")])
def test_upload_file_names_are_cleaned_or_refused(given, clean):
    if clean is None:
        with pytest.raises(PathError):
            clean_file_name(given)
    else:
        assert clean_file_name(given) == clean
