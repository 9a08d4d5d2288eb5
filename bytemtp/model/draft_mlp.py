"""Draft heads that read the shared features through an MLP of their own (``ModelConfig.draft_mlp``).

Draft head k reads ``f + mlp_k(f)``, ``f`` the shared final-normed trunk output, then its
own unembedding. Training and evaluation run one head at a time (``forward``). A decoding
step needs every draft head at one position per row, so ``decode`` runs them all at once on
copies of the weights stacked by ``stack`` (in place, like ``ByteMTP.draft_weight``, so a
captured step keeps reading them at the same address): one product into every head's hidden
units, one batched product out, instead of two small products per head.

With ``draft_next_byte`` each head reads ``u = f + e_k(b)`` instead of ``f``, ``b`` the byte after
its position and ``e_k`` an embedding of its own. A draft head at position t predicts byte
t + k + 1 without knowing byte t + 1, so it spreads its bets over every way that byte might
go, and a chain loses most of its drafts at the first one. But a decoding step drafts only
after verification, when head 1 has decided byte t + 1 (greedily or by sampling, exactly), so
the heads may condition on it: training feeds them the text's byte there, decoding the decided
one. The embeddings start at zero, so such a model starts as the one without them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from bytemtp.model.cache import kept_in_place
from bytemtp.model.config import ModelConfig
from bytemtp.model.layers import MLP


class DraftMLPs(nn.Module):
    """The MLPs of draft heads 2..n (``mlps[k - 1]`` is head k's, k counted from 0 as in ``ByteMTP``)
    and, with ``draft_next_byte``, their embeddings of the next byte (``next_bytes[k - 1]``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inner = dataclasses.replace(cfg, d_ff=cfg.draft_mlp)
        self.mlps = nn.ModuleList(MLP(inner) for _ in range(cfg.n_future - 1))
        # made without a random draw (``ByteMTP`` sets them to zero), so the MLPs' draws stay as they are
        self.next_bytes = nn.ModuleList(
            nn.Embedding(cfg.vocab_padded, cfg.d_model, _weight=torch.zeros(cfg.vocab_padded, cfg.d_model))
            for _ in self.mlps
        ) if cfg.draft_next_byte else None
        self.register_buffer("w_in", None, persistent=False)  # [d, heads * inner width], ``stack``
        self.register_buffer("w_out", None, persistent=False)  # [heads, hidden, d]
        self.register_buffer("e_next", None, persistent=False)  # [vocab, heads, d]

    def head_parameters(self, k: int) -> list[nn.Parameter]:
        """Draft head ``k``'s own parameters here (1..n-1): its MLP's, then its next-byte embedding."""
        own = [] if self.next_bytes is None else list(self.next_bytes[k - 1].parameters())
        return [*self.mlps[k - 1].parameters(), *own]

    def forward(self, features: torch.Tensor, k: int, next_ids: torch.Tensor | None = None) -> torch.Tensor:
        """What draft head ``k`` (1..n-1) unembeds: its input (the features, plus the next byte's
        embedding with ``draft_next_byte``: ``next_ids`` [...] beside features [..., d]) plus its MLP of it."""
        if self.next_bytes is not None:
            features = features + self.next_bytes[k - 1](_required(next_ids))
        return features + self.mlps[k - 1](features)

    def stack(self, dtype: torch.dtype) -> None:
        """Refresh the stacked weights ``decode`` reads (the weights may have changed since the last call)."""
        w_in = torch.cat([m.w_in.weight for m in self.mlps]).t().detach().to(dtype).contiguous()
        w_out = torch.stack([m.w_out.weight.t() for m in self.mlps]).detach().to(dtype).contiguous()
        self.w_in, self.w_out = kept_in_place(self.w_in, w_in), kept_in_place(self.w_out, w_out)
        if self.next_bytes is not None:
            e_next = torch.stack([e.weight for e in self.next_bytes], dim=1).detach().to(dtype).contiguous()
            self.e_next = kept_in_place(self.e_next, e_next)

    def decode(self, features: torch.Tensor, n: int, next_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Features [.., d] (and the next bytes [..] with ``draft_next_byte``) -> what draft heads
        2..n+1 unembed, [.., n, d] (after ``stack``)."""
        width = self.w_in.shape[1] // len(self.mlps)
        if self.e_next is None:  # one input for every head: one product into all their hidden units
            hidden = (features @ self.w_in[:, : n * width]).unflatten(-1, (n, width))
            read = features.unsqueeze(-2)
        else:  # an input per head: a batched product, each head's own
            read = features.unsqueeze(-2) + self.e_next[_required(next_ids), :n]  # [.., n, d]
            w_in = self.w_in[:, : n * width].unflatten(-1, (n, width)).transpose(0, 1)  # [n, d, width]
            hidden = (read.unsqueeze(-2) @ w_in).squeeze(-2)
        hidden = self.mlps[0].activate(hidden)
        return read + (hidden.unsqueeze(-2) @ self.w_out[:n]).squeeze(-2)


def _required(next_ids: torch.Tensor | None) -> torch.Tensor:
    if next_ids is None:
        raise ValueError("draft heads with draft_next_byte read the next byte: pass next_ids")
    return next_ids
