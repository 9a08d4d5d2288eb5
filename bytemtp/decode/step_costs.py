"""The cost table of ``DraftPolicy``, measured with the decoder's own engine step.

A forward alone is not what a step costs: the step also verifies, drafts the next block and
hands the host its decisions. Priced by the forward alone, a CPU server verified fewer drafts
than paid for themselves. So the table times whole ``Engine.step`` calls of a batch of greedy
rows, every row verifying and drafting as many drafts as the width being measured, at each
row count asked for; the widths are interleaved
within each round (so drift hits all alike), and each cost is the fastest of its rounds: a
step's first run at a new shape (width, and attention's cache span as the rows grow) pays
for compiling its kernels, which the generations pay once and the rounds could not average
away.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from bytemtp.decode.batch import RowParams
from bytemtp.decode.config import GenerationConfig
from bytemtp.decode.drafting import CostTable, interpolate_costs
from bytemtp.decode.generate import Decoder

ENDLESS = RowParams(max_new_bytes=1 << 40)  # rows that never stop while measured


@dataclasses.dataclass
class Fixed:
    """A ``DraftPolicy`` of one answer: every step drafts ``k`` (the width being timed)."""

    k: int

    def choose(self, greedy: list[bool], rows: int, wide: int = 0) -> int:
        return self.k

    def learn(self, verdicts: list[tuple[bool, int, int]]) -> None:
        """Nothing to learn."""


def adaptive_decoder(
    model: torch.nn.Module, config: GenerationConfig, compile: bool | None, cache_len: int, rows: tuple[int, ...]
) -> Decoder:
    """A decoder as ``config`` says whose chain verifies the drafts worth their cost, priced by its own
    steps (of the model as it decodes: bfloat16 on CUDA) measured at ``rows`` rows
    (``measure_step_costs``), and at one, with caches of ``cache_len`` positions. A compiled step has one width
    (``ChainDrafts.step``), so its curve is flat: nothing is timed, and no graph compiled for it."""
    unpriced = dataclasses.replace(config, draft_costs=(1.0,) * model.cfg.n_future)  # refused now, not after timing
    decoder = Decoder(model, unpriced, compile)
    if decoder.step is None:  # and at one row: an eager step forwards only the rows still live
        costs = measure_step_costs(decoder, cache_len, (1, *rows))
    else:  # compiled: one width whatever the step verifies, so a draft left out saves nothing
        costs = ((1.0,) * model.cfg.n_future,)
    decoder.config = dataclasses.replace(unpriced, draft_costs=costs)
    return decoder


@torch.inference_mode()
def measure_step_costs(decoder: Decoder, cache_len: int, rows: tuple[int, ...] = (1,), rounds: int = 8) -> CostTable:
    """Time of ``decoder``'s engine step verifying and drafting 0..n_drafts drafts per row, relative to none, for
    steps of 1..max(``rows``) rows: measured at each count of ``rows``, interpolated between them.
    ``cache_len`` should be the generations' (a compiled step then serves both with one shape)."""
    measured = {}
    for b in sorted(set(rows)):
        engine = decoder.engine(b, cache_len)
        engine.stop_at_bos, engine.strategy.policy = False, None
        times: list[list[float]] = [[] for _ in range(decoder.n_drafts + 1)]
        engine.start()
        try:
            for r in range(b):
                engine.admit(engine.row(b"", ENDLESS, r))
            for _ in range(rounds):
                for k in range(decoder.n_drafts + 1):
                    live = [True] * b
                    while any(engine.encoding) or engine.batch.fits(live) < k:  # a window cut comes first
                        engine.step()
                    engine.strategy.n_valid, engine.strategy.policy = [k] * b, Fixed(k)
                    t = time.perf_counter()
                    engine.step()
                    times[k].append(time.perf_counter() - t)
        finally:
            engine.close()
        fastest = [min(t) for t in times]
        measured[b] = tuple(f / fastest[0] for f in fastest)
    return interpolate_costs(measured)
