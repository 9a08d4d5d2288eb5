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

from collections.abc import Sequence
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


# Drafts are drawn at this fraction of the temperature by default. A draft head
# predicts byte t+k without the bytes before it, so its distribution is broader than head
# 1's once those bytes are known, and a draft drawn from a sharper copy of it is accepted
# more often. Measured on the 2000-step tiny preset, 96 val prompts x 192 bytes at T = 0.8,
# bytes per forward: 2.466 at 1, 2.553 at 0.8, 2.501 at 0.65 (48 prompts at T = 1: 2.219
# at 1, 2.328 at 0.7). Trees gain less, their siblings already covering more of the likely
# bytes (96 prompts at T = 0.8, 1 -> 0.8: tree of 7 2.616 -> 2.660, tree of 15 2.827 -> 2.930).
DRAFT_TEMPERATURE = 0.8


def draft_sampling(target: SamplingConfig, draft_temperature: float | None = None) -> SamplingConfig:
    """How the draft heads' logits become the distributions drafts are drawn from, for a row
    sampled as ``target``: at ``draft_temperature`` (None: ``DRAFT_TEMPERATURE`` times the
    target's), with its top-k and top-p. A greedy row's drafts are greedy too."""
    t = target.temperature * DRAFT_TEMPERATURE if draft_temperature is None or target.greedy else draft_temperature
    return SamplingConfig(t, target.top_k, target.top_p)


@dataclass(frozen=True)
class RowSampling:
    """Per-row settings of a batch whose rows sample differently: ``temperature``, ``top_k``,
    ``top_p`` [B] (float, long, float). A row of temperature 0 is greedy: its distribution is a
    point mass at the argmax, so speculative sampling's rules (accept with min(1, p/q), else
    draw from the residual) accept exactly the drafts equal to the argmax and then decide the
    argmax, whatever the drafts' distributions were: greedy and sampled rows share one step and
    a greedy row's output is byte for byte greedy decoding's. ``filtered``: some row uses top-k
    or top-p (known on the host, so rows without them skip the sorts)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    filtered: tuple[bool, bool] = (False, False)

    greedy = False  # as ``SamplingConfig.greedy``: the step takes the sampling path

    def first(self, n: int) -> "RowSampling":
        """The settings of the first ``n`` rows."""
        return RowSampling(self.temperature[:n], self.top_k[:n], self.top_p[:n], self.filtered)

    @staticmethod
    def of(configs: Sequence[SamplingConfig], device: torch.device) -> "RowSampling":
        t = torch.tensor([c.temperature for c in configs], dtype=torch.float32, device=device)
        k = torch.tensor([c.top_k for c in configs], dtype=torch.long, device=device)
        p = torch.tensor([c.top_p for c in configs], dtype=torch.float32, device=device)
        return RowSampling(t, k, p, (any(c.top_k for c in configs), any(c.top_p < 1 for c in configs)))


def probabilities(logits: torch.Tensor, cfg: SamplingConfig | RowSampling) -> torch.Tensor:
    """Row-wise distributions [..., V] (float32) after temperature, top-k and top-p; with a
    ``RowSampling``, ``logits`` are [B, ..., V] and each row has its own.

    Top-p keeps the smallest set of most likely bytes whose mass reaches ``top_p``
    (always at least the most likely one) and renormalises.
    """
    if isinstance(cfg, RowSampling):
        return _row_probabilities(logits, cfg)
    logits = logits.float() / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    return _top_p(probs, cfg.top_p) if cfg.top_p < 1 else probs


def _top_p(probs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
    probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return probs / probs.sum(dim=-1, keepdim=True)


def _row_probabilities(logits: torch.Tensor, cfg: RowSampling) -> torch.Tensor:
    """``probabilities`` with per-row settings: each row's numbers as its own ``SamplingConfig``
    would give them, and a point mass at the argmax for a greedy row."""
    shape = (-1,) + (1,) * (logits.dim() - 1)
    t, k, top_p = cfg.temperature.view(shape), cfg.top_k.view(shape), cfg.top_p.view(shape)
    greedy, V = t == 0, logits.shape[-1]
    logits = logits.float()
    scaled = logits / torch.where(greedy, 1.0, t)
    if cfg.filtered[0]:
        at = (k.clamp(1, V) - 1).expand(*scaled.shape[:-1], 1)
        kth = scaled.sort(dim=-1, descending=True).values.gather(-1, at)
        scaled = scaled.masked_fill((k > 0) & (k < V) & (scaled < kth), float("-inf"))
    probs = scaled.softmax(dim=-1)
    if cfg.filtered[1]:
        probs = torch.where(top_p < 1, _top_p(probs, top_p), probs)
    point = torch.nn.functional.one_hot(logits.argmax(dim=-1), V).float()
    return torch.where(greedy, point, probs)


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
