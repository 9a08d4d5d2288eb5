"""Draft heads that read the shared features through an MLP of their own (``ModelConfig.draft_mlp``).

Draft head k reads ``f + mlp_k(f)``, ``f`` the shared final-normed trunk output, then its
own unembedding. Training and evaluation run one head at a time (``forward``). A decoding
step needs every draft head at one position per row, so ``decode`` runs them all at once on
copies of the weights stacked by ``stack`` (in place, like ``ByteMTP.draft_weight``, so a
captured step keeps reading them at the same address): one product into every head's hidden
units, one batched product out, instead of two small products per head.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from bytemtp.model.cache import kept_in_place
from bytemtp.model.config import ModelConfig
from bytemtp.model.layers import MLP


class DraftMLPs(nn.Module):
    """The MLPs of draft heads 2..n (``mlps[k - 1]`` is head k's, k counted from 0 as in ``ByteMTP``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inner = dataclasses.replace(cfg, d_ff=cfg.draft_mlp)
        self.mlps = nn.ModuleList(MLP(inner) for _ in range(cfg.n_future - 1))
        self.register_buffer("w_in", None, persistent=False)  # [d, heads * inner width], ``stack``
        self.register_buffer("w_out", None, persistent=False)  # [heads, hidden, d]

    def forward(self, features: torch.Tensor, k: int) -> torch.Tensor:
        """What draft head ``k`` (1..n-1) unembeds: the features plus its MLP of them."""
        return features + self.mlps[k - 1](features)

    def stack(self, dtype: torch.dtype) -> None:
        """Refresh the stacked weights ``decode`` reads (the weights may have changed since the last call)."""
        w_in = torch.cat([m.w_in.weight for m in self.mlps]).t().detach().to(dtype).contiguous()
        w_out = torch.stack([m.w_out.weight.t() for m in self.mlps]).detach().to(dtype).contiguous()
        self.w_in, self.w_out = kept_in_place(self.w_in, w_in), kept_in_place(self.w_out, w_out)

    def decode(self, features: torch.Tensor, n: int) -> torch.Tensor:
        """Features [.., d] -> what draft heads 2..n+1 unembed, [.., n, d] (after ``stack``)."""
        width = self.w_in.shape[1] // len(self.mlps)
        hidden = (features @ self.w_in[:, : n * width]).unflatten(-1, (n, width))
        hidden = self.mlps[0].activate(hidden)
        return features.unsqueeze(-2) + (hidden.unsqueeze(-2) @ self.w_out[:n]).squeeze(-2)
