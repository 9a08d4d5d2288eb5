"""The byte model: a transformer trunk and ``n_future`` independent prediction heads.

Head k (0-based here, "head k+1" in the paper's words) predicts the byte k+1
positions ahead. Training runs the trunk and heads over whole sequences; decoding
runs ``decode`` over a few ids at a time against a ``KVCache`` (``bytemtp.model.cache``)
attached by ``setup_cache``, with shapes that never change between steps (friendly to
``torch.compile`` and CUDA graphs).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bytemtp.errors import BytemtpError
from bytemtp.model.cache import CacheRows, KVCache, first_rows, kept_in_place
from bytemtp.model.config import ModelConfig
from bytemtp.model.draft_mlp import DraftMLPs
from bytemtp.model.size import require_decoding_memory
from bytemtp.model.layers import Attention, Block, PosContext, RMSNorm, TransformerHead, rope_tables, soft_cap
from bytemtp.model.panels import PanelLinear, few_rows, panel_product, weights_source
from bytemtp_native.panels import pack_panels

if TYPE_CHECKING:
    from bytemtp.decode.coupling import FittedCoupling


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
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.head_kind == "linear":
            self.heads = nn.ModuleList(
                PanelLinear(cfg.d_model, cfg.vocab_padded, bias=False) for _ in range(cfg.n_future)
            )
            self.unembed = None
        else:
            self.heads = nn.ModuleList(TransformerHead(cfg) for _ in range(cfg.n_future))
            self.unembed = PanelLinear(cfg.d_model, cfg.vocab_padded, bias=False)
        self.draft_mlps: DraftMLPs | None = None  # made last, see ``_init_weights``
        cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("draft_weight", None, persistent=False)
        # [2, n] int64 codes and counts of the training data's byte trigrams (``bytemtp.data.trigrams``),
        # carried by checkpoints and read by drafting (``bytemtp.decode.coupling``); None when unknown.
        # Not a buffer: it stays on the host, only the coupling tables made from it go to the device.
        self.byte_trigrams: torch.Tensor | None = None
        # A coupling table fitted to the draft heads (``bytemtp.train.couple``), kept the same way.
        self.fitted_coupling: FittedCoupling | None = None
        for i, attn in enumerate(self.attention_layers()):
            attn.cache_layer = i
        # The cache cached forwards use (``setup_cache``), and the one kept for reuse after
        # ``clear_cache``: decoding state, not part of the model's state dict.
        self.kv_cache: KVCache | None = None
        self._kept_cache: KVCache | None = None
        self._kept_draft_weight: torch.Tensor | None = None  # see ``_stack_draft_weight``
        self._draft_panels: np.ndarray | None = None  # its panels (``bytemtp.model.panels``), on a CPU
        self._draft_source: tuple | None = None  # the weights and dtype it was stacked from
        # Set by ``bytemtp.compile.compile_model``: the training objective then also runs
        # its per-head cross-entropy compiled, not just the blocks.
        self.compiled = False
        self._init_weights(self)
        if cfg.draft_mlp:
            self.draft_mlps = DraftMLPs(cfg)
            self._init_weights(self.draft_mlps)
            for table in self.draft_mlps.next_bytes or ():
                nn.init.zeros_(table.weight)  # the model starts as one whose heads do not read the byte

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by depth (or zero, with
        ``zero_init_out``). The draft heads' MLPs are made and drawn after everything else, so
        a model with them starts from the same trunk and heads as one without, seed for seed:
        their comparison is paired."""
        depth = self.cfg.n_layers + (self.cfg.head_layers if self.cfg.head_kind == "transformer" else 0)
        for name, p in module.named_parameters():
            if p.dim() < 2:
                continue
            output = name.endswith(("wo.weight", "w_out.weight"))
            std = 0.02 / math.sqrt(2 * depth) if output else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
            if output and self.cfg.zero_init_out:
                nn.init.zeros_(p)

    # -- positions -------------------------------------------------------------
    def pos_context(
        self,
        T: int,
        input_pos: torch.Tensor | None = None,
        rope_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        kv_len: int | None = None,
        rows: CacheRows = None,
    ) -> PosContext:
        """Positions of a forward of ``T`` ids. With a KV cache, ``input_pos`` are the cache slots
        written ([T] for every row, or [B, T]); a draft tree (``bytemtp.decode.tree``) also gives
        each id its RoPE position (its depth, not its slot) and the mask of the slots it attends
        to (its ancestors, not every slot before): ``rope_pos`` like ``input_pos``, ``mask``
        [T, S] or [B, T, S]. ``kv_len``: attention reads only the cache's first ``kv_len``
        slots (see ``decode``); ``rows``: the cache rows the forward's rows are (default: all)."""
        if input_pos is None:
            if T > self.cfg.max_seq_len:
                raise BytemtpError(f"sequence of {T} bytes exceeds max_seq_len={self.cfg.max_seq_len}")
            return PosContext(self.rope_cos[:T], self.rope_sin[:T])
        if self.kv_cache is None:
            raise RuntimeError("forward with input_pos needs setup_cache() first")
        rope_pos = input_pos if rope_pos is None else rope_pos
        mask = self.kv_cache.causal[input_pos] if mask is None else mask
        if kv_len is not None:
            mask = mask[..., :kv_len]
        cos, sin, mask = (_heads_axis(t) for t in (self.rope_cos[rope_pos], self.rope_sin[rope_pos], mask))
        return PosContext(cos, sin, self.kv_cache, self.kv_cache.slot_index(input_pos, rows), mask, rows)

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

        For linear heads this is ``norm(z)`` whatever ``k`` is (see ``linear_heads``),
        so callers running several heads compute it once.
        """
        if self.unembed is None:
            return self.norm(z)
        return self.norm(self.heads[k](z, pos or self.pos_context(z.shape[1])))

    @property
    def linear_heads(self) -> bool:
        """True for linear heads: every head reads the same features, only the unembedding differs."""
        return self.unembed is None

    def unembedding_layer(self, k: int) -> PanelLinear:
        """Head ``k``'s unembedding (shared by all transformer heads)."""
        return self.heads[k] if self.unembed is None else self.unembed

    def unembedding(self, k: int) -> torch.Tensor:
        """Head ``k``'s unembedding weight [vocab_padded, d]."""
        return self.unembedding_layer(k).weight

    def head_logits(self, z: torch.Tensor, k: int, pos: PosContext | None = None,
                    next_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] of head ``k`` (0-based: predicts byte t+k+1) from z (``next_ids``
        [B, T]: byte t+1 at every t, which draft heads read with ``draft_next_byte``)."""
        return self.features_logits(self.head_features(z, k, pos), k, next_ids)

    def features_logits(self, features: torch.Tensor, k: int, next_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Head ``k``'s logits from its features (``head_features``; ``next_ids``: see ``head_logits``)."""
        read = self.readout(features, k, next_ids)
        return soft_cap(self.unembedding_layer(k)(read)[..., : self.cfg.vocab], self.cfg.logit_cap)

    def readout(self, features: torch.Tensor, k: int, next_ids: torch.Tensor | None = None) -> torch.Tensor:
        """What head ``k``'s unembedding multiplies: its features, through its MLP for a draft
        head of a model with ``draft_mlp`` (which also reads ``next_ids`` with ``draft_next_byte``)."""
        return features if self.draft_mlps is None or k == 0 else self.draft_mlps(features, k, next_ids)

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
        if self.linear_heads:
            features = self.head_features(z, 0)
            first = self.features_logits(features, 0)
            # draft heads that read the next byte read the one greedy decoding decides: head 1's top byte
            next_ids = first.argmax(-1) if self.cfg.draft_next_byte else None
            drafts = [self.features_logits(features, k, next_ids) for k in range(1, n_heads)]
            return torch.stack([first, *drafts], dim=2)
        return torch.stack([self.head_logits(z, k, pos) for k in range(n_heads)], dim=2)

    # -- decoding --------------------------------------------------------------
    def decode(
        self,
        ids: torch.Tensor,
        input_pos: torch.Tensor,
        n_heads: int,
        rope_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        kv_len: int | None = None,
        rows: list[int] | None = None,
        spread: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One cached decoding forward of ids [B, P] (B: the cache's rows): head 1's logits
        [B, P, vocab] at every position, and the features the next ``n_heads - 1`` draft heads
        read, [B, P, F, d].

        Per row b and fed id j: ``input_pos[b, j]`` is the cache slot its keys and values are
        written to, ``rope_pos[b, j]`` its RoPE position (default: the slot) and ``mask[b, j]``
        the slots it attends to (default: the causal chain, every slot up to its own), so the
        rows of a batch may sit at different cache lengths and hold different draft trees.
        Each may also come without the batch axis ([P], [P, S]) and then holds for every row.
        With fixed B, P and cache, every step has the same shapes: a compiled or captured step
        passes tensors of its own (in place) and writes only the cache's buffers.
        ``kv_len``: no position attends past the cache's first ``kv_len`` slots, so attention
        reads only those (eager decoding; in a compiled step every value would be a new graph).

        Decoding needs head 1 everywhere (to verify drafts) but the draft heads only at the
        position verification stops at, known only after this forward: the caller picks it and
        runs ``draft_logits`` there. Linear heads share their features (F = 1); transformer
        heads run at every position anyway, to fill their KV caches (F = n_heads - 1).

        ``rows`` (eager decoding): the only rows of the batch that take part, the others parked
        (stopped, vacant, or waiting while a prompt is encoded). The forward computes just
        those, so a step costs what its live rows need, not what the batch could hold; the
        parked rows' outputs are zeros and their cache is untouched (``spread=False``: the outputs
        are the computed rows' only, [len(rows), ...]). Compiled steps keep one shape and compute
        every row.
        """
        B, picked = ids.shape[0], None
        if rows is not None:
            picked = rows if first_rows(rows) is not None else torch.tensor(rows, device=ids.device)
            ids, input_pos, rope_pos, mask = (
                _pick(t, picked, batched) for t, batched in
                ((ids, 2), (input_pos, 2), (rope_pos, 2), (mask, 3))
            )
        pos = self.pos_context(ids.shape[1], input_pos, rope_pos, mask, kv_len, _cache_rows(picked))
        z = self.trunk(ids, pos)
        if self.linear_heads:
            features = self.head_features(z, 0)
            logits, feats = self.features_logits(features, 0), features[:, :, None]
        else:
            drafts = [self.head_features(z, k, pos) for k in range(1, n_heads)]
            feats = torch.stack(drafts, dim=2) if drafts else z.new_empty(*z.shape[:2], 0, z.shape[2])
            logits = self.head_logits(z, 0, pos)
        if picked is None or not spread:
            return logits, feats
        return _spread(logits, B, picked), _spread(feats, B, picked)

    def draft_logits(self, features: torch.Tensor, n_drafts: int, next_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [.., n_drafts, vocab] of heads 2..n_drafts+1 from ``decode`` features [.., F, d]
        (one position's, or several), given the byte head 1 decided after that position, ``next_ids``
        [..] (read only with ``draft_next_byte``).

        One matrix product either way: linear heads stack their unembeddings (one feature row
        against n_drafts * vocab columns; panels on a CPU), transformer heads share one (F rows).
        Draft MLPs (``draft_mlp``) run on the one feature row first (``DraftMLPs.decode``), then
        each head's unembedding on its own row, batched over heads.
        """
        if self.draft_mlps is not None:  # each head its own features: one batched product per head
            vocab = self.cfg.vocab
            read = self.draft_mlps.decode(features[..., 0, :], n_drafts, next_ids)  # [.., n_drafts, d]
            unembeds = self.draft_weight[: n_drafts * vocab].view(n_drafts, vocab, self.cfg.d_model).transpose(1, 2)
            return soft_cap((read.unsqueeze(-2) @ unembeds).squeeze(-2), self.cfg.logit_cap)
        if self.linear_heads:
            n_out = n_drafts * self.cfg.vocab
            panels = None if torch.compiler.is_compiling() else self._draft_panels  # a graph cannot call Numba
            if panels is not None and n_out and few_rows(features, self.cfg.d_model):
                logits = panel_product(features, panels, n_out)
            else:
                logits = F.linear(features, self.draft_weight[:n_out])
            return soft_cap(logits.view(*features.shape[:-2], n_drafts, self.cfg.vocab), self.cfg.logit_cap)
        return soft_cap(F.linear(features[..., :n_drafts, :], self.draft_weight), self.cfg.logit_cap)

    # -- inference cache -------------------------------------------------------
    def attention_layers(self) -> list[Attention]:
        """Every attention layer, trunk then heads: one cache buffer each."""
        return [m for m in self.modules() if isinstance(m, Attention)]

    def setup_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """Attach a KV cache of ``batch_size`` rows and ``max_len`` slots (``dtype``: the weights'
        by default) for ``decode`` and ``forward(input_pos=...)`` to read and write; returns it.

        The previous call's cache is reused when its shape, dtype and device match: compiled
        steps bind to the cache tensors themselves (frozen graphs guard on their identity, CUDA
        graphs on their addresses), so a fresh cache would recompile or re-record the step.
        Stale entries are harmless: a slot is written before a mask lets anything read it.
        """
        if max_len > self.cfg.max_seq_len:
            raise BytemtpError(f"KV cache of {max_len} positions exceeds max_seq_len={self.cfg.max_seq_len}")
        device = self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        n_layers = len(self.attention_layers())
        kept = self._kept_cache
        if kept is None or not kept.fits(n_layers, batch_size, max_len, dtype, device):
            self._kept_cache = kept = None  # its memory counts as available for the new one
            require_decoding_memory(self.cfg, batch_size, max_len, dtype.itemsize, device)
            kept = KVCache(n_layers, batch_size, self.cfg.n_attn_heads, max_len, self.cfg.head_dim, dtype, device)
            self._kept_cache = kept
        self.kv_cache = kept
        self._arm_layers(True)
        self.draft_weight = self._stack_draft_weight(dtype)
        if self.draft_mlps is not None:
            self.draft_mlps.stack(dtype)
        return kept

    def _stack_draft_weight(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The draft heads' unembeddings stacked for ``draft_logits``: [n_drafts * vocab, d] for
        linear heads (and their panels for eager CPU steps), [vocab, d] for transformer heads.

        Stacked again only when the weights changed since the last ``setup_cache`` (an optimizer
        step or ``load_state_dict`` bumps their versions; packing the panels alone took about a
        millisecond of every ``tiny`` generation), into the same tensor as last time when its
        shape allows (``kept_in_place``)."""
        drafts = range(1, self.cfg.n_future)
        if not drafts:
            return None
        sources = [self.unembedding(k) for k in drafts] if self.linear_heads else [self.unembed.weight]
        key = weights_source(sources, dtype)
        if key is not None and key == self._draft_source:
            return self._kept_draft_weight
        if self.linear_heads:
            fresh = torch.cat([w[: self.cfg.vocab] for w in sources]).detach().to(dtype)
        else:
            fresh = sources[0][: self.cfg.vocab].detach().to(dtype)
        self._kept_draft_weight = kept_in_place(self._kept_draft_weight, fresh)
        on_panels = self.linear_heads and self.draft_mlps is None and fresh.is_cpu and dtype == torch.float32
        self._draft_panels = pack_panels(fresh.numpy()) if on_panels else None
        self._draft_source = key
        return self._kept_draft_weight

    def move_cache(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy every layer's cached keys/values of each row from slots ``src`` to slots ``dst``
        ([B, n], or [n] for every row; see ``KVCache.move``): an accepted draft-tree path moves
        down to follow the context."""
        self.kv_cache.move(src, dst)

    def clear_cache(self) -> None:
        """Detach the KV cache: decoding needs ``setup_cache`` again. Its memory is
        kept for the next ``setup_cache`` of the same shape (one cache, at most
        ``max_seq_len`` positions)."""
        self.kv_cache = None
        self.draft_weight = None  # (its stacked copy and panels are kept for the next ``setup_cache``)
        self._arm_layers(False)

    def _arm_layers(self, armed: bool) -> None:
        """Arm (or disarm) the decoding copy of every layer a decoding step multiplies by, for compiled
        steps (``PanelLinear.arm``): a decoding session lasts from ``setup_cache`` to ``clear_cache``,
        and the weights do not change within one. Linear draft heads (their unembeddings and
        MLPs) are not among those layers: ``draft_logits`` reads their weights stacked."""
        stacked = {id(p) for p in self.draft_parameters()} if self.linear_heads else set()
        for layer in self.modules():
            if isinstance(layer, PanelLinear):
                layer.arm(armed and id(layer.weight) not in stacked)

    # -- bookkeeping -----------------------------------------------------------
    def draft_parameters(self) -> list[nn.Parameter]:
        """The parameters only draft heads use: heads 2..n (a transformer head's blocks; a linear
        head's unembedding, and its MLP with ``draft_mlp``)."""
        mlps = [] if self.draft_mlps is None else list(self.draft_mlps.parameters())
        return [p for head in self.heads[1:] for p in head.parameters()] + mlps

    def param_counts(self) -> dict[str, int]:
        """Parameters by part, so an n=1 baseline of equal size can be configured."""
        count = lambda ms: sum(p.numel() for m in ms for p in m.parameters())  # noqa: E731
        shared = [self.norm] + ([self.unembed] if self.unembed is not None else [])
        counts = {
            "embedding": count([self.embed]),
            "trunk": count(self.blocks),
            "heads": count([self.heads, *([self.draft_mlps] if self.draft_mlps is not None else [])]),
            "shared_head": count(shared),
        }
        counts["total"] = sum(counts.values())
        return counts


def _pick(t: torch.Tensor | None, rows: list[int] | torch.Tensor, batched: int) -> torch.Tensor | None:
    """The ``rows`` of ``t`` when it has a batch axis (``batched`` dims); one for every row as it is."""
    if t is None or t.dim() < batched:
        return t
    return t[: len(rows)] if isinstance(rows, list) else t.index_select(0, rows)


def _cache_rows(rows: list[int] | torch.Tensor | None) -> CacheRows:
    """The cache rows of a forward over ``rows``: a prefix as its length (views, no copies)."""
    return len(rows) if isinstance(rows, list) else rows


def _spread(t: torch.Tensor, B: int, rows: list[int] | torch.Tensor) -> torch.Tensor:
    """The outputs ``t`` of ``rows`` placed in a [B, ...] tensor, zeros for the rows not computed."""
    out = t.new_zeros(B, *t.shape[1:])
    if isinstance(rows, list):
        out[: len(rows)] = t
    else:
        out[rows] = t
    return out


def _heads_axis(t: torch.Tensor) -> torch.Tensor:
    """A per-row [B, T, ..] position tensor gets a heads axis ([B, 1, T, ..]) to broadcast over
    attention heads; one for every row ([T, ..]) broadcasts as it is."""
    return t.unsqueeze(1) if t.dim() == 3 else t
