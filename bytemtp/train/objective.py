"""The multi-byte training objective and the paper's memory-saving head schedule.

``sequential`` (default): the trunk runs once; then, inside one autograd Function,
each head in turn runs forward, computes its cross-entropy and is differentiated
at once, accumulating dL/dz and its parameter gradients, so only one head's
logits and activations are alive at any time. The Function hands the accumulated
gradients back during the ordinary ``loss.backward()``, which then runs the trunk
backward once. Because it is one forward and one backward as far as autograd can
tell, DDP/FSDP hooks, gradient accumulation and ``no_sync`` work unchanged.

Two things keep the extra heads cheap. Linear heads all read the same normed
trunk output, so the shared norm runs once, outside the Function, and the
per-head work is just the unembedding matmul, the cross-entropy and their
gradients, written out by hand (``unembed_cross_entropy``): no per-head autograd
graph, no padded-logit copies, the matmul-dtype cast of the features done once.
Transformer heads differentiate only their own block, the shared norm and z;
the unembedding and cross-entropy use the same hand-written step.

``naive``: sum the head losses and backward once (all logits alive together); the
reference the sequential schedule is tested against.

The objective is the mean over heads of each head's mean cross-entropy; targets of
-1 (padding) are ignored (a head with no real target contributes 0, not NaN).
Losses are reported in bits per byte.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bytemtp.model.transformer import ByteMTP, PosContext

LN2 = math.log(2.0)
MODES = ("sequential", "naive")

# compute(x) -> (objective, per-head losses, gradients of the objective w.r.t. (x, *params))
GradsFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar objective (nats), attached to the graph
    head_losses: torch.Tensor  # [n_future] detached, nats

    @property
    def bpb_heads(self) -> list[float]:
        return (self.head_losses / LN2).tolist()


def split_batch(ids: torch.Tensor, n_future: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T+n] ids -> inputs [B, T] and targets [B, T, n], targets[..., k] = ids[:, k+1 : k+1+T].

    Padding (-1) in the inputs becomes BOS so it can be embedded; as a target it is ignored.
    """
    T = ids.shape[1] - n_future
    inputs = ids[:, :T].clamp_min(0)
    targets = torch.stack([ids[:, k + 1 : k + 1 + T] for k in range(n_future)], dim=-1)
    return inputs, targets


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


