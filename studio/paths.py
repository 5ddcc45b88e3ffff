"""Checks for paths and names that come from the browser.

Everything a user types is untrusted: a folder path may climb out of the workspace with
`..`, point through a symlink to somewhere else, or carry a NUL byte; a run or file name
may hold a separator. `resolve_inside` turns typed text into a real path (symlinks
resolved) and accepts it only inside the allowed roots (the workspace and the folders
given with --allow-dir); `safe_name` accepts only plain, portable file names;
`names_local_path` tells a local folder from a hub id in a `name_or_path` setting.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePath, PureWindowsPath

NAME_MAX = 80
_NAME = re.compile(r"[A-Za-z0-9._-]+")
# Device names Windows reserves in every folder, with or without an extension.
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}


class PathError(ValueError):
    """A typed path or name is not acceptable; the message says why and what is allowed."""


def _strip(text: str) -> str:
    """Surrounding blanks, and one pair of quotes as left by "copy as path" on Windows."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def resolve_inside(text: str, roots: list[Path]) -> Path:
    """The real path `text` names (absolute, or relative to the first root; `~` expanded,
    symlinks resolved), provided it lies inside one of `roots`; else PathError."""
    if not roots:
        raise PathError("no folder is open to the studio: start it with a workspace")
    allowed = ", ".join(str(r) for r in roots)
    if not isinstance(text, str) or not _strip(text):
        raise PathError(f"no path given: type a folder inside {allowed}")
    if "\x00" in text:
        raise PathError(f"the path {text!r} contains a NUL character; type a plain path")
    raw = _strip(text)
    try:
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = Path(roots[0]).expanduser() / path
        real = path.resolve(strict=False)
        real_roots = [Path(r).expanduser().resolve(strict=False) for r in roots]
    except (OSError, RuntimeError, ValueError) as e:   # symlink loops, bad ~user, ...
        raise PathError(f"cannot resolve the path '{raw}' ({e})") from e
    if any(real == root or real.is_relative_to(root) for root in real_roots):
        return real
    if _inside_by_identity(real, real_roots):
        return real
    shown = f"'{raw}'" + (f" (which leads to {real})" if str(real) != raw else "")
    raise PathError(f"the path {shown} is outside the folders the studio may use: {allowed}. "
                    f"Move the files into the workspace, or restart the studio with "
                    f"--allow-dir FOLDER")


def _inside_by_identity(path: Path, roots: Sequence[Path]) -> bool:
    """Whether an existing folder on the way to `path` is one of `roots` itself (the same
    file on disk), though the names differ: a path typed in other letter case on a
    case-insensitive disk (macOS), which resolving leaves as typed. On a case-sensitive
    disk the two names are two folders, and this says no."""
    roots = [r for r in roots if r.exists()]
    for folder in (path, *path.parents):
        try:
            if folder.exists() and any(os.path.samefile(folder, r) for r in roots):
                return True
        except (OSError, ValueError):
            return False
    return False


def names_local_path(text: str, bases: Iterable[Path]) -> bool:
    """Whether a `name_or_path` setting names a local folder rather than a hub id: it
    starts like a path ('.', '/', '~', a drive), holds a backslash or more than the one
    '/' of 'owner/name', or exists relative to one of `bases` (the folders a program
    reading it may run in). A hub id such as 'Qwen/Qwen3-0.6B' that exists in none of
    them stays a hub id."""
    name = _strip(text) if isinstance(text, str) else ""
    if not name:
        return False
    if (name.startswith((".", "/", "~")) or "\\" in name or "\x00" in name
            or name.count("/") > 1 or PurePath(name).anchor or PureWindowsPath(name).anchor):
        return True
    for base in bases:
        try:
            if (Path(base) / name).exists():
                return True
        except (OSError, ValueError):
            return True
    return False


def safe_name(text: str) -> str:
    """`text` without surrounding blanks when it is a plain file name: letters, digits,
    '-', '_' and '.', no dot first or last, not a Windows device name, at most 80
    characters; else PathError."""
    name = text.strip() if isinstance(text, str) else ""
    if not name:
        raise PathError("no name given: use letters, digits, '-', '_' and '.'")
    if len(name) > NAME_MAX:
        raise PathError(f"the name '{name[:NAME_MAX]}...' is {len(name)} characters long; "
                        f"the most is {NAME_MAX}")
    if not _NAME.fullmatch(name):
        bad = sorted({c for c in name if not _NAME.fullmatch(c)})
        raise PathError(f"the name {name!r} contains {' '.join(repr(c) for c in bad)}; "
                        f"use only letters, digits, '-', '_' and '.'")
    if name.startswith("."):
        raise PathError(f"the name '{name}' starts with a dot (a hidden file); start it "
                        f"with a letter or digit")
    if name.endswith("."):
        raise PathError(f"the name '{name}' ends with a dot, which Windows drops; end it "
                        f"with a letter or digit")
    if name.split(".")[0].upper() in _WINDOWS_RESERVED:
        raise PathError(f"the name '{name}' is reserved for a device on Windows; choose "
                        f"another")
    return name
