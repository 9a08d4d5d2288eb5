"""How many drafts a speculative step verifies: all of them, or as many as pay for themselves.

A decoding forward over P positions costs more than one over a single position,
by an amount that depends on the machine: next to nothing on a GPU at batch 1,
but 1.25x (``tiny``) to 1.7-2.4x (``small`` on BLAS; 1.3-1.4x on the panel kernel,
``bytemtp.model.panels``) for P = 8 on a 2-core CPU, where 8-row matrix products are
compute-bound. A draft is worth verifying only when the bytes it is expected to
add outweigh what it adds to the forward. ``DraftPolicy`` makes that choice on
the device from the draft heads' calibrated confidence and a cost table measured
once per model and machine by ``bytemtp.decode.step_costs``. A batch's step then
forwards 1 + the most drafts any of its rows verifies.

The table has a curve per number of rows the step forwards: a wide step of one row
is nearly as cheap as a narrow one (the weights are read once either way), but at
8 rows the same drafts turn every matrix product of the step 8 positions taller, and
on a CPU the step's cost grows with them. Priced at batch 1, a full batch verifies
drafts that cost more than they earn; priced at its own row count, it verifies fewer.

Which drafts are verified is decided from the drafts alone, before head 1 judges
them, so greedy output stays identical to autoregressive decoding and sampled
output keeps head 1's distribution exactly.
"""

from __future__ import annotations

import torch

CostTable = tuple[tuple[float, ...], ...]  # [rows in a step - 1][positions - 1]: a forward's relative cost


def draft_count(confidence: torch.Tensor, costs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[..., m] chance that each draft of each row is right, [m+1] relative cost of forwards of
    1..m+1 positions -> the number of drafts k, one for all the rows, that maximises the bytes they
    are expected to decide together per cost of their step (``weights`` [...]: rows counted 0 or 1).

    A step verifying k drafts decides 1 + sum_{j<=k} prod_{i<=j} confidence_i bytes
    of a row on average: draft j only counts if every draft before it was accepted too.
    One count for all: the step is as wide as its widest row, and every row pays for it.
    """
    ones = confidence.new_ones(*confidence.shape[:-1], 1)
    expected = torch.cat((ones, 1 + confidence.cumprod(-1).cumsum(-1)), dim=-1)
    if weights is not None:
        expected = expected * weights[..., None]
    return (expected.reshape(-1, expected.shape[-1]).sum(0) / costs).argmax()


class DraftPolicy:
    """Chooses how many of the rows' new drafts the next step verifies, from a cost table [O, m+1]
    (row o - 1: the relative cost of forwards of 1..m+1 positions for a step of o rows; a curve
    [m+1] serves every step) and the draft heads' confidence (their top probabilities) [B, m].

    A head's top probability ranks its drafts well but misjudges how often they are
    accepted, so each head's confidence is scaled, per row, by its hits over its summed
    confidence on the drafts verification reached so far in that row's generation (one
    pseudo-observation each to start). The acceptances it learns from are of past
    steps only, so the choice still never depends on the drafts being judged. All of
    it stays on the device: no host sync beyond the step's own.
    """

    def __init__(self, costs: torch.Tensor, n_rows: int = 1):
        self.costs = torch.atleast_2d(costs)
        m = self.costs.shape[1] - 1
        self.hits = costs.new_ones(n_rows, m)
        self.predicted = costs.new_ones(n_rows, m)
        self.confidence = costs.new_zeros(n_rows, m)  # of each row's latest drafts

    def reset(self, r: int) -> None:
        """Row ``r`` holds a new generation: its calibration starts again from the pseudo-observations."""
        self.hits[r], self.predicted[r], self.confidence[r] = 1.0, 1.0, 0.0

    def choose(
        self,
        confidence: torch.Tensor,
        n_judged: torch.Tensor,
        accepted: torch.Tensor,
        active: torch.Tensor,
        rows: int = 1,
    ) -> torch.Tensor:
        """[B] how many of the new drafts to verify (``draft_count``: the same for every row), for drafts of ``confidence``
        [B, m], priced for the next step forwarding ``rows`` rows (past the table: its last curve).
        Learnt first: the previous choice's first ``n_judged`` [B] drafts were just verified, the
        first ``accepted`` [B] of them accepted. Rows not ``active`` [B] learn and change nothing."""
        j = torch.arange(self.hits.shape[1], device=self.costs.device)
        judged = (j < n_judged[:, None]) & active[:, None]
        self.predicted += (judged & (j <= accepted[:, None])) * self.confidence
        self.hits += judged & (j < accepted[:, None])
        self.confidence = torch.where(active[:, None], confidence, self.confidence)
        calibrated = (confidence * self.hits / self.predicted).clamp(max=1.0)
        k = draft_count(calibrated, self.costs[min(rows, self.costs.shape[0]) - 1], active.to(calibrated.dtype))
        return k.expand(confidence.shape[0])


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

