"""Logits -> the distribution bytes are drawn from, and the draw itself.

Speculative sampling is exact only if the drafts and the verifier are judged by
the very distributions they are drawn from, so temperature, top-k and top-p are
applied in one place (``probabilities``) for head 1 and the draft heads alike.

Draws use the exponential race (``argmax p / E`` with ``E ~ Exp(1)``), which
samples from ``p`` exactly, works row-wise on a whole batch of distributions at
once and, unlike ``torch.multinomial``, never synchronises with the host.
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


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample per row of ``probs`` [..., V] -> int64 [...] (rows need not be normalised)."""
    race = torch.empty_like(probs).exponential_(generator=generator)
    # An exact 0 from the exponential would turn a zero-probability byte into 0/0 = NaN,
    # which argmax picks; the smallest normal float instead changes nothing measurable.
    race.clamp_min_(torch.finfo(race.dtype).tiny)
    return (probs / race).argmax(dim=-1)
