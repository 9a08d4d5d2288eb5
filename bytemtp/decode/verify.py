"""Verification of a chain of drafts, and the drafts of the next step: batched, on the device.

A forward fed ``[pending, d_1 .. d_k]`` per row (the byte head 1 chose last time and the
drafts the draft heads proposed for the bytes after it) returns head 1's logits at its
P = k+1 positions. Head 1 at position j-1 judges draft d_j; each row keeps its longest
run of accepted drafts (at most its ``n_valid``: drafts past it were never meant to be
verified), and head 1 supplies the byte after it: a correction at the first rejection, or
a fresh byte after the last draft. The draft heads, evaluated at that position, propose
the next block. Autoregressive decoding is the case k = 0 with no drafter.

Greedy and sampling share this skeleton and differ in two places (``ChainRule``): how a
draft is judged, and how the byte after the accepted run is chosen.

- Greedy: drafts are accepted while they equal head 1's argmax: output is exactly greedy
  decoding.
- Sampling: speculative sampling (Leviathan et al. 2023; Chen et al. 2023). Draft d_j was
  drawn from q_j, head j+1's distribution at the position the block was drafted from,
  processed as ``ChainRule.draft_sampling`` says; head 1's processed distribution there is
  p_j. d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection
  the byte is drawn from norm(max(0, p_j - q_j)) instead, and after the last accepted draft
  straight from p. Each output byte is then distributed exactly as head 1 says, whatever
  the drafts were.

Random numbers come in as arguments (``Uniforms``), drawn per row before the step, so
these functions are pure and a row's draws do not depend on the other rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bytemtp.decode.coupling import DraftContext
from bytemtp.decode.incontext import InContext
from bytemtp.decode.sampling import SamplingConfig, draw, probabilities


@dataclass
class Uniforms:
    """A step's uniform numbers in [0, 1), per row: ``accept`` [B, k] judges the drafts,
    ``next`` [B] draws the byte after the accepted run, ``drafts`` [B, m] the next drafts."""

    accept: torch.Tensor
    next: torch.Tensor
    drafts: torch.Tensor


def accepted_run(agree: torch.Tensor) -> torch.Tensor:
    """[B, k] bool, draft j judged acceptable -> [B] length of each row's accepted prefix."""
    return agree.long().cumprod(dim=-1).sum(dim=-1)


@dataclass(frozen=True)
class ChainRule:
    """How drafts are judged and the next byte chosen: greedily (temperature 0) or by sampling.
    ``draft``: how the draft heads' logits become the distributions drafts are drawn from and
    judged by (default: ``sampling``). Any choice keeps the output exactly head 1's; a lower
    temperature than head 1's is accepted more often (``GenerationConfig.draft_sampling``).
    ``context``: given, each draft is drawn (greedy: chosen) given the two bytes before it
    (``bytemtp.decode.coupling``)."""

    sampling: SamplingConfig
    draft: SamplingConfig | None = None
    context: DraftContext | None = field(default=None, compare=False)

    @property
    def draft_sampling(self) -> SamplingConfig:
        return self.draft or self.sampling

    def verify(
        self,
        logits: torch.Tensor,
        drafts: torch.Tensor,
        n_valid: torch.Tensor,
        draft_probs: torch.Tensor | None,
        u: Uniforms | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head-1 ``logits`` [B, P, V], ``drafts`` [B, P-1] of which the first ``n_valid`` [B] count,
        their draft distributions [B, P-1, V] (sampling) -> (accepted [B], next byte [B])."""
        k = drafts.shape[1]
        if k == 0 and self.sampling.greedy:  # autoregressive: nothing to judge
            return n_valid.new_zeros(n_valid.shape), logits[:, 0].argmax(dim=-1)
        valid = torch.arange(k, device=drafts.device) < n_valid[:, None]
        if self.sampling.greedy:
            choice = logits.argmax(dim=-1)  # [B, P]
            accepted = accepted_run((choice[:, :-1] == drafts) & valid)
            return accepted, choice.gather(1, accepted[:, None])[:, 0]
        p = probabilities(logits, self.sampling)  # [B, P, V]
        if k == 0:
            return n_valid.new_zeros(n_valid.shape), draw(p[:, 0], u.next)
        q = draft_probs[:, :k]
        p_d = p[:, :-1].gather(2, drafts[..., None])[..., 0]
        q_d = q.gather(2, drafts[..., None])[..., 0]
        accepted = accepted_run((u.accept * q_d < p_d) & valid)
        residual = (p[:, :-1] - q).clamp_min(0)
        # p <= q everywhere means p == q: rejection has probability zero, but rounding can
        # still reject; drawing from p is then the right answer.
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p[:, :-1])
        # A rejected draft j < n_valid draws from its residual; past the accepted run, from p.
        fallback = torch.where(valid[..., None], residual, p[:, :-1])
        fallback = torch.cat((fallback, p[:, -1:]), dim=1)
        at = accepted[:, None, None].expand(-1, 1, p.shape[-1])
        return accepted, draw(fallback.gather(1, at)[:, 0], u.next)

    def propose(
        self,
        draft_logits: torch.Tensor,
        u: Uniforms | None,
        before: torch.Tensor,
        after: torch.Tensor,
        counts: InContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The draft heads' logits [B, m, V] at the accepted position, whose byte is ``before`` [B]
        and whose next byte is ``after`` [B] -> (drafts [B, m], and when sampling the distributions
        q [B, m, V] they were drawn from, which the next step judges them by). ``counts``: each
        draft's weights also times the rows' in-context factor (``bytemtp.decode.incontext``)."""
        greedy = self.sampling.greedy
        if self.context is None and counts is None:
            if greedy:
                return draft_logits.argmax(dim=-1), None
            q = probabilities(draft_logits, self.draft_sampling)
            return draw(q, u.drafts), q
        q = None if greedy else probabilities(draft_logits, self.draft_sampling)
        drafts, coupled = [], []
        for j in range(draft_logits.shape[1]):  # each draft given the two bytes before it
            w = self.context.after(before, after) if self.context is not None else None
            if counts is not None:
                w = counts.factor(before, after) if w is None else w * counts.factor(before, after)
            if greedy:  # the likeliest byte of the head's distribution times the weights
                draft = (draft_logits[:, j].float() + w.log()).argmax(dim=-1)
            else:
                weighed = q[:, j] * w
                coupled.append(weighed / weighed.sum(-1, keepdim=True))
                draft = draw(coupled[-1], u.drafts[:, j])
            before, after = after, draft
            drafts.append(draft)
        return torch.stack(drafts, dim=1), None if greedy else torch.stack(coupled, dim=1)
