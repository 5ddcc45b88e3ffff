"""Workspace operations of the studio that are not UI: adding uploaded files to a dataset,
and the settings of a new run that starts from a checkpoint's weights.

Uploads arrive as temporary files (each under app.py's --max-upload-mb). Only images the
engine can train and UTF-8 caption files are copied, into workspace/datasets/<name>/ and
nowhere else, under a cleaned-up version of their own file name; a file already there is
never overwritten. Every file that is not copied is named with the reason.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from engine import config
from engine.fileio import atomic_target, ensure_free
from engine.images import (
    BROKEN_FILE_ERRORS,
    IMAGE_EXTENSIONS,
    IMAGE_PROBLEMS,
    MAX_PIXELS,
    image_problem,
    inspect_image,
)
from engine.init_from import differences
from studio import views
from studio.paths import NAME_MAX, PathError, resolve_inside, safe_name

CAPTION_EXTENSIONS = (".txt", ".caption")
MAX_FILES = 20_000              # per upload
MAX_CAPTION_BYTES = 64 * 1024   # a caption longer than this is not a caption


@dataclass
class ImportReport:
    folder: Path
    images: list[str] = field(default_factory=list)      # file names added
    captions: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (uploaded name, why)

    def markdown(self) -> str:
        added = (f"Added **{len(self.images)} image(s)** and **{len(self.captions)} "
                 f"caption(s)** to `{self.folder.name}`.")
        if not self.skipped:
            return added
        rows = "\n".join(f"- `{name}`: {why}" for name, why in self.skipped[:50])
        more = f"\n- ... and {len(self.skipped) - 50} more" if len(self.skipped) > 50 else ""
        return f"{added} **{len(self.skipped)} not added:**\n{rows}{more}"


def clean_file_name(name: str) -> str:
    """A file name reduced to letters, digits, '-', '_' and '.' (others become '_'), so an
    image and its caption still pair up; PathError when nothing usable is left."""
    base = re.split(r"[\\/]", name)[-1]          # a browser may send a relative path
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "file"
    ext = re.sub(r"[^A-Za-z0-9]+", "", ext).lower()
    keep = NAME_MAX - len(ext) - 1
    return safe_name(f"{stem[:keep]}.{ext}" if ext else stem[:NAME_MAX])


def _caption_problem(path: Path) -> str:
    data = path.read_bytes()
    if len(data) > MAX_CAPTION_BYTES:
        return f"{len(data) // 1024} KB is too long for a caption (the most is 64 KB)"
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return (f"not UTF-8 text (byte {e.start} is 0x{data[e.start]:02X}): save it again "
                f"as UTF-8")
    return ""


def add_files(datasets_dir: Path, name: str, files: Sequence[str | Path], *,
              roots: Sequence[Path] = (), max_pixels: int = MAX_PIXELS) -> ImportReport:
    """Copy the uploaded `files` that are images or captions into the dataset folder
    `name` under `datasets_dir` (created when new). PathError for a bad dataset name or
    a folder outside the workspace; problems with single files go into the report."""
    folder_name = safe_name(name)
    datasets_dir = Path(datasets_dir)
    folder = datasets_dir / folder_name
    # a dataset folder that is a link leading elsewhere is not written through
    resolve_inside(str(folder), [datasets_dir.resolve(), *roots])
    files = [Path(f) for f in files]
    if len(files) > MAX_FILES:
        raise PathError(f"{len(files)} files in one upload; the most is {MAX_FILES}: upload "
                        f"them in parts")
    total = sum(f.stat().st_size for f in files if f.is_file())
    datasets_dir.mkdir(parents=True, exist_ok=True)
    ensure_free(folder / "upload", total)
    folder.mkdir(exist_ok=True)
    report = ImportReport(folder)
    for src in files:
        original = src.name
        try:
            target = clean_file_name(original)
        except PathError as e:
            report.skipped.append((original, str(e)))
            continue
        ext = Path(target).suffix.lower()
        if ext in IMAGE_EXTENSIONS:
            try:
                inspect_image(str(src), max_pixels)
                why = ""
            except BROKEN_FILE_ERRORS as e:
                kind, note = image_problem(e, src)
                why = f"{note}; {IMAGE_PROBLEMS[kind][1]}"
        elif ext in CAPTION_EXTENSIONS:
            why = _caption_problem(src)
        else:
            why = (f"not an image or a caption (allowed: "
                   f"{' '.join(sorted(IMAGE_EXTENSIONS | set(CAPTION_EXTENSIONS)))})")
        dst = folder / target
        if not why and dst.exists():
            why = (f"'{target}' is already in the dataset: the one there is kept (rename the "
                   f"new file to add it)")
        if why:
            report.skipped.append((original, why))
            continue
        with atomic_target(dst, src.stat().st_size) as tmp:
            shutil.copyfile(src, tmp)
        (report.images if ext in IMAGE_EXTENSIONS else report.captions).append(target)
    return report


def init_overrides(source: config.RunConfig, checkpoint_id: str) -> tuple[str, str]:
    """(preset, override text) for a new run from a checkpoint's weights: the preset whose
    network and text encoder are nearest the checkpoint's, lines for the keys that still
    differ (so the run keeps the checkpoint's shape), and the train.init_from line."""
    best = None
    for name in config.list_presets():
        try:
            diff = differences(source, config.load_preset(name))
        except config.ConfigError:
            continue
        if best is None or len(diff) < len(best[1]):
            best = (name, diff)
    name, diff = best
    keys = [d.split(" ", 1)[0] for d in diff]
    lines = [f"{k}={views.yaml_value(getattr(getattr(source, k.split('.')[0]), k.split('.')[1]))}"
             for k in keys]
    return name, "\n".join(["# the network and text encoder of the checkpoint:", *lines,
                             f"train.init_from={checkpoint_id}"] if lines else
                            [f"train.init_from={checkpoint_id}"])
