"""Turning one forward's outputs into the next step of decoding.

A forward fed ``[pending, d_1 .. d_k]`` (the byte head 1 chose last time and the
drafts the draft heads proposed for the bytes after it) returns head 1's logits
at its P = k+1 positions and the draft heads' features there (see
``ByteMTP.decode``). Head 1 at position j-1 judges draft d_j; the longest run of
accepted drafts is kept, head 1 supplies the byte after it (a correction at the
first rejection, or a fresh byte after the last draft), and the draft heads are
evaluated at that one position to propose the next block. Autoregressive
decoding is the case k = 0 with no drafter.

Everything is computed on the device and packed into one small ``decision``
tensor ``[a, next_byte, new_draft_1 .. new_draft_m]``, so the caller needs a
single host transfer per step, and the next forward's input is a slice of it.
Given a ``DraftPolicy`` (see ``bytemtp.decode.drafting``), a verifier also marks the
new drafts that are not worth verifying with ``NO_DRAFT``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bytemtp.decode.drafting import DraftPolicy
from bytemtp.decode.sampling import SamplingConfig, draw, probabilities

# features of the position verification stopped at [F, d] -> draft logits [m, V]
Drafter = Callable[[torch.Tensor], torch.Tensor]


def accepted_run(agree: torch.Tensor) -> torch.Tensor:
    """[k] bool, draft j judged acceptable -> [1] length of the accepted prefix."""
    return agree.cumprod(dim=0).sum().view(1)


class GreedyVerifier:
    """Drafts are accepted while they equal head 1's argmax: output is exactly greedy decoding."""

    def __init__(self, drafter: Drafter | None, policy: DraftPolicy | None = None):
        self.drafter = drafter
        self.policy = policy

    def __call__(self, logits: torch.Tensor, features: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        choice = logits.argmax(dim=-1)  # [P]
        accepted = accepted_run(choice[:-1] == drafts) if drafts.numel() else drafts.new_zeros(1)
        decided = torch.cat((accepted, choice.index_select(0, accepted)))
        if self.drafter is None:
            return decided
        draft_logits = self.drafter(features.index_select(0, accepted)[0])
        new_drafts = draft_logits.argmax(dim=-1)
        if self.policy is not None:
            confidence = draft_logits.softmax(dim=-1).amax(dim=-1)
            new_drafts = self.policy.choose(new_drafts, confidence, drafts.numel(), accepted)
        return torch.cat((decided, new_drafts))


class SamplingVerifier:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with the draft heads as drafter.

    Draft d_j was drawn from q_j, head j+1's processed distribution at the
    position the block was drafted from; head 1's processed distribution there is
    p_j. d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the first
    rejection the byte is drawn from norm(max(0, p_j - q_j)) instead, and after the
    last accepted draft straight from p. Each output byte is then distributed
    exactly as head 1 says, whatever the drafts were. The verifier remembers the
    q of the drafts it proposed, because the next call judges them.
    """

    def __init__(
        self,
        sampling: SamplingConfig,
        generator: torch.Generator,
        drafter: Drafter | None,
        policy: DraftPolicy | None = None,
    ):
        self.sampling = sampling
        self.generator = generator
        self.drafter = drafter
        self.policy = policy
        self.draft_probs: torch.Tensor | None = None  # [m, V] q of the latest drafts

    def __call__(self, logits: torch.Tensor, features: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        k = drafts.numel()
        p = probabilities(logits, self.sampling)  # [P, V]
        if k == 0:
            accepted = drafts.new_zeros(1)
            fallback = p
        else:
            q = self.draft_probs[:k]
            p_d = p[:-1].gather(1, drafts[:, None]).squeeze(1)
            q_d = q.gather(1, drafts[:, None]).squeeze(1)
            u = torch.rand(k, generator=self.generator, device=p.device)
            accepted = accepted_run(u * q_d < p_d)
            residual = (p[:-1] - q).clamp_min(0)
            # p <= q everywhere means p == q: rejection has probability zero, but
            # rounding can still reject; drawing from p is then the right answer.
            residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p[:-1])
            fallback = torch.cat((residual, p[-1:]))
        decided = torch.cat((accepted, draw(fallback.index_select(0, accepted), self.generator)))
        if self.drafter is None:
            return decided
        self.draft_probs = probabilities(self.drafter(features.index_select(0, accepted)[0]), self.sampling)
        new_drafts = draw(self.draft_probs, self.generator)
        if self.policy is not None:
            # From q alone, never from the drafts drawn: choosing which drafts to verify
            # by their own values would skew each verified draft away from q.
            new_drafts = self.policy.choose(new_drafts, self.draft_probs.amax(dim=-1), k, accepted)
        return torch.cat((decided, new_drafts))
