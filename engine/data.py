"""Datasets: scanning an image folder with captions, the health report, and the
`python -m engine.data` CLI. The torch Dataset that feeds the trainer is in
engine.dataset.

A dataset is a folder, scanned recursively: .jpg .jpeg .jfif .png .webp .gif .bmp images in
any letter case; the caption of `a/x.png` is the text of `a/x.txt` (UTF-8 or UTF-16),
else of `a/x.caption`, else its line of a `metadata.jsonl`.
Folders named `N_name` repeat their images N times per epoch, and folders named like
regularisation or class sets are left out unless data.include_reg is on: the rules of
these conventions are in engine.conventions. Hidden files and folders (names starting
with '.') are ignored; a folder link that points back at a folder containing it is not
followed, and a link that leads nowhere or a name that is not text is left out on its own.
The scan reads image headers (and the last few kilobytes of each file, to notice one cut
short) but no pixels; what it cannot use (unreadable or truncated files, images over the
pixel limit, missing or empty captions) is reported as a Problem naming every file and
what to do about it, never silently altered. Animated images train their first frame.
Bucketing, cropping and batching are in engine.buckets; demo data in engine.demo_data.

Typical use (trainer):

    scan = scan_dataset(root, cfg.data)
    plan = plan_buckets(scan.records, cfg.data, cfg.model.patch_size, cfg.train.batch_size,
                        world_size, cfg.train.grad_accum)
    loader, sampler = engine.dataset.make_loader(plan, cfg.data, seed=cfg.train.seed,
                                                 rank=rank)
    for epoch in ...: sampler.set_epoch(epoch); for batch in loader: ...
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.config import DataConfig
from engine.conventions import (
    CAPTION_EXTENSIONS,
    CAPTION_PROBLEMS,
    CONVENTION_PROBLEMS,
    MASK_SUFFIX,
    METADATA_NAME,
    NOT_CAPTIONS,
    Conventions,
    choose_caption,
    collect_metadata,
    folder_rule,
)
from engine.fileio import atomic_write_text
from engine.images import (
    BROKEN_FILE_ERRORS,
    IMAGE_EXTENSIONS,
    IMAGE_PROBLEMS,
    MAX_PIXELS,
    ImageInfo,
    image_problem,
    inspect_image,
    open_image,
)

CACHE_VERSION = 3   # 3: sizes follow XMP and late-eXIf orientation

class DataError(ValueError):
    """A dataset folder or file cannot be used as asked."""



# --------------------------------------------------------------------------------------
# Records and problems
# --------------------------------------------------------------------------------------

@dataclass
class ImageRecord:
    path: str                 # absolute
    rel: str                  # relative to the dataset root, '/'-separated
    width: int                # as displayed (EXIF orientation applied)
    height: int
    caption: str | None       # None: missing, empty or unreadable (see the scan's problems)
    file_size: int
    repeats: int = 1          # times trained per epoch (kohya N_name folders)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Problem:
    kind: str                 # unreadable, too_large, too_small, missing_caption, ...
    severity: str             # "error": the file is not trained; "warning": trained, but check
    message: str              # what it means and what to do
    files: dict[str, str] = field(default_factory=dict)   # relative path -> what is wrong

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Scan:
    root: str
    records: list[ImageRecord]
    problems: list[Problem]
    seconds: float
    conventions: Conventions = field(default_factory=Conventions)

    def to_dict(self) -> dict:
        return {"root": self.root, "images": len(self.records),
                "conventions": self.conventions.to_dict(),
                "captioned": sum(r.caption is not None for r in self.records),
                "bytes": sum(r.file_size for r in self.records),
                "seconds": round(self.seconds, 3),
                "records": [r.to_dict() for r in self.records],
                "problems": [p.to_dict() for p in self.problems]}


def _problem(problems: dict[str, Problem], kind: str, severity: str, message: str,
             rel: str, note: str) -> None:
    problems.setdefault(kind, Problem(kind, severity, message)).files[rel] = note


def _convention(problems: dict[str, Problem], kind: str, rel: str, note: str) -> None:
    _problem(problems, kind, *CONVENTION_PROBLEMS[kind], rel, note)


# --------------------------------------------------------------------------------------
# Captions and scanning
# --------------------------------------------------------------------------------------

def _contains(outer: str, inner: str) -> bool:
    return os.path.commonpath([outer, inner]) == outer


@dataclass
class Listing:
    """What _walk found under a dataset root."""
    # (folder, image names, caption or metadata.jsonl names by lower case -> real names)
    folders: list[tuple[Path, list[str], dict[str, list[str]]]]
    unlistable: dict[Path, str]   # folder -> why it cannot be listed
    loops: dict[Path, str]        # folder link -> its target, which contains the link
    relinked: dict[Path, Path]    # folder link -> the folder it leads to, listed under that
    bad: dict[Path, str]          # file or folder left out -> why (a link to nothing, a name
                                  # that is not text)


def name_is_text(name: str) -> bool:
    """False for a file name whose bytes are not in the file system's encoding (Python
    keeps them as lone surrogates): a name from another system, which no text can hold."""
    return not any("\udc80" <= c <= "\udcff" for c in name)


def shown_path(path: str) -> str:
    """A path as text can show it: bytes of a name that is not text become U+FFFD."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _walk(root: Path) -> Listing:
    """Every folder under root, each real folder listed once: folder links are followed
    after every real folder, so that no file is counted twice and none is named by a link
    when it need not be; a link pointing at a folder that contains it (a loop) is not
    followed. A bad entry (a link that leads nowhere or loops, a name that is not text)
    is left out on its own, never with its folder."""
    out = Listing([], {}, {}, {}, {})
    seen: dict[str, Path] = {}
    stack, links = [root], []
    while stack or links:
        folder = stack.pop() if stack else links.pop(0)
        real = os.path.realpath(folder)
        if real in seen:
            if folder.is_symlink():
                out.relinked[folder] = seen[real]
            continue
        seen[real] = folder
        images, texts, subdirs, linked = [], {}, [], []
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            out.unlistable[folder] = e.strerror or str(e)
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            if not name_is_text(e.name):
                out.bad[Path(e.path)] = ("its name is not text in this system's encoding (a "
                                         "name from another system's files): rename it")
                continue
            try:
                is_dir = e.is_dir()
                is_file = not is_dir and e.is_file()
                link = e.is_symlink()
            except OSError as err:   # a link that loops on itself, an entry gone meanwhile
                out.bad[Path(e.path)] = f"cannot be opened ({err.strerror or err})"
                continue
            ext = os.path.splitext(e.name)[1].lower()
            if is_dir:
                if not link:
                    subdirs.append(Path(e.path))
                elif _contains(target := os.path.realpath(e.path), real):
                    out.loops[Path(e.path)] = target
                else:
                    linked.append(Path(e.path))
            elif is_file:
                if ext in IMAGE_EXTENSIONS:
                    images.append(e.name)
                elif ext in CAPTION_EXTENSIONS or e.name.lower() == METADATA_NAME:
                    texts.setdefault(e.name.lower(), []).append(e.name)
            elif link and (not ext or ext in IMAGE_EXTENSIONS | set(CAPTION_EXTENSIONS)):
                out.bad[Path(e.path)] = (f"a link to {os.readlink(e.path)}, which is not "
                                         f"there: fix or remove the link")
        out.folders.append((folder, images, texts))
        stack.extend(sorted(subdirs, reverse=True))
        links.extend(sorted(linked))
    return out


