"""Measuring one training step (time, peak memory), for the demo's step planning and the benchmarks.

A step's wall time on a GPU is only known after the device has finished it, so
the clock is read between two synchronisations; on the CPU they cost nothing.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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


def peak_step_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during one step, above what was allocated before it.

    CPU allocations are invisible to tracemalloc and blurred in RSS by the allocator's
    caching, so on the CPU they come from the profiler's allocation log.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")
