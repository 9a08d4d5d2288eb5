"""The byte model: a transformer trunk and ``n_future`` independent prediction heads.

Head k (0-based here, "head k+1" in the paper's words) predicts the byte k+1
positions ahead. Inference uses a static, pre-allocated KV cache: every attention
layer writes keys/values at explicit positions and attends over the whole buffer
through a position mask, so shapes never change (friendly to ``torch.compile`` and
CUDA graphs) and rolling the cache back after a speculative rejection costs
nothing: the next forward simply writes at the earlier positions again, and the
mask hides whatever stale entries lie beyond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bytemtp.model.config import ModelConfig
from bytemtp.errors import BytemtpError
from bytemtp.model.panels import Linear


def rope_tables(max_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves of ``x`` [..., T, hd] by the angles of its positions (cos/sin: [T, hd/2])."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


@dataclass
class PosContext:
    """What every layer needs to know about the positions of the current forward."""

    cos: torch.Tensor  # [T, hd/2]
    sin: torch.Tensor
    input_pos: torch.Tensor | None = None  # [T] absolute positions, only with a KV cache
    mask: torch.Tensor | None = None  # [T, max_len] bool, only with a KV cache


class KVCache(nn.Module):
    """Keys/values of one attention layer, [B, H, max_len, hd] each: views into the model's
    one cache buffer (``ByteMTP.setup_cache``), so moving entries in every layer is one copy.
    It is an inference cache: it stores values, never autograd history."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, input_pos, k.detach().to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.detach().to(self.v.dtype))
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_attn_heads, cfg.head_dim
        self.wqkv = Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.wo = Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, pos: PosContext) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.wqkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        (q, k), v = apply_rope(qkv[:2], pos.cos, pos.sin), qkv[2]  # q and k rotated in one go: half the small ops
        if pos.input_pos is not None:
            k, v = self.kv_cache.update(pos.input_pos, k, v)
            live = pos.mask.shape[-1]  # the mask may cover only the cache's first slots (``attend``)
            k, v = k[:, :, :live].to(q.dtype), v[:, :, :live].to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=pos.mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.ffn == "swiglu"
        self.w_in = Linear(cfg.d_model, (2 if self.swiglu else 1) * cfg.ffn_dim, bias=False)
        self.w_out = Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.w_out(h)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
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


