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
"""

from __future__ import annotations

import torch


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

    def slot_index(self, slots: torch.Tensor) -> torch.Tensor:
        """The scatter/gather index [B, H, P, hd] (an expanded view) of ``slots`` ([B, P] per row,
        or [P] for every row). A forward builds it once for all its layers' ``write``s: building
        it costs several small ops, more than the write itself."""
        B, H, _, hd = self.k[0].shape
        P = slots.shape[-1]
        return torch.broadcast_to(slots, (B, P))[:, None, :, None].expand(B, H, P, hd)

    def write(
        self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k`` and ``v`` [B, H, P, hd] of ``layer`` at the slots of ``index`` (``slot_index``)
        and return the layer's whole buffers.

        Eager, ``scatter_`` with the prebuilt index is the fewest operations. Compiled, an
        indexed assignment: inductor writes that into the buffer in place, where it turned
        ``scatter_`` into a copy of the whole buffer and a copy back (70 us of a 620 us step
        of the tiny preset on a CPU)."""
        k, v = (t.detach().to(buf.dtype) for t, buf in ((k, self.k[layer]), (v, self.v[layer])))
        if torch.compiler.is_compiling():
            slots = index[:, 0, :, 0]  # [B, P]
            self.k[layer][_rows(slots), :, slots] = k.transpose(1, 2)
            self.v[layer][_rows(slots), :, slots] = v.transpose(1, 2)
        else:
            self.k[layer].scatter_(2, index, k)
            self.v[layer].scatter_(2, index, v)
        return self.k[layer], self.v[layer]

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