def _cross_entropy_fn(model: ByteMTP) -> Callable:
    return _compiled_unembed_cross_entropy() if model.compiled else unembed_cross_entropy


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on ``x`` in (``x``'s own without autocast)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Hand-written steps cast explicitly; backward passes must not be re-autocast either."""
    return torch.autocast(x.device.type, enabled=False)


def _sum_into(total: list[torch.Tensor] | None, grads: list[torch.Tensor], like: list[torch.Tensor]):
    """Running sum of per-head gradients, kept in the dtypes of ``like`` (fp32 under autocast)."""
    if total is None:
        return [g.to(t.dtype) for g, t in zip(grads, like)]
    for t, g in zip(total, grads):
        t.add_(g)
    return total


def _linear_heads_grads(model: ByteMTP, targets: torch.Tensor, counts: torch.Tensor, h: torch.Tensor):
    """GradsFn over (h = norm(z), *head weights): the features are shared, only weights differ."""
    n, dt = targets.shape[-1], _matmul_dtype(h)
    ce, scales = _cross_entropy_fn(model), 1.0 / (n * counts)
    feats = h.detach().flatten(0, 1).to(dt)
    nll, grad_h, grad_ws = [], None, []
    with _no_autocast(h):
        for k in range(n):
            w = model.unembedding(k)
            nll_k, g_f, g_w = ce(feats, w.to(dt), targets[..., k].flatten(), model.cfg.vocab, scales[k])
            grad_h = _sum_into(grad_h, [g_f], [h])
            grad_ws.append(g_w.to(w.dtype))
            nll.append(nll_k)
    losses = torch.stack(nll) / counts
    return losses.mean(), losses, [grad_h[0].view_as(h), *grad_ws]


def _transformer_head_grads(model: ByteMTP, k: int, zd: torch.Tensor, pos: PosContext, unembed: torch.Tensor,
                            targets_k: torch.Tensor, scale: torch.Tensor):
    """Head ``k``'s summed loss, the gradients it sends to (z, shared norm, unembedding) and those of
    its own parameters; its activations die when this returns. ``unembed`` is in the matmul dtype."""
    params = list(model.heads[k].parameters())
    with torch.enable_grad():
        f = model.head_features(zd, k, pos)
    with _no_autocast(zd):
        nll, g_f, g_u = _cross_entropy_fn(model)(
            f.detach().flatten(0, 1).to(unembed.dtype), unembed, targets_k.flatten(), model.cfg.vocab, scale
        )
        g_z, g_norm, *g_params = torch.autograd.grad(f, [zd, model.norm.weight, *params], g_f.view_as(f).to(f.dtype))
    return nll, [g_z, g_norm, g_u], g_params


def _transformer_heads_grads(model: ByteMTP, targets: torch.Tensor, counts: torch.Tensor, z: torch.Tensor):
    """GradsFn over (z, norm weight, unembedding, *head params): one head's graph alive at a time."""
    n, scales = targets.shape[-1], 1.0 / (targets.shape[-1] * counts)
    pos = model.pos_context(z.shape[1])
    zd = z.detach().requires_grad_()
    norm_w, unembed_w = model.norm.weight, model.unembedding(0)
    unembed = unembed_w.to(_matmul_dtype(z))
    nll, shared, head_grads = [], None, []
    for k in range(n):
        nll_k, g_shared, g_params = _transformer_head_grads(model, k, zd, pos, unembed, targets[..., k], scales[k])
        shared = _sum_into(shared, g_shared, [z, norm_w, unembed_w])
        head_grads += g_params
        nll.append(nll_k)
    losses = torch.stack(nll) / counts
    return losses.mean(), losses, [*shared, *head_grads]


class _EagerGrads(torch.autograd.Function):
    """An objective whose gradients w.r.t. (x, *params) are computed during its forward.

    ``backward`` only scales them by the incoming gradient, so the heads' work happens
    where their activations are freshly made and can be dropped at once, while autograd
    (and every hook on it) still sees one ordinary node from x and the params to the loss.
    """

    @staticmethod
    def forward(ctx, compute: GradsFn, x: torch.Tensor, *params: torch.Tensor):
        objective, head_losses, grads = compute(x)
        # Neither inputs nor outputs, so kept as plain attributes and released in backward.
        ctx.grads = grads
        ctx.mark_non_differentiable(head_losses)
        return objective, head_losses

    @staticmethod
    def backward(ctx, grad_objective: torch.Tensor, _grad_head_losses: torch.Tensor):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the sequential head step supports one backward per forward")
        return (None, *(g.mul_(grad_objective) for g in grads))


def head_parameters(model: ByteMTP) -> list[nn.Parameter]:
    """Everything ``head_logits`` touches: the heads, the shared norm and unembedding."""
    mods = [model.heads, model.norm] + ([model.unembed] if model.unembed is not None else [])
    return [p for m in mods for p in m.parameters() if p.requires_grad]


def _sequential(model: ByteMTP, z: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor):
    if model.shared_features:
        weights = [model.unembedding(k) for k in range(model.cfg.n_future)]
        compute = functools.partial(_linear_heads_grads, model, targets, counts)
        return _EagerGrads.apply(compute, model.head_features(z, 0), *weights)
    params = [model.norm.weight, model.unembedding(0), *model.heads.parameters()]
    compute = functools.partial(_transformer_heads_grads, model, targets, counts)
    return _EagerGrads.apply(compute, z, *params)


def _naive(model: ByteMTP, z: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor):
    nll = [
        F.cross_entropy(
            model.head_logits(z, k).flatten(0, 1).float(), targets[..., k].flatten(), ignore_index=-1, reduction="sum"
        )
        for k in range(targets.shape[-1])
    ]
    losses = torch.stack(nll) / counts
    return losses.mean(), losses.detach()


def multihead_loss(model: ByteMTP, ids: torch.Tensor, mode: str = "sequential") -> LossOutput:
    """Objective of batch ``ids`` [B, T+n]; call ``.loss.backward()`` on the result.

    Without grad mode (evaluation) both modes compute the same losses head by head.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    inputs, targets = split_batch(ids, model.cfg.n_future)
    counts = (targets >= 0).sum((0, 1)).clamp_min(1)
    z = model.trunk(inputs)
    step = _sequential if mode == "sequential" and torch.is_grad_enabled() else _naive
    return LossOutput(*step(model, z, targets, counts))


class MTPObjective(nn.Module):
    """Model + objective as one module, so DDP/FSDP wrap a forward that returns the loss."""

    def __init__(self, model: ByteMTP, mode: str = "sequential"):
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = multihead_loss(self.model, ids, self.mode)
        return out.loss, out.head_losses
