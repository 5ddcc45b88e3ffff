"""Datasets as people bring them from phones, scrapers, other systems and other trainers:
links that lead nowhere, names in another encoding, rotations stored outside the EXIF
header, captions told apart by letter case or written as UTF-16 without a byte-order
mark, folder links that carry repeat counts, copies and links of one file. Each entry
that cannot be used is named on its own and nothing else is lost; what is used trains
the right pixels with the right caption."""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from engine.buckets import plan_buckets
from engine.config import DataConfig
from engine.conventions import decode_caption
from engine.data import DataError, health_report, main, scan_dataset
from engine.dataset import load_crop
from engine.images import exif_orientation, upright_rgb
from studio.workspace import add_files


def cfg(**kw) -> DataConfig:
    return replace(DataConfig(min_side=16, max_side=64, bucket_step=16, val_images=0,
                              workers=0), **kw)


def good(path: Path, colour=(200, 30, 30), caption: str | None = "a red square") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def symlink(target, link: Path) -> None:
    try:
        os.symlink(target, link)
    except OSError:
        pytest.skip("this file system has no symlinks")


def problems(scan) -> dict:
    return {p.kind: p for p in scan.problems}


def test_a_link_that_loops_or_leads_nowhere_is_left_out_alone(tmp_path):
    """One bad link took its whole folder with it (the folder could not be listed), and at
    the root the whole dataset."""
    good(tmp_path / "a.png")
    good(tmp_path / "sub" / "b.png")
    symlink("loopB.png", tmp_path / "loopA.png")
    symlink("loopA.png", tmp_path / "loopB.png")
    symlink("gone.png", tmp_path / "sub" / "dangling.png")
    symlink(tmp_path / "unmounted", tmp_path / "5_extra")     # a folder link to nothing
    scan = scan_dataset(tmp_path, cfg())
    assert [r.rel for r in scan.records] == ["a.png", "sub/b.png"]
    bad = problems(scan)["bad_entry"]
    assert set(bad.files) == {"loopA.png", "loopB.png", "sub/dangling.png", "5_extra"}
    assert "cannot be opened" in bad.files["loopA.png"]
    assert bad.files["sub/dangling.png"] == ("a link to gone.png, which is not there: fix or "
                                             "remove the link")
    assert "unreadable_folder" not in problems(scan)


@pytest.mark.skipif(os.name == "nt", reason="Windows names are text by construction")
def test_a_name_in_another_encoding_is_named_and_left_out(tmp_path, capsys):
    """A latin-1 name from an old zip: its bytes are no UTF-8 text. It crashed the
    validation split, the report and the trainer."""
    good(tmp_path / "ok.png")
    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    try:
        with open(raw, "wb") as f:
            Image.new("RGB", (32, 32)).save(f, format="PNG")
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    os.mkdir(os.fsencode(tmp_path) + b"/d\xe9j\xe0")
    scan = scan_dataset(tmp_path, cfg(val_images=1))
    assert [r.rel for r in scan.records] == ["ok.png"]
    bad = problems(scan)["bad_entry"]
    assert set(bad.files) == {"caf\ufffd.png", "d\ufffdj\ufffd"}
    assert "rename it" in bad.files["caf\ufffd.png"]
    plan_buckets(scan.records, cfg(val_images=1), 4, 1, 1, 1)   # the split keys encode
    args = ["report", str(tmp_path), "--preset", "tiny-cpu", "--set", "data.min_side=16",
            "--set", "data.val_images=1"]
    main([*args, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert "caf\ufffd.png" in json.dumps(out, ensure_ascii=False)
    main(args)
    assert "caf\ufffd.png" in capsys.readouterr().out
    # a folder of such names only: the error says why, not just "no images"
    os.remove(tmp_path / "ok.png")
    with pytest.raises(DataError, match="left out: its name is not text"):
        scan_dataset(tmp_path, cfg())


def _portrait_stored_sideways() -> Image.Image:
    """40x30 as stored, its left quarter red: shown with orientation 6 (turned a quarter
    clockwise) it is 30x40 with red at the top."""
    img = Image.new("RGB", (40, 30), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 30))
    return img


def _with_late_exif(path: Path, orientation: int) -> None:
    """A PNG whose eXIf chunk comes after its pixels, as some tools write it."""
    data = path.read_bytes()
    exif = Image.Exif()
    exif[0x0112] = orientation
    body = exif.tobytes()[6:]                    # the TIFF block, without "Exif\0\0"
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + body) & 0xFFFFFFFF)
    end = data.rindex(b"IEND") - 4
    path.write_bytes(data[:end] + chunk + data[end:])


