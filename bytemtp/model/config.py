"""Model configuration and named presets.

``ModelConfig`` is stored as JSON with every checkpoint, so a checkpoint always
knows the exact architecture it needs; unknown or contradictory fields are errors
that name the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from bytemtp import VOCAB
from bytemtp.errors import BytemtpError, require_at_least_one

HEAD_KINDS = ("linear", "transformer")
FFN_KINDS = ("swiglu", "gelu", "relu2")
# Hard upper bounds on the sizes, far above any model this code trains (``base``: d_model 768,
# 16 layers, 2048 positions), so that a typo is refused at once with the field's name; whether a
# size within them fits this machine is checked against its memory before allocating
# (``bytemtp.model.size``, ``bytemtp.memory``).
MAX_SIZES = {"d_model": 1 << 16, "n_layers": 1024, "n_attn_heads": 1024, "n_future": 256, "head_layers": 1024,
             "d_ff": 1 << 20, "max_seq_len": 1 << 20, "draft_mlp": 1 << 20}
MAX_LOGIT_CAP = 1e4  # a cap far above every logit changes nothing (0 turns it off); past float32's range it is NaN


def round_up_64(n: int) -> int:
    """``n`` rounded up to a multiple of 64: matmul widths that fill whole vector tiles, and cache
    lengths that take few distinct values (few shapes to compile or tune for)."""
    return -(-n // 64) * 64


@dataclass
class ModelConfig:
    """Byte trunk + ``n_future`` prediction heads (head k predicts byte t+k).

    ``head_kind="linear"``: one (d -> vocab) unembedding per head after the shared
    final norm (the paper's byte-level models). ``"transformer"``: ``head_layers``
    blocks per head, then the shared final norm and shared unembedding (the paper's
    main architecture). ``n_future=1`` is the next-byte baseline, same code.

    Recipe options (each off by default, so a config saved before they existed builds
    the same model): ``ffn="relu2"`` is relu(x)^2 (modded-nanogpt's MLP), ``qk_norm``
    RMS-normalises queries and keys per head before RoPE (with learned gains), and
    ``zero_init_out`` starts every residual output projection (attention's ``wo``, the
    MLP's ``w_out``) at zero, so each block starts as the identity. ``logit_cap > 0`` soft-caps
    every head's logits at ``cap * tanh(logits / cap)`` (Gemma 2, modded-nanogpt), in training
    and decoding alike.

    ``draft_mlp > 0`` (linear heads): each draft head (2..n) reads the shared features through
    a residual MLP of that hidden width (``ffn``'s kind) before its unembedding; head 1 stays
    the plain read-out a next-byte model has. A linear read-out of features a trunk learnt for
    the next byte predicts bytes further ahead badly; the MLP lets a draft head compute its
    own guess from them, so the trunk need not spend capacity on the draft heads (see
    ``TrainConfig.draft_detach``). ``draft_next_byte`` (with ``draft_mlp``): each draft MLP also
    reads an embedding of its own of the byte after its position, the one head 1 has decided by
    the time a decoding step drafts there (``bytemtp.model.draft_mlp``).
    """

    d_model: int = 128
    n_layers: int = 4
    n_attn_heads: int = 4
    n_future: int = 8
    head_layers: int = 1
    head_kind: str = "linear"
    ffn: str = "swiglu"
    d_ff: int = 0  # 0: derived from d_model (8/3 d for SwiGLU, 4 d for GELU and ReLU², rounded up to 64)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    vocab: int = VOCAB
    norm_eps: float = 1e-5
    qk_norm: bool = False
    zero_init_out: bool = False
    logit_cap: float = 0.0
    draft_mlp: int = 0  # 0: linear draft heads; else the hidden width of each draft head's MLP
    draft_next_byte: bool = False  # draft MLPs also read the byte head 1 decided after their position

    def __post_init__(self) -> None:
        if self.head_kind not in HEAD_KINDS:
            raise BytemtpError(f"head_kind: {self.head_kind!r} is not one of {', '.join(HEAD_KINDS)}")
        if self.ffn not in FFN_KINDS:
            raise BytemtpError(f"ffn: {self.ffn!r} is not one of {', '.join(FFN_KINDS)}")
        require_at_least_one(self, ("d_model", "n_layers", "n_attn_heads", "n_future", "max_seq_len"))
        if self.head_kind == "transformer" and self.head_layers < 1:
            raise BytemtpError(f"head_layers: must be at least 1 for transformer heads, got {self.head_layers}")
        if self.draft_mlp < 0:
            raise BytemtpError(f"draft_mlp: must be >= 0 (0: linear draft heads), got {self.draft_mlp}")
        if self.draft_mlp and self.head_kind != "linear":
            raise BytemtpError(f"draft_mlp: needs linear heads (transformer heads have their blocks), got head_kind "
                               f"{self.head_kind!r}")
        if self.draft_next_byte and not self.draft_mlp:
            raise BytemtpError("draft_next_byte: needs draft_mlp (the byte enters the draft heads' MLPs)")
        if self.d_model % self.n_attn_heads or (self.d_model // self.n_attn_heads) % 2:
            raise BytemtpError(
                f"d_model: {self.d_model} must split into {self.n_attn_heads} heads of even size (for RoPE)"
            )
        self._check_ranges()
        if self.vocab != VOCAB:
            raise BytemtpError(f"vocab: must be {VOCAB} (256 bytes + BOS), got {self.vocab}")

    def _check_ranges(self) -> None:
        """Sizes within ``MAX_SIZES``; the float fields finite and where they keep the arithmetic finite
        (a non-positive RoPE base or a negative norm epsilon trains to NaN at the first step)."""
        for name, most in MAX_SIZES.items():
            if getattr(self, name) > most:
                raise BytemtpError(f"{name}: at most {most:,}, got {getattr(self, name):,}")
        for name in ("rope_theta", "norm_eps", "logit_cap"):
            if not math.isfinite(getattr(self, name)):
                raise BytemtpError(f"{name}: must be a finite number, got {getattr(self, name)}")
        if not self.rope_theta > 0:
            raise BytemtpError(f"rope_theta: must be positive, got {self.rope_theta}")
        if not self.norm_eps >= 0:
            raise BytemtpError(f"norm_eps: must be >= 0, got {self.norm_eps}")
        if not 0 <= self.logit_cap <= MAX_LOGIT_CAP:
            raise BytemtpError(f"logit_cap: must be in [0, {MAX_LOGIT_CAP:g}] (0 = off), got {self.logit_cap}")

    @property
    def vocab_padded(self) -> int:
        """Embedding rows: vocab rounded up to a multiple of 64 for aligned matmuls."""
        return round_up_64(self.vocab)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_attn_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        hidden = 8 * self.d_model // 3 if self.ffn == "swiglu" else 4 * self.d_model
        return round_up_64(hidden)

    @property
    def draft_mlp_weights(self) -> int:
        """Weights of one draft head's MLP (0 without): in and out projections."""
        return (3 if self.ffn == "swiglu" else 2) * self.d_model * self.draft_mlp

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return from_dict(cls, d)


def from_dict(cls, d: dict[str, Any], where: str = "config"):
    """Build dataclass ``cls`` from ``d``, naming any field it does not have."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise BytemtpError(f"{where}: unknown field {unknown[0]!r} for {cls.__name__}")
    return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # ~1.1M parameters: trains to readable Python in a few CPU minutes. ReLU², QK-norm and
    # zero-initialised output projections, with Muon (TRAIN_PRESETS): 3.50 val bits per byte
    # after 80 steps where the plain recipe had 4.23 and Muon alone 3.62 (bench/bench_recipe.py).
    "tiny": ModelConfig(d_model=128, n_layers=4, n_attn_heads=4, max_seq_len=256, ffn="relu2", qk_norm=True,
                        zero_init_out=True),
    # ~26M parameters: a long CPU run or a short GPU run.
    "small": ModelConfig(d_model=512, n_layers=8, n_attn_heads=8, max_seq_len=1024),
    # ~115M parameters: GPU.
    "base": ModelConfig(d_model=768, n_layers=16, n_attn_heads=12, max_seq_len=2048),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A copy of preset ``name`` with ``overrides`` applied (and validated)."""
    if name not in PRESETS:
        raise BytemtpError(f"--preset: unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return dataclasses.replace(PRESETS[name], **overrides)
