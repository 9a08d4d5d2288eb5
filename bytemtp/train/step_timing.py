"""Timing one training step, for the demo's step planning and the step benchmark.

A step's wall time on a GPU is only known after the device has finished it, so
the clock is read between two synchronisations; on the CPU they cost nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bytemtp.model.transformer import ByteMTP
from bytemtp.train.objective import multihead_loss
from bytemtp.train.precision import autocast


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(
    model: ByteMTP, ids: torch.Tensor, mode: str = "sequential", optimizer: torch.optim.Optimizer | None = None
) -> Callable[[], None]:
    """One training step of ``model`` on ``ids`` under the device's training precision:
    forward and backward, then ``optimizer``'s update if one is given."""
    device = ids.device

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast(device):
            loss = multihead_loss(model, ids, mode).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()

    return step


def timed(step: Callable[[], None], device: torch.device, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds ``step`` takes on ``clock``, its device work included."""
    synchronize(device)
    start = clock()
    step()
    synchronize(device)
    return clock() - start