XMP = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/'
       '02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
       'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')


@pytest.mark.parametrize("how", ["header exif", "late exif", "xmp"])
def test_rotations_stored_outside_the_exif_header_train_upright(tmp_path, how):
    """The scan (its size and bucket), the trained crop and the studio's thumbnail all
    read the same orientation: a PNG's eXIf chunk after its pixels and XMP's
    tiff:Orientation trained sideways while the Dataset tab showed them upright."""
    path = tmp_path / "photo.png"
    img = _portrait_stored_sideways()
    if how == "header exif":
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(path, exif=exif)
    elif how == "xmp":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", XMP)
        img.save(path, pnginfo=info)
    else:
        img.save(path)
        _with_late_exif(path, 6)
    path.with_suffix(".txt").write_text("a photo")
    with Image.open(path) as opened:
        assert exif_orientation(opened) == 6
    with Image.open(path) as opened:
        shown = np.asarray(upright_rgb(opened))
    record, = scan_dataset(tmp_path, cfg()).records
    assert (record.width, record.height) == (30, 40)
    crop = np.asarray(load_crop(str(path), (30, 40)))
    assert crop.shape == shown.shape == (40, 30, 3)
    assert crop[2, 15, 0] > 200 and crop[37, 15, 2] > 200      # red on top, blue below
    assert np.abs(crop.astype(int) - shown.astype(int)).max() <= 2


def test_a_png_without_rotation_is_read_as_it_is(tmp_path):
    path = tmp_path / "plain.png"
    _portrait_stored_sideways().save(path)
    with Image.open(path) as opened:
        assert exif_orientation(opened) == 1


def test_captions_told_apart_by_letter_case_stay_with_their_images(tmp_path):
    """cat.png and Cat.png each with its own caption: one caption overwrote the other and
    the blue image trained as the yellow cat."""
    good(tmp_path / "cat.png", (250, 220, 0), "a yellow cat")
    good(tmp_path / "Cat.png", (0, 0, 250), "a blue cat")
    if len(list(tmp_path.iterdir())) < 4:
        pytest.skip("this file system does not tell cat.png from Cat.png")
    good(tmp_path / "DOG.png", caption=None)
    (tmp_path / "dog.txt").write_text("a dog")               # the only one: it is taken
    caps = {r.rel: r.caption for r in scan_dataset(tmp_path, cfg()).records}
    assert caps == {"cat.png": "a yellow cat", "Cat.png": "a blue cat", "DOG.png": "a dog"}
    # a caption in other letter case that no image takes is named, not passed over
    (tmp_path / "cat.TXT").write_text("a third cat")
    scan = scan_dataset(tmp_path, cfg())
    assert problems(scan)["orphan_caption"].files == {
        "cat.TXT": "no image is named exactly so; Cat.txt, in other letter case, is the one "
                   "used"}


def test_a_folder_link_with_a_repeat_count_is_named(tmp_path):
    """`5_shared -> shared`: the images are read once, under shared/, and the ×5 was lost
    without a word."""
    good(tmp_path / "shared" / "a.png")
    symlink("shared", tmp_path / "5_shared")
    symlink("shared", tmp_path / "same")                       # no rule of its own: silent
    scan = scan_dataset(tmp_path, cfg())
    assert [(r.rel, r.repeats) for r in scan.records] == [("shared/a.png", 1)]
    relinked = problems(scan)["folder_relinked"]
    assert relinked.files == {"5_shared/": "leads to shared/"}
    assert "repeats" in relinked.message and "rename the folder itself" in relinked.message


