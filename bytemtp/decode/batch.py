"""The rows of a decoding batch as the host sees them, and the cache slots a step writes.

The batch has a fixed number of row slots, each holding a row or vacant. Each row has
its own settings (``RowParams``: sampling, stop strings, seed, byte budget), context
(``window``, the ids in its part of the KV cache), pending byte (decided, not yet in the
cache), stop matcher, statistics and random generator. A forward over the batch has one
shape [B, P] for all slots; a row that takes no part in it (it has stopped, waits while
another row's context is encoded, or the slot is vacant) is *parked*: an eager forward
leaves it out (``extent``), and in a compiled one all its P positions write the one slot
its pending byte will be written to next, so whatever they leave there is overwritten
before anything reads it; its outputs are ignored.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from bytemtp import MAX_SEED
from bytemtp.decode.sampling import SamplingConfig
from bytemtp.decode.stops import StopMatcher
from bytemtp.errors import BytemtpError
from bytemtp.model.config import round_up_64

STOP_REASONS = ("max_bytes", "stop_string", "end_of_document", "cancelled")


@dataclass(frozen=True)
class RowParams:
    """One row's settings: how it samples (``temperature`` 0: greedy), the strings that end it
    (not output), its seed (None: a fresh one; unused when greedy) and its byte budget."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[bytes, ...] = ()
    seed: int | None = None
    max_new_bytes: int = 256

    def __post_init__(self) -> None:
        if self.max_new_bytes < 0:
            raise BytemtpError(f"--max-bytes: must be >= 0, got {self.max_new_bytes}")
        if any(not s for s in self.stop):
            raise BytemtpError("--stop: stop strings must not be empty")
        self.sampling  # validates temperature, top-k, top-p

    @cached_property  # read by every step
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)


@dataclass
class Row:
    """One sequence of the batch. ``index``: the caller's name for it (its place in a list of
    prompts, a request's number)."""

    index: int
    window: list[int]
    params: RowParams
    stats: GenerationStats
    stops: StopMatcher = field(init=False)
    generator: torch.Generator | None = field(init=False)
    pending: int = 0
    done: bool = False
    started: float = 0.0  # perf_counter() at admission

    def __post_init__(self) -> None:
        self.stops = StopMatcher(self.params.stop)
        self.generator = None
        if not self.params.sampling.greedy:  # its own random numbers: its output does not depend on the other rows
            self.generator = torch.Generator()
            seed = self.params.seed
            self.stats.seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed  # a seed --seed takes back
            self.generator.manual_seed(self.stats.seed)

    @staticmethod
    def vacant() -> "Row":
        """What a free slot holds: a stopped row with an empty context, parked at slot 0."""
        return Row(-1, [], RowParams(), GenerationStats(0), done=True)

    @property
    def last(self) -> int:
        """The last id in the row's context (0 for a vacant slot's)."""
        return self.window[-1] if self.window else 0

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

    rows: list[Row]  # one per slot
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
        """Cache slots [B, width] of a step (``slot_array``) on the device."""
        return torch.from_numpy(self.slot_array(width, active)).to(self.device)

    def slot_array(self, width: int, active: list[bool]) -> np.ndarray:
        """Cache slots [B, width] of a step, on the host: an active row writes ``length + 0 .. width-1``;
        a parked row writes its pending byte's slot (the last slot, if its cache is full: it has stopped)."""
        base = np.minimum([row.length for row in self.rows], self.cache_len - 1)[:, None]
        return base + np.arange(width) * np.array(active, dtype=np.int64)[:, None]

    @property
    def live(self) -> int:
        """Rows decoding (not stopped, not vacant)."""
        return sum(not row.done for row in self.rows)

    @staticmethod
    def computed(active: list[bool]) -> list[int] | None:
        """The rows a forward over the ``active`` ones names (``decode``'s ``rows``): None for every slot."""
        return None if all(active) else [r for r, on in enumerate(active) if on]

    def extent(self, width: int, active: list[bool]) -> dict[str, int | list[int] | None]:
        """What an eager forward of ``width`` positions over the ``active`` rows computes, as
        ``decode``'s keywords: ``rows``, the active ones (None: every slot), and ``kv_len``, the
        cache slots any of them can reach, rounded up to 64. A parked row costs nothing, so a
        step follows the batch's occupancy. Compiled: {} (one shape, every slot)."""
        if not self.eager:
            return {}
        reach = max(row.length for on, row in zip(active, self.rows) if on) + width
        return {"kv_len": min(self.cache_len, round_up_64(reach)), "rows": self.computed(active)}


