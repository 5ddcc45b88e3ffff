"""Image files as the engine reads them: our own pixel limit checked on the header before
anything is decoded, files cut short noticed from their last bytes, plain-words reasons for
files that cannot be used, and the conversion of every mode PIL opens to 8-bit RGB shown
upright. Datasets (engine.data, engine.dataset), start images (engine.generate) and the
studio's thumbnails all read images through here."""

from __future__ import annotations

import functools
import io
import os
import re
import struct
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

try:   # colour management (littlecms); a Pillow built without it reads pixels as they are
    from PIL import ImageCms
    _SRGB = ImageCms.createProfile("sRGB")
except ImportError:   # pragma: no cover - Pillow's wheels include it
    ImageCms = None

# (.jfif: the name Windows browsers give the JPEGs they save)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif", ".bmp"})
# Our own limit, checked on the header before anything is decoded: a decompression bomb
# of a few kilobytes can declare gigabytes of pixels. (PIL only warns from 89 M pixels and
# refuses from 179 M; both are folded into ImageTooLarge here.) 200 M takes the photos of
# 108 and 200 megapixel phone cameras; a large JPEG is decoded at a reduced scale anyway.
MAX_PIXELS = 200_000_000
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
    # PIL's own check, which would refuse such a photo first, then acts only above it
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# What PIL raises for broken, truncated or hostile files (its decoders are not uniform).
BROKEN_FILE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError,
                      struct.error, Image.DecompressionBombError)
# How much of a file's end is read to check that it is all there.
TAIL_BYTES = 4096

# EXIF orientation -> the transpose that shows the image upright (EXIF 2.32, tag 0x0112)
ORIENT_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                     4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                     6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                     8: Image.Transpose.ROTATE_90}

# Problem kind of an image file -> (what it is, what to do about it)
IMAGE_PROBLEMS = {
    "unreadable": ("not a readable image", "replace it with a good copy or delete it"),
    "truncated": ("file cut short (an interrupted copy or download?)",
                  "copy it again from the original or delete it"),
    "too_large": ("over the pixel limit, not decoded (possibly a decompression bomb)",
                  "downscale it if it is a real picture, else delete it"),
}


class ImageTooLarge(ValueError, Image.DecompressionBombError):
    """An image whose header declares more pixels than the limit: it is never decoded."""


class ImageInfo(NamedTuple):
    width: int                # as displayed (EXIF orientation applied)
    height: int
    animated: bool            # several frames; the first is the one trained


def exif_orientation(img: Image.Image, *, decoded: bool = False) -> int:
    """The orientation an image is shown in (1 when it says none), as PIL's exif_transpose
    reads it: the EXIF tag (in a PNG also an eXIf chunk after the pixels, or ImageMagick's
    hex text of it), else XMP's tiff:Orientation (Photoshop and Lightroom exports). Reads
    headers only: a PNG's chunks after its pixels are found by their lengths, not decoded,
    unless `decoded` says the image was loaded already (PIL then read them itself)."""
    info = img.info
    try:
        raw = info.get("exif")
        if raw is None and "Raw profile type exif" in info:
            raw = bytes.fromhex("".join(info["Raw profile type exif"].split("\n")[3:]))
        if raw is None and img.format == "PNG" and not decoded:
            raw = _late_png_exif(getattr(img, "filename", ""))
        exif = Image.Exif()
        if raw:
            exif.load(raw)
        value = exif.get(0x0112)
        if value is None:
            xmp = info.get("XML:com.adobe.xmp") or info.get("xmp") or ""
            found = re.search(r'tiff:Orientation(?:="|>)([0-9])',
                              xmp if isinstance(xmp, str) else xmp.decode("latin-1"))
            value = int(found[1]) if found else 1
    except BROKEN_FILE_ERRORS:
        return 1
    return value if value in ORIENT_TRANSPOSE else 1


