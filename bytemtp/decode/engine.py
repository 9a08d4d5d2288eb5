"""The decode engine: rows in a fixed number of slots, decoded together one fixed-shape step at a time.

The engine owns ``n_slots`` row slots (and the model's KV cache of as many rows) from
``start`` to ``close``. Between two steps a caller may ``admit`` a row into a free slot or
``retire`` one (its client has gone); ``step`` advances every live row by one forward and
returns the bytes each decided. Every row sees ``BOS + prompt``, as every training document
starts with BOS; a generated BOS ends that row's document. A step that has rows to encode
(just admitted, or whose context filled the cache) forwards only their contexts from slot 0,
the others parked, and decides each one's first byte and drafts; otherwise it forwards
every live row's pending byte and drafts at once (an eager forward computes only the rows
it names, so its cost follows how many slots are live, not how many there are), verifies them and drafts the next block
on the device (``bytemtp.decode.step``), and hands the host one small integer tensor. The
host emits each row's decided bytes through its stop matcher; a row that stops (a stop
string, end of document, its byte budget) frees its slot at once, for the next ``admit``.
A row whose context fills the cache is cut to the newest half of the window and re-encoded
(``bytemtp.decode.context``) while the others wait one step, exactly as a new row's prompt
is encoded.

``run`` is the whole of a batch generation (``sample``, ``bench``): every row admitted at
once, stepped until all stop. The server's scheduler (``bytemtp.serve``) drives the same
calls as requests come and go.

How the drafts are made and verified is a strategy: a chain (``ChainDrafts``) or a draft
tree (``TreeDrafts``), with the same interface. The engine never looks inside.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

from bytemtp import BOS
from bytemtp.decode.batch import Batch, Decision, GenerationStats, Row, RowParams
from bytemtp.decode.context import prompt_context, window_keep
from bytemtp.errors import BytemtpError
from bytemtp.model.config import round_up_64


class DraftStrategy(Protocol):
    """How a step's drafts are made and verified (``ChainDrafts``, ``TreeDrafts``)."""

    n_drafts: int

    def start(self, batch: Batch) -> None: ...  # fresh state for every slot of ``batch``

    def admit(self, batch: Batch, r: int) -> None: ...  # slot r now holds a new row: forget the old one's state

    def flush(self) -> None: ...  # anything left between steps that a prompt's forward must not overtake

    def first(
        self, batch: Batch, active: list[bool], logits: torch.Tensor, features: torch.Tensor
    ) -> dict[int, Decision]: ...

    def step(self, batch: Batch, active: list[bool]) -> dict[int, Decision]: ...


