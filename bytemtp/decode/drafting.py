"""How many draft heads a speculative step drafts from: all of them, or as many as pay for themselves.

A decoding forward over P positions costs more than one over a single position,
by an amount that depends on the machine: next to nothing on a GPU at batch 1,
but 1.25x (``tiny``) to 1.7-2.4x (``small`` on BLAS; 1.3-1.4x on the panel kernel,
``bytemtp.model.panels``) for P = 8 on a 2-core CPU, where 8-row matrix products are
compute-bound. A draft is worth verifying only when the bytes it is expected to
add outweigh what it adds to the step; and on the host the step drafts only from the
heads the next step will verify, so a head left out saves its logits, its draws and
its coupling too. ``DraftPolicy`` makes that choice on the host, from how often each
draft position has been accepted and a cost table measured once per model and machine
by ``bytemtp.decode.step_costs``. A batch's step then forwards 1 + the drafts its rows verify.

The table has a curve per number of rows the step forwards: a wide step of one row
is nearly as cheap as a narrow one (the weights are read once either way), but at
8 rows the same drafts turn every matrix product of the step 8 positions taller, and
on a CPU the step's cost grows with them. Priced at batch 1, a full batch verifies
drafts that cost more than they earn; priced at its own row count, it verifies fewer.

How many heads draft is decided from earlier steps' verdicts alone, before the drafts
exist, so greedy output stays identical to autoregressive decoding and sampled output
keeps head 1's distribution exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CostTable = tuple[tuple[float, ...], ...]  # [rows in a step - 1][positions - 1]: a step's relative cost

PRIOR_RATE = 0.8  # an unseen draft position's acceptance: optimistic, so that it gets tried
PRIOR_WEIGHT = 2.0  # ... worth this many verdicts
MEMORY = 0.99  # a kind's verdicts fade by this per step its rows take part in (about 100 steps' worth)


def expected_bytes(rates: Sequence[float]) -> list[float]:
    """Chance that draft j is accepted given the ones before it, j = 1..m -> bytes a step verifying
    0..m drafts decides on average: 1 + sum_{j<=k} prod_{i<=j} rate_i (draft j only counts if
    every draft before it was accepted too)."""
    expected, reached = [1.0], 1.0
    for rate in rates:
        reached *= rate
        expected.append(expected[-1] + reached)
    return expected


def draft_count(expected: Sequence[float], costs: Sequence[float]) -> int:
    """Bytes a step's rows expect together from 0..m drafts each, the step's relative cost at each
    -> the number of drafts k, one for all the rows, with the most bytes per cost. One count for
    all: the step is as wide as its widest row, and every row pays for it."""
    return max(range(len(costs)), key=lambda k: expected[k] / costs[k])


class DraftPolicy:
    """Chooses how many drafts the next step of a batch drafts and verifies, from a cost table
    [O][m+1] (row o - 1: the relative cost of steps of 1..m+1 positions for a step of o rows; a
    single curve serves every step) and each draft position's acceptance rate, kept apart for
    greedy and sampled rows (a greedy draft is right far more often).

    The rates are pooled over rows: a server's requests come and go in tens of steps, too few
    for a row to learn its own, and one count serves the whole batch anyway. They are counts
    of the verdicts verification reached (draft j is judged only after drafts 1..j-1 were
    accepted), fading so that the rates follow the text, with an optimistic prior that a
    position left out long enough returns to, so that it is tried again.

    Plain Python on a few floats, not numpy: it runs every step, right after a forward has
    pushed everything else out of the caches, where each small numpy call cost ~10 us."""

    def __init__(self, costs: CostTable, n_drafts: int):
        self.costs = [list(curve[: n_drafts + 1]) for curve in costs]
        self.judged = [[0.0] * n_drafts for _ in range(2)]  # [sampled, greedy][draft position]
        self.hits = [[0.0] * n_drafts for _ in range(2)]
        self.expected = [expected_bytes(self._rates(kind)) for kind in range(2)]  # kept current by ``learn``

    def _rates(self, kind: int) -> list[float]:
        return [(h + PRIOR_WEIGHT * PRIOR_RATE) / (j + PRIOR_WEIGHT) for h, j in zip(self.hits[kind], self.judged[kind])]

    def rates(self) -> np.ndarray:
        """[2, m] each draft position's acceptance rate given the ones before it: sampled, greedy."""
        return np.array([self._rates(0), self._rates(1)])

    def learn(self, verdicts: list[tuple[bool, int, int]]) -> None:
        """A step's verdicts, (greedy, drafts judged, drafts accepted) per row whose drafts came
        from the heads: drafts 1..accepted+1 were judged on their own (the first ``accepted`` of
        them accepted), the rest only as part of a run already broken."""
        m = len(self.judged[0])
        seen = [False, False]
        for greedy, n_judged, accepted in verdicts:
            kind = int(greedy)
            judged, hits = self.judged[kind], self.hits[kind]
            if not seen[kind]:
                judged[:] = [x * MEMORY for x in judged]
                hits[:] = [x * MEMORY for x in hits]
                seen[kind] = True
            for j in range(min(n_judged, accepted + 1, m)):
                judged[j] += 1
            for j in range(accepted):
                hits[j] += 1
        for kind in range(2):
            if seen[kind]:
                self.expected[kind] = expected_bytes(self._rates(kind))

    def choose(self, greedy: list[bool], rows: int, wide: int = 0) -> int:
        """How many drafts a step of ``rows`` forwarded rows (past the table: its last curve) drafts
        and verifies, for rows of which ``greedy`` says which are greedy. ``wide``: the step is
        expected to be at least this many drafts wide anyway (rows drafting from their own text
        verify as many as they found), so fewer drafts than that would save nothing."""
        if not greedy:
            return 0
        n_greedy = sum(greedy)
        n_sampled = len(greedy) - n_greedy
        expected = [n_sampled * s + n_greedy * g for s, g in zip(*self.expected)]
        costs = self.costs[min(rows, len(self.costs)) - 1]
        if wide:
            floor = costs[min(wide, len(costs) - 1)]
            costs = [max(c, floor) for c in costs]
        return draft_count(expected, costs)


def interpolate_costs(measured: dict[int, tuple[float, ...]]) -> CostTable:
    """Curves measured at some row counts -> one per row count 1..the largest: linear between two
    measured counts, and below the smallest, the smallest's (a step of fewer rows is no dearer)."""
    counts = sorted(measured)
    table = []
    for b in range(1, counts[-1] + 1):
        hi = next(c for c in counts if c >= b)
        lo = max((c for c in counts if c <= b), default=hi)
        w = (b - lo) / (hi - lo) if hi > lo else 0.0
        table.append(tuple((1 - w) * x + w * y for x, y in zip(measured[lo], measured[hi], strict=True)))
    return tuple(table)
