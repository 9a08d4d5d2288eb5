"""The precision decoding runs in: bfloat16 weights and KV cache on CUDA, float32 elsewhere.

A decoding step reads every weight and the whole cache to produce a few bytes per row, so
on a GPU its time is memory traffic, and bfloat16 halves it (training already computes in
bfloat16 under autocast there). On the CPU decoding stays in float32: CPUs without fast
bfloat16 matmuls gain nothing, and the few-row panel kernel (``bytemtp.model.panels``),
which gives each row the result it gets alone, is float32 only.

Greedy speculative decoding equals autoregressive decoding when head 1's logits for a
position do not depend on how many positions the forward holds. The panel kernel makes
that so by construction on the CPU; elsewhere, float32 products of different row counts
differ in the last bits and bfloat16 ones in more, so a near tie between the two likeliest
bytes can resolve differently (rarely, and only where the model hardly prefers one byte).
Measured with bfloat16 on the CPU: on the test suite's trained models (linear and
transformer heads, 12 prompts each, 100 bytes, all draft heads) speculative greedy equals
autoregressive greedy in 24 runs of 24; on a random-weight model, whose logits are nearly
uniform, in 31 of 32. What bfloat16 does change is the model: its greedy continuation
equals the float32 one in 10 of those 24 runs. So greedy identity is exact on the panel kernel,
and on a GPU it holds up to near-ties in bfloat16 (a forward of 8 positions and one of 1, or a
compiled and an eager one, round a few bfloat16 ulps apart); ``bench/gpu_check.py`` checks it
strictly in float32 there and, in bfloat16, that every difference is at such a near-tie.
"""

from __future__ import annotations

import torch

from bytemtp.model.transformer import ByteMTP


def decoding_dtype(device: torch.device) -> torch.dtype:
    """The dtype of weights and KV cache for decoding on ``device``: bfloat16 on CUDA, else float32."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cast_for_decoding(model: ByteMTP, dtype: torch.dtype | None = None) -> ByteMTP:
    """``model`` with its parameters in ``dtype`` (default: ``decoding_dtype`` of its device), for
    ``setup_cache`` and ``decode``; the KV cache then takes the same dtype.

    A model already in ``dtype`` is returned as it is. Otherwise the result is a copy, so a
    model that is still being trained (the demo trains, then samples) keeps its float32
    weights; drop the original to free its memory. The RoPE tables stay float32 whatever
    the weights: a position's angle needs more bits than bfloat16 has.
    """
    weight = next(model.parameters())
    dtype = dtype or decoding_dtype(weight.device)
    if weight.dtype == dtype:
        return model
    device = weight.device
    with torch.device(device):
        copy = ByteMTP(model.cfg)
    params = dict(model.named_parameters())
    for name, param in copy.named_parameters():
        param.data = params[name].detach().to(dtype)
    copy.byte_trigrams, copy.fitted_coupling = model.byte_trigrams, model.fitted_coupling
    return copy.train(model.training)
