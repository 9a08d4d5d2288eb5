"""Full (unsharded) weights and optimizer state for checkpoints, in every parallel mode.

Everything goes through ``torch.distributed.checkpoint.state_dict``: it gathers
full weights and optimizer state onto rank 0's CPU, keyed by parameter name rather
than by position, so a checkpoint written under FSDP2 has the same
``model.safetensors`` as one from a single process, and optimizer state saved in
one mode loads in another. The price is that rank 0 holds one full copy of the
state while saving, which is fine at this project's model sizes. The API is
imported where it is used: it takes seconds to import.
"""

from __future__ import annotations

from typing import Any

import torch

from bytemtp.train.parallel import MTPObjective


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
