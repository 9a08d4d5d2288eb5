"""What to generate and how (``GenerationConfig``), and what a generation did (``GenerationStats``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from bytemtp.decode.coupling import DRAFT_COUPLING, GREEDY_COUPLING
from bytemtp.decode.drafting import DraftPolicy
from bytemtp.decode.incontext import CONTEXT_MIXING, GREEDY_CONTEXT_MIXING, LOOKUP, ContextDrafting
from bytemtp.decode.sampling import SamplingConfig
from bytemtp.decode.tree import check_tree_request
from bytemtp.errors import BytemtpError

STOP_REASONS = ("max_bytes", "stop_string", "end_of_document")


# Drafts are drawn at this fraction of the temperature by default. A draft head
# predicts byte t+k without the bytes before it, so its distribution is broader than head
# 1's once those bytes are known, and a draft drawn from a sharper copy of it is accepted
# more often. Measured on the 2000-step tiny preset, 96 val prompts x 192 bytes at T = 0.8,
# bytes per forward: 2.466 at 1, 2.553 at 0.8, 2.501 at 0.65 (48 prompts at T = 1: 2.219
# at 1, 2.328 at 0.7). Trees gain less, their siblings already covering more of the likely
# bytes (96 prompts at T = 0.8, 1 -> 0.8: tree of 7 2.616 -> 2.660, tree of 15 2.827 -> 2.930).
DRAFT_TEMPERATURE = 0.8


@dataclass
class GenerationConfig:
    """What to generate and how.

    ``temperature == 0`` is greedy. ``stop``: generation ends when the output
    would contain one of these byte strings; the stop string itself is not
    output. ``speculative=None`` means on when the model has draft heads
    (``n_future > 1``); ``draft_heads=None`` uses all ``n_future - 1`` of them,
    a smaller number the first ones (heads 2..draft_heads+1). ``draft_heads`` is
    ignored when not speculative. ``draft_costs``: the relative cost of a decoding
    forward of 1, 2, ... positions (``bytemtp.decode.drafting.measure_step_costs``); given,
    each step verifies only the drafts expected to pay for their cost, otherwise all.
    ``tree_nodes``: speculative decoding verifies a tree of that many
    candidate bytes per step instead of one chain (``bytemtp.decode.tree``); 0: the chain.
    ``draft_temperature``: the temperature a sampling chain's or tree's drafts are drawn at
    (and judged by; the output stays exactly head 1's at ``temperature``); None:
    ``DRAFT_TEMPERATURE`` times ``temperature``. ``seed=None`` draws a fresh seed.
    ``prompt`` and ``seed`` are the defaults of ``generate``, which can also take a list of
    prompts and seeds. ``stop_at_bos=False`` decodes on through a generated BOS (it counts
    toward ``max_new_bytes`` but is no output byte): for callers that want every row's ids
    to the same length (``distill``). ``draft_coupling``: how strongly drafts follow the two
    bytes before them (``bytemtp.decode.coupling``; 0: off; None: ``DRAFT_COUPLING`` when
    sampling, ``GREEDY_COUPLING`` greedy), where the model carries its training data's
    byte-trigram counts. ``context_mixing``: how strongly chain drafts follow each row's own
    byte trigrams (``bytemtp.decode.incontext``; 0: off; None: ``CONTEXT_MIXING`` or
    ``GREEDY_CONTEXT_MIXING``); ``lookup``: a chain row whose last bytes occurred before in its
    text drafts what followed them there (None: ``LOOKUP``).
    """

    prompt: bytes = b""
    max_new_bytes: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[bytes, ...] = ()
    speculative: bool | None = None
    draft_heads: int | None = None
    draft_costs: tuple[float, ...] | None = None
    tree_nodes: int = 0
    stop_at_bos: bool = True
    draft_temperature: float | None = None
    draft_coupling: float | None = None
    context_mixing: float | None = None
    lookup: bool | None = None

    def __post_init__(self) -> None:
        self.prompt = bytes(self.prompt)
        self.stop = tuple(bytes(s) for s in self.stop)
        if self.max_new_bytes < 0:
            raise BytemtpError(f"--max-bytes: must be >= 0, got {self.max_new_bytes}")
        if any(not s for s in self.stop):
            raise BytemtpError("--stop: stop strings must not be empty")
        if self.draft_heads is not None and self.draft_heads < 1:
            raise BytemtpError(f"--draft-heads: must be at least 1, got {self.draft_heads}")
        if self.draft_costs is not None:
            self.draft_costs = tuple(float(c) for c in self.draft_costs)
            if not self.draft_costs or not all(c > 0 for c in self.draft_costs):
                raise BytemtpError(f"draft_costs: need positive relative costs, got {self.draft_costs}")
        if self.tree_nodes:
            check_tree_request(self.tree_nodes)
            if self.draft_costs is not None:
                raise BytemtpError("--tree: a draft tree has a fixed size; it does not combine with --adaptive")
        if self.draft_temperature is not None:
            if not 0 < self.draft_temperature < math.inf:
                raise BytemtpError(f"--draft-temperature: must be positive, got {self.draft_temperature}")
        if self.draft_coupling is not None and not 0 <= self.draft_coupling < math.inf:
            raise BytemtpError(f"--draft-coupling: must be >= 0 (0 = off), got {self.draft_coupling}")
        if self.context_mixing is not None and not 0 <= self.context_mixing < math.inf:
            raise BytemtpError(f"--context-mixing: must be >= 0 (0 = off), got {self.context_mixing}")
        self.sampling  # validates temperature, top-k, top-p

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)

    @property
    def draft_sampling(self) -> SamplingConfig:
        """How the draft heads' logits become the distributions sampled drafts are drawn from."""
        t = self.temperature * DRAFT_TEMPERATURE if self.draft_temperature is None else self.draft_temperature
        return SamplingConfig(t, self.top_k, self.top_p)

    @property
    def coupling_strength(self) -> float:
        """The draft coupling's strength (0: off)."""
        if self.draft_coupling is not None:
            return self.draft_coupling
        return GREEDY_COUPLING if self.sampling.greedy else DRAFT_COUPLING

    @property
    def context_drafting(self) -> ContextDrafting:
        """How chain drafts use each row's own text."""
        mixing = self.context_mixing
        if mixing is None:
            mixing = GREEDY_CONTEXT_MIXING if self.sampling.greedy else CONTEXT_MIXING
        return ContextDrafting(mixing, LOOKUP if self.lookup is None else self.lookup)

    def n_drafts(self, n_future: int) -> int:
        """Draft heads used with a model of ``n_future`` heads; 0 means autoregressive."""
        available = n_future - 1
        if self.speculative is False or (self.speculative is None and available == 0):
            return 0
        if available == 0:
            raise BytemtpError("--speculative: the model has no draft heads (n_future=1)")
        if self.draft_heads is None:
            return available
        if self.draft_heads > available:
            raise BytemtpError(
                f"--draft-heads: the model has {available} draft heads (n_future={n_future}), got {self.draft_heads}"
            )
        return self.draft_heads

    def draft_policy(self, n_drafts: int, device: torch.device) -> DraftPolicy | None:
        """A policy pricing forwards of 1..n_drafts+1 positions by ``draft_costs`` (None: verify every draft)."""
        if self.draft_costs is None or n_drafts == 0:
            return None
        if len(self.draft_costs) < n_drafts + 1:
            raise BytemtpError(
                f"draft_costs: {len(self.draft_costs)} costs cannot price forwards of up to {n_drafts + 1} positions"
            )
        return DraftPolicy(torch.tensor(self.draft_costs[: n_drafts + 1], device=device))


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
    prompt_bytes_dropped: int = 0
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
        self.accepted = [a + b for a, b in zip(self.accepted, other.accepted, strict=True)]
        self.attempted = [a + b for a, b in zip(self.attempted, other.attempted, strict=True)]

    def record_step(self, n_drafts: int, n_accepted: int) -> None:
        self.forwards += 1
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
        if self.window_cuts or self.prompt_bytes_dropped:
            lines.append(
                f"context window: prompt bytes dropped {self.prompt_bytes_dropped}, re-encoded {self.window_cuts} times"
            )
        return "\n".join(lines)
