"""Matrix products with few rows, for decoding steps on a CPU: ``x [M, K] @ W.T`` with M of 1..32.

A decoding step multiplies a handful of rows (one position, or the few a speculative
step verifies) by every weight matrix of the model. BLAS libraries serve one row
with a matrix-vector kernel that streams the weights at memory speed, but switch to
their general kernel from two rows on, which repacks the weights on every call: on
a 2-core CPU a forward over 8 positions then costs about twice one over a single
position, and that ratio is what self-speculative decoding's speedup is divided by.

Here the weights are packed once, into panels of ``PANEL`` output columns stored
``[K, PANEL]`` contiguously, so one pass streams each panel straight through while
all M rows accumulate against it: the weights are read once whatever M is, and M
rows cost little more than one until the arithmetic catches up with memory.

Every output is accumulated over k in the same order, four products at a time,
whatever M is and whichever row it sits in: a row's result does not depend on the
other rows, so a verifying forward over 8 positions computes bit for bit what 8
single-position forwards would (BLAS makes no such promise).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

PANEL = 64  # output columns per panel: 8 AVX2 / 4 AVX-512 vectors per row, an L1-sized accumulator


def pack_panels(weight: np.ndarray) -> np.ndarray:
    """``weight [N, K]`` (float32, as ``nn.Linear`` stores it) -> panels ``[ceil(N/PANEL), K, PANEL]``.

    Columns past N are zero; ``panel_matmul`` writes them, callers slice them off.
    """
    n, k = weight.shape
    n_panels = -(-n // PANEL)
    padded = np.zeros((n_panels * PANEL, k), dtype=np.float32)
    padded[:n] = weight
    return np.ascontiguousarray(padded.reshape(n_panels, PANEL, k).transpose(0, 2, 1))


@njit(cache=True, parallel=True, fastmath={"contract"})
def panel_matmul(x: np.ndarray, panels: np.ndarray, out: np.ndarray) -> None:
    """``out[:, :N] = x @ W.T`` for ``panels = pack_panels(W)``; ``out`` is [M, n_panels * PANEL].

    Panels are shared out between threads. Within a panel, k advances four at a
    time: one load and store of a row's accumulator per four fused multiply-adds,
    which keeps the loop on the arithmetic units rather than on the L1 cache.
    """
    m_rows, k_dim = x.shape
    n_panels, _, width = panels.shape
    k_main = k_dim - k_dim % 4
    for p in prange(n_panels):
        acc = np.zeros((m_rows, width), dtype=np.float32)
        for k in range(0, k_main, 4):
            w0, w1, w2, w3 = panels[p, k], panels[p, k + 1], panels[p, k + 2], panels[p, k + 3]
            for m in range(m_rows):
                a0, a1, a2, a3 = x[m, k], x[m, k + 1], x[m, k + 2], x[m, k + 3]
                row = acc[m]
                for j in range(width):
                    row[j] = (((row[j] + a0 * w0[j]) + a1 * w1[j]) + a2 * w2[j]) + a3 * w3[j]
        for k in range(k_main, k_dim):
            w = panels[p, k]
            for m in range(m_rows):
                a = x[m, k]
                row = acc[m]
                for j in range(width):
                    row[j] += a * w[j]
        out[:, p * width : (p + 1) * width] = acc
