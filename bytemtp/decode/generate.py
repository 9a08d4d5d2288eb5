"""Generation: autoregressive or byte-level self-speculative, streamed as bytes are decided.

``generate(model, GenerationConfig(...))`` returns a ``Generation``: iterate it for
chunks of output bytes; its ``stats`` are complete once the iteration ends.

The model sees ``BOS + prompt``, as every training document starts with BOS; a
generated BOS ends the document and so ends generation. Autoregressive decoding
runs head 1 alone, one position per forward. Self-speculative decoding lets
heads 2..(1 + draft_heads) draft the bytes after head 1's choice; the next
forward verifies the drafts with head 1 and drafts the next block (see
``bytemtp.decode.verify``), so there is one forward per step either way, and the
output is the same as autoregressive decoding's: byte for byte when greedy, in
distribution when sampling.

Context window: the model has ``max_seq_len`` positions. When the context does
not fit (a long prompt, or a long generation that fills the window) it is cut to
its most recent ``window_keep(max_seq_len)`` ids (half the window) and
re-encoded in one forward. The cut happens at the same byte in both
modes, because speculative steps never write past the window, so speculative and
autoregressive decoding still see identical contexts; generation never has to
stop for lack of room.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from bytemtp import BOS
from bytemtp.model.config import ModelConfig, round_up_64
from bytemtp.decode.drafting import DraftPolicy, verified_drafts
from bytemtp.errors import BytemtpError
from bytemtp.decode.sampling import SamplingConfig
from bytemtp.decode.verify import GreedyVerifier, SamplingVerifier
from bytemtp.decode.stops import StopMatcher
from bytemtp.decode.tree import TreeVerifier, check_tree_request, check_tree_size, tree_mask

# (ids [1, P], input_pos [P], n_heads[, rope_pos, mask]) -> (head-1 logits [1, P, V], draft features [1, P, F, d]):
# ByteMTP.decode (a draft tree passes its own RoPE positions and attention mask; eager steps also
# pass ``kv_len``, a compiled one never does)
StepForward = Callable[..., tuple[torch.Tensor, torch.Tensor]]

STOP_REASONS = ("max_bytes", "stop_string", "end_of_document")


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
    ``tree_nodes``: greedy speculative decoding verifies a tree of that many
    candidate bytes per step instead of one chain (``bytemtp.decode.tree``); 0: the chain.
    ``seed=None`` draws a fresh seed.
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
            check_tree_request(self.tree_nodes, self.temperature)
            if self.draft_costs is not None:
                raise BytemtpError("--tree: a draft tree has a fixed size; it does not combine with --adaptive")
        self.sampling  # validates temperature, top-k, top-p

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)

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
        for j in range(min(n_drafts, n_accepted + 1)):
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


def window_keep(window: int) -> int:
    """Ids kept when the context outgrows the window: the newest half of it.

    Each cut re-encodes the kept ids in one forward, so keeping half costs about
    one encoded id per generated byte over a long generation, while every byte
    still sees at least half a window of context.
    """
    return max(1, window // 2)


def cache_length(context: int, max_new_bytes: int, n_drafts: int, window: int) -> int:
    """KV-cache positions a generation can use: at most ``window``, and no more than
    the context, every new byte and one step's drafts need, rounded up to 64.

    Attention reads the whole cache, so a cache sized to the generation rather
    than to ``max_seq_len`` makes every step cheaper; a short cache never fills
    (generation ends first), so it never changes what is generated. Rounding keeps
    the shapes of most generations equal (one compiled graph).
    """
    need = context + max_new_bytes + n_drafts + 1
    return min(window, round_up_64(need))


def generation_cache_length(model_cfg: ModelConfig, prompt: bytes, max_new_bytes: int, tree_nodes: int = 0) -> int:
    """The KV-cache length a generation of ``prompt`` uses.

    It has room for the most drafts the model has, whatever a decoder uses, so the
    autoregressive and every speculative decoder of a prompt (and the step-cost
    measurement, ``measure_step_costs``) share one cache shape, hence one compiled step;
    a draft tree of more nodes than that needs room for all of them.
    """
    window = model_cfg.max_seq_len
    room = max(model_cfg.n_future - 1, tree_nodes)
    return cache_length(len(prompt_context(prompt, window)), max_new_bytes, room, window)


def prompt_context(prompt: bytes, window: int) -> list[int]:
    """The ids the model is first fed: ``BOS + prompt``, cut to fit ``window`` positions."""
    ids = [BOS, *prompt]
    return ids if len(ids) <= window else ids[-window_keep(window) :]


def generate(
    model: torch.nn.Module, config: GenerationConfig, *, step_forward: StepForward | None = None
) -> "Generation":
    """Start a generation (nothing runs until it is iterated).

    ``step_forward`` replaces ``model.decode`` for the per-step forwards (fixed,
    small shapes), e.g. with a compiled version of it; the prompt's forward
    always uses the model itself.
    """
    return Generation(model, config, step_forward)


class Generation:
    """An iterator of output byte chunks; ``stats`` is complete when it is exhausted.

    Drive it to the end (or ``close()`` it): the model's KV cache is allocated
    for the generation and released when it finishes.
    """

    def __init__(self, model: torch.nn.Module, config: GenerationConfig, step_forward: StepForward | None = None):
        self.model = model
        self.config = config
        self.n_drafts = config.n_drafts(model.cfg.n_future)
        self.step_forward = step_forward
        self.device = next(model.parameters()).device
        self.stats = GenerationStats(draft_heads=self.n_drafts)
        drafter = (lambda features: model.draft_logits(features, self.n_drafts)) if self.n_drafts else None
        policy = config.draft_policy(self.n_drafts, self.device)
        self.tree_nodes = config.tree_nodes if self.n_drafts else 0
        if self.tree_nodes:
            check_tree_size(self.tree_nodes, self.n_drafts)
            self.verify = TreeVerifier(drafter, self.tree_nodes, self.n_drafts, self.device)
        elif config.sampling.greedy:
            self.verify = GreedyVerifier(drafter, policy)
        else:
            generator = torch.Generator(device=self.device)
            self.stats.seed = generator.seed() if config.seed is None else config.seed
            generator.manual_seed(self.stats.seed)
            self.verify = SamplingVerifier(config.sampling, generator, drafter, policy)
        self._stream = self._run()

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self._stream)

    def close(self) -> None:
        self._stream.close()

    def read(self) -> bytes:
        """All remaining output at once."""
        return b"".join(self)

    # -- the decoding loop -----------------------------------------------------
    def _run(self) -> Iterator[bytes]:
        cfg, stats = self.config, self.stats
        window_len = self.model.cfg.max_seq_len
        start = time.perf_counter()
        if cfg.max_new_bytes == 0:
            stats.stop_reason = "max_bytes"
            return
        window = prompt_context(cfg.prompt, window_len)  # the ids in the KV cache, in order
        stats.prompt_bytes_dropped = max(0, len(cfg.prompt) - len(window))
        stops = StopMatcher(cfg.stop)
        cache_len = generation_cache_length(self.model.cfg, cfg.prompt, cfg.max_new_bytes, self.tree_nodes)
        self.cache_len = cache_len
        self.model.setup_cache(1, cache_len)
        try:
            decision = self._encode(window)
            fed: list[int] = []  # the pending byte the latest forward appended, if it was a step
            judged: list[int] = []  # the chain drafts it verified
            n_judged = 0  # how deep the verified drafts went (a tree's depth)
            while True:
                # the step's one host sync (a tree's decision is made on the host)
                accepted, pending, *rest = decision if self.tree_nodes else decision.tolist()
                decided = rest[1 : 1 + accepted] if self.tree_nodes else judged[:accepted]
                stats.record_step(n_judged, accepted)
                out = self._emit(decided + [pending], stops)
                if out:
                    yield out
                if stats.stop_reason:
                    return
                window.extend(fed + decided)
                # No room for the pending byte: cut the context (a cache this full is the whole window).
                if len(window) == cache_len:
                    window = (window + [pending])[-window_keep(cache_len) :]
                    stats.window_cuts += 1
                    decision, fed, judged, n_judged = self._encode(window), [], [], 0
                    continue
                room = cache_len - 1 - len(window)
                fed = [pending]
                if self.tree_nodes:
                    n_judged = min(rest[0], room)  # the tree's depth, or less when cut to the room
                    decision = self._tree_step(pending, len(window), room)
                else:
                    judged = verified_drafts(rest)[:room]
                    n_judged = len(judged)
                    decision = self._step(decision[1 : 2 + len(judged)], len(window))
        finally:
            self.model.clear_cache()
            stats.wall_s = time.perf_counter() - start

    def _emit(self, decided: list[int], stops: StopMatcher) -> bytes:
        """Output bytes of newly decided ids; sets ``stats.stop_reason`` when generation is over."""
        stats, out = self.stats, bytearray()
        for b in decided:
            if b == BOS:
                stats.stop_reason = "end_of_document"
                break
            stats.bytes += 1
            out += stops.push(bytes((b,)))
            if stops.hit:
                stats.stop_reason = "stop_string"
                return bytes(out)
            if stats.bytes == self.config.max_new_bytes:
                stats.stop_reason = "max_bytes"
                break
        if stats.stop_reason:
            out += stops.flush()
        return bytes(out)

    def _forward(
        self, ids: torch.Tensor, slots: torch.Tensor, end: int, *tree: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A step's forward writing cache ``slots`` (all before slot ``end``; a draft tree adds its
        RoPE positions and mask). Eager, attention reads only the slots in use; a compiled step
        keeps its fixed shapes."""
        if self.step_forward is None:
            return self.model.decode(ids, slots, self.n_drafts + 1, *tree, kv_len=self._attended(end))
        return self.step_forward(ids, slots, self.n_drafts + 1, *tree)

    def _attended(self, end: int) -> int:
        """Cache slots a step writing up to slot ``end`` attends to: eager, ``end`` rounded up
        (``round_up_64``); compiled, the whole cache (one shape)."""
        if self.step_forward is not None:
            return self.cache_len
        return min(self.cache_len, round_up_64(end))

    @torch.inference_mode()
    def _encode(self, ids: list[int]) -> torch.Tensor:
        """Forward a whole context from position 0 and decide from its last position."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        pos = torch.arange(len(ids), device=self.device)
        kv_len = min(self.cache_len, round_up_64(len(ids)))  # always eager: trimmed even when steps are compiled
        logits, features = self.model.decode(x, pos, self.n_drafts + 1, kv_len=kv_len)
        if self.tree_nodes:
            return self.verify(logits[0, -1:], features[0, -1:], None)[0]
        return self.verify(logits[0, -1:], features[0, -1:], x.new_empty(0))

    @torch.inference_mode()
    def _step(self, feed: torch.Tensor, start: int) -> torch.Tensor:
        """Forward ``[pending, drafts...]`` at positions ``start..`` and verify the drafts."""
        pos = torch.arange(start, start + feed.numel(), device=self.device)
        logits, features = self._forward(feed.view(1, -1), pos, start + feed.numel())
        return self.verify(logits[0], features[0], feed[1:])

    @torch.inference_mode()
    def _tree_step(self, pending: int, start: int, room: int) -> list[int]:
        """Forward ``[pending, tree nodes]`` (as many nodes as the cache has ``room`` for), verify
        the tree, and move its accepted path's cache entries down (unless already in place)."""
        tree = self.verify.tree.prefix(room)
        size = tree.size + 1
        slots = torch.arange(start, start + size, device=self.device)
        rope = torch.from_numpy(start + np.concatenate(([0], tree.depth))).to(self.device)
        mask = tree_mask(tree, start, self._attended(start + size))
        ids = torch.tensor([[pending, *tree.tokens.tolist()]], device=self.device)
        logits, features = self._forward(ids, slots, start + size, rope, torch.from_numpy(mask).to(self.device))
        decision, path = self.verify(logits[0], features[0], tree)
        if path.size and path[-1] != path.size:  # node numbers grow with depth: in place iff they are 1..a
            self.model.move_cache(torch.from_numpy(start + path).to(self.device), slots[1 : 1 + path.size])
        return decision
