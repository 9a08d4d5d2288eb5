"""Packing a shard's documents into training rows of ``T + n`` ids, BOS before every document.

A shard is ``data`` (uint8, the documents back to back) and ``offsets`` (n_docs + 1),
as ``bytemtp.data.shards.read_shard`` returns them. Packing runs in two steps so that a
loader never holds a whole shard's worth of rows:

* ``plan_rows`` lists, for every row, the pieces of documents it holds
  (document, start inside BOS+document, length): a few integers per document;
* ``fill_rows`` writes any subset of the rows, in any order, into a caller's
  buffer (for instance a pinned staging tensor), one batch at a time.

Modes (``C = T + n`` ids per row, ``m = 1 + len(doc)`` ids per document):

``concat``
    The documents in the given order form one stream of BOS+document runs, of
    length ``L``. Row ``r`` is ``stream[r*T : r*T + C]`` for ``r < ceil((L-1)/T)``,
    the last one padded with -1. Rows overlap by ``n`` ids, so every input position
    has all ``n`` future targets and every id but the first is a head-1 target
    exactly once. A document is *truncated* when no single row holds all of it.

``best-fit``
    A document with ``m <= C`` is one item. A longer one is *truncated*: it is cut
    the way concat cuts the stream, into pieces ``[k*T, k*T + C)`` that fill a row
    each, plus the remainder ``[K*T, m)`` as an item if it holds a head-1 target the
    last piece did not. Items are placed by best-fit decreasing: longest first
    (stable), each into the open row with the least room that still fits it (ties:
    the row whose room changed last), else into a new row. Rows are numbered in
    the order they were opened and padded with -1, the target the loss ignores and
    the input it reads as BOS. Since rows are opened longest-items-first, a loader
    should shuffle them.

Ids are written to signed arrays (int16 or int32): BOS is 256 and padding is -1.
Optional per-position document ids (the document's index in the shard, -1 on
padding) support document-causal attention masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from bytemtp import BOS

PAD = -1
PACKING_MODES = ("concat", "best-fit")
_BLOCK = 64  # rooms per block in best-fit's index of open rows


@njit(cache=True, nogil=True)
def _plan_concat(offsets, order, T, n):
    C = T + n
    nd = len(order)
    starts = np.empty(nd + 1, np.int64)
    starts[0] = 0
    for i in range(nd):
        d = order[i]
        starts[i + 1] = starts[i] + offsets[d + 1] - offsets[d] + 1
    L = starts[nd]
    n_rows = (L - 2) // T + 1 if L >= 2 else 0
    # A document start lies in at most ceil(C/T) rows; each row adds one segment
    # for the document it starts inside.
    cap = nd * ((C + T - 1) // T) + n_rows
    row_ptr = np.zeros(n_rows + 1, np.int64)
    seg_doc = np.empty(cap, np.int64)
    seg_src = np.empty(cap, np.int64)
    seg_len = np.empty(cap, np.int64)
    s = 0
    j = 0
    for r in range(n_rows):
        lo = r * T
        hi = min(lo + C, L)
        while starts[j + 1] <= lo:
            j += 1
        k = j
        while k < nd and starts[k] < hi:
            a = max(starts[k], lo)
            seg_doc[s] = order[k]
            seg_src[s] = a - starts[k]
            seg_len[s] = min(starts[k + 1], hi) - a
            s += 1
            k += 1
        row_ptr[r + 1] = s
    n_truncated = 0
    if n_rows > 0:
        for k in range(nd):
            # The row reaching furthest among those starting at or before the document.
            r = min(starts[k] // T, n_rows - 1)
            if starts[k + 1] > r * T + C:
                n_truncated += 1
    return row_ptr, seg_doc[:s].copy(), seg_src[:s].copy(), seg_len[:s].copy(), n_truncated


@njit(cache=True, nogil=True)
def _best_fit_items(offsets, order, T, n):
    """Whole documents and the pieces of long ones, in document order."""
    C = T + n
    n_items = 0
    for i in range(len(order)):
        m = offsets[order[i] + 1] - offsets[order[i]] + 1
        if m <= C:
            n_items += 1
        else:
            K = (m - n) // T
            n_items += K + (1 if m - K * T >= 2 else 0)
    item_doc = np.empty(n_items, np.int64)
    item_src = np.empty(n_items, np.int64)
    item_len = np.empty(n_items, np.int64)
    n_truncated = 0
    t = 0
    for i in range(len(order)):
        d = order[i]
        m = offsets[d + 1] - offsets[d] + 1
        if m <= C:
            item_doc[t], item_src[t], item_len[t] = d, 0, m
            t += 1
            continue
        n_truncated += 1
        K = (m - n) // T
        for k in range(K):
            item_doc[t], item_src[t], item_len[t] = d, k * T, C
            t += 1
        if m - K * T >= 2:
            item_doc[t], item_src[t], item_len[t] = d, K * T, m - K * T
            t += 1
    return item_doc, item_src, item_len, n_truncated


@njit(cache=True, nogil=True)
def _longest_first(item_len, C):
    """Stable counting sort of item indices by decreasing length (lengths are 1..C)."""
    start = np.zeros(C + 2, np.int64)
    for t in range(len(item_len)):
        start[C - item_len[t] + 1] += 1
    for c in range(1, C + 2):
        start[c] += start[c - 1]
    out = np.empty(len(item_len), np.int64)
    for t in range(len(item_len)):
        key = C - item_len[t]
        out[start[key]] = t
        start[key] += 1
    return out


@njit(cache=True, nogil=True)
def _tightest_room(head, block_count, m, C):
    """Smallest room >= m that has an open row, or -1; scans one block, then block counts."""
    block_end = min((m // _BLOCK + 1) * _BLOCK, C + 1)
    for c in range(m, block_end):
        if head[c] >= 0:
            return c
    for b in range(m // _BLOCK + 1, len(block_count)):
        if block_count[b] > 0:
            for c in range(b * _BLOCK, min((b + 1) * _BLOCK, C + 1)):
                if head[c] >= 0:
                    return c
    return -1


@njit(cache=True, nogil=True)
def _plan_best_fit(offsets, order, T, n):
    C = T + n
    item_doc, item_src, item_len, n_truncated = _best_fit_items(offsets, order, T, n)
    n_items = len(item_len)
    sorted_items = _longest_first(item_len, C)
    # Open rows are kept in one stack per room (head[room] -> row, below[row] -> row),
    # with a count of non-empty stacks per block of rooms for the search.
    head = np.full(C + 1, -1, np.int64)
    below = np.empty(n_items, np.int64)
    block_count = np.zeros(C // _BLOCK + 1, np.int64)
    item_row = np.empty(n_items, np.int64)
    n_rows = 0
    for t in sorted_items:
        m = item_len[t]
        room = _tightest_room(head, block_count, m, C)
        if room < 0:
            row = n_rows
            n_rows += 1
            room = C
        else:
            row = head[room]
            head[room] = below[row]
            if head[room] < 0:
                block_count[room // _BLOCK] -= 1
        item_row[t] = row
        room -= m
        if room > 0:
            if head[room] < 0:
                block_count[room // _BLOCK] += 1
            below[row] = head[room]
            head[room] = row
    row_ptr = np.zeros(n_rows + 1, np.int64)
    for t in range(n_items):
        row_ptr[item_row[t] + 1] += 1
    for r in range(n_rows):
        row_ptr[r + 1] += row_ptr[r]
    cursor = row_ptr[:-1].copy()
    seg_doc = np.empty(n_items, np.int64)
    seg_src = np.empty(n_items, np.int64)
    seg_len = np.empty(n_items, np.int64)
    for t in sorted_items:
        s = cursor[item_row[t]]
        cursor[item_row[t]] += 1
        seg_doc[s], seg_src[s], seg_len[s] = item_doc[t], item_src[t], item_len[t]
    return row_ptr, seg_doc, seg_src, seg_len, n_truncated


@njit(cache=True, nogil=True)
def _fill(data, offsets, row_ptr, seg_doc, seg_src, seg_len, rows, out, doc_out, with_docs):
    # Copies go through 1-d views indexed from 0, the form LLVM vectorises.
    width = out.shape[1]
    for i in range(len(rows)):
        r = rows[i]
        row = out[i]
        p = 0
        for s in range(row_ptr[r], row_ptr[r + 1]):
            d, src, ln = seg_doc[s], seg_src[s], seg_len[s]
            dst = row[p : p + ln]
            q = 0
            if src == 0:
                dst[0] = BOS
                q = 1
            piece = data[offsets[d] + src + q - 1 : offsets[d] + src + ln - 1]
            for k in range(ln - q):
                dst[q + k] = piece[k]
            if with_docs:
                doc_out[i, p : p + ln] = d
            p += ln
        row[p:width] = PAD
        if with_docs:
            doc_out[i, p:width] = PAD


@dataclass(frozen=True)
class PackPlan:
    """Which document pieces every row holds; row ``r`` is segments ``row_ptr[r]:row_ptr[r+1]``."""

    row_ptr: np.ndarray  # int64, n_rows + 1
    seg_doc: np.ndarray  # int64: document index in the shard
    seg_src: np.ndarray  # int64: start inside BOS+document (0 is the BOS)
    seg_len: np.ndarray  # int64: ids
    row_len: int  # T + n
    n_docs: int
    n_truncated: int  # documents split across rows

    @property
    def n_rows(self) -> int:
        return len(self.row_ptr) - 1

    @property
    def pad_fraction(self) -> float:
        total = self.n_rows * self.row_len
        return 1.0 - float(self.seg_len.sum()) / total if total else 0.0


def _as_i64(offsets: np.ndarray) -> np.ndarray:
    """Offsets as int64 without copying: Numba turns uint64/int64 arithmetic into floats."""
    offsets = np.ascontiguousarray(offsets)
    return offsets.view(np.int64) if offsets.dtype == np.uint64 else offsets.astype(np.int64, copy=False)


def plan_rows(offsets: np.ndarray, order: np.ndarray, seq_len: int, n_future: int, mode: str = "concat") -> PackPlan:
    """Plan rows of ``seq_len + n_future`` ids from the documents ``order`` (indices into ``offsets``)."""
    if mode not in PACKING_MODES:
        raise ValueError(f"mode must be one of {PACKING_MODES}, got {mode!r}")
    if seq_len < 1 or n_future < 1:
        raise ValueError(f"seq_len and n_future must be at least 1, got {seq_len} and {n_future}")
    kernel = _plan_concat if mode == "concat" else _plan_best_fit
    order = np.ascontiguousarray(order, dtype=np.int64)
    row_ptr, seg_doc, seg_src, seg_len, n_truncated = kernel(_as_i64(offsets), order, seq_len, n_future)
    return PackPlan(row_ptr, seg_doc, seg_src, seg_len, seq_len + n_future, len(order), int(n_truncated))


def fill_rows(
    data: np.ndarray,
    offsets: np.ndarray,
    plan: PackPlan,
    rows: np.ndarray,
    out: np.ndarray,
    doc_ids: np.ndarray | None = None,
) -> None:
    """Write rows ``rows`` of ``plan`` into ``out[i]`` (and their document ids into ``doc_ids[i]``)."""
    if out.shape != (len(rows), plan.row_len) or out.dtype.kind != "i":
        raise ValueError(f"out must be a signed integer array of shape {(len(rows), plan.row_len)}")
    if doc_ids is not None and doc_ids.shape != out.shape:
        raise ValueError(f"doc_ids must have shape {out.shape}")
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= plan.n_rows):
        raise ValueError(f"row index out of range for a plan of {plan.n_rows} rows")
    docs = doc_ids if doc_ids is not None else np.empty((0, 0), np.int32)
    segments = (plan.row_ptr, plan.seg_doc, plan.seg_src, plan.seg_len)
    _fill(data, _as_i64(offsets), *segments, rows, out, docs, doc_ids is not None)


def pack(
    data: np.ndarray,
    offsets: np.ndarray,
    order: np.ndarray,
    seq_len: int,
    n_future: int,
    mode: str = "concat",
    dtype: np.dtype = np.int32,
    with_doc_ids: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """All rows at once: ``(rows [R, T+n], doc_ids [R, T+n] int32 or None, n_truncated)``."""
    plan = plan_rows(offsets, order, seq_len, n_future, mode)
    rows = np.empty((plan.n_rows, plan.row_len), dtype)
    doc_ids = np.empty(rows.shape, np.int32) if with_doc_ids else None
    fill_rows(data, offsets, plan, np.arange(plan.n_rows), rows, doc_ids)
    return rows, doc_ids, plan.n_truncated


def concat_stream(data: np.ndarray, offsets: np.ndarray, dtype: np.dtype = np.int16) -> np.ndarray:
    """BOS+document for every document in shard order, as one array (the evaluation stream)."""
    offsets = _as_i64(offsets)
    n_docs = len(offsets) - 1
    lengths = np.diff(offsets) + 1
    row_ptr = np.array([0, n_docs], np.int64)
    docs = np.arange(n_docs, dtype=np.int64)
    plan = PackPlan(row_ptr, docs, np.zeros(n_docs, np.int64), lengths, int(lengths.sum()), n_docs, 0)
    out = np.empty((1, plan.row_len), dtype)
    fill_rows(data, offsets, plan, np.zeros(1, np.int64), out)
    return out[0]
