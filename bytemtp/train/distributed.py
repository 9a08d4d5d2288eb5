"""Processes, devices and PyTorch's own data-parallel engines (DDP, FSDP2).

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run is a single
process, no process group is created, and the wrapping and communication helpers
here degrade to no-ops, so the training loop has one code path from a laptop to a
cluster.

Checkpoints go through ``torch.distributed.checkpoint.state_dict`` in every mode:
it gathers full (unsharded) weights and optimizer state onto rank 0's CPU, keyed by
parameter name rather than by position, so a checkpoint written under FSDP2 has
the same ``model.safetensors`` as one from a single process, and optimizer state
saved in one mode loads in another. The price is that rank 0 holds one full copy
of the state while saving, which is fine at this project's model sizes.

The engines and the checkpoint API are imported where they are used: together they
take seconds to import, which ``bytemtp eval`` need not pay.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from bytemtp.errors import BytemtpError
from bytemtp.train.objective import MTPObjective


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


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 elsewhere (CPU bf16 matmuls are slow and inexact)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def wrap(objective: MTPObjective, env: DistEnv, fsdp: bool) -> nn.Module:
    """The module the training step calls: DDP, FSDP2, or (single process) ``objective`` itself.

    FSDP2 shards every trunk block as its own unit (all-gathered just before it
    runs, freed after) and leaves the embedding, heads and shared norm to the root
    unit: the sequential head schedule runs all heads inside one autograd Function,
    so they are needed together anyway. ``fully_shard`` changes ``objective`` in
    place; DDP wraps it. Buffers (RoPE tables) are deterministic, so DDP need not
    broadcast them every step.
    """
    if not env.distributed:
        return objective
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    if fsdp:
        for block in objective.model.blocks:
            fully_shard(block)
        fully_shard(objective)
        return objective
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(objective, device_ids=device_ids, broadcast_buffers=False)


def unwrap(module: nn.Module) -> MTPObjective:
    """The objective inside a DDP wrapper (FSDP2 modules are their own objective)."""
    return module if isinstance(module, MTPObjective) else module.module


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter for micro-steps that are not the last.

    Gradients then accumulate locally and are synchronised once, together with the
    last micro-step's, which is what makes gradient accumulation cost one
    communication per optimizer step.
    """
    if enabled:
        yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    elif hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    else:  # a single process: nothing to synchronise
        yield


def as_local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a replicated DTensor (e.g. FSDP2's clipped grad norm)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


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


def full_model_state(objective: MTPObjective) -> dict[str, torch.Tensor]:
    """The model's full weights on rank 0's CPU, keyed as in ``ByteMTP.state_dict`` (empty on other ranks)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    prefix = "model."
    state = get_model_state_dict(objective, options=_gather())
    return {k.removeprefix(prefix): v for k, v in state.items()}


def full_optimizer_state(objective: MTPObjective, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full optimizer state keyed by parameter name, on rank 0's CPU (empty on other ranks)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(objective, optimizer, options=_gather())


def load_optimizer_state(objective: MTPObjective, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a ``full_optimizer_state`` on every rank; each keeps its own shard under FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(objective, optimizer, optim_state_dict=state, options=options)


def _gather():
    """Options that gather full tensors onto rank 0's CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)
