"""Numeric precision of training: bf16 autocast and TF32 matmuls on CUDA, fp32 elsewhere.

TF32 (``float32_matmul_precision = "high"``) is a process-wide setting. Training
wants it for the fp32 matmuls autocast leaves alone; decoding must not inherit it,
because greedy identity between autoregressive and speculative decoding relies on
1-row and P-row products rounding alike. So training sets it only for its own
duration (``training_precision``) and puts back what it found, and a process that
trains and then decodes (``bytemtp demo``) decodes in the default precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 elsewhere (CPU bf16 matmuls are slow and inexact)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def training_precision(device: torch.device) -> Iterator[None]:
    """TF32 matmuls on CUDA for the duration of the block, the previous setting restored after."""
    previous = torch.get_float32_matmul_precision()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
