"""The unembedding and cross-entropy of one head, with its gradients, written out by hand.

The sequential head schedule (``bytemtp.train.objective``) differentiates each head
as soon as its logits exist, so their memory can go before the next head starts.
Doing that through autograd would build a per-head graph and keep padded-logit
copies alive; the step below computes the loss and both gradients directly,
reusing the logits buffer for the gradient of the logits.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

from bytemtp.model.transformer import ByteMTP


def unembed_cross_entropy(
    features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``targets`` under ``features @ weight.T`` and the gradients of
    ``scale * sum`` w.r.t. features and weight, without autograd.

    features [N, d] and weight [vocab_padded, d] come in the matmul dtype; only the first
    ``vocab`` logit columns are real (padding ids get no probability mass and no gradient).
    The softmax runs in fp32 whatever the matmul dtype. Targets of -1 are ignored.
    Returns (nll_sum fp32 scalar, grad_features [N, d], grad_weight [vocab_padded, d]).

    The logits buffer is reused for dlogits, padding columns zeroed, so the backward
    matmuls stay on the aligned padded width and nothing the size of the logits is
    allocated twice.
    """
    logits = features @ weight.T
    real = logits[:, :vocab]
    lf = real.float()  # the very same tensor when the matmul ran in fp32
    lse = torch.logsumexp(lf, dim=1, keepdim=True)
    valid = targets >= 0
    t = targets.clamp_min(0).unsqueeze(1)
    nll_sum = ((lse - lf.gather(1, t)).squeeze(1) * valid).sum()
    row_scale = (valid * scale).unsqueeze(1)
    dlogits = lf.sub_(lse).exp_().mul_(row_scale).scatter_add_(1, t, -row_scale)
    if dlogits is not real:
        real.copy_(dlogits)
    logits[:, vocab:].zero_()
    return nll_sum, logits @ weight, logits.T @ features


@functools.cache
def _compiled_unembed_cross_entropy() -> Callable:
    return torch.compile(unembed_cross_entropy)


def cross_entropy_fn(model: ByteMTP) -> Callable:
    """``unembed_cross_entropy``, compiled when the model's blocks are (``bytemtp.compile``)."""
    return _compiled_unembed_cross_entropy() if model.compiled else unembed_cross_entropy


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on ``x`` in (``x``'s own without autocast)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Hand-written steps cast explicitly; backward passes must not be re-autocast either."""
    return torch.autocast(x.device.type, enabled=False)
