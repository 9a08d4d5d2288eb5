"""Muon with its Newton-Schulz orthogonalisation in the dtype the device multiplies fast.

``torch.optim.Muon`` casts every update to bfloat16 before its five Newton-Schulz steps
(as the reference implementation does, for GPUs). A CPU with bf16 dot-product
instructions (AVX512-BF16, AMX-BF16) multiplies bf16 faster than float32, but a CPU
without them emulates every product: on a 2-core AVX2 EPYC five steps on the ``tiny``
preset's 512 x 128 matrices took 69 ms against 3 ms in float32, and the optimizer two thirds
of a training step (bench/RESULTS.md). So ``Muon`` here runs the same iteration (torch's
coefficients and step count) in bfloat16 on CUDA and on CPUs with those instructions,
where it computes bitwise what ``torch.optim.Muon`` does, and in float32 elsewhere, where
it is also the more exact of the two. ``TrainConfig.muon_dtype`` overrides the choice.

The choice reads the CPU's flags once per process. ``ONEDNN_MAX_CPU_ISA`` counts too:
torch's CPU bf16 products run in oneDNN, which uses no instruction beyond the ISA it
names, so ``ONEDNN_MAX_CPU_ISA=AVX2`` makes a bf16 CPU multiply bf16 as slowly as one
without (it is how bench/RESULTS.md measures that case on a bf16 machine).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch.optim._muon import _adjust_lr
from torch.optim.optimizer import _to_scalar

# oneDNN ISA caps below AVX512_CORE_BF16; every later ISA has bf16 dot products.
_ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"})


def cpu_bf16_verdict(capabilities: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[bool, str]:
    """(whether this CPU multiplies bf16 natively, why), from ``torch.cpu.get_capabilities()``
    and the environment oneDNN reads its ISA cap from."""
    flags = [name for name in ("avx512_bf16", "amx_bf16") if capabilities.get(name)]
    if not flags:
        return False, "the CPU has no bf16 dot-product instructions (avx512_bf16, amx_bf16)"
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if environ.get(var, "").upper() in _ISAS_WITHOUT_BF16:
            return False, f"{var}={environ[var]} keeps oneDNN off the CPU's {' and '.join(flags)}"
    return True, f"the CPU has {' and '.join(flags)}"


@functools.cache
def _cpu_choice() -> tuple[torch.dtype, str]:
    native, why = cpu_bf16_verdict(torch.cpu.get_capabilities(), os.environ)
    return (torch.bfloat16 if native else torch.float32), why


def orthogonalisation_dtype(setting: str, device: torch.device) -> tuple[torch.dtype, str]:
    """(dtype, why) of Muon's Newton-Schulz steps for ``TrainConfig.muon_dtype=setting`` on ``device``."""
    if setting != "auto":
        return getattr(torch, setting), f"muon_dtype={setting}"
    if device.type == "cuda":
        return torch.bfloat16, "the GPU multiplies bf16 natively"
    if device.type == "cpu":
        return _cpu_choice()
    return torch.float32, f"bf16 products on {device.type} are not known to be native"


def newton_schulz(
    grad: torch.Tensor, dtype: torch.dtype, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """torch's ``_zeropower_via_newtonschulz`` computed in ``dtype`` instead of bfloat16:
    ``grad`` scaled to norm 1, then ``steps`` quintic steps X <- aX + (bA + cA²)X with
    A = XXᵀ on its wide orientation (the smaller Gram matrix)."""
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # not in place: in float32, x may be the momentum buffer itself
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` whose orthogonalisation runs in ``ns_dtype`` (see the module
    docstring); construction, parameter groups and state (so checkpoints) are torch's.

    ``step`` is torch's single-tensor update with ``newton_schulz`` in place of its
    bfloat16-only iteration; with ``ns_dtype=torch.bfloat16`` it matches
    ``torch.optim.Muon`` bitwise (tests/test_muon.py).
    """

    def __init__(self, params, *, ns_dtype: torch.dtype, ns_why: str = "", **kwargs: Any):
        super().__init__(params, **kwargs)
        self.ns_dtype, self.ns_why = ns_dtype, ns_why

    @property
    def dtype_name(self) -> str:
        return str(self.ns_dtype).removeprefix("torch.")

    def describe(self) -> str:
        """One line for the training log: the dtype and why."""
        return f"Muon orthogonalises in {self.dtype_name}: {self.ns_why}"

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon.step takes no closure")
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            lr, momentum = _to_scalar(group["lr"]), group["momentum"]
            for param, grad, buf in zip(params, grads, bufs):
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, self.ns_dtype, group["ns_coefficients"], group["ns_steps"], group["eps"])
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))
