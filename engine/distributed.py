"""Several processes (torchrun, DDP): which rank this is, the device it trains on, and
the few collective operations the training loop needs so that every rank takes the
same decisions (stop, skip a batch) and the replicas stay identical."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


class DeviceError(RuntimeError):
    """The requested device is not available."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_device(name: str | None) -> tuple[Dist, torch.device]:
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
             int(os.environ.get("LOCAL_RANK", 0)))
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA GPU is visible to PyTorch (torch "
                             f"{torch.__version__}); use --device cpu or install a CUDA build")
        index = d.local_rank if d.world > 1 else (torch.device(name).index or 0)
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device(name)
    if d.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def broadcast_flags(d: Dist, flags: list[bool]) -> list[bool]:
    if d.world == 1:
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.int64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, 0)
    return [bool(v) for v in t.tolist()]


def mean_over_ranks(d: Dist, value: float, device: torch.device) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t) / d.world


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
        raise DeviceError(f"DDP ranks are out of sync (parameter checksums {values}); the run "
                         f"cannot continue safely")
    log(f"{d.world} ranks in sync (parameter checksum {values[0]:.6f})")


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()
