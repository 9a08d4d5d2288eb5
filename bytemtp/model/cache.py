"""The KV cache of decoding: every attention layer's keys and values, written in place.

Each layer has its own key buffer and its own value buffer, [B, H, S, hd] each (B rows,
H attention heads, S slots), allocated once and never reallocated or reshaped: a compiled
or CUDA-graph-captured decode step binds to these very tensors and mutates them in place.
They are separate tensors, not views of one shared tensor, because a captured graph that
mutates views of a common base may be refused (and silently run uncaptured).

Rows are independent. A forward writes each row's keys and values at that row's own slots
(``input_pos`` [B, P]) and each row attends through its own mask, so the rows of a batch
may hold contexts of different lengths and accept different numbers of drafts. Rolling a
row back after a rejected draft costs nothing: the next forward writes the same slots
again, and the mask hides whatever stale entries lie beyond. The cache stores values,
never autograd history.

A forward need not take every row: ``rows`` names the ones it computes (``CacheRows``), so
a step costs what its live rows need, not what the batch could hold. The first ``n`` rows
are views of the buffers (no copy); any other set is gathered for reading and written back
by an indexed assignment.
"""

from __future__ import annotations

import torch

# The cache rows a forward takes part in: all of them (None), the first n (an int), or those listed
# (a 1-d LongTensor on the cache's device, one per row of the forward, in order).
CacheRows = int | torch.Tensor | None


def kept_in_place(kept: torch.Tensor | None, fresh: torch.Tensor) -> torch.Tensor:
    """``fresh`` copied into ``kept`` when its shape, dtype and device allow, else ``fresh`` itself.

    Decoding weights stacked at ``setup_cache`` (the draft heads') are read by captured steps at
    their address, so a new tensor per generation would make every generation record its CUDA
    graph again; the weights may have changed since (training between samples), so the copy is
    refreshed every time."""
    if kept is None or (kept.shape, kept.dtype, kept.device) != (fresh.shape, fresh.dtype, fresh.device):
        return fresh
    if kept.data_ptr() != fresh.data_ptr():  # (a transformer head's may be the weight itself)
        with torch.inference_mode():  # it may have been made in inference mode, where decoding runs
            kept.copy_(fresh)
    return kept


def first_rows(rows: list[int] | None) -> int | None:
    """How many rows ``rows`` lists when they are the first ones (0, 1, ..., n - 1): those a forward
    and the work after it can take as views and slices; None for any other set, or for None."""
    return len(rows) if rows is not None and rows == list(range(len(rows))) else None


class KVCache:
    """Keys ``k[layer]`` and values ``v[layer]``, [B, H, S, hd] each, and the causal mask table
    ``causal`` [S, S] (row s: the slots a position at slot s attends to in a plain chain)."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (batch_size, n_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.causal = torch.ones(max_len, max_len, dtype=torch.bool, device=device).tril()

    def fits(self, n_layers: int, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this cache already has the asked-for shape, dtype and device (and can be reused)."""
        k = self.k[0]
        return (len(self.k), k.shape[0], k.shape[2], k.dtype, k.device) == (
            n_layers, batch_size, max_len, dtype, torch.device(device)
        )

    def n_rows(self, rows: CacheRows) -> int:
        """How many rows a forward over ``rows`` computes."""
        if rows is None:
            return self.k[0].shape[0]
        return rows if isinstance(rows, int) else rows.shape[0]

    def slot_index(self, slots: torch.Tensor, rows: CacheRows = None) -> torch.Tensor:
        """The scatter/gather index [b, H, P, hd] (an expanded view) of ``slots`` ([b, P] per row of
        ``rows``, or [P] for each). A forward builds it once for all its layers' ``write``s:
        building it costs several small ops, more than the write itself."""
        _, H, _, hd = self.k[0].shape
        b, P = self.n_rows(rows), slots.shape[-1]
        return torch.broadcast_to(slots, (b, P))[:, None, :, None].expand(b, H, P, hd)

    def write(
        self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor, live: int, rows: CacheRows = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k`` and ``v`` [b, H, P, hd] of ``layer`` at the slots of ``index`` (``slot_index``)
        in cache ``rows`` and return those rows' first ``live`` slots of the layer's buffers.

        Eager, ``scatter_`` with the prebuilt index is the fewest operations. Compiled, an
        indexed assignment: inductor writes that into the buffer in place, where it turned
        ``scatter_`` into a copy of the whole buffer and a copy back (70 us of a 620 us step
        of the tiny preset on a CPU). Listed rows are written by an indexed assignment too."""
        kbuf, vbuf = self.k[layer], self.v[layer]
        k, v = (t.detach().to(buf.dtype) for t, buf in ((k, kbuf), (v, vbuf)))
        if isinstance(rows, torch.Tensor):
            slots = index[:, 0, :, 0]  # [b, P]
            kbuf[rows[:, None], :, slots] = k.transpose(1, 2)
            vbuf[rows[:, None], :, slots] = v.transpose(1, 2)
            return kbuf[rows, :, :live], vbuf[rows, :, :live]
        if rows is not None:
            kbuf, vbuf = kbuf[:rows], vbuf[:rows]
        if torch.compiler.is_compiling():
            slots = index[:, 0, :, 0]  # [B, P]
            kbuf[_rows(slots), :, slots] = k.transpose(1, 2)
            vbuf[_rows(slots), :, slots] = v.transpose(1, 2)
        else:
            kbuf.scatter_(2, index, k)
            vbuf.scatter_(2, index, v)
        return kbuf[:, :, :live], vbuf[:, :, :live]

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy every layer's keys and values of row b from slots ``src[b]`` to slots ``dst[b]``
        ([B, n], or [n] for every row): an accepted draft-tree path moves down to follow the
        context. All entries are read before any is written, so the two may overlap; within a
        row the ``dst`` slots must be distinct (a row that moves fewer entries than the others
        pads with ``src = dst`` = a slot no other entry writes). Compiled, an indexed assignment, as
        in ``write``: inductor makes ``scatter_`` a copy of the whole buffer and back."""
        if torch.compiler.is_compiling():
            B = self.k[0].shape[0]
            src, dst = (torch.broadcast_to(t, (B, t.shape[-1])) for t in (src, dst))
            for buf in (*self.k, *self.v):
                buf[_rows(dst), :, dst] = buf[_rows(src), :, src]  # the right side is gathered first
            return
        src, dst = self.slot_index(src), self.slot_index(dst)
        for buf in (*self.k, *self.v):
            buf.scatter_(2, dst, buf.gather(2, src))


def _rows(slots: torch.Tensor) -> torch.Tensor:
    """[B, 1] row numbers, the index beside per-row ``slots`` [B, P] in an indexed assignment."""
    return torch.arange(slots.shape[0], device=slots.device)[:, None]
