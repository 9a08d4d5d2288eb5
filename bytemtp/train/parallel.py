"""The module the training step calls, and PyTorch's data-parallel engines around it.

DDP and FSDP2 wrap a module whose forward returns the loss (``MTPObjective``), so
their hooks see one ordinary forward and backward whatever head schedule runs
inside. Without a process group the wrapping is the identity and the helpers are
no-ops, so the training loop has one code path from a laptop to a cluster. The
engines are imported where they are used: they take seconds to import, which
``bytemtp eval`` need not pay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn as nn

from bytemtp.model.panels import drop_layouts
from bytemtp.model.transformer import ByteMTP
from bytemtp.train.distributed import DistEnv
from bytemtp.train.objective import multihead_loss

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy


class MTPObjective(nn.Module):
    """Model + objective as one module, so DDP/FSDP wrap a forward that returns the loss.

    ``draft_loss_weight`` (one weight for every draft head, or one per draft head) may be
    set between steps: the training loop sets each step's under an objective schedule.
    ``draft_detach``: the draft heads do not train the trunk (``multihead_loss``)."""

    def __init__(self, model: ByteMTP, mode: str = "sequential", draft_loss_weight: float | Sequence[float] = 1.0,
                 draft_detach: bool = False):
        super().__init__()
        self.model, self.mode, self.draft_loss_weight, self.draft_detach = model, mode, draft_loss_weight, draft_detach

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = multihead_loss(self.model, ids, self.mode, self.draft_loss_weight, self.draft_detach)
        return out.loss, out.head_losses


def wrap(objective: MTPObjective, env: DistEnv, fsdp: bool) -> nn.Module:
    """The module the training step calls: DDP, FSDP2, or (single process) ``objective`` itself.

    ``fully_shard`` changes ``objective`` in place (``shard``); DDP wraps it. Buffers
    (RoPE tables) are deterministic, so DDP need not broadcast them every step.
    """
    if not env.distributed:
        return objective
    if fsdp:
        return shard(objective, fsdp_mixed_precision(env.device))
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(objective, device_ids=device_ids, broadcast_buffers=False)


def fsdp_mixed_precision(device: torch.device) -> MixedPrecisionPolicy | None:
    """FSDP2's precision on ``device``: on CUDA, parameters all-gathered and computed in bf16
    and gradients reduced in fp32 (as torchtitan trains), with the sharded fp32 master
    weights and optimizer state untouched; elsewhere None, fp32 throughout (CPU bf16
    matmuls are slow and inexact, and the CPU runs are the ones tests compare bitwise).

    Forward inputs are not cast: FSDP2 would cast every float tensor among a unit's
    arguments, the RoPE tables inside the blocks' ``PosContext`` too, and a position's angle
    needs more bits than bf16 has (DDP and single-GPU runs keep them float32). The blocks'
    activations need no cast: they come out of bf16 weights already."""
    if device.type != "cuda":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard(objective: MTPObjective, mp_policy: MixedPrecisionPolicy | None = None) -> MTPObjective:
    """FSDP2 over the process group, in place: every trunk block is its own unit
    (all-gathered just before it runs, freed after); the embedding, heads and shared
    norm belong to the root unit, since the head schedules run all heads inside one
    autograd Function and need them together anyway. The layers' decoding layouts go
    (``drop_layouts``): FSDP2 rewrites the weights behind them without a trace they can see."""
    from torch.distributed.fsdp import fully_shard

    drop_layouts(objective)

    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in objective.model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(objective, **kwargs)
    return objective


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
