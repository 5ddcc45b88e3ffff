"""What this machine offers PixelHDM Studio, printed one row per fact; changes nothing.

    python engine/doctor.py          (what `./launch.sh doctor` and `launch.bat doctor` run)

Standard library only, so it also runs before the environment is installed; torch and the
GPU extras are reported when they are importable.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import socket
import sys
from pathlib import Path

PY_RANGE = ((3, 11), (3, 14))   # launch.sh PY_MIN/PY_MAX, launch.bat PY_OK
WINDOWS = os.name == "nt"
LAUNCHER = "launch.bat" if WINDOWS else "./launch.sh"


def rows() -> list[tuple[str, str]]:
    out = []
    lo, hi = PY_RANGE
    ok = lo <= sys.version_info[:2] <= hi
    out.append(("Python", f"{sys.version.split()[0]} ({sys.executable})"
                + ("" if ok else f": needs 3.{lo[1]} to 3.{hi[1]}")))
    try:
        import torch
    except ImportError:
        out.append(("torch", f"not installed ({LAUNCHER} installs it)"))
    else:
        cuda = torch.cuda.is_available()
        out.append(("torch", f"{torch.__version__}, CUDA available: {cuda}"))
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append((f"GPU {i}", f"{torch.cuda.get_device_name(i)}, {total / 2**30:.1f} "
                                    f"GiB, {free / 2**30:.1f} GiB free"))
        if not cuda:
            out.append(("training", "CPU only: the tiny-cpu preset; the home-* presets need an "
                                    "NVIDIA GPU"))
        # oneDNN's own test, as engine.distributed.native_half (this script runs standalone)
        try:
            bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            bf16 = None
        out.append(("CPU bf16", "unknown (PyTorch has no oneDNN here)" if bf16 is None else
                    "native: train.precision=bf16 trains large networks on the CPU about 1.8x "
                    "faster than fp32" if bf16 else
                    "none (it needs AVX-512 or AMX): bf16 would be emulated, so CPU training "
                    "and generation use fp32"))
        out.append(("DDP backend", "nccl" if cuda and not WINDOWS else "gloo"
                    + (" (Windows has no NCCL)" if WINDOWS else "")))
    for name in ("flash_attn", "bitsandbytes"):
        found = importlib.util.find_spec(name) is not None
        out.append((name, "installed" if found else
                    "not installed (optional, see requirements-gpu.txt)"))
    compilers = ("cl",) if WINDOWS else ("cc", "gcc", "clang")
    found = next((c for c in compilers if shutil.which(c)), None)
    out.append(("C compiler", f"{found} (torch.compile can run)" if found else
                "none found: train.compile falls back to uncompiled training"
                + (" (install Visual Studio Build Tools to compile)" if WINDOWS else "")))
    ws = Path("workspace")
    probe = ws if ws.exists() else Path(".")
    out.append(("disk", f"{shutil.disk_usage(probe).free / 2**30:.1f} GiB free in "
                        f"{probe.resolve()}"))
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 7860))
            out.append(("port 7860", "free"))
        except OSError:
            out.append(("port 7860", f"in use (start with {LAUNCHER} --port 7861)"))
    out.append(("system", platform.platform()))
    return out


def main() -> int:
    for label, text in rows():
        print(f"{label:<14}{text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
