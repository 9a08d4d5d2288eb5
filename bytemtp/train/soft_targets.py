"""Draft heads fitted to head 1's whole distribution along its own sampled continuations.

A sampled draft is accepted with probability ``sum_x min(p(x), q(x))``: ``p`` head 1's
distribution at the row's temperature, given the bytes actually before it, and ``q`` the one
the draft was drawn from, its head's logits at the draft temperature times the corpus's
coupling weights after the two bytes before it (``bytemtp.decode.coupling``). Heads trained
on the corpus predict the text at no temperature in particular. Fitted to head 1's greedy
choices (``distill --temperature 0``) they learn its modes and grow sharper than ``p``, and
lose sampled drafts: on the demo's model the chain at T = 0.7 fell from 2.73 to 2.48 bytes per
forward.

Here each draft head is fitted to ``p`` itself: the cross-entropy of ``q``, computed as
decoding draws it (draft temperature and coupling included), against head 1's tempered
distribution, along continuations head 1 sampled at that temperature. The two bytes before
each target, and the next byte a head may read, are the continuation's, as a chain whose
drafts were all accepted sees them: the only case where a draft is judged at all. The total
variation ``1 - sum min(p, q)`` is at most ``sqrt(KL(p || q) / 2)`` (Pinsker), so minimising the
KL makes drafts survive more often.
Greedy drafts gain too (the heads' argmax moves toward head 1's); the greedy coupling table
is then fitted to these heads (``bytemtp.train.couple``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from bytemtp.decode.coupling import DRAFT_COUPLING
from bytemtp.decode.sampling import SamplingConfig, draft_sampling
from bytemtp.model.transformer import ByteMTP
from bytemtp.train.couple import corpus_ratios


@dataclass
class Targets:
    """Sequences [N, T] with the frozen trunk's output ``z`` [N, T, d] and head 1's log-probabilities
    at the fit's temperature ``log_p`` [N, T, V] (``distill.trunk_and_choices`` computes both)."""

    seqs: torch.Tensor
    z: torch.Tensor
    log_p: torch.Tensor

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, rows: torch.Tensor | slice) -> Targets:
        return Targets(self.seqs[rows], self.z[rows], self.log_p[rows])

    @staticmethod
    def join(parts: list[Targets]) -> Targets:
        return Targets(*(torch.cat(tensors) for tensors in zip(*((t.seqs, t.z, t.log_p) for t in parts))))


@dataclass(frozen=True)
class DraftLaw:
    """How decoding draws a sampled draft at a row temperature: its head's logits at
    ``temperature`` (the draft temperature) plus ``log_weights[index[a, b]]`` after the bytes
    ``a, b`` before it (None: a model without byte trigrams, uncoupled)."""

    temperature: float
    log_weights: torch.Tensor | None
    index: torch.Tensor | None

    @classmethod
    def of(cls, model: ByteMTP, temperature: float) -> DraftLaw:
        """Decoding's defaults for rows sampled at ``temperature``."""
        draft_t = draft_sampling(SamplingConfig(temperature)).temperature
        if model.byte_trigrams is None:
            return cls(draft_t, None, None)
        ratios, device = corpus_ratios(model), model.embed.weight.device
        return cls(draft_t, DRAFT_COUPLING * ratios.weights.to(device), ratios.index.to(device))


def draft_pairs(model: ByteMTP, t: Targets, law: DraftLaw) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per draft head k+1 (k = 1..n-1): the log of the distribution it drafts from at every
    position that has a target, [B, T-k, V], and head 1's log-probabilities of that byte (the one
    at t + k + 1), [B, T-k, V] float32. A head that reads the next byte reads the sequence's."""
    T = t.seqs.shape[1]
    for k in range(1, model.cfg.n_future):
        logits = model.head_logits(t.z[:, : T - k], k, next_ids=t.seqs[:, 1 : T - k + 1]).float() / law.temperature
        if law.index is not None:  # the two bytes before the target: t + k - 1 and t + k
            logits = logits + law.log_weights[law.index[t.seqs[:, k - 1 : T - 1], t.seqs[:, k:]]]
        yield logits.log_softmax(-1), t.log_p[:, k:].float()


def soft_loss(model: ByteMTP, t: Targets, law: DraftLaw) -> torch.Tensor:
    """[n - 1]: per draft head, the mean ``KL(p || q)`` over its positions (``draft_pairs``)."""
    return torch.stack([(log_p.exp() * (log_p - log_q)).sum(-1).mean() for log_q, log_p in draft_pairs(model, t, law)])


@torch.no_grad()
def acceptance(model: ByteMTP, t: Targets, law: DraftLaw, batch_size: int) -> list[float]:
    """Per draft head, the mean of ``sum min(p, q)`` over its positions: how often its draft would be
    accepted where the drafts before it were."""
    total = torch.zeros(model.cfg.n_future - 1)
    for i in range(0, len(t), batch_size):
        for k, (log_q, log_p) in enumerate(draft_pairs(model, t[i : i + batch_size], law)):
            total[k] += torch.minimum(log_q, log_p).exp().sum(-1).mean().item() * min(batch_size, len(t) - i)
    return (total / len(t)).tolist()
