"""The multi-byte training objective and the paper's memory-saving head schedule.

``sequential`` (default): the trunk runs once; then, inside one autograd Function,
each head in turn runs forward, computes its cross-entropy and is differentiated
at once, accumulating dL/dz and its parameter gradients, so only one head's
logits and activations are alive at any time. The Function hands the accumulated
gradients back during the ordinary ``loss.backward()``, which then runs the trunk
backward once. Because it is one forward and one backward as far as autograd can
tell, DDP/FSDP hooks, gradient accumulation and ``no_sync`` work unchanged.

``naive``: sum the head losses and backward once (all logits alive together); the
reference the sequential schedule is tested against.

The objective is the mean over heads of each head's mean cross-entropy; targets of
-1 (padding) are ignored. Losses are reported in bits per byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bytemtp.model import ByteMTP

LN2 = math.log(2.0)
MODES = ("sequential", "naive")


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


def head_loss(model: ByteMTP, z: torch.Tensor, k: int, targets_k: torch.Tensor) -> torch.Tensor:
    logits = model.head_logits(z, k)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets_k.flatten(), ignore_index=-1)


class _SequentialHeads(torch.autograd.Function):
    """z -> mean head loss, with each head's backward done inside the forward."""

    @staticmethod
    def forward(ctx, model: ByteMTP, targets: torch.Tensor, z: torch.Tensor, *params: torch.Tensor):
        n = targets.shape[-1]
        grad_z = torch.zeros_like(z)
        grads: list[torch.Tensor | None] = [None] * len(params)
        losses = []
        with torch.enable_grad():
            zd = z.detach().requires_grad_()
            for k in range(n):
                loss_k = head_loss(model, zd, k, targets[..., k])
                g_z, *g_params = torch.autograd.grad(loss_k / n, [zd, *params], allow_unused=True)
                grad_z += g_z
                for i, g in enumerate(g_params):
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i] + g
                losses.append(loss_k.detach())
        losses_t = torch.stack(losses)
        ctx.mark_non_differentiable(losses_t)
        ctx.save_for_backward(grad_z, *[g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)])
        return losses_t.mean(), losses_t

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_losses: torch.Tensor):
        grad_z, *grads = ctx.saved_tensors
        return (None, None, grad_z * grad_loss, *(g * grad_loss for g in grads))


def head_parameters(model: ByteMTP) -> list[nn.Parameter]:
    """Everything ``head_logits`` touches: the heads, the shared norm and unembedding."""
    mods = [model.heads, model.norm] + ([model.unembed] if model.unembed is not None else [])
    return [p for m in mods for p in m.parameters() if p.requires_grad]


def multihead_loss(model: ByteMTP, ids: torch.Tensor, mode: str = "sequential") -> LossOutput:
    """Objective of batch ``ids`` [B, T+n]; call ``.loss.backward()`` on the result."""
    n = model.cfg.n_future
    inputs, targets = split_batch(ids, n)
    z = model.trunk(inputs)
    if mode == "sequential" and torch.is_grad_enabled():
        loss, losses = _SequentialHeads.apply(model, targets, z, *head_parameters(model))
        return LossOutput(loss, losses)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    losses = torch.stack([head_loss(model, z, k, targets[..., k]) for k in range(n)])
    return LossOutput(losses.mean(), losses.detach())


class MTPObjective(nn.Module):
    """Model + objective as one module, so DDP/FSDP wrap a forward that returns the loss."""

    def __init__(self, model: ByteMTP, mode: str = "sequential"):
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = multihead_loss(self.model, ids, self.mode)
        return out.loss, out.head_losses
