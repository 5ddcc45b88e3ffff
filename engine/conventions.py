"""The dataset layouts other training tools use, as the scan (engine.data) reads them:
caption files and metadata.jsonl, kohya-style repeat folders and regularisation sets.
Pure functions of names and small text files; the scan turns what they find into its
problems and into the `Conventions` summary of the health report.

Captions. The caption of `a/x.png` comes from the first of these that exists:
  1. `a/x.txt`, then 2. `a/x.caption`, then `a/x.png.txt` (the sidecar some tag managers
     and downloaders write), in UTF-8, or UTF-16 with its byte-order mark or, for Latin
     text, without one; where the file system tells `x.txt` from `X.txt`, the one named
     exactly as the image, else the one there is;
  3. a line of a `metadata.jsonl` (the Hugging Face ImageFolder layout: one JSON object
     per line, `file_name` relative to the jsonl's folder, the caption under `text`, or
     under `caption` when there is no `text`). Where several metadata.jsonl files name
     an image, the one in the deepest folder (the nearest to it) is used.
A caption file of the image's own outranks any metadata line because it is the more
specific statement. The source used wins even when it is empty or unreadable (that is
reported as such); every other source of the same image is ignored with a warning that
names it. Metadata lines that cannot be used (not JSON, no file name, no text, a file
outside the jsonl's folder, a file named twice) and lines naming files that are not
images of the dataset are reported with the jsonl's path and line number.

Repeats (kohya's `N_name` folders). Every image under a folder named `<N>_<name>`
(`10_cat`, `3_dog style`) trains N times per epoch: the bucket plan, the epoch length
and the batch sampler (engine.buckets) count each copy, and each copy gets its own
random crop and flip. Only the innermost such folder counts (`10_cat/2_close/x.png`
trains twice); an image under none trains once. A `0_name` folder trains nothing: its
images are left out with a message. A number above MAX_REPEATS (`2024_trip`) is not read
as a repeat count: the folder is plain, with a warning that says so.

Regularisation and class sets. kohya-style trainers use these images for a prior-
preservation loss, which this trainer does not have; trained as ordinary images they
would teach the class instead of the subject. A folder whose name (less an `N_` prefix,
in any letter case) is reg, regs, regularization, regularisation, class or classes,
alone or followed by ' ', '_', '-' or '.' and more (`reg_images`, `class_images`,
`1_reg dog`), marks everything under it as such a set: it is left out with a message
naming the folder, unless data.include_reg is on (then it trains as ordinary images,
repeats included). The dataset folder itself is never checked: choosing it says what it
is.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

CAPTION_EXTENSIONS = (".txt", ".caption")        # in order of precedence
METADATA_NAME = "metadata.jsonl"
# Text files in a dataset that are documentation, not captions of a missing image.
NOT_CAPTIONS = frozenset({"readme", "license", "licence"})
MAX_REPEATS = 1000

REPEAT_FOLDER = re.compile(r"([0-9]+)_(.+)", re.S)
REG_FOLDER = re.compile(r"(reg|regs|regularization|regularisation|class|classes)([ _.\-].*)?",
                        re.I | re.S)

# caption problem kind -> (what it is, what to do)
CAPTION_PROBLEMS = {"missing_caption": ("no caption", "add a .txt of the same name (or a "
                                        ".caption, or a metadata.jsonl line)"),
                    "empty_caption": ("empty caption", "write the caption into it"),
                    "caption_unreadable": ("caption file is not UTF-8 text",
                                           "save it again as UTF-8")}

# problem kind -> (severity, message) for what the conventions find
CONVENTION_PROBLEMS = {
    "zero_repeats": ("error", "in a 0_name folder (kohya repeat count 0): not trained; rename "
                              "the folder to N_name with N >= 1 to train it"),
    "regularisation": ("error", "in a folder named like a regularisation or class set: left "
                                "out, as this trainer has no prior-preservation loss; set "
                                "data.include_reg = true to train it as ordinary images, or "
                                "rename the folder"),
    "not_repeats": ("warning", f"folder name starts with a number above {MAX_REPEATS}: not read "
                               f"as a kohya repeat count, its images train once per epoch; "
                               f"rename it if a repeat count was meant"),
    "caption_conflict": ("warning", "more than one caption for this image: the first of "
                                    ".txt, .caption and the nearest metadata.jsonl is used; "
                                    "keep one and delete the others"),
    "metadata_line": ("warning", "metadata.jsonl line that cannot be used: ignored; fix the "
                                 "line (a JSON object with file_name and text)"),
    "metadata_missing_file": ("warning", "metadata.jsonl line naming no image of the dataset: "
                                         "ignored; correct file_name (relative to the jsonl's "
                                         "folder) or delete the line"),
    "mask_image": ("error", "a mask of OneTrainer's masked training (x-masklabel.png beside "
                            "x.png): not trained as a picture; this trainer has no masked loss, "
                            "so the whole of x trains"),
}
MASK_SUFFIX = "-masklabel"   # OneTrainer's mask of the image of the same name


def one_line(text: str) -> str:
    """A caption as it trains: line breaks (Windows' \\r\\n too), tabs and runs of spaces
    become one space, none at either end."""
    return " ".join(text.split())


def decode_caption(raw: bytes) -> str:
    """The text of a caption file: UTF-8 (a byte-order mark allowed), or UTF-16 with its
    byte-order mark or, as some Windows tools write it, without one (told by the zero
    bytes of its ASCII characters, which no UTF-8 text holds). UnicodeDecodeError for
    anything else, NUL bytes included."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    if b"\x00" in raw:
        # the high byte of Latin text is zero: in one column of byte pairs nearly always,
        # in the other never. Text in other scripts has no such column and stays refused
        # (a wrong byte order would decode to other, printable characters)
        even, odd = raw[0::2].count(0), raw[1::2].count(0)
        if len(raw) % 2 == 0 and max(even, odd) >= len(raw) // 4 and min(even, odd) == 0:
            with contextlib.suppress(UnicodeDecodeError):
                text = raw.decode("utf-16-le" if odd else "utf-16-be")
                if "".join(text.split()).isprintable():
                    return text
        at = raw.index(b"\x00")
        raise UnicodeDecodeError("utf-8", raw, at, at + 1, "a NUL byte: not text")
    return raw.decode("utf-8-sig")


def read_caption(path: Path) -> tuple[str | None, str, str]:
    """(caption, problem, note): the text on one line (one_line), '', ''; or None, a key
    of CAPTION_PROBLEMS and what exactly is wrong."""
    try:
        text = one_line(decode_caption(path.read_bytes()))
    except FileNotFoundError:
        return None, "missing_caption", f"no {path.name}"
    except UnicodeDecodeError as e:
        return None, "caption_unreadable", (f"{path.name} is not UTF-8 text (byte {e.start} "
                                            f"is 0x{e.object[e.start]:02X})")
    except OSError as e:
        return None, "caption_unreadable", f"cannot read {path.name}: {e.strerror}"
    return (text, "", "") if text else (None, "empty_caption", f"{path.name} is empty")


# --------------------------------------------------------------------------------------
# Folder names: repeats and regularisation sets
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FolderRule:
    """How the images directly in one folder are trained, from the names of the folders
    between the dataset root and it."""
    repeats: int               # times each image trains per epoch (0 = left out)
    repeat_folder: str         # the N_name folder that sets it, '/'-terminated ('' = none)
    reg_folder: str            # the outermost regularisation folder above ('' = none)
    plain: tuple[str, ...]     # N_name folders whose N is above MAX_REPEATS (read as plain)


def folder_rule(rel_folder: str) -> FolderRule:
    """The rule for a folder given relative to the dataset root ('' = the root)."""
    parts = [p for p in rel_folder.split("/") if p]
    repeats, repeat_folder, reg_folder, plain = 1, "", "", []
    for i, name in enumerate(parts):
        m = REPEAT_FOLDER.fullmatch(name)
        here = "/".join(parts[:i + 1]) + "/"
        if not reg_folder and REG_FOLDER.fullmatch(m[2] if m else name):
            reg_folder = here
        if m and int(m[1]) > MAX_REPEATS:
            plain.append(here)
        elif m:
            repeats, repeat_folder = int(m[1]), here
    return FolderRule(repeats, repeat_folder, reg_folder, tuple(plain))


# --------------------------------------------------------------------------------------
# metadata.jsonl
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MetadataLine:
    name: str                  # the image named, relative to the dataset root
    text: str                  # stripped; '' = empty
    where: str                 # '<jsonl path relative to the dataset root> line <n>'


def read_metadata(path: Path, rel_folder: str) -> tuple[dict[str, MetadataLine],
                                                        dict[str, str]]:
    """The usable lines of one metadata.jsonl: {image path relative to the dataset root,
    lower case: line}, and {'<jsonl> line <n>' (or the jsonl alone): what is wrong} for
    lines that cannot be used. `rel_folder` is the jsonl's folder relative to the dataset
    root ('' = the root)."""
    rel = posixpath.join(rel_folder, path.name)
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        return {}, {rel: f"not UTF-8 text (byte {e.start}); save it again as UTF-8"}
    except OSError as e:
        return {}, {rel: f"cannot be read: {e.strerror or e}"}
    entries: dict[str, MetadataLine] = {}
    first_line: dict[str, int] = {}
    bad: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{rel} line {n}"
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:   # RecursionError: absurdly deep nesting
            why = (f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError)
                   else str(e)[:80] or type(e).__name__)
            bad[where] = f"not valid JSON ({why})"
            continue
        if not isinstance(obj, dict):
            bad[where] = f"a JSON {type(obj).__name__}, not an object with file_name and text"
            continue
        name = obj.get("file_name")
        key = "text" if "text" in obj else "caption"
        text = obj.get(key)
        if not isinstance(name, str) or not name.strip():
            bad[where] = "no file_name (a string: the image's path relative to this file)"
            continue
        target = posixpath.normpath(posixpath.join(rel_folder, name.strip().replace("\\", "/")))
        if name.strip().startswith("/") or target.startswith("../") or target == "..":
            bad[where] = f"file_name '{name}' is outside the folder of {path.name}"
            continue
        if not isinstance(text, str):
            bad[where] = (f"{key} of '{name}' is not a string" if key in obj else
                          f"no text (or caption) for '{name}'")
            continue
        low = target.lower()
        if low in first_line:
            bad[where] = f"'{name}' is already on line {first_line[low]}; this line is ignored"
            continue
        first_line[low] = n
        entries[low] = MetadataLine(target, one_line(text), where)
    return entries, bad


