"""Matrix products with few rows, for decoding steps on a CPU: ``x [M, K] @ W.T`` with M of 1..32.

A decoding step multiplies a handful of rows (one position, or the few a speculative
step verifies) by every weight matrix of the model. BLAS libraries serve one row
with a matrix-vector kernel that streams the weights at memory speed, but switch to
their general kernel from two rows on, which repacks the weights on every call: on
a 2-core CPU a forward over 8 positions then costs about twice one over a single
position, and that ratio is what self-speculative decoding's speedup is divided by.

Here the weights are packed once, into panels of ``PANEL`` output columns stored
``[K, PANEL]`` contiguously (one cache line per k). A tile of ``ROWS`` rows by one
panel keeps its accumulators in registers while k streams by: each weight is loaded
once per tile and feeds ``ROWS`` fused multiply-adds, so 4 rows cost about what one
does and the arithmetic units, not the loads, set the pace.

Every output is ``fma(x[m, k], w[k], acc)`` over k in order, whatever M is and
whichever tile a row sits in: a row's result does not depend on the other rows, so
a verifying forward over 8 positions computes bit for bit what 8 single-position
forwards would (BLAS makes no such promise).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

PANEL = 16  # output columns per panel: 2 AVX2 vectors, one 64-byte line per k
ROWS = 4  # rows per tile: 8 accumulator vectors, half the AVX2 register file
SIGNATURE = (types.float32[:, ::1], types.float32[:, :, ::1], types.float32[:, ::1])


def pack_panels(weight: np.ndarray) -> np.ndarray:
    """``weight [N, K]`` (float32, as ``nn.Linear`` stores it) -> panels ``[ceil(N/PANEL), K, PANEL]``.

    Columns past N are zero; ``panel_matmul`` writes them, callers slice them off.
    """
    n, k = weight.shape
    n_panels = -(-n // PANEL)
    padded = np.zeros((n_panels * PANEL, k), dtype=np.float32)
    padded[:n] = weight
    return np.ascontiguousarray(padded.reshape(n_panels, PANEL, k).transpose(0, 2, 1))


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (LLVM's ``llvm.fma``): the same bits wherever the vectorizer puts it,
    which fast-math contraction of ``a * b + c`` does not promise."""
    sig = types.float32(types.float32, types.float32, types.float32)
    return sig, lambda context, builder, signature, args: builder.fma(*args)


def _tile(rows: int) -> Callable:
    """``tile(x, panels, p, m0, out)``: rows ``m0 .. m0+rows`` of x times panel p, into ``out``.

    Written out as ``rows * PANEL`` scalar accumulators (generated source): LLVM keeps
    scalars in registers and its SLP vectorizer packs them into vector FMAs, while an
    accumulator array would live in memory and cost a load and a store per product.
    """
    acc = [[f"c{r}_{j}" for j in range(PANEL)] for r in range(rows)]
    lines = ["def tile(x, panels, p, m0, out):"]
    lines += [f"    {acc[r][j]} = np.float32(0)" for r in range(rows) for j in range(PANEL)]
    lines += ["    for k in range(x.shape[1]):", "        w = panels[p, k]"]
    lines += [f"        w{j} = w[{j}]" for j in range(PANEL)]
    for r in range(rows):
        lines.append(f"        a = x[m0 + {r}, k]")
        lines += [f"        {acc[r][j]} = fma(a, w{j}, {acc[r][j]})" for j in range(PANEL)]
    for r in range(rows):
        lines.append(f"    o = out[m0 + {r}, p * {PANEL}:]")
        lines += [f"    o[{j}] = {acc[r][j]}" for j in range(PANEL)]
    namespace = {"np": np, "fma": fma}
    exec("\n".join(lines), namespace)
    return njit(inline="always")(namespace["tile"])


_tile1, _tile2, _tile3, _tile4 = (_tile(rows) for rows in range(1, ROWS + 1))


@njit(inline="always")
def _panel(x, panels, p, out):
    """Every row of x times panel p: full tiles, then one tile for the rest."""
    m_rows = x.shape[0]
    full = m_rows - m_rows % ROWS
    for m0 in range(0, full, ROWS):
        _tile4(x, panels, p, m0, out)
    rest = m_rows - full
    if rest == 1:
        _tile1(x, panels, p, full, out)
    elif rest == 2:
        _tile2(x, panels, p, full, out)
    elif rest == 3:
        _tile3(x, panels, p, full, out)


@njit(parallel=True, cache=True)
def _panel_kernel(x, panels, out):
    """Panels are shared out between threads."""
    for p in prange(panels.shape[0]):
        _panel(x, panels, p, out)


@njit(cache=True)
def _serial_kernel(x, panels, out):
    """The same on the calling thread: no parallel launch, which costs a few µs even for one thread,
    and a 128-wide model's decoding step makes some 20 products of a few µs each."""
    for p in range(panels.shape[0]):
        _panel(x, panels, p, out)


@contextmanager
def _slp_vectorizer() -> Iterator[None]:
    """Numba leaves LLVM's SLP vectorizer off by default; the tiles need it (without it they run
    on scalar FMAs at a fifth of the speed)."""
    before = numba.config.SLP_VECTORIZE
    numba.config.SLP_VECTORIZE = 1
    try:
        yield
    finally:
        numba.config.SLP_VECTORIZE = before


@functools.cache
def _compiled(serial: bool) -> Callable:
    """A kernel, compiled (or loaded from Numba's cache) once, for C-contiguous float32 only:
    compiling any other signature later would do so without the SLP vectorizer."""
    kernel = _serial_kernel if serial else _panel_kernel
    with _slp_vectorizer():
        kernel.compile(SIGNATURE)
    kernel.disable_compile()
    return kernel


def panel_matmul(x: np.ndarray, panels: np.ndarray, out: np.ndarray, serial: bool = False) -> None:
    """``out[:, :N] = x @ W.T`` for ``panels = pack_panels(W)``; ``out`` is [M, n_panels * PANEL].
    ``serial``: on the calling thread alone (the same bits either way).

    All three C-contiguous float32.
    """
    _compiled(serial)(x, panels, out)
