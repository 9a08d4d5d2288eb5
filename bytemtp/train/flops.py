"""Model FLOPs per trained byte and the peak a GPU offers: MFU, as the PaLM paper defines it.

Per byte, a training step (forward + backward) costs 6 FLOPs per weight a matmul
multiplies it by, plus 12 * d * T per attention layer for the scores and the
weighted sum over the T positions of a row (counted over the full row, masked or
not, as in PaLM's appendix B, so figures compare with published MFU). The weights
counted are every block's projections (trunk, and every head's blocks for
transformer heads) and every head's unembedding at its padded width (the width the
matmuls run at); the embedding is a lookup and costs nothing. Each head counts on
the steps that train it: the objective runs every head that weighs more than 0, so
under a schedule of the number of heads trained a run costs ``mean_flops_per_byte``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING

import torch

from bytemtp.model.config import ModelConfig
from bytemtp.train.objective_schedule import draft_weights

if TYPE_CHECKING:
    from bytemtp.train.config import TrainConfig

# Dense bf16 tensor-core peaks (no sparsity: half the datasheets' headline figures), FLOP/s, by a
# name torch.cuda.get_device_name contains; the first that matches wins, so the PCIe and NVL
# cards (lower clocks and power than the SXM modules) come before the bare names the SXM
# modules report ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
}


def block_matmul_weights(cfg: ModelConfig) -> int:
    """Weights one transformer block multiplies activations by: q, k, v, output, and the MLP."""
    mlp_in = (2 if cfg.ffn == "swiglu" else 1) * cfg.ffn_dim
    return 4 * cfg.d_model * cfg.d_model + cfg.d_model * (mlp_in + cfg.ffn_dim)


def attention_layers(cfg: ModelConfig) -> int:
    """Attention layers a byte passes through in training: the trunk's and every head's."""
    return cfg.n_layers + (cfg.n_future * cfg.head_layers if cfg.head_kind == "transformer" else 0)


def flops_per_byte(cfg: ModelConfig, seq_len: int, draft_detach: bool = False) -> float:
    """Training FLOPs (forward and backward) per byte of a row of ``seq_len`` bytes; ``draft_detach``:
    a draft head's first product (its unembedding, or its MLP's input projection with
    ``draft_mlp``) costs its forward and weight gradient only."""
    matmul = 6.0 * (attention_layers(cfg) * block_matmul_weights(cfg) + cfg.d_model * cfg.vocab_padded)
    return matmul + (cfg.n_future - 1) * draft_head_flops(cfg, draft_detach) \
        + 12.0 * attention_layers(cfg) * cfg.d_model * seq_len


def draft_head_flops(cfg: ModelConfig, draft_detach: bool) -> float:
    """One draft head's FLOPs per byte: its unembedding (transformer heads: their blocks, counted
    with the trunk's, and the shared unembedding) and, with ``draft_mlp``, its MLP."""
    unembedding, mlp = cfg.d_model * cfg.vocab_padded, cfg.draft_mlp_weights
    if not (draft_detach and cfg.head_kind == "linear"):
        return 6.0 * (unembedding + mlp)
    mlp_in = cfg.d_model * cfg.draft_mlp * (2 if cfg.ffn == "swiglu" else 1)
    first = mlp_in if cfg.draft_mlp else unembedding
    return 6.0 * (unembedding + mlp) - 2.0 * first


def distill_flops(cfg: ModelConfig, seq_len: int, generated: int, encoded: int, fitted_rows: int,
                  measured_rows: int, epochs: int) -> dict[str, float]:
    """FLOPs of a draft-head distillation (``bytemtp.train.distill``) by part, and their total, so its
    cost can be set against a training run's: generating ``generated`` bytes, one forward
    position each (trunk and head 1, as autoregressive decoding needs them); encoding ``encoded``
    positions (the same forward); ``epochs`` passes of the fit over ``fitted_rows`` rows of
    ``seq_len`` positions, where draft head k+1 has a target at the first ``seq_len - k`` and costs
    what training a detached head does (its features are frozen); the agreement with head 1,
    measured before and after on ``measured_rows`` rows, forward only."""
    forward = flops_per_byte(dataclasses.replace(cfg, n_future=1), seq_len) / 3
    positions = sum(seq_len - k for k in range(1, cfg.n_future))  # every draft head's, in one row
    unembedding = cfg.d_model * cfg.vocab_padded
    if cfg.head_kind == "linear":
        fit = draft_head_flops(cfg, draft_detach=True)
    else:  # blocks train in full; the shared unembedding, frozen, costs forward and input gradient
        fit = 6.0 * head_block_weights(cfg, seq_len) + 4.0 * unembedding
    measure = draft_forward_flops(cfg, seq_len)
    parts = {"generation": generated * forward, "encoding": encoded * forward,
             "fit": epochs * fitted_rows * positions * fit, "agreement": 2 * measured_rows * positions * measure}
    return {**parts, "total": sum(parts.values())}


def draft_forward_flops(cfg: ModelConfig, seq_len: int) -> float:
    """FLOPs of one draft head's logits at one position from the trunk's output: its MLP (or
    blocks, attending over ``seq_len``) and its unembedding."""
    unembedding = cfg.d_model * cfg.vocab_padded
    if cfg.head_kind == "linear":
        return 2.0 * (unembedding + cfg.draft_mlp_weights)
    return 2.0 * (head_block_weights(cfg, seq_len) + unembedding)


def head_block_weights(cfg: ModelConfig, seq_len: int) -> float:
    """A transformer head's blocks in weights per position: their matrices, and attention over
    ``seq_len`` positions counted as ``2 d T`` more."""
    return cfg.head_layers * (block_matmul_weights(cfg) + 2.0 * cfg.d_model * seq_len)


def coupling_flops(cfg: ModelConfig, seq_len: int, examples: int, fitted: int) -> float:
    """FLOPs of fitting a coupling table (``bytemtp.train.couple``) beyond the encoding ``distill``
    counts: one draft head's logits per example (``examples`` of them, ``draft_forward_flops``)
    and, per fitted example (``fitted``: steps times rows), the adjusted logits' cross-entropy
    forward and backward, taken as ten FLOPs per vocabulary entry."""
    return examples * draft_forward_flops(cfg, seq_len) + fitted * 10.0 * cfg.vocab


def mean_flops_per_byte(cfg: ModelConfig, train: "TrainConfig") -> float:
    """Training FLOPs per byte averaged over the ``train.steps`` steps of a run (``train`` resolved):
    each step pays for the heads it trains (head 1 and every draft head weighing more than 0)."""
    if train.objective_schedule == "constant" and train.draft_loss_weight > 0:
        return flops_per_byte(cfg, train.seq_len, train.draft_detach)
    trained = Counter(1 + sum(w > 0 for w in draft_weights(train, step, cfg.n_future))
                      for step in range(1, train.steps + 1))
    total = sum(n * flops_per_byte(dataclasses.replace(cfg, n_future=heads), train.seq_len, train.draft_detach)
                for heads, n in trained.items())
    return total / train.steps


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """The device's dense bf16 peak in FLOP/s: ``override_tflops`` if given, else from
    ``PEAK_BF16_FLOPS`` by the GPU's name; None on the CPU or an unknown GPU (no MFU then)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