@dataclass
class GenerationStats:
    """What one generation did. ``bytes`` counts bytes the model generated,
    including a stop string that ended generation (which is not output).

    Acceptance per draft head counts a draft as attempted when verification
    reached it (every earlier draft of its block was accepted), so
    ``acceptance[j]`` is head j+2's hit rate given a chance.
    """

    draft_heads: int
    bytes: int = 0
    forwards: int = 0  # including the prompt's and any re-encoding of the window
    window_cuts: int = 0
    lookups: int = 0  # decisions after which the row drafted from a lookup of its own text
    prompt_bytes_dropped: int = 0
    drafted: int = 0  # drafts verified, over all steps
    attempted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    wall_s: float = 0.0  # from the start of iteration to its end
    stop_reason: str = ""  # one of STOP_REASONS
    seed: int | None = None  # the sampling seed actually used (None when greedy)

    def __post_init__(self) -> None:
        self.attempted = self.attempted or [0] * self.draft_heads
        self.accepted = self.accepted or [0] * self.draft_heads

    @property
    def mode(self) -> str:
        return "speculative" if self.draft_heads else "autoregressive"

    @property
    def bytes_per_forward(self) -> float:
        return self.bytes / self.forwards if self.forwards else 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def acceptance(self) -> list[float]:
        return [a / t if t else 0.0 for a, t in zip(self.accepted, self.attempted)]

    def absorb(self, other: "GenerationStats") -> None:
        """Add another generation's counts (bytes, forwards, acceptance) to these: a total over runs."""
        self.bytes += other.bytes
        self.forwards += other.forwards
        self.drafted += other.drafted
        self.lookups += other.lookups
        self.accepted = [a + b for a, b in zip(self.accepted, other.accepted, strict=True)]
        self.attempted = [a + b for a, b in zip(self.attempted, other.attempted, strict=True)]

    def record_step(self, n_drafts: int, n_accepted: int) -> None:
        self.forwards += 1
        self.drafted += n_drafts
        for j in range(min(n_drafts, n_accepted + 1, len(self.attempted))):  # a lookup may run past the heads
            self.attempted[j] += 1
            self.accepted[j] += j < n_accepted

    def summary(self) -> str:
        """A few human-readable lines (what ``bytemtp sample --stats`` prints)."""
        lines = [
            f"{self.mode}: {self.bytes} bytes in {self.forwards} forwards "
            f"({self.bytes_per_forward:.2f} bytes/forward), {self.wall_s:.3f} s, "
            f"{self.bytes_per_s:.1f} bytes/s, stopped by {self.stop_reason}"
            + ("" if self.seed is None else f", seed {self.seed}")
        ]
        if self.draft_heads:
            per_head = ", ".join(
                f"h{j + 2} {rate:.2f} ({a}/{t})"
                for j, (rate, a, t) in enumerate(zip(self.acceptance, self.accepted, self.attempted))
            )
            lines.append(f"draft acceptance: {per_head}")
            if self.lookups:
                lines.append(f"lookup drafts: after {self.lookups} of {self.forwards} forwards")
        if self.window_cuts or self.prompt_bytes_dropped:
            lines.append(
                f"context window: prompt bytes dropped {self.prompt_bytes_dropped}, re-encoded {self.window_cuts} times"
            )
        return "\n".join(lines)
