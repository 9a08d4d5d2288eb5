"""``PanelLinear``: ``nn.Linear`` whose decoding-sized CPU products keep the weight in a layout made for them.

A CPU decoding step multiplies 1..8 rows by every weight of the model, and a speculative
step's speedup is divided by what its 8 rows cost over one. ``F.linear`` hands BLAS the
weight transposed, which its general kernel repacks on every call. So few-row products
on CPU float32 inference take one of two routes:

- **big weights** (``MIN_WEIGHT`` and up) run on the panel kernel
  (``bytemtp_native.panels``), which reads the weights once whatever the number of rows
  and gives every row the same result it would get alone;
- **small weights**, which stay in cache and where a Numba call's fixed cost would
  dominate, are multiplied by a transposed copy [in, out] with ``torch.matmul``. On a
  128-wide model that halves one row's product and takes 8 rows' from 11 to 5 µs,
  so a forward over 8 positions costs 1.2x one over a single position instead of 1.36x.

Compiled decoding steps use the transposed copy too, while a decoding session has armed
the layer (``arm``). Everything else (training, evaluation, prompts, GPUs, other dtypes)
stays on ``F.linear``. The state dict is ``nn.Linear``'s, so checkpoints do not care.

The decoding copy of the weight is made on the first eligible call and again whenever
the weight changed since (an optimizer step or ``load_state_dict`` bumps the tensor's
version), so a model can alternate training and sampling. It costs one more copy of
the weights in memory for a model that decodes on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numba
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bytemtp_native.panels import PANEL, pack_panels, panel_matmul

# Up to here the panels beat BLAS on a 2-core CPU (about 1.7x at 32 rows); beyond it, BLAS's
# general kernel is at home: prompts, batches, training.
MAX_ROWS = 32
# Smaller weights stay in cache, where the kernel's fixed cost per call (a parallel launch
# and Numba's argument checks) would dominate: they take the transposed copy instead.
MIN_WEIGHT = 512 * 512

_enabled = True


@contextmanager
def panels_enabled(enabled: bool) -> Iterator[None]:
    """Within the block, eligible products use the decoding layouts (True) or ``F.linear`` (False)."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


def _has_layout(weight: torch.Tensor) -> bool:
    """Whether ``weight`` gets a decoding layout: layouts are on, and it is a CPU float32 tensor
    with a version counter (an inference tensor has none to notice a change by)."""
    return _enabled and weight.is_cpu and weight.dtype == torch.float32 and not weight.is_inference()


class PanelLinear(nn.Linear):
    """``nn.Linear`` (without bias) with a decoding layout of its weight for few-row CPU float32 inference."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, **kwargs):
        if bias:
            raise ValueError("bytemtp.model.panels.PanelLinear has no bias")
        super().__init__(in_features, out_features, bias=False, **kwargs)
        self._packed: np.ndarray | torch.Tensor | None = None  # panels (big weights) or the transposed weight
        self._packed_from: tuple[int, int] | None = None
        self._big = in_features * out_features >= MIN_WEIGHT
        self._armed = False  # a decoding session holds a fresh transposed copy (``arm``)

    def arm(self, armed: bool) -> None:
        """Decoding starts (True) or ends (False). A compiled decoding step cannot check that
        the transposed copy of a small weight is fresh, so it uses the copy only while armed,
        and arming makes it fresh (``ByteMTP.setup_cache`` arms, ``clear_cache`` disarms)."""
        weight = self._parameters["weight"]
        self._armed = armed and not self._big and _has_layout(weight)
        if self._armed:
            self._decoding_weight(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Runs 17 times per forward of a small model, whose whole forward is under a
        # millisecond: the weight is looked up once and the cheap tests come first.
        weight = self._parameters["weight"]
        if torch.compiler.is_compiling():  # the copy is a graph input, fresh while armed
            if self._armed and x.is_cpu and x.dtype == torch.float32 and not torch.is_grad_enabled():
                return torch.matmul(x, self._packed)
            return F.linear(x, weight)
        if not self._eligible(x, weight):
            return F.linear(x, weight)
        if self._big:
            return self._panel_forward(x, weight)
        return torch.matmul(x, self._decoding_weight(weight))  # folds the leading axes in C++

    def _eligible(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (
            _has_layout(weight)
            and x.is_cpu
            and x.dtype == torch.float32
            and x.numel() <= MAX_ROWS * self.in_features
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        )

    def _decoding_weight(self, weight: torch.Tensor) -> np.ndarray | torch.Tensor:
        """``weight`` in its decoding layout, rebuilt if the weight changed since it was made."""
        source = (weight.data_ptr(), weight._version)
        if self._packed_from != source:
            weight = weight.detach()
            self._packed = pack_panels(weight.numpy()) if self._big else weight.t().contiguous()
            self._packed_from = source
        return self._packed

    def _panel_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        panels = self._decoding_weight(weight)
        threads = torch.get_num_threads()
        numba_threads = min(threads, numba.config.NUMBA_NUM_THREADS)
        if numba.get_num_threads() != numba_threads:
            numba.set_num_threads(numba_threads)
        rows = x.reshape(-1, self.in_features).contiguous().numpy()
        out = np.empty((rows.shape[0], panels.shape[0] * PANEL), dtype=np.float32)
        panel_matmul(rows, panels, out)
        if torch.get_num_threads() != threads:
            # Numba's OpenMP layer can share torch's libgomp, and starting it up resizes
            # that pool: give torch back the thread count it was asked for.
            torch.set_num_threads(threads)
        return torch.from_numpy(out[:, : self.out_features]).reshape(*x.shape[:-1], self.out_features)
