"""The unembedding and cross-entropy of linear heads, with their gradients, written out by hand.

The head schedules (``bytemtp.train.objective``) differentiate heads as soon as
their logits exist, so the logits' memory can go before the next head (or the next
chunk of rows) starts. Doing that through autograd would build a graph per head
and keep padded-logit copies alive; the step below computes the loss and both
gradients directly, reusing the logits buffer for the gradient of the logits. It
takes one head (the sequential schedule) or several stacked into one weight (the
stacked schedule: one wide product instead of a narrow one per head).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from bytemtp.compile import training_kernel
from bytemtp.model.transformer import ByteMTP


def unembed_cross_entropy(
    features: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab: int,
    scales: torch.Tensor,
    cap: float = 0.0,
    feature_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Summed cross-entropy of ``h`` heads stacked in ``weight`` and the gradients of
    ``sum_k scales[k] * nll_k`` w.r.t. features and weight, without autograd.

    features [N, d] and weight [h * vocab_padded, d] (head k's unembedding in rows
    k * vocab_padded ...) come in the matmul dtype; targets are [N, h], scales [h].
    Only the first ``vocab`` logit columns of each head are real (padding ids get no
    probability mass and no gradient). The softmax runs in fp32 whatever the matmul
    dtype. Targets of -1 are ignored. ``cap > 0`` soft-caps the logits (``cap * tanh(l / cap)``,
    ``bytemtp.model.layers.soft_cap``) before the softmax.
    Returns (nll sums [h] fp32, grad_features [N, d], grad_weight [h * vocab_padded, d]);
    grad_features is None, and not computed, without ``feature_grad`` (heads that must not
    train the trunk: ``TrainConfig.draft_detach``).

    The logits buffer is reused for dlogits, padding columns zeroed, so the backward
    matmuls stay on the aligned padded width and nothing the size of the logits is
    allocated twice (with a cap, once more: the tanh's slope, which the gradient needs).
    """
    n_rows, heads = targets.shape
    logits = features @ weight.T
    per_head = logits.view(n_rows, heads, -1)
    real = per_head[..., :vocab]
    lf = real.float()  # the very same tensor when the matmul ran in fp32
    if cap:  # tanh kept in lf; d capped / d raw = 1 - tanh^2 scales dlogits below
        lf = lf.div_(cap).tanh_()
        slope = 1 - lf.square()
        lf = lf.mul_(cap)
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)
    valid = targets >= 0
    t = targets.clamp_min(0).unsqueeze(-1)
    nll = ((lse - lf.gather(-1, t)).squeeze(-1) * valid).sum(0)
    row_scale = (valid * scales).unsqueeze(-1)
    dlogits = lf.sub_(lse).exp_().mul_(row_scale).scatter_add_(-1, t, -row_scale)
    if cap:
        dlogits = dlogits.mul_(slope)
    if dlogits is not real:
        real.copy_(dlogits)
    per_head[..., vocab:].zero_()
    return nll, logits @ weight if feature_grad else None, logits.T @ features


def cross_entropy_fn(model: ByteMTP) -> Callable:
    """``unembed_cross_entropy``, compiled or not as ``bytemtp.compile`` decides for ``model``."""
    return training_kernel(model, unembed_cross_entropy)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on ``x`` in (``x``'s own without autocast)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Hand-written steps cast explicitly; backward passes must not be re-autocast either."""
    return torch.autocast(x.device.type, enabled=False)
