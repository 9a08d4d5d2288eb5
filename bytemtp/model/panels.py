"""``PanelLinear``: ``nn.Linear`` whose decoding-sized CPU products run on ``bytemtp_native.panels``.

A CPU decoding step multiplies 1..8 rows by every weight of the model, where BLAS
makes 8 rows cost about twice one (see ``bytemtp_native.panels``). This layer sends
such products to the panel kernel, which reads the weights once whatever the number
of rows and gives every row the same result it would get alone; everything else
(training, evaluation, prompts, GPUs, compiled graphs, other dtypes) stays on
``F.linear``. The state dict is ``nn.Linear``'s, so checkpoints do not care.

The packed copy of the weight is made on the first eligible call and again whenever
the weight changed since (an optimizer step or ``load_state_dict`` bumps the
tensor's version), so a model can alternate training and sampling. It costs one
more copy of the weights in memory for a model that decodes on a CPU.
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
# Smaller weights stay in cache, where BLAS's repacking is cheap and the kernel's fixed
# cost per call (a parallel launch and Numba's argument checks) would dominate.
MIN_WEIGHT = 512 * 512

_enabled = True


@contextmanager
def panels_enabled(enabled: bool) -> Iterator[None]:
    """Within the block, eligible products use the panel kernel (True) or ``F.linear`` (False)."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


class PanelLinear(nn.Linear):
    """``nn.Linear`` (without bias) with the panel kernel for few-row CPU float32 inference on big weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, **kwargs):
        if bias:
            raise ValueError("bytemtp.model.panels.PanelLinear has no bias")
        super().__init__(in_features, out_features, bias=False, **kwargs)
        self._panels = None
        self._packed_from: tuple[int, int] | None = None
        self._big = in_features * out_features >= MIN_WEIGHT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._eligible(x):
            return self._panel_forward(x)
        return F.linear(x, self.weight)

    def _eligible(self, x: torch.Tensor) -> bool:
        return (
            _enabled
            and self._big
            and x.numel() <= MAX_ROWS * self.in_features
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            and not torch.compiler.is_compiling()
            and not self.weight.is_inference()  # no version counter to notice a change by
        )

    def _panel_forward(self, x: torch.Tensor) -> torch.Tensor:
        source = (self.weight.data_ptr(), self.weight._version)
        if self._packed_from != source:
            self._panels = pack_panels(self.weight.detach().numpy())
            self._packed_from = source
        threads = torch.get_num_threads()
        numba_threads = min(threads, numba.config.NUMBA_NUM_THREADS)
        if numba.get_num_threads() != numba_threads:
            numba.set_num_threads(numba_threads)
        rows = x.reshape(-1, self.in_features).contiguous().numpy()
        out = np.empty((rows.shape[0], self._panels.shape[0] * PANEL), dtype=np.float32)
        panel_matmul(rows, self._panels, out)
        if torch.get_num_threads() != threads:
            # Numba's OpenMP layer can share torch's libgomp, and starting it up resizes
            # that pool: give torch back the thread count it was asked for.
            torch.set_num_threads(threads)
        return torch.from_numpy(out[:, : self.out_features]).reshape(*x.shape[:-1], self.out_features)
