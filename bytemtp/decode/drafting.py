"""How many drafts a speculative step verifies: all of them, or as many as pay for themselves.

A decoding forward over P positions costs more than one over a single position,
by an amount that depends on the machine: next to nothing on a GPU at batch 1,
but 1.25x (``tiny``) to 1.7-2.4x (``small`` on BLAS; 1.3-1.4x on the panel kernel,
``bytemtp.model.panels``) for P = 8 on a 2-core CPU, where 8-row matrix products are
compute-bound. A draft is worth verifying only when the bytes it is expected to
add outweigh what it adds to the forward. ``DraftPolicy`` makes that choice on
the device from the draft heads' calibrated confidence and a cost curve measured
once per model and machine by ``measure_step_costs``.

Which drafts are verified is decided from the drafts alone, before head 1 judges
them, so greedy output stays identical to autoregressive decoding and sampled
output keeps head 1's distribution exactly.
"""

from __future__ import annotations

import statistics
import time

import torch

NO_DRAFT = -1  # marks the drafts a step chose not to verify (never a byte id)


def draft_count(confidence: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """[m] chance that each draft is right, [m+1] relative cost of forwards of 1..m+1
    positions -> [1] the number of drafts k that maximises expected bytes per cost.

    A step verifying k drafts decides 1 + sum_{j<=k} prod_{i<=j} confidence_i bytes
    on average: draft j only counts if every draft before it was accepted too.
    """
    expected = torch.cat((confidence.new_ones(1), 1 + confidence.cumprod(0).cumsum(0)))
    return (expected / costs).argmax().view(1)


class DraftPolicy:
    """Chooses which of each step's new drafts to verify, from a cost curve [m+1] and the
    draft heads' confidence (their top probabilities) [m].

    A head's top probability ranks its drafts well but misjudges how often they are
    accepted, so each head's confidence is scaled by its hits over its summed
    confidence on the drafts verification reached so far in this generation (one
    pseudo-observation each to start). The acceptances it learns from are of past
    steps only, so the choice still never depends on the drafts being judged. All of
    it stays on the device: no host sync beyond the step's own.
    """

    def __init__(self, costs: torch.Tensor):
        self.costs = costs
        m = costs.numel() - 1
        self.hits = costs.new_ones(m)
        self.predicted = costs.new_ones(m)
        self.confidence = costs.new_zeros(m)  # of the latest drafts

    def choose(
        self, drafts: torch.Tensor, confidence: torch.Tensor, n_judged: int = 0, accepted: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``drafts`` [m] with those past ``draft_count`` replaced by ``NO_DRAFT``.

        ``n_judged`` drafts of the previous choice were just verified, the first
        ``accepted`` [1] of them accepted: that is learnt first.
        """
        if n_judged:
            j = torch.arange(n_judged, device=self.costs.device)
            self.predicted[:n_judged] += (j <= accepted) * self.confidence[:n_judged]
            self.hits[:n_judged] += j < accepted
        self.confidence = confidence
        calibrated = (confidence * self.hits / self.predicted).clamp(max=1.0)
        keep = torch.arange(drafts.numel(), device=drafts.device) < draft_count(calibrated, self.costs)
        return torch.where(keep, drafts, NO_DRAFT)


def verified_drafts(drafts: list[int]) -> list[int]:
    """The drafts a step chose to verify: those before the first ``NO_DRAFT``."""
    return drafts[: drafts.index(NO_DRAFT)] if NO_DRAFT in drafts else drafts


@torch.inference_mode()
def measure_step_costs(
    model: torch.nn.Module, n_positions: int, cache_len: int, step_forward=None, rounds: int = 7
) -> tuple[float, ...]:
    """Time of a decoding forward of 1..``n_positions`` positions, relative to one position.

    Forwards of every size are interleaved within each round (so drift hits all
    alike) and the first round is discarded (it absorbs compilation); each cost is
    a median. The forward includes the host transfer every real step ends with.
    ``cache_len`` should be the generations' (``generation_cache_length``): attention
    reads the whole cache, and a compiled step then serves both with the same graphs.
    """
    step = step_forward or model.decode
    device = next(model.parameters()).device
    start = cache_len - n_positions
    ids = torch.zeros(1, n_positions, dtype=torch.long, device=device)
    times: list[list[float]] = [[] for _ in range(n_positions)]
    model.setup_cache(1, cache_len)
    try:
        for r in range(rounds + 1):
            for p in range(1, n_positions + 1):
                t = time.perf_counter()
                logits, _ = step(ids[:, :p], torch.arange(start, start + p, device=device), n_positions)
                logits[0, -1, 0].item()
                if r:
                    times[p - 1].append(time.perf_counter() - t)
    finally:
        model.clear_cache()
    medians = [statistics.median(t) for t in times]
    return tuple(m / medians[0] for m in medians)
