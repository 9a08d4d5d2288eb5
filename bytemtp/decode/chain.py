"""Chain drafting: each step verifies one block of drafts per row, one per draft head.

Compiled, a step is ``chain_step``: forward and decision in one graph. Eager, the
forward runs alone and the decision is taken on the host (``host_chain_decide``).

The strategy keeps, per row, the drafts of the latest decision and how many of them
the next step verifies (``n_valid``: all of them, or as many as pay for themselves
under a ``DraftPolicy``, which an eager step then drafts alone; fewer when the step is
narrower, see ``Batch.fits``); when sampling, the draft distributions they were drawn
from stay on the device for the step that judges them.
Autoregressive decoding is the chain of no drafts.

Rows carry their own sampling settings. A step whose rows all share one setting uses that
setting's rule (the decoder's own, compiled when it is; greedy rows alone, the greedy
rule); rows that differ share a step under per-row settings (``RowSampling``), where a
greedy row is a point mass at head 1's argmax and its drafts point masses too, judged by
the very rules that judge sampled drafts: its output is still greedy decoding's.

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

from bytemtp.decode.batch import Batch, Decision, Row
from bytemtp.decode.coupling import UNCOUPLED, HostContext
from bytemtp.decode.drafting import DraftPolicy
from bytemtp.decode.host_chain import host_chain_decide
from bytemtp.decode.incontext import ContextDrafting, InContext, RowTexts
from bytemtp.decode.sampling import RowSampling, SamplingConfig
from bytemtp.decode.step import ChainOutput, StepOutput, chain_decide, chain_step
from bytemtp.decode.transfer import download, upload
from bytemtp.decode.verify import ChainRule, Uniforms
from bytemtp.model.cache import first_rows

StepFn = Callable[..., ChainOutput]
# The rule (and its draft context as host arrays) for rows sampled alike, or each row as listed.
RuleFn = Callable[[SamplingConfig | list[SamplingConfig]], tuple[ChainRule, HostContext]]


class ChainDrafts:
    """Verification of a chain of ``n_drafts`` drafts per row (``bytemtp.decode.verify``): by
    ``rule`` where the rows sample as it does, else by the rule ``rules`` makes for theirs."""

    def __init__(
        self,
        model: torch.nn.Module,
        rule: ChainRule,
        n_drafts: int,
        policy: DraftPolicy | None = None,
        step: StepFn | None = None,
        host_context: HostContext = UNCOUPLED,
        rules: RuleFn | None = None,
        drafting: ContextDrafting = ContextDrafting(),
    ):
        self.model, self.rule, self.n_drafts, self.policy = model, rule, n_drafts, policy
        self.step_fn = step  # a compiled ``chain_step`` bound to model, rule and n_drafts; None: eager
        self.host_context, self.rules = host_context, rules
        self.drafting = drafting if n_drafts else ContextDrafting()
        # the most drafts an eager step of a row could judge: a row's random numbers per step are laid
        # out for it, compiled or not, so that a seed draws the same bytes from a compiled decoder as
        # from an eager one
        self.judged_max = max(n_drafts, self.drafting.length) if self.drafting.lookup else n_drafts
        # the most drafts a row verifies: a lookup runs past the heads' reach in an eager step of one
        # live row only (a compiled one keeps its shapes, and a batch's forward would widen for every row)
        self.longest = self.judged_max if step is None else n_drafts
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
        self.texts = RowTexts(n, self.model.cfg.vocab) if self.drafting.on else None

    def admit(self, batch: Batch, r: int) -> None:
        """Slot ``r`` holds a new row: no drafts yet."""
        self.drafts[r], self.n_valid[r], self.looked_up[r] = [0] * self.n_drafts, 0, False
        if self.texts is not None:
            self.texts.reset(r)

    def flush(self) -> None:
        """Nothing is pending between steps (a tree's cache moves are)."""

    def pick(self, batch: Batch, active: list[bool], drafted: int) -> tuple[ChainRule, Callable, StepFn | None]:
        """The rule of a step over the ``active`` rows, how it decides, and the compiled step when the
        rule is the one it was compiled with. An eager decision appends the decided bytes of the
        active rows that draft from their texts itself, before drafting from them, and drafts from
        the first ``drafted`` heads only."""
        texts = self.texts
        if texts is not None:
            texts.active = np.array([on and self.drafting.uses_text(row.params.sampling.greedy)
                                     for on, row in zip(active, batch.rows)])
            texts = texts if texts.active.any() else None  # no row of this step has a use for its text
        settings = {row.params.sampling for r, row in enumerate(batch.rows) if active[r]}
        if settings == {self.rule.sampling} or self.rules is None:
            rule, context, step = self.rule, self.host_context, self.step_fn
        else:
            rows = [row.params.sampling for row in batch.rows]
            rule, context = self.rules(settings.pop() if len(settings) == 1 else rows)
            step = None
        # eager: decided on the host, with the rule's draft context as host arrays (``host_arrays``)
        decide = chain_decide
        if step is None:
            mixing = self.drafting.mixing([row.params.sampling.greedy for row in batch.rows])
            decide = functools.partial(host_chain_decide, context=context, texts=texts, mixing=mixing,
                                       drafted=drafted)
        return rule, decide, step

    def next_drafts(self, batch: Batch) -> int:
        """How many drafts the decision at hand draws for the next step (``DraftPolicy``): priced for a
        step of the batch's live rows (an eager step forwards those only, a compiled one every slot),
        at least as wide as the lookups now pending (a row that drafted from its text likely does again)."""
        if self.policy is None:
            return self.n_drafts
        live = [r for r, row in enumerate(batch.rows) if not row.done]
        greedy = [batch.rows[r].params.sampling.greedy for r in live]
        wide = max((self.n_valid[r] for r in live if self.looked_up[r]), default=0)
        return self.policy.choose(greedy, len(live) if batch.eager else len(batch.rows), wide)

    def uniforms(self, batch: Batch, active: list[bool], k: int, rule: ChainRule) -> Uniforms | None:
        """The random numbers of a step judging ``k`` drafts on the device (``draw_uniforms``)."""
        drawn = self.draw_uniforms(batch, active, rule)
        return self.split_uniforms(torch.from_numpy(drawn["u"]).to(batch.device) if drawn else None, k)

    def draw_uniforms(self, batch: Batch, active: list[bool], rule: ChainRule) -> dict[str, np.ndarray]:
        """A step's random numbers on the host, ``{"u": [B, w+1+m]}`` ({} when greedy), from each
        active sampled row's own generator (zeros for the others). A row draws as many every step,
        however wide the step (which depends on the other rows): its stream of numbers is its own."""
        if rule.sampling.greedy:
            return {}
        m, w = self.n_drafts, self.judged_max  # a lookup may judge more drafts than the heads make
        u = torch.zeros(len(batch.rows), w + 1 + m)
        for r, row in enumerate(batch.rows):
            if active[r] and row.generator is not None:
                u[r] = torch.rand(w + 1 + m, generator=row.generator)
        return {"u": u.numpy()}

    def split_uniforms(self, u: torch.Tensor | None, k: int) -> Uniforms | None:
        """Drawn random numbers (``draw_uniforms``, on the device) as a step judging ``k`` drafts reads them."""
        w = self.judged_max
        return None if u is None else Uniforms(u[:, :k], u[:, w], u[:, w + 1 :])

    def judged_probs(self, rule: ChainRule, ids: torch.Tensor, active: list[bool]) -> torch.Tensor | None:
        """The distributions the drafts of ``ids`` [B, P] being judged were drawn from: as kept, and
        a point mass on each draft that was chosen, not drawn: a looked-up row's, and under per-row
        settings a greedy row's (which keeps none) -> [B, P-1, V]."""
        if rule.sampling.greedy or not self.n_drafts:
            return None
        lookups = [on and looked for on, looked in zip(active, self.looked_up)]
        q, per_row = self.draft_probs, isinstance(rule.sampling, RowSampling)
        if not any(lookups) and not per_row:
            return q
        chosen = torch.tensor(lookups, device=ids.device)
        if per_row:
            chosen = chosen | (rule.sampling.temperature == 0)
        k = ids.shape[1] - 1
        points = torch.nn.functional.one_hot(ids[:, 1:], self.model.cfg.vocab).float()
        if q is None:
            return points
        b, m, v = q.shape
        heads = q[:, :k] if k <= m else torch.cat((q, q.new_zeros(b, k - m, v)), dim=1)
        return torch.where(chosen[:, None, None], points, heads)

    def first(
        self, batch: Batch, active: list[bool], logits: torch.Tensor, features: torch.Tensor
    ) -> dict[int, Decision]:
        """Decide from the prompts' forwards: head-1 ``logits`` [B, 1, V] and draft ``features``
        [B, 1, F, d] at each row's last id."""
        if self.texts is not None:  # a row's context the first time it is encoded (not after a cut)
            for r, row in enumerate(batch.rows):
                if active[r] and self.drafting.uses_text(row.params.sampling.greedy):
                    self.texts.begin(r, row.window)
        last = torch.tensor([[row.last] for row in batch.rows], device=batch.device)  # the prompts' ends
        zeros = torch.zeros(len(batch.rows), dtype=torch.long, device=batch.device)
        drafted = self.next_drafts(batch)
        rule, decide, step = self.pick(batch, active, drafted)
        u = self.uniforms(batch, active, 0, rule)
        out = decide(self.model, rule, self.n_drafts, logits, features, last, zeros, None, u)
        return self._read(batch, active, out, [0] * len(batch.rows), drafted, fed=False, eager=step is None)

    def step(self, batch: Batch, active: list[bool]) -> dict[int, Decision]:
        """One forward of ``[pending, drafts]`` for the active rows.

        Compiled, every step has the one width ``1 + n_drafts`` (one graph per batch size): rows
        that verify fewer drafts (a ``DraftPolicy``'s choice) have the rest masked (``n_valid``)
        rather than narrow the step, and the few steps near the window's end where fewer drafts
        fit run the same step eager and narrower (positions past the cache's end would overwrite
        slots in use). Eager, a step is as wide as the drafts it verifies."""
        drafted = self.next_drafts(batch)
        rule, decide, step = self.pick(batch, active, drafted)
        fits = batch.fits(active)
        compiled = step is not None and fits >= self.n_drafts
        most = self.n_drafts if compiled else max(n for n, on in zip(self.n_valid, active) if on)
        width = 1 + min(most, fits)
        n_valid = [min(self.n_valid[r], width - 1) if active[r] else 0 for r in range(len(batch.rows))]
        ids = [[row.pending, *self.drafts[r][: width - 1]] for r, row in enumerate(batch.rows)]
        ids = np.array([row + [0] * (width - len(row)) for row in ids])
        host = {"ids": ids, "slots": batch.slot_array(width, active), "n_valid": np.array(n_valid),
                "active": np.array(active), **self.draw_uniforms(batch, active, rule)}
        sent = upload(batch.device, host)  # one copy for all of the step's inputs
        ids, u = sent["ids"], self.split_uniforms(sent.get("u"), width - 1)
        args = (ids, sent["slots"], sent["n_valid"], self.judged_probs(rule, ids, active), u)
        if compiled:
            out = step(*args, counts=self.counts(batch))
        else:  # eager, or a compiled rule's narrower step near the window's end (its tensor decision)
            counts = None if step is None else self.counts(batch)
            out = chain_step(self.model, rule, self.n_drafts, *args, decide=decide, counts=counts,
                             **batch.extent(width, active))
        return self._read(batch, active, out, n_valid, drafted, fed=True, eager=step is None, sent=sent)

    def counts(self, batch: Batch) -> InContext | None:
        """The rows' counts for a compiled step's in-context weight, read in place: on a CPU only
        (elsewhere they would cross to the device every step, and compiled drafts go without).
        They hold the text up to the step before: its own bytes are counted after it."""
        if self.texts is None or batch.device.type != "cpu":
            return None
        return self.texts.tensors(self.drafting.mixing([row.params.sampling.greedy for row in batch.rows]))

    def _read(
        self,
        batch: Batch,
        active: list[bool],
        out: tuple,
        n_judged: list[int],
        drafted: int,
        fed: bool,
        eager: bool,
        sent: dict[str, torch.Tensor] | None = None,
    ) -> dict[int, Decision]:
        """Keep the new drafts (and their distributions), of which the next step verifies ``drafted``, and
        read the decisions: one transfer for all rows. ``out``: every row's, or (an eager step of the first
        rows) those rows' alone. ``sent``: the step's inputs on the device, ``active`` among them. A
        ``DraftPolicy`` learns from the verdicts on the heads' drafts."""
        ints, q = out
        keep = self.draft_probs is not None and not all(active)  # the waiting rows' drafts are still to be judged
        if q is not None:  # never the output itself: a captured step's next replay overwrites it (CUDA graphs)
            n = first_rows(batch.computed(active)) if keep else None
            if not keep:
                self.draft_probs = q.new_zeros(len(batch.rows), *q.shape[1:])
                self.draft_probs[: len(q)] = q
            elif n is not None:  # the first rows: theirs in place, the rest kept
                self.draft_probs[:n] = q[:n]
            else:
                active_t = sent["active"] if sent else torch.tensor(active, device=batch.device)
                self.draft_probs = torch.where(active_t[:, None, None], q, self.draft_probs)
        host = StepOutput.read(download(ints))
        if self.policy is not None:
            self.policy.learn([(row.params.sampling.greedy, n_judged[r], host.accepted[r])
                               for r, row in enumerate(batch.rows) if active[r] and not self.looked_up[r]])
        decisions = {}
        reach = self.longest if batch.live == 1 else self.n_drafts  # a lookup's length
        for r, row in enumerate(batch.rows):
            if not active[r]:
                continue
            a, drafts = host.accepted[r], self.drafts[r]
            entered = [row.pending, *drafts[:a]] if fed else []
            decisions[r] = Decision(entered, [*drafts[:a], host.next_byte[r]], n_judged[r], host.broken[r])
            self.drafts[r] = host.drafts[r]
            self.n_valid[r] = drafted
            if self.texts is not None and self.drafting.uses_text(row.params.sampling.greedy):
                self._from_text(r, row, decisions[r].decided, eager, reach)
        return decisions

    def _from_text(self, r: int, row: Row, decided: list[int], eager: bool, reach: int) -> None:
        """Row ``r``'s text after a decision (an eager one appended its bytes itself; a compiled
        step's are appended here), and its lookup draft of at most ``reach`` bytes in place of the
        heads' when it has one."""
        if not eager:
            self.texts.extend(r, decided)
        lookup = self.drafting.lookup_for(row.params.sampling.greedy)
        proposal = self.texts.lookup(r, reach, self.drafting.min_match) if lookup else []
        self.looked_up[r] = bool(proposal)
        if proposal:
            self.drafts[r], self.n_valid[r] = proposal, len(proposal)
            row.stats.lookups += 1
