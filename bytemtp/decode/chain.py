"""Chain drafting: each step verifies one block of drafts per row, one per draft head.

Compiled, a step is ``chain_step``: forward and decision in one graph. Eager, the
forward runs alone and the decision is taken on the host (``host_chain_decide``).

The strategy keeps, per row, the drafts of the latest decision and how many of them
the next step verifies (``n_valid``: all of them, or as many as pay for themselves
under a ``DraftPolicy``; fewer when the step is narrower, see ``Batch.fits``); when
sampling, the draft distributions they were drawn from stay on the device for the
step that judges them.
Autoregressive decoding is the chain of no drafts.

With drafts from the rows' own text (``bytemtp.decode.incontext``), the strategy keeps each
row's text and trigram counts, and a row whose last bytes occurred before in its text drafts
the bytes that followed there instead of the heads' (``looked_up``); when sampling, those are
judged by point masses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from bytemtp.decode.batch import Batch, Decision
from bytemtp.decode.coupling import UNCOUPLED, HostContext
from bytemtp.decode.drafting import DraftPolicy
from bytemtp.decode.host_chain import host_chain_decide
from bytemtp.decode.incontext import ContextDrafting, RowTexts
from bytemtp.decode.step import ChainOutput, StepOutput, chain_decide, chain_step
from bytemtp.decode.verify import ChainRule, Uniforms

StepFn = Callable[..., ChainOutput]


class ChainDrafts:
    """Verification of a chain of ``n_drafts`` drafts per row (``bytemtp.decode.verify``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        rule: ChainRule,
        n_drafts: int,
        policy: DraftPolicy | None = None,
        step: StepFn | None = None,
        host_context: HostContext = UNCOUPLED,
        drafting: ContextDrafting = ContextDrafting(),
    ):
        self.model, self.rule, self.n_drafts, self.policy = model, rule, n_drafts, policy
        self.step_fn = step  # a compiled ``chain_step`` bound to model, rule and n_drafts; None: eager
        self.host_context, self.drafting = host_context, drafting if n_drafts else ContextDrafting()
        # the most drafts a row verifies: a lookup runs past the heads' reach in an eager step only
        # (a compiled one keeps its shapes)
        self.longest = max(n_drafts, self.drafting.length) if self.drafting.lookup and step is None else n_drafts
        self.decide = chain_decide
        self.texts: RowTexts | None = None
        self.drafts: list[list[int]] = []
        self.n_valid: list[int] = []
        self.looked_up: list[bool] = []
        self.draft_probs: torch.Tensor | None = None

    def start(self, batch: Batch) -> None:
        """Fresh per-row state for ``batch``."""
        n = len(batch.rows)
        self.drafts, self.n_valid = [[0] * self.n_drafts for _ in range(n)], [0] * n
        self.looked_up = [False] * n
        self.draft_probs = None
        if self.policy is not None:
            self.policy = DraftPolicy(self.policy.costs, n)
        self.texts = RowTexts(n, self.model.cfg.vocab) if self.drafting.on else None
        if self.step_fn is None:  # eager: decided on the host, the draft context as host arrays (``host_arrays``)
            self.decide = functools.partial(
                host_chain_decide, context=self.host_context, texts=self.texts, mixing=self.drafting.mixing
            )

    def flush(self) -> None:
        """Nothing is pending between steps (a tree's cache moves are)."""

    def uniforms(self, batch: Batch, active: list[bool], k: int) -> Uniforms | None:
        """The random numbers of a step judging ``k`` drafts, from each active row's own generator
        (zeros for the others). A row draws as many every step, however wide the step (which
        depends on the other rows): its stream of numbers is its own."""
        if self.rule.sampling.greedy:
            return None
        m, w = self.n_drafts, self.longest
        u = torch.zeros(len(batch.rows), w + 1 + m)
        for r, row in enumerate(batch.rows):
            if active[r]:
                u[r] = torch.rand(w + 1 + m, generator=row.generator)
        u = u.to(batch.device)
        return Uniforms(u[:, :k], u[:, w], u[:, w + 1 :])

    def first(
        self, batch: Batch, active: list[bool], logits: torch.Tensor, features: torch.Tensor
    ) -> dict[int, Decision]:
        """Decide from the prompts' forwards: head-1 ``logits`` [B, 1, V] and draft ``features``
        [B, 1, F, d] at each row's last id."""
        if self.texts is not None:
            for r, row in enumerate(batch.rows):
                if active[r]:
                    self.texts.begin(r, row.window)
            self.texts.active = np.array(active)
        last = torch.tensor([[row.window[-1]] for row in batch.rows], device=batch.device)  # the prompts' ends
        zeros = torch.zeros(len(batch.rows), dtype=torch.long, device=batch.device)
        u = self.uniforms(batch, active, 0)
        out = self.decide(self.model, self.rule, self.n_drafts, logits, features, last, zeros, None, u)
        return self._read(batch, active, out, [0] * len(batch.rows), fed=False)

    def step(self, batch: Batch, active: list[bool]) -> dict[int, Decision]:
        """One forward of ``[pending, drafts]`` for the active rows."""
        most = max(n for n, on in zip(self.n_valid, active) if on)
        width = 1 + min(most, batch.fits(active))
        n_valid = [min(self.n_valid[r], width - 1) if active[r] else 0 for r in range(len(batch.rows))]
        ids = [[row.pending, *self.drafts[r][: width - 1]] for r, row in enumerate(batch.rows)]
        ids = torch.tensor([row + [0] * (width - len(row)) for row in ids], device=batch.device)
        n_valid_t = torch.tensor(n_valid, device=batch.device)
        u = self.uniforms(batch, active, width - 1)
        if self.texts is not None:
            self.texts.active = np.array(active)
        args = (ids, batch.slots(width, active), n_valid_t, self.judged_by(ids, active), u)
        if self.step_fn is None:
            kv_len = batch.kv_len(width)
            out = chain_step(self.model, self.rule, self.n_drafts, *args, kv_len=kv_len, decide=self.decide)
        else:
            out = self.step_fn(*args)
        return self._read(batch, active, out, n_valid, fed=True)

    def judged_by(self, ids: torch.Tensor, active: list[bool]) -> torch.Tensor | None:
        """The distributions the drafts of ``ids`` [B, P] are judged by when sampling: the heads'
        (coupled) ones they were drawn from, and for the rows that looked their drafts up, the
        point masses on them [B, P-1, V]."""
        q = self.draft_probs
        lookups = [on and looked for on, looked in zip(active, self.looked_up)]
        if q is None or not any(lookups):
            return q
        k, (b, m, v) = ids.shape[1] - 1, q.shape
        heads = q[:, :k] if k <= m else torch.cat((q, q.new_zeros(b, k - m, v)), dim=1)
        points = torch.nn.functional.one_hot(ids[:, 1:], v).to(q.dtype)
        return torch.where(torch.tensor(lookups, device=q.device)[:, None, None], points, heads)

    def _read(
        self, batch: Batch, active: list[bool], out: tuple, n_judged: list[int], fed: bool
    ) -> dict[int, Decision]:
        """Keep the new drafts (and their distributions) and read the decisions: one transfer for all rows."""
        ints, q, confidence = out
        keep = self.draft_probs is not None and not all(active)  # the waiting rows' drafts are still to be judged
        active_t = torch.tensor(active, device=batch.device) if keep or self.policy is not None else None
        if q is not None:
            self.draft_probs = torch.where(active_t[:, None, None], q, self.draft_probs) if keep else q
        if self.policy is not None:
            judged_t = torch.tensor(n_judged, device=batch.device)
            counts = self.policy.choose(confidence, judged_t, ints[:, 0], active_t)
            ints = torch.cat((counts[:, None], ints), dim=1)
        host = StepOutput.read(ints, counted=self.policy is not None)
        decisions = {}
        for r, row in enumerate(batch.rows):
            if not active[r]:
                continue
            a, drafts = host.accepted[r], self.drafts[r]
            entered = [row.pending, *drafts[:a]] if fed else []
            decisions[r] = Decision(entered, [*drafts[:a], host.next_byte[r]], n_judged[r], host.broken[r])
            self.drafts[r] = host.drafts[r]
            self.n_valid[r] = host.n_next[r] if host.n_next is not None else self.n_drafts
            if self.texts is not None:
                self._from_text(r, decisions[r].decided)
        return decisions

    def _from_text(self, r: int, decided: list[int]) -> None:
        """Row ``r``'s text after a decision (a compiled step's bytes are appended here, an eager
        one's by the host decision), and its lookup draft in place of the heads' when it has one."""
        if self.step_fn is not None:
            self.texts.extend(r, decided)
        proposal = self.texts.lookup(r, self.longest, self.drafting.min_match) if self.drafting.lookup else []
        self.looked_up[r] = bool(proposal)
        if proposal:
            self.drafts[r], self.n_valid[r] = proposal, len(proposal)