# image formats a dataset may hold that are not read (PIL reads some of them only in part:
# 16-bit RGB TIFF, multi-page files), for the note on their orphaned captions
UNREAD_IMAGE_EXTENSIONS = frozenset({
    ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".psd", ".svg", ".exr",
    ".hdr", ".tga", ".ppm", ".pgm", ".ico", ".dng", ".raw", ".cr2", ".cr3", ".nef",
    ".arw", ".orf", ".rw2", ".raf"})


def _unread_images(root: Path, limit: int = 100) -> list[str]:
    """Up to `limit` paths (relative to root) of files in UNREAD_IMAGE_EXTENSIONS."""
    found: list[str] = []
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            if os.path.splitext(name)[1].lower() in UNREAD_IMAGE_EXTENSIONS:
                found.append(os.path.relpath(os.path.join(folder, name), root))
                if len(found) >= limit:
                    return found
    return found


def _orphan_note(folder: Path, caption: str) -> str:
    """Why a caption file has no image: none of its name, or one in an image format this
    program does not read (a TIFF, HEIC or camera RAW file beside it), named."""
    stem = os.path.splitext(caption)[0]
    try:
        others = sorted(p.name for p in folder.glob(glob.escape(stem) + ".*")
                        if p.suffix.lower() in UNREAD_IMAGE_EXTENSIONS and p.is_file())
    except OSError:
        others = []
    if not others:
        return "no image with this name"
    if kind := _sniffed_format(folder / others[0]):
        return (f"{others[0]} is a {kind} file under another name: rename it to "
                f"{Path(others[0]).stem}.{SNIFFED[kind]}")
    return (f"{others[0]} is not in a format this program reads "
            f"({' '.join(sorted(IMAGE_EXTENSIONS))}): convert it to PNG or JPEG")


