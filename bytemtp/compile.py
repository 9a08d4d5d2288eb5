"""The compile policy: what ``torch.compile`` is applied to, with which mode, on which device.

Two things are compiled, and both default to on for CUDA and off for the CPU
(``compile_by_default``), where inductor's warm-up costs more than a short run gains:

- **Training** (``compile_model``): every transformer block, and the per-head
  cross-entropy. Blocks are compiled one by one and in place (``nn.Module.compile``),
  not the model as a whole: the sequential head schedule runs the trunk and then each
  head separately, with an ``autograd.grad`` between heads that no single graph could
  span; all blocks share one structure, so a single compiled graph serves every block
  of the trunk and of the heads and compile time does not grow with depth; and in-place
  compilation keeps the eager model's state-dict keys, so checkpoints do not care
  whether a run was compiled. The per-head cross-entropy of the sequential schedule is
  a chain of memory-bound passes over [B*T, vocab] that compilation fuses into a couple
  of kernels; it lives outside the blocks, so the objective asks ``training_kernel``,
  which follows the model's decision (``ByteMTP.compiled``).
- **Decoding** (``compile_decode_step``): the decode step, with static shapes, in
  ``reduce-overhead`` mode on CUDA (CUDA graphs: one launch per step) and inductor's
  default mode on the CPU (``--compile``).

Compiled kernels are cached under the user's cache directory (``use_user_cache_dir``),
not inductor's default ``/tmp/torchinductor_USER``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import torch

from bytemtp import user_cache_dir
from bytemtp.model.layers import Block
from bytemtp.model.transformer import ByteMTP

F = TypeVar("F", bound=Callable)

# One graph per step shape met: (rows, positions) per decoder, times the cache lengths. Dynamo's
# default of 8 would silently send the rest to eager once a bench sweep exceeds it.
DECODE_RECOMPILE_LIMIT = 64


def use_user_cache_dir() -> None:
    """Cache inductor's and Triton's kernels under ``user_cache_dir()``, unless the user chose a
    place (``TORCHINDUCTOR_CACHE_DIR``, or ``TRITON_CACHE_DIR``). Inductor's own default is
    ``/tmp/torchinductor_USER`` whatever ``XDG_CACHE_HOME`` says: a directory other users
    can claim first, that a reboot may empty, outside the quota a cluster user's cache
    directory is on. It is read when inductor first needs it, so setting it before
    compiling is enough; with only ``TORCHINDUCTOR_CACHE_DIR`` set, Triton's cache stays
    inside it, as torch places it."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(user_cache_dir() / "torchinductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(user_cache_dir() / "triton"))


def compile_by_default(device: torch.device) -> bool:
    """Whether ``--compile`` left unset means on: on CUDA yes, on the CPU no."""
    return device.type == "cuda"


def compile_model(model: ByteMTP, enabled: bool | None = None) -> bool:
    """Compile ``model`` for training, in place; returns whether it did.

    ``enabled=None`` decides by device (``compile_by_default``). Call it after moving the
    model to its device.
    """
    if enabled is None:
        enabled = compile_by_default(model.embed.weight.device)
    if not enabled:
        return False
    use_user_cache_dir()
    for module in model.modules():
        if isinstance(module, Block):
            module.compile()
    model.compiled = True
    return True


@functools.cache
def _compiled_static(fn: F) -> F:
    """One compiled wrapper per kernel and process, so its graphs are built once and reused."""
    use_user_cache_dir()
    return torch.compile(fn, dynamic=False)  # a static graph per shape met (sequential, stacked chunks)


def training_kernel(model: ByteMTP, fn: F) -> F:
    """``fn``, a hand-written training kernel outside the blocks, compiled when ``model``'s
    blocks are (``compile_model``) and eager otherwise."""
    return _compiled_static(fn) if model.compiled else fn


def compile_decode_step(step: F, device: torch.device, enabled: bool | None = None) -> F | None:
    """``step`` compiled with static shapes (CUDA graphs on a GPU), or None to run it eager.

    ``enabled=None`` decides by device (``compile_by_default``).
    """
    if not (compile_by_default(device) if enabled is None else enabled):
        return None
    use_user_cache_dir()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, DECODE_RECOMPILE_LIMIT)
    if device.type == "cuda":
        return torch.compile(step, dynamic=False, mode="reduce-overhead")
    # The CPU graph's launcher in C++, not Python: a small model's step is a few hundred
    # microseconds of many small kernels, and without it autoregressive decoding of the
    # tiny preset ran 1.11x slower.
    return torch.compile(step, dynamic=False, options={"cpp_wrapper": True})
