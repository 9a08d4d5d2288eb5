"""The layers of the trunk and of the transformer heads: RoPE, attention, MLP, pre-norm block.

A forward's positions arrive as one ``PosContext`` shared by every layer. Without a KV
cache (training, evaluation) attention is plainly causal over the ids given. With one
(decoding), each layer writes its keys and values into its own buffer of the cache at the
slots the context names and attends through the context's mask, so rows of a batch may sit
at different positions and a draft tree may attend to its ancestors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bytemtp.model.cache import CacheRows, KVCache
from bytemtp.model.config import ModelConfig
from bytemtp.model.panels import PanelLinear, WeightLayout, decoding_weight, eager_inference, host_copy
from bytemtp_native.norms import rms_norm_rows


def rope_tables(max_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_len, head_dim / 2] of every position's rotation angles (computed in float64)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(logits / cap)``; ``cap == 0``: the logits as they are."""
    return cap * torch.tanh(logits / cap) if cap else logits


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves of ``x`` [..., T, hd] by the angles of its positions (cos/sin broadcastable to [..., T, hd/2])."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


NORM_MAX_ELEMENTS = 1 << 16  # a prompt's forward (a few hundred positions of a small model) and less


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose few-row CPU float32 inference (a decoding step's) runs in one Numba call
    (``bytemtp_native.norms``: torch's takes half a dozen operations, a tenth of a small model's
    step); everything else, and compiled graphs, as ``nn.RMSNorm``. The same state dict."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._host_weight = WeightLayout(host_copy)
        self.layouts = True  # False: always torch's (``bytemtp.model.panels.drop_layouts``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (not self.layouts or not eager_inference(x) or weight is None or self.eps is None or x.numel() > NORM_MAX_ELEMENTS
                or not decoding_weight(weight)):
            return super().forward(x)
        d, out = x.shape[-1], torch.empty(x.shape)
        rows = x.detach().contiguous().numpy().reshape(-1, d)
        rms_norm_rows(rows, self._host_weight.of(weight), self.eps, out.numpy().reshape(-1, d))
        return out


@dataclass
class PosContext:
    """What every layer needs to know about the positions of the current forward.

    Tensors with a batch axis carry it first; ``cos``, ``sin`` and ``mask`` then also
    carry a length-1 heads axis after it, so they broadcast over attention heads.
    """

    cos: torch.Tensor  # [T, hd/2] or [B, 1, T, hd/2]
    sin: torch.Tensor
    cache: KVCache | None = None  # decoding: the cache every attention layer reads and writes
    slot_index: torch.Tensor | None = None  # the cache slots written (``KVCache.slot_index``)
    mask: torch.Tensor | None = None  # [T, S] or [B, 1, T, S] bool: which slots each position attends to
    rows: CacheRows = None  # the cache rows this forward's rows are (``bytemtp.model.cache``)


class Attention(nn.Module):
    """Multi-head self-attention with RoPE. ``cache_layer``: this layer's buffer in a ``KVCache``
    (numbered by the model that owns the layer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_attn_heads, cfg.head_dim
        self.wqkv = PanelLinear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.wo = PanelLinear(cfg.d_model, cfg.d_model, bias=False)
        self.qk_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.cache_layer = 0

    def forward(self, x: torch.Tensor, pos: PosContext) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.wqkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        qk = qkv[:2] if self.qk_norm is None else self.qk_norm(qkv[:2])
        (q, k), v = apply_rope(qk, pos.cos, pos.sin), qkv[2]  # q and k rotated in one go: half the small ops
        if pos.cache is not None:
            live = pos.mask.shape[-1]  # the mask may cover only the cache's first slots (``kv_len``)
            k, v = pos.cache.write(self.cache_layer, pos.slot_index, k, v, live, pos.rows)
            k, v = k.to(q.dtype), v.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=pos.mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.ffn
        self.swiglu = cfg.ffn == "swiglu"
        self.w_in = PanelLinear(cfg.d_model, (2 if self.swiglu else 1) * cfg.ffn_dim, bias=False)
        self.w_out = PanelLinear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(self.activate(self.w_in(x)))

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """The nonlinearity between the two projections (SwiGLU halves the last axis)."""
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        if self.kind == "relu2":
            return F.relu(h).square()
        return F.gelu(h)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, pos: PosContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), pos)
        return x + self.mlp(self.mlp_norm(x))


class TransformerHead(nn.Module):
    """``head_layers`` blocks of one prediction head (norm and unembedding are shared)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.head_layers))

    def forward(self, z: torch.Tensor, pos: PosContext) -> torch.Tensor:
        for blk in self.blocks:
            z = blk(z, pos)
        return z