# the formats this program reads, by their first bytes -> the extension to give them
SNIFFED = {"JPEG": "jpg", "PNG": "png", "WebP": "webp", "GIF": "gif", "BMP": "bmp"}


def _sniffed_format(path: Path) -> str:
    """The format of a file whose name says another, from its first bytes ('' when it is
    none that this program reads): a JPEG that a phone export saved as .heic."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return ""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return "BMP" if head[:2] == b"BM" else ""


def _load_cache(path: Path | None, root: Path) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    ok = (isinstance(data, dict) and data.get("version") == CACHE_VERSION
          and data.get("root") == str(root) and isinstance(data.get("entries"), dict))
    return data["entries"] if ok else {}


def scan_dataset(root: str | os.PathLike, data_cfg: DataConfig, *, max_pixels: int = MAX_PIXELS,
                 cache_path: str | os.PathLike | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Scan:
    """Find every image under `root` with its size and caption, and what is wrong.
    DataError when `root` is no folder or holds no image file at all.

    Reads headers only. With `cache_path`, what a good file's header said is kept in
    that JSON file keyed by (file size, modification time), so a rescan of an unchanged
    100k-image folder opens no image. `progress(done, total)` is called as headers are
    read."""
    start = time.perf_counter()
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(f"dataset folder '{root}' does not exist or is not a folder (give the "
                        f"folder that holds the images and their .txt captions)")
    root_path = root_path.resolve()
    listing = _walk(root_path)
    folders = listing.folders
    total = sum(len(imgs) for _, imgs, _ in folders)
    if total == 0:
        unread = "".join([f"; folder '{f}' cannot be listed ({err})" for f, err in
                          list(listing.unlistable.items())[:3]]
                         + [f"; '{shown_path(str(p))}' left out: {why}" for p, why in
                            list(listing.bad.items())[:3]])
        if other := _unread_images(root_path):
            raise DataError(
                f"no images this program reads in '{root_path}' or its subfolders "
                f"({' '.join(sorted(IMAGE_EXTENSIONS))}), but {len(other)}"
                f"{'+' if len(other) >= 100 else ''} in other formats ({other[0]} ...)"
                f"{unread}: convert them to PNG or JPEG, keeping their names, each with a "
                f".txt caption of the same name")
        raise DataError(f"no images in '{root_path}' or its subfolders (looked for "
                        f"{' '.join(sorted(IMAGE_EXTENSIONS))} files){unread}: put the images "
                        f"there, each with a .txt caption of the same name")
    cache_file = Path(cache_path) if cache_path is not None else None
    cache = _load_cache(cache_file, root_path)
    new_cache: dict[str, list[int]] = {}
    problems: dict[str, Problem] = {}
    records: list[ImageRecord] = []
    missing_is_error = data_cfg.missing_caption == "skip"
    fallback = (f"trained with the default caption '{data_cfg.default_caption}'"
                if data_cfg.default_caption else "trained unconditionally (empty caption)")
    caption_effect = "skipped (data.missing_caption = skip)" if missing_is_error else fallback
    caption_severity = "error" if missing_is_error else "warning"

    def rel_of(path: Path) -> str:
        return path.relative_to(root_path).as_posix()

    for folder, err in listing.unlistable.items():
        _problem(problems, "unreadable_folder", "error", "folder cannot be listed: its images "
                 "are skipped; check its permissions", rel_of(folder) + "/", err)
    for link, target in listing.loops.items():
        _problem(problems, "folder_loop", "warning", "folder link to a folder that contains "
                 "it (a loop): not followed; remove the link unless something else needs it",
                 rel_of(link) + "/", f"links to {target}")
    for path, why in listing.bad.items():
        _problem(problems, "bad_entry", "error", "file or folder that cannot be read as it is "
                 "named: left out", shown_path(rel_of(path)), why)
    for link, first in listing.relinked.items():
        if folder_rule(rel_of(link)) != folder_rule(rel_of(first)):
            _problem(problems, "folder_relinked", "warning", "folder link to a folder the "
                     "dataset already holds: its images are read once, by the other name, "
                     "and the link's repeats or regularisation name do not apply; rename the "
                     "folder itself, or copy it", rel_of(link) + "/",
                     f"leads to {rel_of(first)}/")
    conv = Conventions(reg_included=data_cfg.include_reg)
    metadata, conv.metadata_files, issues = collect_metadata(
        [(folder, texts) for folder, _, texts in folders], root_path,
        {rel_of(folder / n).lower() for folder, names, _ in folders for n in names})
    for kind, where, note in issues:
        _convention(problems, kind, where, note)
    done = 0
    for folder, images, texts in folders:
        rule = folder_rule("" if folder == root_path else rel_of(folder))
        for plain in rule.plain:
            _convention(problems, "not_repeats", plain, "not a repeat count: a plain folder")
        if rule.reg_folder and images:
            conv.reg_folders[rule.reg_folder] = (conv.reg_folders.get(rule.reg_folder, 0)
                                                 + len(images))
        left_out = ("regularisation" if rule.reg_folder and not data_cfg.include_reg
                    else "zero_repeats" if rule.repeats == 0 else "")
        if left_out:   # not opened; its caption files are not orphans either
            where = rule.reg_folder if left_out == "regularisation" else rule.repeat_folder
            if left_out == "zero_repeats":
                conv.zero_folders[where] = conv.zero_folders.get(where, 0) + len(images)
            for name in images:
                _convention(problems, left_out, rel_of(folder / name), f"in {where}")
            done += len(images)
            if progress is not None and images:
                progress(done, total)
            continue
        stems, used = set(), set()   # the images' keys; the caption files they took
        pictures = {os.path.splitext(name)[0].lower() for name in images}
        for name in images:
            path = folder / name
            rel = rel_of(path)
            stem = os.path.splitext(name)[0]
            stems.update((stem.lower(), name.lower()))   # x.txt and x.png.txt are its captions
            done += 1
            if progress is not None:
                progress(done, total)
            masked = stem[:-len(MASK_SUFFIX)]
            if stem.lower().endswith(MASK_SUFFIX) and masked.lower() in pictures:
                _convention(problems, "mask_image", rel, f"the mask of {masked}")
                continue
            try:
                st = path.stat()
                hit = cache.get(rel)
                if hit and hit[:2] == [st.st_size, st.st_mtime_ns] and \
                        hit[2] * hit[3] <= max_pixels:
                    info = ImageInfo(*hit[2:5])
                else:
                    info = inspect_image(str(path), max_pixels)
                new_cache[rel] = [st.st_size, st.st_mtime_ns, *info]
            except BROKEN_FILE_ERRORS as e:
                kind, note = image_problem(e, path)
                what, todo = IMAGE_PROBLEMS[kind]
                _problem(problems, kind, "error", f"{what}: skipped; {todo}", rel, note)
                continue
            w, h = info.width, info.height
            if info.animated:
                _problem(problems, "animated", "warning", "animated image: only its first "
                         "frame is trained; save the frame you want as a still image", rel,
                         "animated: the first frame is trained")
            if min(w, h) < data_cfg.min_side:
                _problem(problems, "too_small", "error", f"shorter side below data.min_side "
                         f"{data_cfg.min_side}: skipped; use a larger image or lower "
                         f"data.min_side", rel, f"{w}x{h} px")
            choice = choose_caption(folder, name, texts, metadata.get(rel.lower(), []))
            used.add(choice.used)
            if choice.caption is None:
                what, todo = CAPTION_PROBLEMS[choice.kind]
                _problem(problems, choice.kind, caption_severity,
                         f"{what}: {caption_effect}; {todo}", rel, choice.note)
            else:
                conv.captions[choice.source] = conv.captions.get(choice.source, 0) + 1
            if choice.ignored:
                _convention(problems, "caption_conflict", rel, f"{choice.used} is used; "
                            f"ignored: {', '.join(choice.ignored)}")
            if rule.repeat_folder:
                conv.repeat_folders.setdefault(rule.repeat_folder, [rule.repeats, 0])[1] += 1
            records.append(ImageRecord(str(path), rel, w, h, choice.caption, st.st_size,
                                       rule.repeats))
        for low, real_names in texts.items():
            stem, ext = os.path.splitext(low)
            if ext not in CAPTION_EXTENSIONS or stem in NOT_CAPTIONS:
                continue
            if stem not in stems:
                for real_name in real_names:
                    _problem(problems, "orphan_caption", "warning", "caption file with no "
                             "image of the same name", rel_of(folder / real_name),
                             _orphan_note(folder, real_name))
            elif taken := used.intersection(real_names):   # cat.txt beside Cat.txt
                for real_name in sorted(set(real_names) - taken):
                    _problem(problems, "orphan_caption", "warning", "caption file with no "
                             "image of the same name", rel_of(folder / real_name),
                             f"no image is named exactly so; {min(taken)}, in other letter "
                             f"case, is the one used")
    if cache_file is not None and new_cache != cache:
        try:
            atomic_write_text(cache_file, json.dumps({"version": CACHE_VERSION,
                                                      "root": str(root_path),
                                                      "entries": new_cache}))
        except OSError:
            pass   # the cache only saves time; a read-only location must not stop a scan
    records.sort(key=lambda r: r.rel)
    return Scan(str(root_path), records, list(problems.values()), time.perf_counter() - start,
                conv)


# --------------------------------------------------------------------------------------
# Health report
# --------------------------------------------------------------------------------------

@dataclass
class TokenStats:
    counter: str              # how tokens were counted
    max_tokens: int | None    # the encoder's limit (None = not checked)
    captions: int
    min: int
    mean: float
    p95: int
    max: int
    over: int                 # captions longer than max_tokens (truncated in training)


@dataclass
class HealthReport:
    root: str
    images: int
    problems: list[Problem]
    tokens: TokenStats | None
    conventions: Conventions | None = None   # what the scan found of each convention

    @property
    def errors(self) -> int:
        """Files that will not be trained."""
        return len({f for p in self.problems if p.severity == "error" for f in p.files})

    @property
    def warnings(self) -> int:
        return len({f for p in self.problems if p.severity == "warning" for f in p.files})

    def to_dict(self) -> dict:
        return {"root": self.root, "images": self.images, "errors": self.errors,
                "warnings": self.warnings, "problems": [p.to_dict() for p in self.problems],
                "tokens": asdict(self.tokens) if self.tokens else None,
                "conventions": self.conventions.to_dict() if self.conventions else None}


def content_hash(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def find_duplicates(records: Sequence[ImageRecord]) -> list[list[ImageRecord]]:
    """Groups of byte-identical files (by content hash), each sorted by path. Only files
    sharing a size are hashed, so a folder without duplicates is barely read."""
    by_size: dict[int, list[ImageRecord]] = {}
    for r in records:
        by_size.setdefault(r.file_size, []).append(r)
    groups: list[list[ImageRecord]] = []
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        by_hash: dict[str, list[ImageRecord]] = {}
        for r in same_size:
            try:
                by_hash.setdefault(content_hash(r.path), []).append(r)
            except OSError:
                continue
        groups += [sorted(g, key=lambda r: r.rel) for g in by_hash.values() if len(g) > 1]
    return sorted(groups, key=lambda g: g[0].rel)


def health_report(scan: Scan, *, count_tokens: Callable[[list[str]], list[int]] | None = None,
                  max_tokens: int | None = None, counter_name: str = "tokenizer",
                  deep: bool = False, max_pixels: int = MAX_PIXELS,
                  progress: Callable[[int, int], None] | None = None) -> HealthReport:
    """The scan's problems plus duplicate files, captions over `max_tokens` (counted by
    `count_tokens`, described by `counter_name`) and, with `deep`, images whose pixels do
    not decode (reads every file completely: slow on big folders)."""
    problems = list(scan.problems)
    dup = Problem("duplicate", "warning", "identical file content (a copy, or a link to a "
                  "file of the dataset): it trains the same image twice; delete the copy or "
                  "the link, or use a repeat folder to weight an image")
    skipped = {f for p in problems if p.severity == "error" for f in p.files}
    for group in find_duplicates([r for r in scan.records if r.rel not in skipped]):
        # a link is named as the extra one, never the file it leads to
        first, *others = sorted(group, key=lambda r: (os.path.islink(r.path), r.rel))
        real = {os.path.realpath(r.path): r.rel for r in reversed(group)
                if not os.path.islink(r.path)}
        for r in others:
            target = real.get(os.path.realpath(r.path)) if os.path.islink(r.path) else None
            dup.files[r.rel] = (f"a link to {target}" if target
                                else f"same content as {first.rel}")
    if dup.files:
        problems.append(dup)

    if deep:
        corrupt = Problem("corrupt", "error", "header reads but the pixels do not decode: "
                          "skipped in training; replace it with a good copy or delete it")
        for i, r in enumerate(scan.records):
            if progress is not None:
                progress(i + 1, len(scan.records))
            try:
                with open_image(r.path, max_pixels) as img:
                    img.load()
            except BROKEN_FILE_ERRORS as e:
                corrupt.files[r.rel] = image_problem(e, r.path)[1]
        if corrupt.files:
            problems.append(corrupt)

    tokens = None
    captioned = [r for r in scan.records if r.caption is not None]
    if count_tokens is not None and captioned:
        counts = list(count_tokens([r.caption for r in captioned]))
        if len(counts) != len(captioned):
            raise ValueError(f"count_tokens returned {len(counts)} counts for "
                             f"{len(captioned)} captions")
        arr = np.asarray(counts)
        over = {r.rel: f"{n} tokens, will be cut to {max_tokens}" for r, n in
                zip(captioned, counts) if max_tokens is not None and n > max_tokens}
        tokens = TokenStats(counter_name, max_tokens, len(counts), int(arr.min()),
                            float(arr.mean()), int(np.percentile(arr, 95, method="higher")),
                            int(arr.max()), len(over))
        if over:
            problems.append(Problem("long_caption", "warning", f"caption longer than "
                                    f"text.max_tokens = {max_tokens}: the end is cut off in "
                                    f"training; shorten it or raise text.max_tokens", over))
    return HealthReport(scan.root, len(scan.records), problems, tokens, scan.conventions)


def main(argv=None) -> int:
    """`python -m engine.data demo | report | cache`: the command line is in engine/report.py,
    above bucketing, which the report needs and this module does not."""
    from engine.report import main as cli
    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