def collect_metadata(folders: list[tuple[Path, dict[str, str]]], root: Path, images: set[str]
                     ) -> tuple[dict[str, list[MetadataLine]], dict[str, int],
                                list[tuple[str, str, str]]]:
    """Every metadata.jsonl under `root`: ({image path relative to the root, lower case:
    the lines naming it, nearest jsonl first}, {jsonl: usable lines}, [(problem kind,
    where, note)]). `folders`: (folder, its lower-case file name -> real names) as the scan
    lists them; `images`: the lower-case relative paths of every image file found."""
    found: dict[str, list[MetadataLine]] = {}
    files: dict[str, int] = {}
    issues: list[tuple[str, str, str]] = []
    for folder, names in sorted(folders, key=lambda f: -len(f[0].relative_to(root).parts)):
        if METADATA_NAME not in names:
            continue
        jsonl = folder / _by_case(names[METADATA_NAME], METADATA_NAME)
        entries, bad = read_metadata(jsonl, "" if folder == root
                                     else folder.relative_to(root).as_posix())
        files[jsonl.relative_to(root).as_posix()] = sum(low in images for low in entries)
        issues += [("metadata_line", where, note) for where, note in bad.items()]
        for low, line in entries.items():
            if low in images:
                found.setdefault(low, []).append(line)
            else:
                issues.append(("metadata_missing_file", line.where,
                               f"no image '{line.name}' in the dataset"))
    return found, files, issues


