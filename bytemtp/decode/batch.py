"""The rows of a decoding batch as the host sees them, and the cache slots a step writes.

Each row has its own context (``window``, the ids in its part of the KV cache), its
own pending byte (decided, not yet in the cache), stop matcher, statistics and random
generator. A forward over the batch has one shape [B, P] for all rows; a row that takes
no part in it (it has stopped, or waits while another row's context is re-encoded) is
*parked*: all its P positions write the one slot its pending byte will be written to
next, so whatever they leave there is overwritten before anything reads it, and its
outputs are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from bytemtp.model.config import round_up_64

if TYPE_CHECKING:
    from bytemtp.decode.config import GenerationStats
    from bytemtp.decode.stops import StopMatcher


@dataclass
class Row:
    """One sequence of the batch. ``index``: its place in the caller's list of prompts."""

    index: int
    window: list[int]
    stops: StopMatcher
    stats: GenerationStats
    generator: torch.Generator | None
    pending: int = 0
    done: bool = False

    @property
    def length(self) -> int:
        """Ids in the row's KV cache: the slot its pending byte goes to."""
        return len(self.window)


@dataclass
class Decision:
    """What one forward decided for a row: ``entered`` the ids now in the cache for good (the
    pending byte and the accepted drafts; none after a prompt's forward), ``decided`` the
    output bytes (the accepted drafts, then head 1's next byte), ``judged`` how many drafts
    (a tree: how many depths) verification had, and ``broken`` non-finite logits."""

    entered: list[int]
    decided: list[int]
    judged: int
    broken: bool = False

    @property
    def accepted(self) -> int:
        return len(self.decided) - 1


@dataclass
class Batch:
    """The rows decoded together, their cache length ``cache_len`` and device; ``eager`` steps
    attend only to the cache slots in use (a compiled step keeps its one shape)."""

    rows: list[Row]
    cache_len: int
    device: torch.device
    eager: bool = True

    def fits(self, active: list[bool]) -> int:
        """Drafts that fit after every active row's pending byte before the cache ends. A step is
        never wider than this: near the end of the window (a generation about to be cut) the
        step narrows for a few steps, rather than let any position write past the cache, where
        it could only overwrite a slot in use. A compiled step compiles those widths once too."""
        return min(self.cache_len - 1 - row.length for r, row in enumerate(self.rows) if active[r])

    def slots(self, width: int, active: list[bool]) -> torch.Tensor:
        """Cache slots [B, width] of a step: an active row writes ``length + 0 .. width-1``; a parked
        row writes its pending byte's slot (the last slot, if its cache is full: it has stopped)."""
        out = []
        for r, row in enumerate(self.rows):
            base = min(row.length, self.cache_len - 1)
            out.append([base + j for j in range(width)] if active[r] else [base] * width)
        return torch.tensor(out, device=self.device)

    def kv_len(self, width: int) -> int | None:
        """Cache slots attention reads in a forward of ``width`` positions: eager, those any row can
        reach, rounded up to 64; compiled, all (None)."""
        if not self.eager:
            return None
        return min(self.cache_len, round_up_64(max(row.length for row in self.rows) + width))
