"""A decoding step's host-device traffic: its inputs in one copy, its result in one.

A step's inputs are a handful of small host arrays (ids, cache slots, RoPE positions, a
tree's mask, pending cache moves, random numbers), and its result one small integer
tensor. Sent one by one from pageable memory, every input is a copy of its own that
blocks the host until the device has it, a dozen per sampled-tree step. On CUDA,
``upload`` packs them into one pinned buffer and sends it in one non-blocking copy (the
step reads views of one device buffer), and ``download`` reads the result into pinned
memory; the pinned buffers come from torch's caching host allocator, which does not hand
one out again before its copy has finished. On the CPU both cost nothing: the arrays
become tensors without a copy.
"""

from __future__ import annotations

import math

import numpy as np
import torch

ALIGN = 64  # bytes: every input starts at an offset a kernel can read from directly


def upload(device: torch.device, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """``arrays`` as tensors on ``device``, each of its own dtype and shape: one copy on CUDA."""
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    if device.type != "cuda":
        return {name: torch.from_numpy(a).to(device) for name, a in arrays.items()}
    host, layout = pack(arrays, pin=True)
    return unpack(host.to(device, non_blocking=True), layout)


Layout = dict[str, tuple[int, torch.dtype, tuple[int, ...]]]  # name -> (byte offset, dtype, shape)


def pack(arrays: dict[str, np.ndarray], pin: bool = False) -> tuple[torch.Tensor, Layout]:
    """Contiguous ``arrays`` in one byte buffer (pinned: ``pin``), each at an offset ``ALIGN`` divides."""
    layout, size = {}, 0
    for name, a in arrays.items():
        layout[name] = (size, torch.from_numpy(a[:0]).dtype, a.shape)
        size += -(-a.nbytes // ALIGN) * ALIGN
    buffer = torch.empty(max(size, ALIGN), dtype=torch.uint8, pin_memory=pin)
    staging = buffer.numpy()
    for name, a in arrays.items():
        staging[layout[name][0] : layout[name][0] + a.nbytes] = a.reshape(-1).view(np.uint8)
    return buffer, layout


def unpack(buffer: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """The tensors ``pack`` put in ``buffer`` (wherever it now is): views, no copies."""
    out = {}
    for name, (offset, dtype, shape) in layout.items():
        n = math.prod(shape) * dtype.itemsize
        out[name] = buffer[offset : offset + n].view(dtype).view(shape)
    return out


def download(t: torch.Tensor) -> np.ndarray:
    """``t`` on the host: on CUDA one non-blocking copy into pinned memory, then a wait for it."""
    if t.device.type != "cuda":
        return t.numpy()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return host.numpy()