# --------------------------------------------------------------------------------------
# Choosing an image's caption
# --------------------------------------------------------------------------------------

@dataclass
class CaptionChoice:
    caption: str | None        # None: missing, empty or unreadable (see kind)
    source: str                # '.txt', '.caption', 'metadata.jsonl' or '' (none)
    used: str                  # the file name or metadata line used ('' = none)
    kind: str                  # '' or a key of CAPTION_PROBLEMS
    note: str                  # what exactly is wrong ('' = nothing)
    ignored: list[str]         # other sources of the same image, not used


def _by_case(names: list[str], wanted: str) -> str:
    """Of the files whose names differ from `wanted` only in letter case, the one named
    exactly so, else the first: on a file system that tells a.txt from A.txt, A.png takes
    A.txt; on one that does not, or with only a.txt there, it takes a.txt."""
    return wanted if wanted in names else names[0]


def caption_names(name: str) -> list[str]:
    """The caption files of the image file `name`, in order of precedence: x.txt and
    x.caption for x.png, then x.png.txt (the sidecar Hydrus and gallery-dl write)."""
    stem = Path(name).stem
    return [f"{stem}{ext}" for ext in CAPTION_EXTENSIONS] + [f"{name}.txt"]


def choose_caption(folder: Path, name: str, texts: dict[str, list[str]],
                   metadata: list[MetadataLine]) -> CaptionChoice:
    """The caption of the image file `name` in `folder`, by the precedence of the module
    docstring. `texts`: the folder's caption files, lower-case name -> real names;
    `metadata`: the metadata lines naming the image, nearest jsonl first."""
    stem = Path(name).stem
    files = [_by_case(texts[low], wanted) for wanted in caption_names(name)
             if (low := wanted.lower()) in texts]
    if files:
        caption, kind, note = read_caption(folder / files[0])
        return CaptionChoice(caption, Path(files[0]).suffix.lower(), files[0], kind, note,
                             files[1:] + [m.where for m in metadata])
    if metadata:
        m = metadata[0]
        ignored = [x.where for x in metadata[1:]]
        if not m.text:
            return CaptionChoice(None, METADATA_NAME, m.where, "empty_caption",
                                 f"{m.where} has an empty text", ignored)
        return CaptionChoice(m.text, METADATA_NAME, m.where, "", "", ignored)
    return CaptionChoice(None, "", "", "missing_caption", f"no {stem}.txt", [])


