"""Several processes (torchrun, DDP): which rank this is, the device it trains on, and
the few collective operations the training loop needs so that every rank takes the
same decisions (stop, skip a batch) and the replicas stay identical."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from engine.attention import gpu_capability, note_gpu_capabilities, pre_ampere


class DeviceError(ValueError):
    """The requested device is not a device name or is not available."""


class RankSyncError(RuntimeError):
    """DDP replicas hold different weights."""


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device a name means: None, '' or 'auto' is the GPU when PyTorch sees one, else
    the CPU; anything else must name a device that is there. Returning a CUDA device
    also lets fp32 matmuls and convolutions there run on TF32 tensor cores (see
    `allow_tf32`); returning the CPU keeps freed memory for reuse (`reuse_freed_memory`)."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"device {name!r} is not a device name (use cpu, cuda or cuda:N)") from e
    if device.type not in ("cpu", "cuda"):   # mps, xpu, meta ...: paths never tried here
        raise DeviceError(f"device {name!r}: PixelHDM trains and generates on cpu or cuda "
                          f"(an NVIDIA GPU); on a Mac use cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r}: no CUDA GPU is visible to PyTorch (torch "
                          f"{torch.__version__}); use cpu, or install a CUDA build of torch")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) visible")
    if device.type == "cuda":
        allow_tf32()
        note_gpu_capabilities()
    else:
        reuse_freed_memory()
    return device


def compiler_problem(device: torch.device) -> str:
    """Why torch.compile cannot run on `device` here ('' when it can): compiles and runs a
    one-line function, so a missing C++ compiler (CPU: e.g. Windows without MSVC) or
    Triton (CUDA) is found before training starts rather than in its first step."""
    try:
        fn = torch.compile(lambda x: x * 2.0 + 1.0, fullgraph=True)
        fn(torch.ones(8, device=device))
    except Exception as e:   # any backend failure means: run eager
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first[:200]}"
    finally:
        torch._dynamo.reset()
    return ""


def allow_tf32() -> None:
    """fp32 matmuls and convolutions on CUDA through TF32 (fp32 range, 10-bit mantissa
    inputs, fp32 accumulation): several times the fp32 throughput on every GPU since
    Ampere. Mixed-precision presets are unaffected; fp32 parts (norms, losses) keep
    their fp32 elementwise math. Angles of the rotary embedding never go through a
    matmul (engine/attention.py), so they keep full precision."""
    # through the API that keeps the legacy flags in step: set through the per-backend flags
    # alone, torch.get_float32_matmul_precision() and torch.backends.cuda.matmul.allow_tf32
    # raise ("a mix of the legacy and new APIs"), and Inductor's autotuning and other
    # libraries read them. The CPU's oneDNN matmuls keep their own precision.
    cpu = torch.backends.mkldnn.matmul.fp32_precision
    torch.set_float32_matmul_precision("high")
    torch.backends.mkldnn.matmul.fp32_precision = cpu
    torch.backends.cudnn.conv.fp32_precision = "tf32"


# glibc's mallopt parameters, and the values the CPU paths use: blocks up to 32 MiB (glibc's
# largest threshold) come from the heap, and up to 1 GiB of freed heap is kept for reuse
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20
_TRIM_THRESHOLD = 1 << 30
_reuse_state: bool | None = None


def _glibc():
    """The C library when it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        _ = libc.mallopt, libc.malloc_trim   # both glibc's; musl has no malloc_trim
    except (OSError, AttributeError):
        return None
    return libc


def reuse_freed_memory() -> bool:
    """Let glibc keep the memory of freed tensors for the next step's tensors (Linux; a
    no-op elsewhere). By default it maps every large tensor afresh and unmaps it when
    freed, so each training step page-faults its activations in again: about 50 MB and
    12,000 faults per pixel block at 64x64 on `tiny-cpu`, a tenth of the step's time.
    A long-lived process calls `release_memory` after dropping a model.
    Idempotent; returns whether the setting took."""
    global _reuse_state
    if _reuse_state is None:
        libc = _glibc()
        _reuse_state = bool(libc is not None
                            and libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                            and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _reuse_state


def release_memory(device: torch.device | None = None) -> None:
    """Give back what freed tensors held, after dropping a model or between measurements:
    collect garbage, empty the CUDA cache (of `device`; with None, whenever CUDA is
    there) and hand the freed heap back to the system (glibc's malloc_trim; with
    `reuse_freed_memory` in effect a dropped model's memory stays with the process
    otherwise: 1.4 GB for `pixelhdm-default`)."""
    gc.collect()
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB, since it started or since the last
    reset_peak_memory on Linux; 0 where the system does not say (Windows)."""
    try:   # Linux: the high-water mark that reset_peak_memory can start afresh
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0   # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:   # pragma: no cover - Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024.0   # bytes there, KiB


def reset_peak_memory(device: torch.device) -> bool:
    """Start the peak-memory reading afresh: the GPU's allocation peak, or the process's
    resident high-water mark on Linux (elsewhere on the CPU it keeps counting from the
    start, and this returns False). The trainer calls it when setup is over, so that the
    logged peak is the training's, not the text encoder's while it filled the feature
    cache."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")   # 5: reset the peak RSS
    except OSError:
        return False
    return True


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # a gloo group of all ranks for waits that may outlast the process group's timeout
    # (`main_rank_first`); None with one process
    patient: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_device(name: str | None) -> tuple[Dist, torch.device]:
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
             int(os.environ.get("LOCAL_RANK", 0)))
    device = resolve_device(name)
    if device.type == "cuda":
        # under torchrun each rank takes the GPU of its local rank
        if d.world > 1 and d.local_rank >= torch.cuda.device_count():
            raise DeviceError(
                f"torchrun started more processes on this machine than PyTorch sees GPUs "
                f"({torch.cuda.device_count()}; this is local rank {d.local_rank}): set "
                f"--nproc_per_node (the studio: GPUs) to at most {torch.cuda.device_count()}, "
                f"or check CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", d.local_rank if d.world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if d.world > 1 and not dist.is_initialized():
        # rank 0 alone validates, samples (compiling its no-grad blocks the first time) and
        # writes checkpoints while the others wait at the next collective: give that an
        # hour, not NCCL's default of ten minutes, before a waiting rank gives up
        # device_id binds the rank to its GPU from the start: NCCL sets up its communicator
        # for that device at once, and barriers need not guess the device from the rank
        backend = process_group_backend(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=1),
                                device_id=device if backend == "nccl" else None)
    if d.world > 1:
        # rank 0 may encode millions of captions while the others wait: hours, not minutes
        d.patient = dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)
    return d, device


