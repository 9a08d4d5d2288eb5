"""Turning one forward's logits into the next step of decoding.

A forward fed ``[pending, d_1 .. d_k]`` (the byte head 1 chose last time and the
drafts heads 2.. proposed for the bytes after it) returns logits [P = k+1
positions, H = 1 + draft heads, V]. Head 1 at position j-1 judges draft d_j; the
longest run of accepted drafts is kept, head 1 supplies the byte after it (a
correction at the first rejection, or a fresh byte after the last draft) and the
draft heads at that same position propose the next block. Autoregressive decoding
is the case k = 0, H = 1.

Everything is computed on the device and packed into one small ``decision``
tensor ``[a, next_byte, new_draft_1 .. new_draft_{H-1}]``, so the caller needs a
single host transfer per step, and the next forward's input is a slice of it.
"""

from __future__ import annotations

import torch

from bytemtp.sampling import SamplingConfig, draw, probabilities


class GreedyVerifier:
    """Drafts are accepted while they equal head 1's argmax: output is exactly greedy decoding."""

    def __call__(self, logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        choice = logits.argmax(dim=-1)  # [P, H]
        if drafts.numel() == 0:
            return torch.cat((choice.new_zeros(1), choice[0]))
        accepted = (choice[:-1, 0] == drafts).cumprod(dim=0).sum().view(1)
        return torch.cat((accepted, choice.index_select(0, accepted).view(-1)))


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

    def __init__(self, sampling: SamplingConfig, generator: torch.Generator):
        self.sampling = sampling
        self.generator = generator
        self.draft_probs: torch.Tensor | None = None  # [H-1, V] q of the latest drafts

    def __call__(self, logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        k = drafts.numel()
        p = probabilities(logits[:, 0], self.sampling)  # [P, V]
        if k == 0:
            accepted = drafts.new_zeros(1)
            fallback = p
        else:
            q = self.draft_probs[:k]
            p_d = p[:-1].gather(1, drafts[:, None]).squeeze(1)
            q_d = q.gather(1, drafts[:, None]).squeeze(1)
            u = torch.rand(k, generator=self.generator, device=p.device)
            accepted = (u * q_d < p_d).cumprod(dim=0).sum().view(1)
            residual = (p[:-1] - q).clamp_min(0)
            # p <= q everywhere means p == q: rejection has probability zero, but
            # rounding can still reject; drawing from p is then the right answer.
            residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p[:-1])
            fallback = torch.cat((residual, p[-1:]))
        next_byte = draw(fallback.index_select(0, accepted), self.generator)
        if logits.shape[1] == 1:
            return torch.cat((accepted, next_byte))
        self.draft_probs = probabilities(logits.index_select(0, accepted)[0, 1:], self.sampling)
        new_drafts = draw(self.draft_probs, self.generator)
        return torch.cat((accepted, next_byte, new_drafts))
