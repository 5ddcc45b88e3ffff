"""Run the trainer CLI with one fault injected, for the fault tests:

    python tests/faultinject.py MODE ARG -- <engine.train arguments>

The process SIGKILLs itself at the chosen moment, so nothing in it gets to clean up:
    timer SECONDS          that long after training setup begins (a random moment)
    after-step N           right after the metrics line of step N is written
    mid-metrics N          halfway through writing the metrics line of step N
    mid-write GLOB         halfway through writing the first checkpoint file whose name
                           matches GLOB (its temporary file holds half the bytes)
    before-rename GLOB     with the first weights file matching GLOB complete but not yet
                           in place (its state file already is)
A full disk instead of a kill:
    disk-full GLOB[@N]     the first write of a file matching GLOB (a checkpoint file or a
                           sample grid: after half its bytes) fails with ENOSPC; for
                           metrics.jsonl, the line of step N
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal
import sys
import threading
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _named(path, pattern: str) -> bool:
    """Whether `path`, or the file that the temporary file `path` will become, matches."""
    name = Path(path).name
    if name.startswith("."):   # atomic_target's ".<name>.<random>"
        name = name[1:].rsplit(".", 1)[0]
    return fnmatch.fnmatch(name, pattern)


def _half_then(path, fault) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    fault()


def _full() -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _patch(module, name: str, value) -> None:
    """Replace `name` in `module`, which must use it: a name moved to another module would
    leave the fault unarmed and its test failing for the wrong reason."""
    if not hasattr(module, name):
        raise SystemExit(f"faultinject: {module.__name__} has no {name} to replace")
    setattr(module, name, value)


def install(mode: str, arg: str) -> None:
    import engine.checkpoint as ckpt
    import engine.job as job
    import engine.sample_grid as sample_grid
    import engine.train as train

    if mode == "timer":
        real_train = train._train

        def armed(*a, **k):
            threading.Timer(float(arg), die).start()
            return real_train(*a, **k)
        train._train = armed

    elif mode in ("after-step", "mid-metrics"):
        real_append = job.append_line

        def append(path, line):
            if f'"step":{arg},' in line and '"loss"' in line:
                if mode == "mid-metrics":
                    with open(path, "a", encoding="utf-8") as f:
                        f.write(line[: len(line) // 2])
                    die()
                real_append(path, line)
                die()
            real_append(path, line)
        job.append_line = append

    elif mode == "mid-write":
        real_save = ckpt.save_file
        fired = []

        def save(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)
            if _named(filename, arg) and not fired:
                fired.append(filename)
                _half_then(filename, die)
        ckpt.save_file = save

    elif mode == "disk-full":   # checkpoint files, sample grids (atomic) and metrics lines
        import contextlib

        import engine.fileio as fileio
        real_target, real_append = fileio.atomic_target, job.append_line
        arg, _, at_step = arg.partition("@")
        fired = []

        @contextlib.contextmanager
        def target(path, needed=0, **kwargs):
            with real_target(path, needed, **kwargs) as tmp:
                yield tmp
                if _named(path, arg) and not fired:
                    fired.append(path)
                    _half_then(tmp, _full)
        for module in (ckpt, sample_grid):   # the modules that write checkpoints and grids
            _patch(module, "atomic_target", target)

        def append(path, line):   # (append_line's own undo of a partial line: unit-tested)
            if _named(path, arg) and f'"step":{at_step},' in line and not fired:
                fired.append(path)
                raise fileio.DiskFull(Path(path), 0, len(line))
            real_append(path, line)
        job.append_line = append

    elif mode == "before-rename":
        import engine.fileio as fileio
        real_replace = os.replace

        def replace(src, dst):
            if _named(dst, arg):
                die()
            real_replace(src, dst)
        fileio.os = types.SimpleNamespace(**{**vars(os), "replace": replace})
    else:
        raise SystemExit(f"unknown fault {mode!r}")


def main() -> int:
    mode, arg, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: faultinject.py MODE ARG -- <engine.train arguments>"
    install(mode, arg)
    from engine.train import main as train_main
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
