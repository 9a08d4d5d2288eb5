"""RMS normalisation of a few rows, for decoding steps on a CPU.

``torch.rms_norm`` on a CPU runs as half a dozen small operations (square, mean, add, rsqrt,
two products): some 12-18 µs whatever the size of a decoding step's input, where a step of a
128-wide model makes 13 of them and its whole forward takes about a millisecond. One Numba
call does it in a few µs. Each row is normalised alone, in a fixed order, so a row gets the
same bits whatever other rows share the call (as on the panel kernel, ``bytemtp_native.panels``).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, fastmath=False)
def rms_norm_rows(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    """``out[m] = x[m] / sqrt(mean(x[m] ** 2) + eps) * weight`` for every row of ``x`` [M, D]
    (float32, C-contiguous, as ``out``); the mean is summed in float32 from the first column."""
    m_rows, d = x.shape
    inv_d = np.float32(1.0) / np.float32(d)
    for m in range(m_rows):
        acc = np.float32(0.0)
        for j in range(d):
            acc += x[m, j] * x[m, j]
        scale = np.float32(1.0) / np.sqrt(acc * inv_d + np.float32(eps))
        for j in range(d):
            out[m, j] = x[m, j] * scale * weight[j]
