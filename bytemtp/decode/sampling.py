"""Logits -> the distribution bytes are drawn from, and the draw itself.

Speculative sampling is exact only if the drafts and the verifier are judged by
the very distributions they are drawn from, so temperature, top-k and top-p are
applied in one place (``probabilities``) for head 1 and the draft heads alike.

Draws invert the cumulative distribution at a uniform number given by the caller:
exact, one number per draw, row-wise on a whole batch of distributions at once,
and (unlike ``torch.multinomial``) free of any generator or host synchronisation,
so the decode step that draws stays a pure function of its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bytemtp.errors import BytemtpError


@dataclass(frozen=True)
class SamplingConfig:
    """How logits become a distribution. ``temperature == 0`` is greedy (argmax).

    ``top_k == 0`` and ``top_p == 1`` switch those filters off; with both set,
    top-k is applied first, then top-p to what remains.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise BytemtpError(f"--temperature: must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise BytemtpError(f"--top-k: must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise BytemtpError(f"--top-p: must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Row-wise distributions [..., V] (float32) after temperature, top-k and top-p.

    Top-p keeps the smallest set of most likely bytes whose mass reaches ``top_p``
    (always at least the most likely one) and renormalises.
    """
    logits = logits.float() / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if cfg.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= cfg.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One sample per row of ``probs`` [..., V] (rows need not be normalised), by inverting the
    cumulative distribution at ``uniform`` [...] in [0, 1) -> int64 [...].

    Byte i is drawn when ``cdf[i-1] <= u * total < cdf[i]``, an interval of width ``p[i]``: a
    zero-probability byte is never drawn. The last entry is made infinite so that rounding of
    ``u * total`` up to the total still lands on a byte.
    """
    cdf = probs.float().cumsum(dim=-1)
    target = uniform[..., None] * cdf[..., -1:]
    cdf = torch.cat((cdf[..., :-1], torch.full_like(cdf[..., -1:], float("inf"))), dim=-1)
    return (cdf <= target).sum(dim=-1)
