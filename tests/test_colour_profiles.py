"""Embedded colour profiles: every image is read as sRGB (engine.images.to_srgb), so a
phone photo in Display P3 trains as the colours it shows, not as its raw numbers."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageCms

from engine.dataset import load_crop
from engine.images import to_rgb, upright_rgb

# Display P3's primaries adapted to the D50 white of the profile connection space, and a
# pure gamma 2.2 for each channel (the real profile uses sRGB's curve: close enough here)
P3_PRIMARIES = ((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841))
D50 = (0.9642, 1.0, 0.8249)


def s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def matrix_profile(description: str, primaries=P3_PRIMARIES, gamma: float = 2.2) -> bytes:
    """A minimal ICC v2 RGB display profile (matrix and curves), as cameras embed them."""
    def xyz(v) -> bytes:
        return b"XYZ " + bytes(4) + b"".join(s15(c) for c in v)
    text = description.encode("ascii") + b"\0"
    desc = (b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67))
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)
    tags = [(b"desc", desc), (b"wtpt", xyz(D50)), (b"rXYZ", xyz(primaries[0])),
            (b"gXYZ", xyz(primaries[1])), (b"bXYZ", xyz(primaries[2])),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve),
            (b"cprt", b"text" + bytes(4) + b"none\0" + bytes(3))]
    offset = 128 + 4 + 12 * len(tags)
    table, data = [], b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table.append(sig + struct.pack(">II", offset + len(data), len(body)))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + bytes(4) + bytes([2, 0x10, 0, 0]) + b"mntr" + b"RGB "
              + b"XYZ " + bytes(12) + b"acsp" + bytes(24) + bytes(4) + b"".join(map(s15, D50)))
    header += bytes(128 - len(header))
    return header + struct.pack(">I", len(tags)) + b"".join(table) + data


def test_the_hand_made_profile_is_a_display_p3_profile():
    """The test's profile is one littlecms reads as an RGB display profile."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(matrix_profile("Display P3 (test)")))
    assert ImageCms.getProfileDescription(profile).strip() == "Display P3 (test)"
    assert profile.profile.xcolor_space.strip() == "RGB"


def saved(tmp_path, name: str, img: Image.Image, **kwargs) -> str:
    path = tmp_path / name
    img.save(path, **kwargs)
    return str(path)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_display_p3_colours_are_read_as_srgb(tmp_path, fmt):
    """A saturated P3 red is redder and less green in sRGB numbers (by the primaries'
    matrix: P3 (200, 60, 60) is about sRGB (218, 40, 51)); grey stays grey."""
    colours = np.zeros((8, 16, 3), np.uint8)
    colours[:, :8] = (200, 60, 60)
    colours[:, 8:] = (128, 128, 128)
    img = Image.fromarray(colours)
    path = saved(tmp_path, f"p3.{fmt}", img, icc_profile=matrix_profile("Display P3"),
                 **({"quality": 100, "subsampling": 0} if fmt == "jpg" else {}))
    with Image.open(path) as im:
        out = np.asarray(to_rgb(im), np.int32)
    red, grey = out[4, 3], out[4, 12]
    assert red[0] >= 210 and red[1] <= 50 and red[2] <= 56, red
    assert abs(int(grey[0]) - int(grey[1])) <= 1 and abs(int(grey[1]) - int(grey[2])) <= 1
    crop = np.asarray(load_crop(path, (16, 8)), np.int32)     # the training crop too
    assert abs(crop[4, 3] - red).max() <= 2


def test_srgb_and_unusable_profiles_leave_the_pixels_alone(tmp_path):
    colours = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for name, icc in (("srgb", srgb), ("damaged", b"not a profile at all" * 10),
                      ("cut", matrix_profile("Display P3")[:200])):
        path = saved(tmp_path, f"{name}.png", Image.fromarray(colours), icc_profile=icc)
        with Image.open(path) as im:
            assert np.array_equal(np.asarray(to_rgb(im)), colours), name


def test_transparency_and_palettes_keep_their_shape_through_the_conversion(tmp_path):
    """Alpha is kept through the conversion and composited on white afterwards; a palette
    image with a profile is converted like the RGB image it shows."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 60, 60)
    rgba[:, 4:, 3] = 255          # left half transparent
    icc = matrix_profile("Display P3")
    path = saved(tmp_path, "alpha.png", Image.fromarray(rgba), icc_profile=icc)
    with Image.open(path) as im:
        out = np.asarray(upright_rgb(im), np.int32)
    assert (out[:, :4] == 255).all()                              # white where transparent
    assert out[2, 6, 0] >= 210 and out[2, 6, 1] <= 50            # converted where opaque
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    path = saved(tmp_path, "palette.png", palette, icc_profile=icc)
    with Image.open(path) as im:
        assert im.mode == "P"
        out = np.asarray(to_rgb(im), np.int32)
    assert out[2, 6, 0] >= 210 and out[2, 6, 1] <= 50


def test_a_crop_converts_only_its_own_pixels(tmp_path, monkeypatch):
    """The conversion costs per pixel: a training crop converts the bucket-sized crop, not
    the decoded photo (a 12-megapixel one's took longer than its decoding)."""
    import engine.images as images
    big = np.full((256, 512, 3), (200, 60, 60), np.uint8)
    path = saved(tmp_path, "big.png", Image.fromarray(big), icc_profile=matrix_profile("P3"))
    seen, real = [], images.to_srgb
    monkeypatch.setattr(images, "to_srgb", lambda im: (seen.append(im.size), real(im))[1])
    crop = np.asarray(load_crop(path, (32, 16)), np.int32)
    assert seen == [(32, 16)] and crop[8, 16, 0] >= 210 and crop[8, 16, 1] <= 50


def test_a_linear_srgb_profile_is_not_taken_for_srgb(tmp_path):
    """Only a standard sRGB profile is left alone: one named 'Linear sRGB' (sRGB's primaries,
    a straight curve) is converted like any other."""
    srgb_primaries = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971),
                      (0.1431, 0.0606, 0.7141))
    grey = Image.new("RGB", (4, 4), (64, 64, 64))
    path = saved(tmp_path, "linear.png", grey,
                 icc_profile=matrix_profile("Linear sRGB", srgb_primaries, gamma=1.0))
    with Image.open(path) as im:
        out = np.asarray(to_rgb(im), np.int32)
    assert out[0, 0, 0] > 120          # linear 0.25 is about 137 in sRGB's curve
