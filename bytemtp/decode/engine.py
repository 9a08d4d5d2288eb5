"""The decode engine: a batch of prompts decoded together, one fixed-shape step at a time.

Every row of the batch sees ``BOS + prompt``, as every training document starts with
BOS; a generated BOS ends that row's document. The prompts' forward (one, for rows of
any lengths) decides each row's first byte and drafts; then each step forwards every
live row's pending byte and drafts at once, verifies them and drafts the next block on
the device (``bytemtp.decode.step``), and hands the host one small integer tensor.
The host emits each row's decided bytes through its stop matcher and retires the rows
that stop (a stop string, end of document, the byte budget): they are parked, so the
step keeps its shape and the other rows run on. A row whose context fills the cache is
cut to the newest half of the window and re-encoded (``bytemtp.decode.context``) while
the others wait one step.

How the drafts are made and verified is a strategy: a chain (``ChainDrafts``) or a draft
tree (``TreeDrafts``), with the same interface. The engine never looks inside.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

import torch

from bytemtp import BOS
from bytemtp.decode.batch import Batch, Decision, Row
from bytemtp.decode.context import window_keep
from bytemtp.errors import BytemtpError
from bytemtp.model.config import round_up_64


class DraftStrategy(Protocol):
    """How a step's drafts are made and verified (``ChainDrafts``, ``TreeDrafts``)."""

    n_drafts: int

    def start(self, batch: Batch) -> None: ...

    def flush(self) -> None: ...  # anything left between steps that a prompt's forward must not overtake

    def first(
        self, batch: Batch, active: list[bool], logits: torch.Tensor, features: torch.Tensor
    ) -> dict[int, Decision]: ...

    def step(self, batch: Batch, active: list[bool]) -> dict[int, Decision]: ...


class Engine:
    """Decodes ``batch`` with ``strategy`` and a byte budget ``max_new_bytes`` per row; a
    generated BOS ends a row's document unless ``stop_at_bos`` is False."""

    def __init__(
        self,
        model: torch.nn.Module,
        strategy: DraftStrategy,
        batch: Batch,
        max_new_bytes: int,
        stop_at_bos: bool = True,
    ):
        self.model, self.strategy, self.batch, self.max_new_bytes = model, strategy, batch, max_new_bytes
        self.stop_at_bos = stop_at_bos

    @torch.inference_mode()
    def run(self) -> Iterator[tuple[int, bytes]]:
        """``(row, output bytes)`` as they are decided; every row's ``stats`` is complete at the end."""
        rows, start = self.batch.rows, time.perf_counter()
        if self.max_new_bytes == 0:
            for row in rows:
                row.stats.stop_reason, row.done = "max_bytes", True
            return
        self.model.setup_cache(len(rows), self.batch.cache_len)
        self.strategy.start(self.batch)
        try:
            decisions = self._encode([True] * len(rows))
            while decisions:
                cut = [False] * len(rows)
                for r, decision in decisions.items():
                    out = self._apply(rows[r], decision)
                    if out:
                        yield r, out
                    if rows[r].done:
                        rows[r].stats.wall_s = time.perf_counter() - start
                    elif rows[r].length == self.batch.cache_len:  # no room for the pending byte
                        cut[r] = True
                if any(cut):
                    for r in (r for r in range(len(rows)) if cut[r]):
                        row = rows[r]
                        row.window = (row.window + [row.pending])[-window_keep(self.batch.cache_len) :]
                        row.stats.window_cuts += 1
                    decisions = self._encode(cut)
                    continue
                live = [not row.done for row in rows]
                decisions = self.strategy.step(self.batch, live) if any(live) else {}
        finally:
            self.model.clear_cache()
            for row in rows:
                row.stats.wall_s = row.stats.wall_s or time.perf_counter() - start

    def _encode(self, active: list[bool]) -> dict[int, Decision]:
        """Forward the whole contexts of the ``active`` rows from slot 0 (the others parked) and
        decide from each one's last id. Shapes vary with the prompts: always eager."""
        self.strategy.flush()
        rows, device = self.batch.rows, self.batch.device
        width = max(row.length for r, row in enumerate(rows) if active[r])
        ids = [row.window + [0] * (width - row.length) if active[r] else [0] * width for r, row in enumerate(rows)]
        parked = [min(row.length, self.batch.cache_len - 1) for row in rows]
        slots = [list(range(width)) if active[r] else [parked[r]] * width for r in range(len(rows))]
        slots = torch.tensor(slots, device=device)
        kv_len = min(self.batch.cache_len, round_up_64(width))
        logits, features = self.model.decode(
            torch.tensor(ids, device=device), slots, self.strategy.n_drafts + 1, kv_len=kv_len
        )
        last = torch.tensor([max(row.length, 1) - 1 if active[r] else 0 for r, row in enumerate(rows)], device=device)
        logits = logits.gather(1, last[:, None, None].expand(-1, 1, logits.shape[-1]))
        features = features.gather(1, last[:, None, None, None].expand(-1, 1, *features.shape[2:]))
        return self.strategy.first(self.batch, active, logits, features)

    def _apply(self, row: Row, decision: Decision) -> bytes:
        """Take a decision into the row (its cache, pending byte, statistics) and return the bytes
        it outputs; marks the row done when it stops."""
        if decision.broken:
            raise BytemtpError(
                "the model's logits are not finite (NaN or infinite weights?): refusing to decode them as bytes"
            )
        row.stats.record_step(decision.judged, decision.accepted)
        row.window.extend(decision.entered)
        row.pending = decision.decided[-1]
        stats, out = row.stats, bytearray()
        for b in decision.decided:
            if b == BOS and self.stop_at_bos:
                stats.stop_reason = "end_of_document"
                break
            stats.bytes += 1
            if b != BOS:  # decoding on through a BOS: it takes budget, but is no byte to output
                out += row.stops.push(bytes((b,)))
            if row.stops.hit:
                stats.stop_reason = "stop_string"
                break
            if stats.bytes == self.max_new_bytes:
                stats.stop_reason = "max_bytes"
                break
        if stats.stop_reason:
            row.done = True
            if stats.stop_reason != "stop_string":
                out += row.stops.flush()
        return bytes(out)