class ByteMTP(nn.Module):
    """Embedding -> trunk blocks -> z; head k maps z to logits for byte t+k+1.

    ``forward`` returns logits of the first ``n_heads`` heads, sliced to the real
    vocabulary (padding ids never get probability mass). Training code uses
    ``trunk`` and ``head_features`` + ``unembedding`` directly to run the heads one
    at a time.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_padded, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.head_kind == "linear":
            self.heads = nn.ModuleList(
                Linear(cfg.d_model, cfg.vocab_padded, bias=False) for _ in range(cfg.n_future)
            )
            self.unembed = None
        else:
            self.heads = nn.ModuleList(TransformerHead(cfg) for _ in range(cfg.n_future))
            self.unembed = Linear(cfg.d_model, cfg.vocab_padded, bias=False)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("causal_mask", None, persistent=False)
        self.register_buffer("draft_weight", None, persistent=False)
        # The KV cache kept between generations (see ``setup_cache``); not submodules.
        self._caches: list[KVCache] = []
        self._kv: torch.Tensor | None = None  # the buffer they view
        self._mask: torch.Tensor | None = None
        self._cache_key: tuple | None = None
        # Set by ``bytemtp.compile.compile_model``: the training objective then also runs
        # its per-head cross-entropy compiled, not just the blocks.
        self.compiled = False
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by depth."""
        depth = self.cfg.n_layers + (self.cfg.head_layers if self.cfg.head_kind == "transformer" else 0)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            std = 0.02 / math.sqrt(2 * depth) if name.endswith(("wo.weight", "w_out.weight")) else 0.02
            nn.init.normal_(p, mean=0.0, std=std)

    # -- positions -------------------------------------------------------------
    def pos_context(
        self,
        T: int,
        input_pos: torch.Tensor | None = None,
        rope_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        attend: int | None = None,
    ) -> PosContext:
        """Positions of a forward. With a KV cache, ``input_pos`` are the cache slots written;
        a draft tree (``bytemtp.decode.tree``) also gives each id its RoPE position (its depth,
        not its slot) and the mask of what it attends to (its ancestors, not every slot before).
        ``attend``: attention reads only the cache's first ``attend`` slots (see ``decode``)."""
        if input_pos is None:
            if T > self.cfg.max_seq_len:
                raise BytemtpError(f"sequence of {T} bytes exceeds max_seq_len={self.cfg.max_seq_len}")
            return PosContext(self.rope_cos[:T], self.rope_sin[:T])
        if self.causal_mask is None:
            raise RuntimeError("forward with input_pos needs setup_cache() first")
        rope_pos = input_pos if rope_pos is None else rope_pos
        mask = self.causal_mask[input_pos] if mask is None else mask
        if attend is not None:
            mask = mask[:, :attend]
        return PosContext(self.rope_cos[rope_pos], self.rope_sin[rope_pos], input_pos, mask)

    # -- pieces ----------------------------------------------------------------
    def trunk(self, ids: torch.Tensor, pos: PosContext | None = None) -> torch.Tensor:
        """[B, T] ids -> [B, T, d] trunk output z."""
        pos = pos or self.pos_context(ids.shape[1])
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x, pos)
        return x

    def head_features(self, z: torch.Tensor, k: int, pos: PosContext | None = None) -> torch.Tensor:
        """What head ``k``'s unembedding reads: final-normed head output [B, T, d].

        For linear heads this is ``norm(z)`` whatever ``k`` is (see ``shared_features``),
        so callers running several heads compute it once.
        """
        if self.unembed is None:
            return self.norm(z)
        return self.norm(self.heads[k](z, pos or self.pos_context(z.shape[1])))

    @property
    def shared_features(self) -> bool:
        """True when every head reads the same features (linear heads): only the unembedding differs."""
        return self.unembed is None

    def unembedding_layer(self, k: int) -> Linear:
        """Head ``k``'s unembedding (shared by all transformer heads)."""
        return self.heads[k] if self.unembed is None else self.unembed

    def unembedding(self, k: int) -> torch.Tensor:
        """Head ``k``'s unembedding weight [vocab_padded, d]."""
        return self.unembedding_layer(k).weight

    def head_logits(self, z: torch.Tensor, k: int, pos: PosContext | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] of head ``k`` (0-based: predicts byte t+k+1) from z."""
        return self._logits(self.head_features(z, k, pos), k)

    def _logits(self, features: torch.Tensor, k: int) -> torch.Tensor:
        return self.unembedding_layer(k)(features)[..., : self.cfg.vocab]

    def forward(
        self, ids: torch.Tensor, input_pos: torch.Tensor | None = None, n_heads: int | None = None
    ) -> torch.Tensor:
        """Logits [B, T, n_heads, vocab] of the first ``n_heads`` heads (default: all).

        With ``input_pos`` ([T] absolute positions) the KV cache is read and written;
        ``setup_cache`` must have been called.
        """
        pos = self.pos_context(ids.shape[1], input_pos)
        z = self.trunk(ids, pos)
        n_heads = self.cfg.n_future if n_heads is None else n_heads
        if self.shared_features:
            features = self.head_features(z, 0)
            return torch.stack([self._logits(features, k) for k in range(n_heads)], dim=2)
        return torch.stack([self.head_logits(z, k, pos) for k in range(n_heads)], dim=2)

    # -- decoding --------------------------------------------------------------
    def decode(
        self,
        ids: torch.Tensor,
        input_pos: torch.Tensor,
        n_heads: int,
        rope_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        attend: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One cached decoding forward: head 1's logits [B, P, vocab] at every position,
        and the features the next ``n_heads - 1`` draft heads read, [B, P, F, d].
        ``rope_pos`` and ``mask``: a draft tree's (see ``pos_context``). ``attend``: no
        position attends past the cache's first ``attend`` slots, so attention reads only
        those. Eager decoding passes it (attention then costs what the context holds, not
        the whole cache); a compiled step does not, as every value would be a new graph.

        Decoding needs head 1 everywhere (to verify drafts) but the draft heads only at
        the one position verification stops at, which is known only after this forward.
        Returning features instead of draft logits lets the caller pick that position on
        the device and run ``draft_logits`` there: for linear heads F = 1 (the features
        are shared) and the draft heads cost one small batched matmul instead of
        ``n_heads - 1`` unembeddings over every position. Transformer heads must run at
        every position anyway (to fill their KV caches), so F = n_heads - 1.
        """
        pos = self.pos_context(ids.shape[1], input_pos, rope_pos, mask, attend)
        z = self.trunk(ids, pos)
        if self.shared_features:
            features = self.head_features(z, 0)
            return self._logits(features, 0), features[:, :, None]
        drafts = [self.head_features(z, k, pos) for k in range(1, n_heads)]
        feats = torch.stack(drafts, dim=2) if drafts else z.new_empty(*z.shape[:2], 0, z.shape[2])
        return self.head_logits(z, 0, pos), feats

    def draft_logits(self, features: torch.Tensor, n_drafts: int) -> torch.Tensor:
        """Logits [.., n_drafts, vocab] of heads 2..n_drafts+1 from ``decode`` features [.., F, d]
        (one position's, or several).

        One matrix product either way: linear heads stack their unembeddings (one feature
        row against n_drafts * vocab columns), transformer heads share one (F rows).
        """
        if self.shared_features:
            vocab = self.cfg.vocab
            logits = F.linear(features, self.draft_weight[: n_drafts * vocab])
            return logits.view(*features.shape[:-2], n_drafts, vocab)
        return F.linear(features[..., :n_drafts, :], self.draft_weight)

    # -- inference cache -------------------------------------------------------
    def attention_layers(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    def setup_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Attach a static KV cache of ``max_len`` positions to every attention layer.

        The cache of the previous call is reused when its shape, dtype and device
        match: compiled decode steps bind to the cache tensors themselves (frozen
        graphs guard on their identity, CUDA graphs on their addresses), so a fresh
        cache per generation would recompile or re-record the step every time.
        Stale entries are harmless: a position is always written before the causal
        mask lets anything read it.
        """
        if max_len > self.cfg.max_seq_len:
            raise BytemtpError(f"KV cache of {max_len} positions exceeds max_seq_len={self.cfg.max_seq_len}")
        device = self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        layers = self.attention_layers()
        key = (batch_size, max_len, dtype, device)
        if self._cache_key != key:
            # Every layer's keys and values in one buffer [layers, 2, B, H, max_len, hd]
            # (all attention layers have the same shape), so ``move_cache`` is one copy.
            a = layers[0]
            shape = (len(layers), 2, batch_size, a.n_heads, max_len, a.head_dim)
            self._kv = torch.zeros(shape, dtype=dtype, device=device)
            self._caches = [KVCache(self._kv[i, 0], self._kv[i, 1]) for i in range(len(layers))]
            self._mask = torch.ones(max_len, max_len, dtype=torch.bool, device=device).tril()
            self._cache_key = key
        for attn, cache in zip(layers, self._caches):
            attn.kv_cache = cache
        self.causal_mask = self._mask
        # The draft heads' unembeddings stacked for ``draft_logits``, rebuilt every time
        # (the weights may have changed since, e.g. between training and sampling).
        drafts = range(1, self.cfg.n_future)
        if not drafts:
            self.draft_weight = None
        elif self.shared_features:  # [n_drafts * vocab, d]
            self.draft_weight = torch.cat([self.unembedding(k)[: self.cfg.vocab] for k in drafts]).detach().to(dtype)
        else:  # [vocab, d]
            self.draft_weight = self.unembed.weight[: self.cfg.vocab].detach().to(dtype)

    def move_cache(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy every layer's cached keys/values from slots ``src`` to slots ``dst`` (both [k]):
        an accepted draft-tree path moves down to follow the context."""
        self._kv.index_copy_(4, dst, self._kv.index_select(4, src))

    def clear_cache(self) -> None:
        """Detach the KV cache: decoding needs ``setup_cache`` again. Its memory is
        kept for the next ``setup_cache`` of the same shape (one cache, at most
        ``max_seq_len`` positions)."""
        for attn in self.attention_layers():
            attn.kv_cache = None
        self.causal_mask = None
        self.draft_weight = None

    # -- bookkeeping -----------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Parameters by part, so an n=1 baseline of equal size can be configured."""
        count = lambda ms: sum(p.numel() for m in ms for p in m.parameters())  # noqa: E731
        shared = [self.norm] + ([self.unembed] if self.unembed is not None else [])
        counts = {
            "embedding": count([self.embed]),
            "trunk": count(self.blocks),
            "heads": count(self.heads),
            "shared_head": count(shared),
        }
        counts["total"] = sum(counts.values())
        return counts
