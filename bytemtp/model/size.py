"""What a model of a given ``ModelConfig`` occupies, computed from the config alone, so a size
that cannot fit is refused before anything is allocated (``bytemtp.memory``). The parameter
count is the model's own (``ByteMTP.param_counts()["total"]``, tested equal); the training and
decoding figures are lower bounds, counting only what certainly lives at once."""

from __future__ import annotations

from bytemtp.memory import require_memory
from bytemtp.model.config import ModelConfig

FLOAT32 = 4


def parameter_count(cfg: ModelConfig) -> int:
    """The parameters of ``ByteMTP(cfg)``."""
    d, ffn = cfg.d_model, cfg.ffn_dim
    attention = 4 * d * d + (cfg.head_dim if cfg.qk_norm else 0)  # qkv and output projections, q/k norm gain
    mlp = (3 if cfg.ffn == "swiglu" else 2) * d * ffn
    block = attention + mlp + 2 * d  # two norms
    unembedding = cfg.vocab_padded * d
    if cfg.head_kind == "linear":
        tables = unembedding if cfg.draft_next_byte else 0  # each draft head's embedding of the next byte
        heads = cfg.n_future * unembedding + (cfg.n_future - 1) * (cfg.draft_mlp_weights + tables)
    else:
        heads = cfg.n_future * cfg.head_layers * block + unembedding
    return unembedding + cfg.n_layers * block + d + heads  # embedding, trunk, final norm, heads


def attention_layers(cfg: ModelConfig) -> int:
    """Attention layers, trunk and transformer heads: each has its own KV cache."""
    return cfg.n_layers + (cfg.n_future * cfg.head_layers if cfg.head_kind == "transformer" else 0)


def rope_bytes(cfg: ModelConfig) -> int:
    """The RoPE cos and sin tables, [max_seq_len, head_dim / 2] float32 each."""
    return 2 * cfg.max_seq_len * (cfg.head_dim // 2) * FLOAT32


def training_bytes(cfg: ModelConfig, rows: int, seq_len: int, shards: int = 1) -> int:
    """At least what training needs: weights, gradients and one optimizer moment (float32, split
    over ``shards`` processes under FSDP), the RoPE tables, and the activations of ``rows`` x
    ``seq_len`` positions that backward keeps (each block's input and MLP hidden layer, one
    head's logits)."""
    state = 3 * parameter_count(cfg) * FLOAT32 // shards
    activations = rows * seq_len * (cfg.n_layers * (cfg.d_model + cfg.ffn_dim) + cfg.vocab_padded) * FLOAT32
    return state + rope_bytes(cfg) + activations


def kv_cache_bytes(cfg: ModelConfig, rows: int, slots: int, element_size: int) -> int:
    """The KV cache of ``rows`` rows and ``slots`` positions: keys and values of every attention layer."""
    return 2 * attention_layers(cfg) * rows * slots * cfg.d_model * element_size


def require_training_memory(cfg: ModelConfig, rows: int, seq_len: int, device: object, shards: int = 1) -> None:
    """Refuse a training run that cannot fit ``device``'s memory, before building the model."""
    require_memory(
        training_bytes(cfg, rows, seq_len, shards),
        f"training a model of {parameter_count(cfg):,} parameters (d_model={cfg.d_model}, n_layers={cfg.n_layers}) "
        f"on batches of {rows} x {seq_len} bytes",
        device,
        "; choose a smaller model, --batch-size or --seq-len",
    )


def require_decoding_memory(cfg: ModelConfig, rows: int, slots: int, element_size: int, device: object) -> None:
    """Refuse a KV cache of ``rows`` x ``slots`` that cannot fit ``device``'s memory, before allocating it."""
    require_memory(
        kv_cache_bytes(cfg, rows, slots, element_size),
        f"the KV cache of {rows:,} rows of {slots:,} positions",
        device,
        "; decode fewer rows together (--batch of sample and bench, --max-batch of serve, --batch-size of distill)",
    )
