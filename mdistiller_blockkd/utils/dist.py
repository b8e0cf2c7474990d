"""Distributed-training helpers (``torchrun`` on one or several nodes, or Slurm's ``srun``).

Where a process stands (:func:`launch_env`):

* under ``torchrun`` (or any launcher that sets ``WORLD_SIZE``): ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, and ``MASTER_ADDR`` / ``MASTER_PORT`` (or torchrun's c10d rendezvous, also
  across nodes: ``torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT``);
* in an ``srun`` step without torchrun (``SLURM_STEP_ID`` set; one process per task): rank
  ``SLURM_PROCID`` of ``SLURM_NTASKS``, local rank ``SLURM_LOCALID``; the master is the first
  host of ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``; expanded by ``scontrol show
  hostnames`` when it works, else by :func:`expand_nodelist`) unless ``MASTER_ADDR`` is set,
  on port ``MASTER_PORT`` when set, else ``20000 + crc32("<job id>.<step id>") % 10000`` (the
  same on every task of the step, different for another job). A batch script itself (no step)
  is one process, whatever its ``--ntasks``.

A run is distributed when the world size is above 1. :func:`init_distributed` then starts the
default process group -- NCCL with one CUDA device per process (``cuda:LOCAL_RANK``, or
``cuda:0`` when the launcher gave each process one GPU) when CUDA is available, Gloo on
CPUs otherwise. Every helper here is a no-op (or the obvious single-process answer) when no
process group is running, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

__all__ = [
    "DistInfo",
    "LaunchEnv",
    "launch_env",
    "expand_nodelist",
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


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher says about this process (:func:`launch_env`); ``init_method`` is None for
    torchrun's ``env://`` (torch reads the variables itself), ``tcp://MASTER:PORT`` under srun."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "srun" or "none"
    init_method: Optional[str] = None


def _env_int(env: Mapping[str, str], name: str, default: int, by: str = "torchrun") -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name} is '{raw}'; it must be an integer (set by {by})") from None


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str) -> List[str]:
    """``text`` split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def expand_nodelist(nodelist: str) -> List[str]:
    """The hosts of a Slurm node list: ``host``, ``host[1-3,5]``, ``gpu[01-02],cpu7``, ``r[1-2]-n[3-4]``
    (zero padding kept); :class:`ConfigError` for a list it cannot read."""
    hosts: List[str] = []
    for item in _split_top(nodelist.strip()):
        found = re.search(r"\[([^\[\]]*)\]", item)
        if not item or item.count("[") != item.count("]") or (found is None and "[" in item):
            raise ConfigError(f"the Slurm node list '{nodelist}' cannot be read; set MASTER_ADDR to the first node's "
                              "host name")
        if found is None:
            hosts.append(item)
            continue
        head, tail = item[:found.start()], item[found.end():]
        for part in found.group(1).split(","):
            m = _RANGE.match(part.strip())
            if m is None:
                raise ConfigError(f"the Slurm node list '{nodelist}' has the range '{part}'; set MASTER_ADDR to the "
                                  "first node's host name")
            low, high = m.group(1), m.group(2) or m.group(1)
            for k in range(int(low), int(high) + 1):
                hosts += expand_nodelist(f"{head}{k:0{len(low)}d}{tail}")
    return hosts


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: by ``scontrol show hostnames`` when it answers, else
    :func:`expand_nodelist`."""
    if shutil.which("scontrol"):
        try:
            r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
            if r.returncode == 0 and r.stdout.split():
                return r.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return expand_nodelist(nodelist)[0]


def launch_env(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Rank, world size, local rank and rendezvous of this process from ``env`` (default ``os.environ``):
    torchrun's variables when ``WORLD_SIZE`` is set, else an srun step's (see the module docstring)."""
    env = os.environ if env is None else env
    if env.get("WORLD_SIZE", "") != "" or env.get("SLURM_STEP_ID", "") == "":
        world = _env_int(env, "WORLD_SIZE", 1)
        launcher = "torchrun" if "WORLD_SIZE" in env else "none"
        return LaunchEnv(_env_int(env, "RANK", 0), world, _env_int(env, "LOCAL_RANK", 0), launcher)
    rank = _env_int(env, "SLURM_PROCID", 0, "srun")
    world = _env_int(env, "SLURM_NTASKS", 1, "srun")
    local = _env_int(env, "SLURM_LOCALID", 0, "srun")
    if world <= 1:
        return LaunchEnv(rank, world, local, "srun")
    addr = env.get("MASTER_ADDR", "")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ConfigError("srun started this process without a node list (SLURM_STEP_NODELIST, "
                              "SLURM_JOB_NODELIST); set MASTER_ADDR to the host of task 0")
        addr = _first_host(nodelist)
    if env.get("MASTER_PORT", "") != "":
        port = _env_int(env, "MASTER_PORT", 0, "you")
    else:
        port = 20000 + zlib.crc32(f"{env.get('SLURM_JOB_ID', '')}.{env.get('SLURM_STEP_ID', '')}".encode()) % 10000
    if not 0 < port < 65536:
        raise ConfigError(f"MASTER_PORT is {port}; give a free TCP port between 1 and 65535")
    host = f"[{addr}]" if ":" in addr else addr
    return LaunchEnv(rank, world, local, "srun", f"tcp://{host}:{port}")


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Read the launcher's variables (:func:`launch_env`), start the process group when the world
    size is above 1, pick the device.

    Device: ``cuda:LOCAL_RANK`` (``SLURM_LOCALID`` under srun) when CUDA is available (that device is made current),
    else ``cpu``; a process that sees one GPU while ``CUDA_VISIBLE_DEVICES`` is set (its
    launcher gave it that GPU, e.g. Slurm ``--gpus-per-task=1``) uses ``cuda:0`` whatever
    its ``LOCAL_RANK``. Backend: ``nccl`` on CUDA, ``gloo`` on CPU. A process group that
    is already running is reused.
    """
    launch = launch_env()
    world, rank, local = launch.world_size, launch.rank, launch.local_rank
    if world < 1 or not 0 <= rank < world:
        names = "SLURM_PROCID and SLURM_NTASKS" if launch.launcher == "srun" else "RANK and WORLD_SIZE"
        raise ConfigError(f"{names} are {rank} and {world}, inconsistent; launch with torchrun or srun")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        one_each = count == 1 and os.environ.get("CUDA_VISIBLE_DEVICES", "") != ""
        if local >= count and not one_each:
            raise ConfigError(
                f"{'SLURM_LOCALID' if launch.launcher == 'srun' else 'LOCAL_RANK'} is {local} but only {count} "
                "CUDA device(s) are visible; "
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
        if launch.init_method is not None:  # srun: no torchrun variables
            kwargs.update(init_method=launch.init_method, rank=rank, world_size=world)
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