# --------------------------------------------------------------------------------------
# What a scan found, for the health report
# --------------------------------------------------------------------------------------

@dataclass
class Conventions:
    """Per convention, what a scan found. Folders are relative, '/'-terminated."""
    repeat_folders: dict[str, list[int]] = field(default_factory=dict)  # -> [repeats, images]
    captions: dict[str, int] = field(default_factory=dict)     # source -> images captioned
    metadata_files: dict[str, int] = field(default_factory=dict)  # jsonl -> lines used
    reg_folders: dict[str, int] = field(default_factory=dict)  # -> image files in it
    reg_included: bool = False
    zero_folders: dict[str, int] = field(default_factory=dict)  # 0_name -> image files left out

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """One line per convention found (none for a plain folder of .txt captions)."""
        out = []
        if self.repeat_folders:
            out.append("kohya repeats: " + ", ".join(
                f"{f} ×{r} ({_n(n, 'image')})"
                for f, (r, n) in sorted(self.repeat_folders.items())))
        if self.zero_folders:
            out.append("left out, repeat count 0: " + _folders(self.zero_folders))
        if set(self.captions) - {".txt"} or self.metadata_files:
            order = [*CAPTION_EXTENSIONS, METADATA_NAME]
            parts = [f"{self.captions[s]} {'from ' if s == METADATA_NAME else ''}{s}"
                     for s in order if self.captions.get(s)]
            out.append("captions: " + (", ".join(parts) or "none found"))
        if self.metadata_files:
            out.append("metadata files: " + ", ".join(
                f"{f} ({_n(n, 'line')} naming images)"
                for f, n in sorted(self.metadata_files.items())))
        if self.reg_folders:
            out.append(("regularisation folders trained as ordinary images (data.include_reg"
                        " is on): " if self.reg_included else "regularisation folders left "
                        "out (set data.include_reg = true to train them): ")
                       + _folders(self.reg_folders))
        return out


def _n(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _folders(counts: dict[str, int]) -> str:
    return ", ".join(f"{f} ({_n(n, 'image')})" for f, n in sorted(counts.items()))