class Engine:
    """Decodes rows in ``n_slots`` slots with ``strategy``, a KV cache of ``cache_len`` positions
    per row; ``eager``: the strategy's steps are not compiled (they read only the cache slots in
    use). A generated BOS ends a row's document unless ``stop_at_bos`` is False."""

    def __init__(
        self,
        model: torch.nn.Module,
        strategy: DraftStrategy,
        n_slots: int,
        cache_len: int,
        eager: bool = True,
        stop_at_bos: bool = True,
    ):
        self.model, self.strategy, self.stop_at_bos = model, strategy, stop_at_bos
        device = next(model.parameters()).device
        self.batch = Batch([Row.vacant() for _ in range(n_slots)], cache_len, device, eager)
        self.encoding = [False] * n_slots  # rows the next step encodes: admitted, or cut to the window
        self.started = False

    def row(self, prompt: bytes, params: RowParams, index: int) -> Row:
        """A row for ``prompt``, not yet admitted: its context is ``BOS + prompt``, cut to the window."""
        window = min(self.model.cfg.max_seq_len, self.batch.cache_len)
        context = prompt_context(prompt, window)
        stats = GenerationStats(self.strategy.n_drafts, prompt_bytes_dropped=max(0, len(prompt) - len(context)))
        return Row(index, context, params, stats)

    @property
    def free(self) -> list[int]:
        """The vacant slots."""
        return [r for r, row in enumerate(self.batch.rows) if row.done]

    @property
    def live(self) -> int:
        """Rows decoding."""
        return self.batch.live

    @torch.inference_mode()
    def start(self) -> None:
        """Attach the KV cache and fresh strategy state: the engine holds them until ``close``."""
        self.model.setup_cache(len(self.batch.rows), self.batch.cache_len)
        self.strategy.start(self.batch)
        self.started = True

    def close(self) -> None:
        """Release the KV cache; the rows still decoding stop where they are."""
        if self.started:
            self.model.clear_cache()
            self.started = False

    @torch.inference_mode()
    def admit(self, row: Row) -> int:
        """Put ``row`` in a free slot -> the slot; the next step encodes its context. A row with no
        byte budget is done at once and takes no slot (-1)."""
        row.stats.wall_s, row.started = 0.0, time.perf_counter()
        if row.params.max_new_bytes == 0:
            row.stats.stop_reason, row.done = "max_bytes", True
            return -1
        free = self.free
        if not free:
            raise BytemtpError(f"the engine's {len(self.batch.rows)} rows are all taken")
        r = free[0]
        self.batch.rows[r] = row
        try:
            self.strategy.admit(self.batch, r)
        except BytemtpError:  # the strategy cannot decode it: the slot stays free
            self.batch.rows[r] = Row.vacant()
            raise
        self.encoding[r] = True
        return r

    def retire(self, row: Row) -> None:
        """Stop ``row`` before it is done (its client has gone) and free its slot."""
        for r, held in enumerate(self.batch.rows):
            if held is row:
                self._free(r, "cancelled")

    def _free(self, r: int, reason: str = "") -> None:
        row = self.batch.rows[r]
        row.done, row.stats.stop_reason = True, row.stats.stop_reason or reason
        row.stats.wall_s = time.perf_counter() - row.started
        self.batch.rows[r], self.encoding[r] = Row.vacant(), False

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, bytes]]:
        """One forward: encode the rows waiting for it, or advance every live row -> each row that
        decided something, with its output bytes (a row is ``done`` when it stopped; its slot is
        then free)."""
        rows = self.batch.rows
        if any(self.encoding):
            decisions = self._encode(self.encoding)
            self.encoding = [False] * len(rows)
        else:
            live = [not row.done for row in rows]
            decisions = self.strategy.step(self.batch, live) if any(live) else {}
        out = []
        for r, decision in decisions.items():
            row = rows[r]
            out.append((row, self._apply(row, decision)))
            if row.done:
                self._free(r)
            elif row.length == self.batch.cache_len:  # no room for the pending byte: cut and re-encode
                row.window = (row.window + [row.pending])[-window_keep(self.batch.cache_len) :]
                row.stats.window_cuts += 1
                self.encoding[r] = True
        return out

    def run(self, rows: Sequence[Row]) -> Iterator[tuple[int, bytes]]:
        """Decode ``rows`` (at most one per slot) together to the end: ``(row index, output bytes)``
        as they are decided; every row's ``stats`` is complete at the end."""
        self.start()
        try:
            for row in rows:
                self.admit(row)
            while self.live:
                for row, data in self.step():
                    if data:
                        yield row.index, data
        finally:
            for r, held in enumerate(self.batch.rows):
                if not held.done:  # the caller stopped early
                    self._free(r, "cancelled")
            self.close()

    def _encode(self, active: list[bool]) -> dict[int, Decision]:
        """Forward the whole contexts of the ``active`` rows from slot 0 (only theirs: the others are
        parked) and decide from each one's last id. Shapes vary with the prompts: always eager."""
        self.strategy.flush()
        rows, device = self.batch.rows, self.batch.device
        width = max(row.length for r, row in enumerate(rows) if active[r])
        ids = [row.window + [0] * (width - row.length) if active[r] else [0] * width for r, row in enumerate(rows)]
        parked = [min(row.length, self.batch.cache_len - 1) for row in rows]
        slots = [list(range(width)) if active[r] else [parked[r]] * width for r in range(len(rows))]
        slots = torch.tensor(slots, device=device)
        kv_len = min(self.batch.cache_len, round_up_64(width))
        logits, features = self.model.decode(
            torch.tensor(ids, device=device), slots, self.strategy.n_drafts + 1, kv_len=kv_len,
            rows=self.batch.computed(active),
        )
        last = torch.tensor([row.length - 1 if active[r] else 0 for r, row in enumerate(rows)], device=device)
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
            if stats.bytes == row.params.max_new_bytes:
                stats.stop_reason = "max_bytes"
                break
        if stats.stop_reason:
            row.done = True
            if stats.stop_reason != "stop_string":
                out += row.stops.flush()
        return bytes(out)