def _late_png_exif(path: str) -> bytes | None:
    """The eXIf chunk of a PNG that keeps it after its pixels (PIL reads it only when it
    decodes them), found by stepping over the chunks; None when there is none."""
    if not path:
        return None
    with open(path, "rb") as f:
        f.seek(8)
        while len(head := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                return f.read(length)
            if kind == b"IEND":
                break
            f.seek(length + 4, os.SEEK_CUR)   # the data and its CRC
    return None


def open_image(path: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Image.open, refusing with ImageTooLarge (before any pixel is decoded) a header
    that declares more than `max_pixels` pixels."""
    limit = f"over the limit of {max_pixels / 1e6:g} M"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as e:    # over PIL's own, higher limit
            n = re.search(r"(\d+) pixels", str(e))
            size = f"{int(n[1]) / 1e6:.3g} M" if n else "too many"
            raise ImageTooLarge(f"the header declares {size} pixels, {limit}") from e
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageTooLarge(f"{w}x{h} = {w * h / 1e6:.3g} M pixels, {limit}")
    return img


def _displayed_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    if exif_orientation(img) >= 5:   # orientations 5-8 swap the axes
        w, h = h, w
    if w < 1 or h < 1:
        raise OSError(f"image has no pixels ({w}x{h})")
    return w, h


def read_header(path: str) -> tuple[int, int]:
    """(width, height) as displayed, from the file header (ImageTooLarge over MAX_PIXELS)."""
    with open_image(path) as img:
        return _displayed_size(img)


def cut_short(path: str | os.PathLike) -> bool:
    """Whether the file lacks the end its format ends with (PNG IEND, JPEG EOI, GIF
    trailer) or is shorter than its header says (WebP, BMP). Reads the first and last
    bytes only. A hint that the scan confirms by decoding: data after the end (a JPEG
    motion photo) makes it say True for a good file."""
    with open(path, "rb") as f:
        head = f.read(16)
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - TAIL_BYTES))
        tail = f.read()
    if head.startswith(b"\x89PNG"):
        return b"IEND" not in tail
    if head.startswith(b"\xff\xd8"):       # EOI cannot occur inside JPEG entropy data
        return b"\xff\xd9" not in tail
    if head.startswith(b"GIF8"):
        return not tail.rstrip(b"\0").endswith(b";")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return size < 8 + int.from_bytes(head[4:8], "little")
    if head.startswith(b"BM"):
        return size < int.from_bytes(head[2:6], "little")
    return False


def inspect_image(path: str, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Displayed size and animation of an image that training can decode, from its
    header; a file that looks cut short is decoded to be sure. Raises ImageTooLarge over
    the pixel limit, else one of BROKEN_FILE_ERRORS (see image_problem)."""
    with open_image(path, max_pixels) as img:
        w, h = _displayed_size(img)
        animated = bool(getattr(img, "is_animated", False))
        if cut_short(path):
            img.load()
    return ImageInfo(w, h, animated)


def _content(head: bytes) -> str:
    """What a file that is no image seems to hold, from its first bytes."""
    if head[4:8] == b"ftyp":
        return "an HEIC/AVIF or video container: convert it to PNG or JPEG"
    if head.startswith((b"II*\0", b"MM\0*")):
        return "a TIFF image: convert it to PNG"
    if head.lstrip().startswith(b"<"):
        return "HTML or XML text (a web page saved under an image name?)"
    if head.isascii() and all(c >= 32 or c in b"\t\r\n" for c in head):
        return "plain text"
    return "no image format this program reads (PNG, JPEG, WebP, GIF, BMP)"


def image_problem(e: BaseException, path: str | os.PathLike) -> tuple[str, str]:
    """(kind, note) for an image file that failed to open or decode with `e`: the kind
    is a key of IMAGE_PROBLEMS, the note says what is wrong in plain words."""
    if isinstance(e, ImageTooLarge):
        return "too_large", str(e)
    if isinstance(e, Image.DecompressionBombError):
        return "too_large", f"over PIL's pixel limit: {e}"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
        short = size > 0 and cut_short(path)
    except OSError as err:
        return "unreadable", f"cannot be read: {err.strerror or err}"
    if size == 0:
        return "unreadable", "empty file (0 bytes)"
    if short or "truncated" in str(e):
        return "truncated", f"the image data stops early ({size} bytes on disk)"
    if isinstance(e, Image.UnidentifiedImageError):
        return "unreadable", f"not an image: the file holds {_content(head)}"
    return "unreadable", f"damaged image data ({str(e) or type(e).__name__})"


def problem_text(e: BaseException, path: str | os.PathLike) -> str:
    """What is wrong with an image file that failed to open or decode, and what to do,
    in one line."""
    kind, note = image_problem(e, path)
    return f"{note}; {IMAGE_PROBLEMS[kind][1]}"


def _is_srgb(profile) -> bool:
    """Whether a profile is a standard sRGB one (its description says so: 'sRGB
    IEC61966-2.1', 'sRGB built-in', ...; a 'linear sRGB' has another curve)."""
    name = ImageCms.getProfileDescription(profile).strip().lower()
    return name.startswith("srgb") and "linear" not in name


@functools.lru_cache(maxsize=16)
def _srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from an embedded colour profile to sRGB for images of `mode` (RGB, L
    or CMYK, to RGB), built once per profile; None when the profile is sRGB already (no
    work, no rounding) or cannot be used (damaged, or for another colour space)."""
    if ImageCms is None:
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if _is_srgb(source):
            return None
        return ImageCms.buildTransform(source, _SRGB, mode, "RGB",
                                       ImageCms.Intent.RELATIVE_COLORIMETRIC)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def to_srgb(img: Image.Image) -> Image.Image:
    """The image's colours in sRGB, as every picture the network learns from and draws is
    taken to be: an embedded colour profile (Display P3 in phone photos and screenshots,
    Adobe RGB, ProPhoto, a print CMYK profile) is converted with relative colorimetric
    intent, so the same colour trains as the same numbers whatever profile its file
    carries. Images without a profile, with an sRGB one or with one that cannot be used
    come back as they are; RGB, RGBA, L, LA, P and CMYK images are converted (RGB or RGBA
    out, alpha kept; the result carries no profile, so converting again changes nothing).
    """
    icc = img.info.get("icc_profile")
    if not icc:
        return img
    if img.mode == "P" or (img.mode in ("RGB", "L") and "transparency" in img.info):
        img = img.convert("RGBA")   # colours (and a transparent colour) made explicit
    if img.mode not in ("RGB", "RGBA", "L", "LA", "CMYK"):
        return img
    alpha = img.getchannel("A") if img.mode in ("RGBA", "LA") else None
    colour = img.convert(img.mode[:-1]) if alpha is not None else img
    transform = _srgb_transform(bytes(icc), colour.mode)
    if transform is None:
        return img
    try:
        out = ImageCms.applyTransform(colour, transform)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return img
    if alpha is not None:
        out.putalpha(alpha)
    return out


def to_rgb(img: Image.Image, *, later_profile: bool = False) -> Image.Image:
    """8-bit sRGB of the current frame (to_srgb: embedded colour profiles converted).
    Transparent pixels are composited on white. The grey modes wider than 8 bits are
    rescaled, where PIL's own conversion clips: 16-bit (I;16*, as PNG's 16-bit grey opens)
    65535 -> 255; 32-bit integer I the same when its values need more than 8 bits (else
    as is); float F taken as 0..1 when it stays there.

    With `later_profile` an RGB or RGBA image's profile is not applied but kept in the
    result's info["icc_profile"], for to_srgb on the smaller image the caller cuts from it
    (a crop, a thumbnail): the conversion costs per pixel, more than decoding a
    12-megapixel photo at the reduced scale a crop needs. White stays white, so it
    commutes with the compositing on white. Other modes are converted here."""
    icc = img.info.get("icc_profile") if later_profile and img.mode in ("RGB", "RGBA") else None
    if not icc:
        img = to_srgb(img)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        raw = np.asarray(img)
        a = raw.astype(np.float64)
        top = float(a.max()) if a.size else 0.0
        if img.mode.startswith("I;16") or (img.mode == "I" and top > 255):
            a = a / 257.0
        elif img.mode == "F" and top <= 1.0:
            a = a * 255.0
        grey = np.clip(a.round(), 0, 255).astype(np.uint8)
        if isinstance(img.info.get("transparency"), int):
            grey[raw == img.info["transparency"]] = 255
        out = Image.fromarray(grey).convert("RGB")
    elif img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        out = img.convert("RGB")
    out.info.pop("icc_profile", None)
    if icc:
        out.info["icc_profile"] = icc
    return out


def srgb_of_part(part: Image.Image, icc: bytes | None) -> Image.Image:
    """to_srgb of a smaller RGB image cut from one whose profile `icc` to_rgb left for
    later (later_profile); `part` as it is when there was none."""
    if not icc:
        return part
    part.info["icc_profile"] = icc
    return to_srgb(part)


def upright_rgb(img: Image.Image, *, later_profile: bool = False) -> Image.Image:
    """to_rgb of an opened image, turned the way its EXIF orientation says it is shown.
    The result carries no orientation tag, so calling it again changes nothing."""
    return to_rgb(ImageOps.exif_transpose(img), later_profile=later_profile)
