"""Files written so that nothing is ever half-written, and a full disk is named as such.

Every file the engine writes goes through `atomic_target`: the bytes go to a temporary
file beside the target, which replaces the target in one `os.replace` only when complete.
A write that fails (a full disk, a kill) leaves the previous version untouched and the
temporary file deleted. When a write fails because the disk is full, `DiskFull` says which
disk, how much is free and about how much the write needed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# errors a full disk or an exhausted quota raise
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# how libraries that do their own I/O (safetensors, PIL's encoders) word the same error
_FULL_WORDS = ("no space left", "storagefull", "disk quota exceeded", "os error 28")


class DiskFull(OSError):
    """A write failed because the disk holding `path` is full."""

    def __init__(self, path: Path, free: int, needed: int):
        self.path, self.free, self.needed = Path(path), free, needed
        need = f"; it needs about {format_bytes(needed)}" if needed else ""
        super().__init__(errno.ENOSPC,
                         f"the disk holding {self.path.parent} is full "
                         f"({format_bytes(free)} free) while writing {self.path.name}{need}: "
                         "free space on that disk, then resume the run")

    def __str__(self) -> str:
        return self.strerror


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"   # pragma: no cover


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk holding `folder` (its nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, DiskFull):
        return True
    if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
        return True
    text = str(err).lower().replace(" ", "")
    return any(w.replace(" ", "") in text for w in _FULL_WORDS)


def ensure_free(path: Path, needed: int) -> None:
    """Refuse a write of about `needed` bytes to `path` before starting it, when the disk
    visibly cannot hold it (the check leaves a 1% / 16 MB margin for everything else)."""
    free = free_bytes(Path(path).parent)
    if needed + max(16 << 20, needed // 100) > free:
        raise DiskFull(path, free, needed)


_WINDOWS = os.name == "nt"
REPLACE_TRIES, REPLACE_WAIT_S = 40, 0.05


def replace(src: str | Path, dst: str | Path) -> None:
    """os.replace. On Windows a file that another process has open (the studio reading a
    run's status.json every two seconds, the trainer reading a request, a virus scanner)
    cannot be replaced: PermissionError until it is closed, a few milliseconds later.
    There the replace is tried again for up to two seconds before the error stands."""
    tries = REPLACE_TRIES if _WINDOWS else 1
    for attempt in range(1, tries + 1):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if attempt == tries:
                raise
            time.sleep(REPLACE_WAIT_S)


def readable_output() -> None:
    """Let the command lines print any file name or caption: where standard output is a
    file or a pipe on Windows (cp1252, strict), a character it cannot encode is written
    as an escape instead of stopping the command with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):   # replaced, or closed
            stream.reconfigure(errors="backslashreplace")


def _import_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _import_umask()


def file_mode() -> int:
    """The mode a plainly created file gets (0o666 less the process's umask, usually
    0o644): temporary files are created private (0o600), and what replaces a target must
    be readable as any file the user writes. Read where the system shows the umask
    without changing it (Linux), else as it was at import."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o666 & ~_UMASK_AT_IMPORT


@contextlib.contextmanager
def atomic_target(path: Path, needed: int = 0, durable: bool = False):
    """Yield a temporary path beside `path`; on success it replaces `path` in one
    os.replace, on any error it is deleted. Readers never see a half-written file. A
    failure caused by a full disk is raised as `DiskFull` (`needed`: the expected size).
    `durable`: the file's bytes reach the disk before it replaces `path`, and the rename
    after (a power cut then leaves the old file or the whole new one, never an empty
    one): for files whose loss costs hours, such as checkpoints, before older ones are
    deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(path, free_bytes(path.parent), needed) from e
        raise
    os.close(fd)
    try:
        yield Path(tmp)
        # as written (a writer may have made the file anew); a file system without modes
        # (FAT, some mounts) keeps its own
        with contextlib.suppress(OSError):
            os.chmod(tmp, file_mode())
        if durable:
            with open(tmp, "r+b") as f:
                os.fsync(f.fileno())
        replace(tmp, path)
        if durable:
            sync_folder(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not isinstance(e, DiskFull) and isinstance(e, Exception) and is_disk_full(e):
            raise DiskFull(path, free_bytes(path.parent), needed) from e
        raise


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk, where the system allows it
    (POSIX; Windows has no handle on a folder for it, and its renames are journaled)."""
    if os.name == "nt":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (flushed to disk before it replaces the old one)."""
    data = text.encode("utf-8")
    with atomic_target(path, len(data)) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def append_line(path: Path, line: str) -> None:
    """Append one line to a log-like file. A line cut short earlier (a kill or a full disk
    in the middle of a write) is closed first, so it never swallows this one; a write that
    fails is taken back, so the file only ever holds whole lines."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    # unbuffered: a buffered file would keep the bytes a full disk refused, and write them
    # again when it truncates and when it closes, which then fail and leave half a line
    with open(path, "a+b", buffering=0) as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                data = b"\n" + data
        try:
            view = memoryview(data)
            while view:   # a write may take part of the bytes, and fail on the rest
                view = view[f.write(view):]
        except OSError as e:
            with contextlib.suppress(OSError):
                f.truncate(end)
            if is_disk_full(e):
                raise DiskFull(Path(path), free_bytes(Path(path).parent), len(data)) from e
            raise


_HASHES: dict[tuple, str] = {}


def file_hash(path: Path) -> str:
    """First 10 hex digits of the file's SHA-256 (the usual "Model hash"), cached."""
    st = Path(path).stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()[:10]
    return _HASHES[key]