PATIENT_TIMEOUT = datetime.timedelta(days=7)


def process_group_backend(device: torch.device) -> str:
    """NCCL between GPUs where this build of torch has it; gloo on the CPU and on builds
    without NCCL (Windows), whose collectives then go through CPU tensors."""
    return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"


def _collective_device(device: torch.device) -> torch.device:
    """Where a collective's tensor lives: the GPU under NCCL, else the CPU (gloo)."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(d: Dist, flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag set on any rank (a collective call; the flags unchanged with one rank)."""
    if d.world == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], dtype=torch.float64)
    t = t.to(_collective_device(device))
    dist.all_reduce(t)
    return [v > 0 for v in t.tolist()]


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """A CPU tensor on `device`. To a GPU through pinned memory, without waiting: for a copy
    from ordinary (pageable) memory CUDA may first drain the stream to stage it (its API
    synchronization notes), which at a stochastic sampler's every step (fresh noise) or a
    training step's every micro-batch (prompts) would keep the host from preparing the
    next while the GPU computes."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def sum_over_ranks(d: Dist, t: Tensor) -> Tensor:
    """The elementwise sum of `t` over the ranks, on `t`'s device (a collective call)."""
    if d.world == 1:
        return t
    on = t.to(_collective_device(t.device))
    dist.all_reduce(on)
    return on.to(t.device)


def read_step(d: Dist, loss: Tensor, norm: Tensor,
              flags: list[bool]) -> tuple[float, float, list[bool]]:
    """A training step's one read from the device: the loss and the gradient norm averaged
    over the ranks, and each flag set on any rank (rank 0's requests from the studio, any
    rank's stop signal), through one collective and one transfer. The norm of the
    all-reduced gradients is the same on every rank but for rounding (GPUs of two kinds):
    averaged, every rank clips, and takes or skips the step, alike. The flags are written
    into the collective's tensor on the device, so no host-to-device copy waits for the
    queue either."""
    if d.world == 1:
        loss_v, norm_v = read_scalars(loss, norm)
        return loss_v, norm_v, list(flags)
    t = torch.zeros(2 + len(flags), dtype=torch.float64,
                    device=_collective_device(loss.device))
    t[0], t[1] = loss.detach(), norm.detach()
    for i, flag in enumerate(flags):
        if flag:
            t[2 + i] = 1.0   # a fill on the device, not a copy from the host
    dist.all_reduce(t)
    loss_v, norm_v, *flag_v = read_scalars(t)
    return loss_v / d.world, norm_v / d.world, [v > 0 for v in flag_v]


def read_scalars(*values: Tensor) -> list[float]:
    """The elements of tensors (scalars or vectors) as Python floats, in one transfer
    from the device."""
    return torch.cat([v.detach().double().reshape(-1) for v in values]).tolist()


@contextlib.contextmanager
def main_rank_first(d: Dist):
    """Rank 0 runs the block while the other ranks wait; then they run it: what rank 0
    built once (the text features' disk cache, the dataset's index) the others find
    there, without loading what builds it. The wait is a barrier of the `patient` group,
    whose timeout is days: filling the cache for a large dataset takes hours. (A rank
    that fails ends the others through torchrun.)"""
    if d.world > 1 and not d.main:
        dist.barrier(group=d.patient)
    yield
    if d.world > 1 and d.main:
        dist.barrier(group=d.patient)


