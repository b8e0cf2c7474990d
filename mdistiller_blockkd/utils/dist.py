"""Distributed-training helpers (``torchrun`` / ``python -m torch.distributed.run``).

A run is distributed when the ``WORLD_SIZE`` environment variable (set by torchrun,
with ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) is above 1.
:func:`init_distributed` then starts the default process group -- NCCL with one CUDA
device per process (``cuda:LOCAL_RANK``) when CUDA is available, Gloo on CPUs
otherwise. Every helper here is a no-op (or the obvious single-process answer) when no
process group is running, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

__all__ = [
    "DistInfo",
    "init_distributed",
    "is_dist",
    "get_rank",
    "get_world_size",
    "is_main",
    "all_reduce_sum",
    "all_reduce_max",
    "all_gather_object",
    "broadcast_buffers",
    "barrier",
    "cleanup",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that logs and writes files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name} is '{raw}'; it must be an integer (set by torchrun)") from None


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Read torchrun's variables, start the process group when ``WORLD_SIZE > 1``, pick the device.

    Device: ``cuda:LOCAL_RANK`` when CUDA is available (that device is made current),
    else ``cpu``; a process that sees one GPU while ``CUDA_VISIBLE_DEVICES`` is set (its
    launcher gave it that GPU, e.g. Slurm ``--gpus-per-task=1``) uses ``cuda:0`` whatever
    its ``LOCAL_RANK``. Backend: ``nccl`` on CUDA, ``gloo`` on CPU. A process group that
    is already running is reused.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent; launch with torchrun")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        one_each = count == 1 and os.environ.get("CUDA_VISIBLE_DEVICES", "") != ""
        if local >= count and not one_each:
            raise ConfigError(
                f"LOCAL_RANK is {local} but only {count} CUDA device(s) are visible; "
                f"use --nproc_per_node {count} or fewer, or give each process its own GPU (CUDA_VISIBLE_DEVICES, "
                "Slurm --gpus-per-task=1)"
            )
        device = torch.device("cuda", 0 if one_each else local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def is_dist() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0."""
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it (unchanged with one process)."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all processes, in place; returns it."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_object(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` with one process)."""
    if not is_dist():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy every floating / integer buffer (BatchNorm statistics, ...) of ``module`` from rank ``src``.

    DDP broadcasts buffers at the start of each forward, so after the last training step
    ranks hold slightly different BatchNorm statistics; calling this before evaluation
    makes every rank evaluate (and rank 0 save) the same model.
    """
    if not is_dist():
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=src)


def barrier() -> None:
    """Wait for every process (no-op with one process)."""
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one is running."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
