"""Processes and devices: where this rank sits, and the collectives the loop needs.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run is a single
process, no process group is created, and the communication helpers here degrade
to no-ops, so the training loop has one code path from a laptop to a cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from bytemtp.errors import BytemtpError


@dataclass
class DistEnv:
    """Where this process sits: its rank among ``world_size`` and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we created the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(flag: str | torch.device, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU if there is one, else the CPU; a bare ``cuda`` gets the local rank."""
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise BytemtpError(f"--device: {flag!r} is not a device (try cpu, cuda, cuda:1 or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BytemtpError(f"--device: {flag!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_flag: str) -> DistEnv:
    """Join the torchrun process group if there is one (NCCL on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_flag, local_rank)
    if world_size == 1:
        return DistEnv(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world_size, local_rank, device, owns)


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, env: DistEnv, op: str = "avg") -> torch.Tensor:
    """``t`` reduced over ranks (``avg`` or ``max``); ``t`` itself when single-process."""
    if not env.distributed:
        return t
    t = t.clone()
    if op == "avg":
        dist.all_reduce(t, dist.ReduceOp.SUM)
        return t / env.world_size
    dist.all_reduce(t, dist.ReduceOp.MAX)
    return t


def gather_to_main(obj: Any, env: DistEnv) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere)."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any, env: DistEnv) -> Any:
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