def check_ranks_in_sync(d: Dist, model: nn.Module, log) -> None:
    """DDP keeps replicas identical; verify it before each checkpoint (a mismatch would
    otherwise be saved silently from rank 0)."""
    if d.world == 1:
        return
    with torch.no_grad():
        local = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    backend_device = local.device if dist.get_backend() == "nccl" else "cpu"
    gathered = [torch.zeros((), dtype=torch.float64, device=backend_device) for _ in range(d.world)]
    dist.all_gather(gathered, local.to(backend_device))
    values = [float(g) for g in gathered]
    if max(values) - min(values) > 1e-6 * max(1.0, abs(values[0])):
        raise RankSyncError(f"DDP ranks are out of sync (parameter checksums {values}); the run "
                         f"cannot continue safely")
    log(f"{d.world} ranks in sync (parameter checksum {values[0]:.6f})")


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def _gather(d: Dist, t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of a CPU tensor of the same shape on all ranks."""
    if d.world == 1:
        return [t]
    on = "cuda" if dist.get_backend() == "nccl" else "cpu"
    parts = [torch.empty_like(t, device=on) for _ in range(d.world)]
    dist.all_gather(parts, t.to(on))
    return [p.cpu() for p in parts]


def gather_rng_states(d: Dist, gen: torch.Generator, device: torch.device,
                      host: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The random states every rank draws from (the global CPU one, the rank's noise
    generator, its CPU generator for host-side draws where the noise one is a GPU's, and
    its CUDA one), keyed `rng.<name>.<rank>`: a collective call."""
    mine = {"torch": torch.get_rng_state(), "noise": gen.get_state()}
    if host is not None:
        mine["host"] = host.get_state()
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    out = {}
    for name, state in mine.items():
        for rank, part in enumerate(_gather(d, state)):
            out[f"rng.{name}.{rank}"] = part
    return out


def restore_rng_states(d: Dist, gen: torch.Generator, device: torch.device,
                       tensors: dict[str, torch.Tensor],
                       host: torch.Generator | None = None) -> str:
    """Set this rank's random states from a checkpoint: '' when done, else why they
    cannot be (the caller seeds afresh). A checkpoint of another device type holds a
    noise state of another size (a CPU generator's state is 5056 bytes, a GPU's 16)."""
    noise = tensors.get(f"rng.noise.{d.rank}")
    if noise is None:
        return f"no random state saved for rank {d.rank} (the number of processes changed)"
    if noise.numel() != gen.get_state().numel():
        return (f"the checkpoint's random state is from another kind of device than this "
                f"run's {device.type}")
    torch.set_rng_state(tensors[f"rng.torch.{d.rank}"])
    gen.set_state(noise)
    saved_host = tensors.get(f"rng.host.{d.rank}")
    if host is not None and saved_host is not None:
        host.set_state(saved_host)
    if device.type == "cuda" and f"rng.cuda.{d.rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.cuda.{d.rank}"], device)
    return ""


# --------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------

# The config's precision names (train.precision, generation dtypes) as torch dtypes.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_half(precision: str) -> bool | None:
    """Whether this CPU computes `precision` (bf16 / fp16) in hardware: oneDNN's own test
    (bf16: AVX-512 or AMX; fp16: AVX-512 FP16 or AMX). None where PyTorch has no oneDNN
    to ask."""
    test = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[precision]
    try:
        return bool(getattr(torch.ops.mkldnn, test)())
    except (AttributeError, RuntimeError):
        return None


def compute_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """The precision to compute in for a requested one on `device`, and why it differs
    ('' when it does not). A CPU without bf16 / fp16 arithmetic would emulate it: the
    `pixelhdm-default` network benchmark at 256x256 took over 600 s in bf16 against 62 s
    in fp32 on such a CPU, so there fp32 is used instead. Where the CPU has it, bf16
    trains that network 1.8x faster than fp32."""
    if device.type == "cuda" and precision == "bf16" and pre_ampere(device):
        major, minor = gpu_capability(device)
        return "fp16", (f"this GPU (compute capability {major}.{minor}) has no bf16 "
                        f"arithmetic, which needs an Ampere or newer GPU (8.0 and up), so it "
                        f"computes in fp16 with a gradient scaler")
    if device.type != "cpu" or precision == "fp32" or native_half(precision) is not False:
        return precision, ""
    needs = {"bf16": "AVX-512 or AMX", "fp16": "AVX-512 FP16 or AMX"}[precision]
    return "fp32", (f"this CPU has no {precision} arithmetic (it needs {needs}), so it "
                    f"would be emulated, over 10x slower than fp32")


def frozen_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype the frozen encoders (Qwen3, DINOv3) run in for the network's: the same,
    except fp16, whose range (up to 65504) the outlier activations of large
    pretrained transformers can exceed. They run in fp32 then: the text encoder only
    once, to fill the feature cache, before it is unloaded."""
    return torch.float32 if compute == torch.float16 else compute


def autocast_for(precision: str, device: torch.device):
    """Mixed precision for a config's train.precision on `device` (fp32: none)."""
    return autocast_to(PRECISIONS[precision], device)


def autocast_to(dtype: torch.dtype | None, device: torch.device):
    """Mixed precision in `dtype` on `device` (None or float32: none)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)