def test_utf16_captions_without_a_byte_order_mark_are_read(tmp_path):
    good(tmp_path / "le.png", caption=None)
    (tmp_path / "le.txt").write_bytes("a caption, café".encode("utf-16-le"))
    good(tmp_path / "be.png", caption=None)
    (tmp_path / "be.caption").write_bytes("a caption, 猫".encode("utf-16-be"))
    good(tmp_path / "cjk.png", caption=None)   # no column of zeros: the byte order is unknown
    (tmp_path / "cjk.txt").write_bytes("一个女孩，一只猫".encode("utf-16-le"))
    good(tmp_path / "nul.png", caption=None)
    (tmp_path / "nul.txt").write_bytes(b"a cat\x00\x00\xff junk")
    scan = scan_dataset(tmp_path, cfg())
    caps = {r.rel: r.caption for r in scan.records}
    assert caps["le.png"] == "a caption, café" and caps["be.png"] == "a caption, 猫"
    assert caps["nul.png"] is None and caps["cjk.png"] is None   # refused, never garbled
    assert "byte 5 is 0x00" in problems(scan)["caption_unreadable"].files["nul.png"]
    assert decode_caption("plain ascii".encode()) == "plain ascii"


def test_duplicates_name_the_link_and_leave_out_files_that_do_not_train(tmp_path):
    photo = good(tmp_path / "photo.png")
    symlink("photo.png", tmp_path / "link_to_photo.png")
    (tmp_path / "link_to_photo.txt").write_text("the photo again")
    Image.open(photo).save(tmp_path / "copy.png")
    (tmp_path / "copy.txt").write_text("a copy")
    # byte-identical, but with no caption under missing_caption = skip: never trained
    (tmp_path / "mask.png").write_bytes(photo.read_bytes())
    report = health_report(scan_dataset(tmp_path, cfg(missing_caption="skip")))
    dup = {p.kind: p for p in report.problems}["duplicate"]
    assert dup.files == {"link_to_photo.png": "a link to photo.png",
                         "photo.png": "same content as copy.png"}


def test_jfif_images_train_and_a_jpeg_under_a_heic_name_is_told_to_be_renamed(tmp_path):
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "saved.jfif", format="JPEG")
    (tmp_path / "saved.txt").write_text("saved from a browser")
    Image.new("RGB", (32, 32)).save(tmp_path / "IMG_0001.HEIC", format="JPEG")
    (tmp_path / "IMG_0001.txt").write_text("a phone photo")
    scan = scan_dataset(tmp_path, cfg())
    assert [r.rel for r in scan.records] == ["saved.jfif"]
    assert problems(scan)["orphan_caption"].files["IMG_0001.txt"] == (
        "IMG_0001.HEIC is a JPEG file under another name: rename it to IMG_0001.jpg")


def test_an_upload_takes_the_captions_the_trainer_reads(tmp_path):
    good(tmp_path / "up" / "a.png", caption=None)
    (tmp_path / "up" / "a.txt").write_bytes("a caption".encode("utf-16"))   # with its mark
    report = add_files(tmp_path / "datasets", "set", [tmp_path / "up" / "a.png",
                                                       tmp_path / "up" / "a.txt"])
    assert report.captions == ["a.txt"] and not report.skipped
    scan = scan_dataset(tmp_path / "datasets" / "set", cfg())
    assert [r.caption for r in scan.records] == ["a caption"]


def test_onetrainer_masks_are_not_trained_as_pictures(tmp_path):
    good(tmp_path / "cat.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "cat-masklabel.png")
    good(tmp_path / "lone-masklabel.png")            # no picture of its own: a picture
    scan = scan_dataset(tmp_path, cfg(missing_caption="skip"))
    assert [r.rel for r in scan.records] == ["cat.png", "lone-masklabel.png"]
    mask = problems(scan)["mask_image"]
    assert mask.files == {"cat-masklabel.png": "the mask of cat"}
    assert "missing_caption" not in problems(scan)


def test_sidecar_captions_named_after_the_whole_file_name(tmp_path):
    """x.png.txt, as Hydrus and gallery-dl write them, when there is no x.txt."""
    good(tmp_path / "a.png", caption=None)
    (tmp_path / "a.png.txt").write_text("a sidecar caption")
    good(tmp_path / "b.jpg", caption="the plain caption")
    (tmp_path / "b.jpg.txt").write_text("a sidecar caption too")
    scan = scan_dataset(tmp_path, cfg())
    assert {r.rel: r.caption for r in scan.records} == {"a.png": "a sidecar caption",
                                                        "b.jpg": "the plain caption"}
    assert problems(scan)["caption_conflict"].files == {"b.jpg": "b.txt is used; ignored: "
                                                                 "b.jpg.txt"}
    assert "orphan_caption" not in problems(scan)
