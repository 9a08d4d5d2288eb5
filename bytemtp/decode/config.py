"""What to generate and how (``GenerationConfig``): a decoder's settings and its rows' defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bytemtp.decode.coupling import DRAFT_COUPLING, FITTED_COUPLING, GREEDY_COUPLING
from bytemtp.decode.drafting import CostTable, DraftPolicy
from bytemtp.decode.batch import RowParams
from bytemtp.decode.incontext import (
    CONTEXT_MIXING,
    GREEDY_CONTEXT_MIXING,
    GREEDY_LOOKUP,
    SAMPLED_LOOKUP,
    ContextDrafting,
)
from bytemtp.decode.sampling import SamplingConfig, draft_sampling
from bytemtp.decode.tree import check_tree_request
from bytemtp.errors import BytemtpError


@dataclass
class GenerationConfig:
    """What to generate and how.

    ``temperature == 0`` is greedy. ``stop``: generation ends when the output
    would contain one of these byte strings; the stop string itself is not
    output. ``speculative=None`` means on when the model has draft heads
    (``n_future > 1``); ``draft_heads=None`` uses all ``n_future - 1`` of them,
    a smaller number the first ones (heads 2..draft_heads+1). ``draft_heads`` is
    ignored when not speculative. ``draft_costs``: the relative cost of a decoding
    step of 1, 2, ... positions, a curve per number of rows in a step (or one for all;
    ``bytemtp.decode.step_costs``); given, each step drafts and verifies only the drafts
    expected to pay for their cost at its row count (``bytemtp.decode.drafting``), otherwise all.
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
    sampling, ``GREEDY_COUPLING`` greedy; ``FITTED_COUPLING`` greedy with a table fitted to the
    model), where the model carries its training data's byte-trigram counts or a fitted table. ``context_mixing``: how strongly chain drafts follow each row's own
    byte trigrams (``bytemtp.decode.incontext``; 0: off; None: ``CONTEXT_MIXING`` or
    ``GREEDY_CONTEXT_MIXING``); ``lookup``: a chain row whose last bytes occurred before in its
    text drafts what followed them there (None: ``GREEDY_LOOKUP`` and ``SAMPLED_LOOKUP``).
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
    draft_costs: tuple[float, ...] | CostTable | None = None
    tree_nodes: int = 0
    stop_at_bos: bool = True
    draft_temperature: float | None = None
    draft_coupling: float | None = None
    context_mixing: float | None = None
    lookup: bool | None = None

    def __post_init__(self) -> None:
        self.prompt = bytes(self.prompt)
        self.stop = tuple(bytes(s) for s in self.stop)
        if self.draft_heads is not None and self.draft_heads < 1:
            raise BytemtpError(f"--draft-heads: must be at least 1, got {self.draft_heads}")
        if self.draft_costs is not None:
            self.draft_costs = cost_table(self.draft_costs)
        if self.tree_nodes:
            check_tree_request(self.tree_nodes)
            if self.draft_costs is not None:
                raise BytemtpError("--tree: a draft tree has a fixed size; it does not combine with --adaptive")
        if self.draft_temperature is not None:
            if not 0 < self.draft_temperature < math.inf:
                raise BytemtpError(f"--draft-temperature: must be positive, got {self.draft_temperature}")
            if self.temperature == 0:
                raise BytemtpError("--draft-temperature: greedy decoding (--temperature 0) drafts the likeliest "
                                   "bytes, at no temperature")
        if self.draft_coupling is not None and not 0 <= self.draft_coupling < math.inf:
            raise BytemtpError(f"--draft-coupling: must be >= 0 (0 = off), got {self.draft_coupling}")
        if self.context_mixing is not None and not 0 <= self.context_mixing < math.inf:
            raise BytemtpError(f"--context-mixing: must be >= 0 (0 = off), got {self.context_mixing}")
        self.row_params(None)  # validates the budget, stop strings, temperature, top-k, top-p

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)

    @property
    def draft_sampling(self) -> SamplingConfig:
        """How the draft heads' logits become the distributions sampled drafts are drawn from."""
        return draft_sampling(self.sampling, self.draft_temperature)

    def row_params(self, seed: int | None) -> RowParams:
        """The settings of one row of this generation, sampled with ``seed``."""
        return RowParams(self.temperature, self.top_k, self.top_p, self.stop, seed, self.max_new_bytes)

    @property
    def coupling_strength(self) -> float:
        """The draft coupling's strength (0: off)."""
        return self.coupling_for(self.sampling.greedy)

    def coupling_for(self, greedy: bool, fitted: bool = False) -> float:
        """The draft coupling's strength for greedy or sampled rows (0: off), ``fitted``: with a table
        fitted to the model (``bytemtp.decode.coupling.FittedCoupling``)."""
        if self.draft_coupling is not None:
            return self.draft_coupling
        if fitted:
            return FITTED_COUPLING
        return GREEDY_COUPLING if greedy else DRAFT_COUPLING

    @property
    def context_drafting(self) -> ContextDrafting:
        """How chain drafts use each row's own text."""
        greedy, sampled = (GREEDY_CONTEXT_MIXING, CONTEXT_MIXING) if self.context_mixing is None else (
            (self.context_mixing,) * 2
        )
        lookups = (GREEDY_LOOKUP, SAMPLED_LOOKUP) if self.lookup is None else (self.lookup,) * 2
        return ContextDrafting(greedy, sampled, *lookups)

    def n_drafts(self, n_future: int) -> int:
        """Draft heads used with a model of ``n_future`` heads; 0 means autoregressive, where a
        drafting setting (draft heads, a tree, draft costs, temperature or coupling) is an error:
        it cannot apply, and silently ignoring it would hide a mistake."""
        available = n_future - 1
        if self.speculative is False or (self.speculative is None and available == 0):
            self._refuse_draft_settings("--no-speculative" if self.speculative is False
                                        else f"the model has no draft heads (n_future={n_future})")
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

    def _refuse_draft_settings(self, why: str) -> None:
        settings = {
            "--draft-heads": self.draft_heads, "--tree": self.tree_nodes or None, "--adaptive": self.draft_costs,
            "--draft-temperature": self.draft_temperature, "--draft-coupling": self.draft_coupling,
            "--context-mixing": self.context_mixing, "--lookup": self.lookup or None,
        }
        given = [flag for flag, value in settings.items() if value is not None]
        if given:
            raise BytemtpError(f"{given[0]}: there are no drafts to apply it to ({why})")

    def draft_policy(self, n_drafts: int) -> DraftPolicy | None:
        """A policy pricing steps of 1..n_drafts+1 positions by ``draft_costs`` (None: draft and verify every head)."""
        if self.draft_costs is None or n_drafts == 0:
            return None
        if len(self.draft_costs[0]) < n_drafts + 1:
            raise BytemtpError(
                f"draft_costs: {len(self.draft_costs[0])} costs cannot price forwards of up to {n_drafts + 1} positions"
            )
        return DraftPolicy(self.draft_costs, n_drafts)


def cost_table(costs: tuple[float, ...] | CostTable) -> CostTable:
    """``draft_costs`` as a table, one curve per row count of a step (a single curve: one for all),
    checked: the curves positive, non-empty and of one length."""
    one_curve = not costs or isinstance(costs[0], (int, float))
    table = (costs,) if one_curve else costs
    table = tuple(tuple(float(c) for c in curve) for curve in table)
    if not table[0] or any(len(curve) != len(table[0]) or not all(c > 0 for c in curve) for curve in table):
        raise BytemtpError(f"draft_costs: need positive relative costs, curves of one length, got {costs}")
    return table
