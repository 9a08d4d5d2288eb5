"""Drafts from the text itself: each row's own byte trigrams, and a lookup of its own earlier text.

The corpus's byte trigrams (``bytemtp.decode.coupling``) say what usually follows two bytes;
a row's own text says what follows them *here*: the names a program defined, the phrase a
document repeats. Two uses, per row:

- **In-context mixing.** Each draft's coupling weights are multiplied by
  ``((257 n(c) + k) / (N + k)) ** t``, ``n(c)`` how often byte ``c`` followed the draft's two
  bytes before it in the row's text so far, ``N`` how often they occurred (``k`` pseudo-counts,
  strength ``t``): 1 until the pair has been seen, weighing more the more it has.
- **Lookup.** When the row's last few bytes (``LOOKUP_MIN_MATCH`` or more) occurred earlier in
  its text, the bytes that followed them there are the next drafts (prompt lookup decoding),
  as long a run as the step may be wide (``LOOKUP_LENGTH`` in an eager step when the row is the
  only one live, past the heads' reach; the heads' count in a compiled one, whose shapes are
  fixed, and beside other live rows, whose forward would widen with it).

Exactness is untouched. Greedy verification keeps head 1's bytes whatever the drafts. A
lookup draft is chosen, not drawn: it is judged by the point mass on it (accepted with head 1's
probability of it, the residual head 1 without it, ``bytemtp.decode.tree_sampling``'s ranked
candidates), and whether a row looks up depends on its text only, never on the random numbers
that drew or judge anything. A mixed draft is drawn from, and judged by, the mixed distribution.

The per-row state (text, counts: ``bytemtp_native.context_ops``) is made once per generation
and kept by the rows that draft from their text (greedy rows, by default): filled with a row's
context when it is first encoded, extended as bytes are decided (not again when the row is
re-encoded after its window is cut), reset when its slot takes a new request. Eager steps
read it on the host, counting their own bytes before drafting; a compiled step's lookups are
made on the host between steps, and on a CPU the step weighs its drafts by the same tables
(``InContext``, read in place: no copy), as of the step before. On a GPU they would cross to
the device every step, so compiled GPU steps go without the in-context weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from bytemtp_native.context_ops import PAIR_BASE, append, append_step, lookup, reset

CONTEXT_MIXING = 0.0  # in-context strength t when sampling: measured, it gains nothing there
GREEDY_CONTEXT_MIXING = 0.3  # greedy
# Chain rows draft from a lookup of their own text when it matches: greedy rows, whose text
# repeats itself (the demo model: 3.55 -> 6.89 bytes per forward); not sampled ones, for which a
# point mass is accepted with head 1's probability of its byte, less often than a draft drawn
# from a head close to head 1 (copy workload at T = 0.8: 2.64 without, 2.59 with).
GREEDY_LOOKUP, SAMPLED_LOOKUP = True, False
# Bytes a lookup needs to match; 6 did no better (copy workload, greedy, 31-byte lookups: 7.67
# bytes per forward against 7.79).
LOOKUP_MIN_MATCH = 4
# Bytes an eager one-row step's lookup draft runs to. Greedy on the demo model (600-step run's
# step 480), 16 val prompts, bytes per forward and speedup: 7 5.59 4.04x, 15 7.37 5.05x, 23 8.24
# 5.60x, 31 8.70 5.51x.
LOOKUP_LENGTH = 23
CONTEXT_PSEUDO = 1.0  # pseudo-counts of the uniform distribution in the in-context factor
TABLE_PAIRS = 1024  # distinct byte pairs counted per row
TEXT_BYTES = 4096  # bytes of each row's text kept for lookups (older halves are dropped)


@dataclass(frozen=True)
class ContextDrafting:
    """How drafts use each row's own text: ``greedy_mixing`` and ``sampled_mixing`` the in-context
    strength ``t`` of greedy and of sampled rows (0: off), ``greedy_lookup`` and ``sampled_lookup``
    whether they draft from lookups, when the text's last ``min_match`` bytes or more occurred
    before, ``length`` bytes of them in an eager step."""

    greedy_mixing: float = 0.0
    sampled_mixing: float = 0.0
    greedy_lookup: bool = False
    sampled_lookup: bool = False
    min_match: int = LOOKUP_MIN_MATCH
    length: int = LOOKUP_LENGTH

    @property
    def lookup(self) -> bool:
        """Some rows may draft from lookups."""
        return self.greedy_lookup or self.sampled_lookup

    @property
    def on(self) -> bool:
        return self.greedy_mixing > 0 or self.sampled_mixing > 0 or self.lookup

    def lookup_for(self, greedy: bool) -> bool:
        return self.greedy_lookup if greedy else self.sampled_lookup

    def uses_text(self, greedy: bool) -> bool:
        """Whether a greedy (or sampled) row drafts from its text at all: only such rows keep one."""
        return self.lookup_for(greedy) or (self.greedy_mixing if greedy else self.sampled_mixing) > 0

    def mixing(self, greedy: list[bool]) -> np.ndarray:
        """[B] the in-context strength of rows that are ``greedy`` or not."""
        return np.array([self.greedy_mixing if g else self.sampled_mixing for g in greedy], np.float64)


class InContext(NamedTuple):
    """The rows' counts as a compiled step reads them: ``keys`` [B, H], ``counts`` [B, H, V] (the
    ``RowTexts`` tables; on a CPU, the host arrays themselves) and each row's strength ``mixing`` [B]."""

    keys: torch.Tensor
    counts: torch.Tensor
    mixing: torch.Tensor

    def factor(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[B, V] the in-context factor after each row's bytes ``a`` then ``b`` [B], as
        ``bytemtp_native.context_ops.apply_context`` applies it: ``((257 n(c) + k) / k) ** t`` for the
        bytes seen after the pair, 1 for the others."""
        match = self.keys == (a * PAIR_BASE + b)[:, None]  # a pair owns at most one slot
        slot = match.int().argmax(dim=1)[:, None, None].expand(-1, 1, self.counts.shape[-1])
        n = self.counts.gather(1, slot)[:, 0] * match.any(dim=1)[:, None]
        k = CONTEXT_PSEUDO
        return torch.where(n > 0, ((PAIR_BASE * n + k) / k) ** self.mixing[:, None], 1.0)


class RowTexts:
    """Each row's text and its byte-trigram counts (host arrays; on a CPU the step reads them in
    place). ``vocab``: the width of a count row, as the draft heads' logits."""

    def __init__(self, n_rows: int, vocab: int, pairs: int = TABLE_PAIRS, text_bytes: int = TEXT_BYTES):
        assert vocab >= PAIR_BASE
        self.history = np.zeros((n_rows, text_bytes), np.int64)
        self.lengths = np.zeros(n_rows, np.int64)
        self.keys = np.full((n_rows, pairs), -1, np.int64)
        self.counts = np.zeros((n_rows, pairs, vocab), np.float32)
        self.totals = np.zeros((n_rows, pairs), np.float32)
        self.started = np.zeros(n_rows, np.bool_)

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.history, self.lengths, self.keys, self.counts, self.totals

    def reset(self, r: int) -> None:
        """Row ``r`` holds a new request: forget its text."""
        reset(*self.arrays, r)
        self.started[r] = False

    def begin(self, r: int, context: list[int]) -> None:
        """Row ``r``'s context as first encoded (``BOS + prompt``); a later re-encoding of the row
        (after its window was cut) counts nothing again."""
        if not self.started[r]:
            append(*self.arrays, r, np.asarray(context, np.int64))
            self.started[r] = True

    def extend(self, r: int, new: list[int]) -> None:
        """Bytes decided for row ``r``."""
        append(*self.arrays, r, np.asarray(new, np.int64))

    def extend_step(self, active: np.ndarray, fed: np.ndarray, accepted: np.ndarray, next_byte: np.ndarray) -> None:
        """A chain step's decisions, for every ``active`` row at once (``append_step``)."""
        append_step(*self.arrays, active, fed, accepted, next_byte)

    def lookup(self, r: int, longest: int, min_match: int = LOOKUP_MIN_MATCH) -> list[int]:
        """Row ``r``'s lookup draft of ``longest`` bytes, or [] when its last bytes have no earlier match."""
        out = np.zeros(longest, np.int64)
        return out.tolist() if lookup(self.history, self.lengths, r, min_match, longest, out) else []

    def text(self, r: int) -> list[int]:
        return self.history[r, : self.lengths[r]].tolist()

    def tensors(self, mixing: np.ndarray) -> InContext:
        """The tables as a compiled CPU step reads them, in place (no copy), with the rows' ``mixing``."""
        return InContext(torch.from_numpy(self.keys), torch.from_numpy(self.counts), torch.from_numpy(mixing).float())
