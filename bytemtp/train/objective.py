"""The multi-byte training objective and its head schedules: the paper's memory-saving one and a stacked one.

``sequential`` (the CPU's default, ``DEFAULT_LOSS_MODE``): the trunk runs once; then, inside one autograd Function,
each head in turn runs forward, computes its cross-entropy and is differentiated
at once, accumulating dL/dz and its parameter gradients, so only one head's
logits and activations are alive at any time. The Function hands the accumulated
gradients back during the ordinary ``loss.backward()``, which then runs the trunk
backward once. Because it is one forward and one backward as far as autograd can
tell, DDP/FSDP hooks, gradient accumulation and ``no_sync`` work unchanged.

Two things keep the extra heads cheap. Linear heads all read the same normed
trunk output, so the shared norm runs once, outside the Function, and the
per-head work is just the unembedding matmul, the cross-entropy and their
gradients, written out by hand (``bytemtp.train.cross_entropy``): no per-head autograd
graph, no padded-logit copies, the matmul-dtype cast of the features done once.
Transformer heads differentiate only their own block, the shared norm and z;
the unembedding and cross-entropy use the same hand-written step.

``stacked`` (CUDA's default; linear heads without ``draft_mlp`` only, the others run ``sequential``): the same
Function, but all heads' unembeddings stacked into one [n * vocab_padded, d]
weight, so each chunk of rows is one wide product forward and two backward rather
than n narrow ones each; chunks of rows bound the logits alive at once
(``STACKED_LOGITS``). The same gradients, fewer and larger matmuls.

``naive``: sum the head losses and backward once (all logits alive together); the
reference the other schedules are tested against.

The objective is a weighted mean over heads of each head's mean cross-entropy: head 1
weighs 1 and every draft head ``draft_loss_weight`` (1: the paper's plain mean), normalised
to sum to 1 (``head_weights``). Targets of -1 (padding) are ignored (a head with no real
target contributes 0, not NaN). Losses are reported in bits per byte.

``draft_detach`` (linear heads): the draft heads learn from the trunk's features but send
no gradient into them (nor into the shared final norm), so head 1 alone shapes the trunk,
as in next-byte training, and each draft head is a linear read-out of what the trunk
already knows. It is the recipe for a model that must predict as well as a next-byte
model of the same compute: a small trunk has no capacity to spare for bytes further
ahead. A detached head's step skips the gradient of its features, a third of its cost.

``draft_mlp`` (the model's, linear heads): each draft head reads the features through an MLP
of its own (``bytemtp.model.draft_mlp``), differentiated with autograd head by head like a
transformer head's block; its unembedding and cross-entropy are the same hand-written step.
Detached, such a head trains its MLP and unembedding and sends nothing into the features.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bytemtp.model.layers import PosContext
from bytemtp.model.transformer import ByteMTP
from bytemtp.train.config import LOSS_MODES
from bytemtp.train.cross_entropy import cross_entropy_fn, matmul_dtype, no_autocast

LN2 = math.log(2.0)  # nats per bit: losses are computed in nats and reported in bits per byte
# Logit elements the stacked schedule computes at once (one chunk of rows times n heads' vocabularies).
STACKED_LOGITS = 1 << 24
# The schedule ``loss_mode="auto"`` trains with, per device type. CPU, measured (one thread, fwd + bwd,
# fastest of 7): tiny 16x256 sequential 0.79 s, stacked 0.89 s; small 4x256 2.66 s vs 2.62 s. CUDA: the
# stacked schedule's fewer, wider products suit tensor cores; bench/gpu_check.py times both on the GPU.
DEFAULT_LOSS_MODE = {"cpu": "sequential", "cuda": "stacked"}

# compute(x) -> (objective, per-head losses, gradients of the objective w.r.t. (x, *params))
LossAndGradients = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar objective (nats), attached to the graph
    head_losses: torch.Tensor  # [n_future] detached, nats


def split_batch(ids: torch.Tensor, n_future: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T+n] ids -> inputs [B, T] and targets [B, T, n], targets[..., k] = ids[:, k+1 : k+1+T].

    Padding (-1) in the inputs becomes BOS so it can be embedded; as a target it is ignored.
    """
    T = ids.shape[1] - n_future
    inputs = ids[:, :T].clamp_min(0)
    targets = torch.stack([ids[:, k + 1 : k + 1 + T] for k in range(n_future)], dim=-1)
    return inputs, targets


def head_weights(
    n_future: int, draft_loss_weight: float | Sequence[float], device: torch.device | None = None
) -> torch.Tensor:
    """[n] weights of the heads' losses in the objective: 1 for head 1, ``draft_loss_weight`` for each
    draft head (or, a sequence, one weight per draft head: an objective schedule's step),
    normalised to sum 1. Below 1 the shared trunk serves head 1 first (the draft heads then
    only propose, and head 1 alone decides every output byte)."""
    w = torch.tensor([1.0, *_draft_list(n_future, draft_loss_weight)], dtype=torch.float32, device=device)
    return w / w.sum()


def trained_heads(n_future: int, draft_loss_weight: float | Sequence[float]) -> list[int]:
    """The heads (0-based) a training step computes: head 1 and every draft head weighing more than 0.
    A head of weight 0 adds nothing to the gradient, so its logits, loss and gradients are not
    computed at all: a schedule that trains fewer heads early saves their compute (its loss is
    reported as 0 and logged as missing; its parameters get zero gradients, as they would)."""
    return [0, *(k + 1 for k, w in enumerate(_draft_list(n_future, draft_loss_weight)) if w > 0)]


def _draft_list(n_future: int, draft_loss_weight: float | Sequence[float]) -> list[float]:
    drafts = [float(draft_loss_weight)] * (n_future - 1) if isinstance(draft_loss_weight, (int, float)) \
        else [float(w) for w in draft_loss_weight]
    if len(drafts) != n_future - 1:
        raise ValueError(f"{len(drafts)} draft weights for {n_future - 1} draft heads")
    return drafts


def _sum_into(total: list[torch.Tensor] | None, grads: list[torch.Tensor], like: list[torch.Tensor]):
    """Running sum of per-head gradients, kept in the dtypes of ``like`` (fp32 under autocast)."""
    if total is None:
        return [g.to(t.dtype) for g, t in zip(grads, like)]
    for t, g in zip(total, grads):
        t.add_(g)
    return total


def _linear_heads_grads(model: ByteMTP, targets: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                        trained: list[int], detach: bool, h: torch.Tensor):
    """LossAndGradients over (h = norm(z), *unembeddings, *draft MLPs' parameters): the features are
    shared, only weights differ (and, with ``draft_mlp``, each draft head's MLP of them). Heads not
    ``trained`` are not computed (``trained_heads``); with ``detach`` only head 1's loss reaches h."""
    n, dt = targets.shape[-1], matmul_dtype(h)
    ce, scales = cross_entropy_fn(model), weights / counts
    feats, next_ids = h.detach().flatten(0, 1).to(dt), _next_ids(targets)
    nll, grad_h, grad_ws, grad_mlps = [], None, [], []
    with no_autocast(h):
        for k in range(n):
            w, mlp = model.unembedding(k), _draft_mlp_params(model, k)
            if k not in trained:
                nll.append(torch.zeros(1, device=h.device))
                grad_ws.append(torch.zeros_like(w))
                grad_mlps += [torch.zeros_like(p) for p in mlp]
                continue
            args = (targets[..., k : k + 1].flatten(0, 1), model.cfg.vocab, scales[k : k + 1], model.cfg.logit_cap)
            if mlp:
                nll_k, g_f, g_w, g_mlp = _draft_mlp_head(model, k, mlp, h, next_ids, w.to(dt), args, not detach)
                grad_mlps += g_mlp
            else:
                nll_k, g_f, g_w = ce(feats, w.to(dt), *args, not (detach and k))
            if g_f is not None:
                grad_h = _sum_into(grad_h, [g_f.view_as(h)], [h])
            grad_ws.append(g_w.to(w.dtype))
            nll.append(nll_k)
    losses = torch.cat(nll) / counts
    return (weights * losses).sum(), losses, [grad_h[0], *grad_ws, *grad_mlps]


def _draft_mlp_params(model: ByteMTP, k: int) -> list[torch.Tensor]:
    """Head ``k``'s MLP parameters (none for head 1 or without ``draft_mlp``)."""
    return [] if model.draft_mlps is None or k == 0 else model.draft_mlps.head_parameters(k)


def _next_ids(targets: torch.Tensor) -> torch.Tensor:
    """The byte after every position [B, T], which draft heads with ``draft_next_byte`` read: the
    text's, as decoding's is the one head 1 decided (where it is padding, no draft head has a target)."""
    return targets[..., 0].clamp_min(0)


def _draft_mlp_head(model: ByteMTP, k: int, params: list[torch.Tensor], h: torch.Tensor, next_ids: torch.Tensor,
                    unembed: torch.Tensor, args: tuple, feature_grad: bool):
    """Draft head ``k`` through its MLP (``params``, reading ``next_ids`` with ``draft_next_byte``): (its
    summed loss, h's gradient or None, its unembedding's gradient, its MLP's gradients); the MLP's
    activations die when this returns. ``args``: the cross-entropy's targets, vocabulary, scale
    and cap. Runs in h's dtype (float32)."""
    with torch.enable_grad():
        hd = h.detach().requires_grad_(feature_grad)
        read = model.readout(hd, k, next_ids)
    nll, g_read, g_w = cross_entropy_fn(model)(read.detach().flatten(0, 1).to(unembed.dtype), unembed, *args)
    grads = torch.autograd.grad(read, [hd, *params] if feature_grad else params, g_read.view_as(read).to(read.dtype))
    return nll, grads[0] if feature_grad else None, g_w, list(grads[1:] if feature_grad else grads)


def _stacked_heads_grads(model: ByteMTP, targets: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                         trained: list[int], detach: bool, h: torch.Tensor):
    """LossAndGradients over (h = norm(z), *unembeddings) with the ``trained`` heads' unembeddings
    stacked: one [d, heads * vocab_padded] product per chunk of rows instead of one narrow one per
    head, each chunk's logits (at most ``STACKED_LOGITS`` elements) freed before the next. With
    ``detach`` the draft heads are a second stack whose products leave h's gradient out."""
    n, dt, vp = targets.shape[-1], matmul_dtype(h), model.cfg.vocab_padded
    feats = h.detach().flatten(0, 1).to(dt)
    unembeds = [model.unembedding(k) for k in range(n)]
    stacks = [[0], trained[1:]] if detach else [trained]
    nll, grad_h, grad_ws = torch.zeros(n, device=h.device), None, [torch.zeros_like(w) for w in unembeds]
    with no_autocast(h):
        for heads in filter(None, stacks):  # head 1 is in the first: it always reaches h
            part_nll, part_h, part_w = _stacked_part(model, feats, targets, (weights / counts)[heads], unembeds,
                                                     heads, not (detach and heads[0]))
            nll[heads] = part_nll
            if part_h is not None:
                grad_h = _sum_into(grad_h, [part_h.view_as(h)], [h])
            for k, g in zip(heads, part_w.split(vp), strict=True):
                grad_ws[k] = g.to(unembeds[k].dtype)
    losses = nll / counts
    return (weights * losses).sum(), losses, [grad_h[0], *grad_ws]


def _stacked_part(model: ByteMTP, feats: torch.Tensor, targets: torch.Tensor, scales: torch.Tensor,
                  unembeds: list[torch.Tensor], heads: list[int], feature_grad: bool):
    """The stacked step of ``heads`` over every chunk of rows -> (nll sums [len(heads)], the features'
    gradient or None, the stacked unembeddings' gradient [len(heads) * vocab_padded, d])."""
    ce, vp = cross_entropy_fn(model), model.cfg.vocab_padded
    stacked, flat_targets = torch.cat([unembeds[k] for k in heads]).to(feats.dtype), targets[..., heads].flatten(0, 1)
    rows = max(1, STACKED_LOGITS // (len(heads) * vp))
    nll, grad_f, grad_w = 0.0, [], None
    for start in range(0, feats.shape[0], rows):
        part = slice(start, start + rows)
        nll_part, g_f, g_w = ce(feats[part], stacked, flat_targets[part], model.cfg.vocab, scales,
                                model.cfg.logit_cap, feature_grad)
        nll = nll + nll_part
        grad_f.append(g_f)
        grad_w = _sum_into(grad_w, [g_w], unembeds[:1])
    return nll, torch.cat(grad_f) if feature_grad else None, grad_w[0]


def _transformer_head_grads(model: ByteMTP, k: int, zd: torch.Tensor, pos: PosContext, unembed: torch.Tensor,
                            targets_k: torch.Tensor, scale: torch.Tensor):
    """Head ``k``'s summed loss, the gradients it sends to (z, shared norm, unembedding) and those of
    its own parameters; its activations die when this returns. ``unembed`` is in the matmul dtype."""
    params = list(model.heads[k].parameters())
    with torch.enable_grad():
        f = model.head_features(zd, k, pos)
    with no_autocast(zd):
        nll, g_f, g_u = cross_entropy_fn(model)(
            f.detach().flatten(0, 1).to(unembed.dtype), unembed, targets_k.reshape(-1, 1), model.cfg.vocab, scale,
            model.cfg.logit_cap,
        )
        g_z, g_norm, *g_params = torch.autograd.grad(f, [zd, model.norm.weight, *params], g_f.view_as(f).to(f.dtype))
    return nll, [g_z, g_norm, g_u], g_params


def _transformer_heads_grads(model: ByteMTP, targets: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                             trained: list[int], z: torch.Tensor):
    """LossAndGradients over (z, norm weight, unembedding, *head params): one head's graph alive at a
    time; heads not ``trained`` are not run."""
    n, scales = targets.shape[-1], weights / counts
    pos = model.pos_context(z.shape[1])
    zd = z.detach().requires_grad_()
    norm_w, unembed_w = model.norm.weight, model.unembedding(0)
    unembed = unembed_w.to(matmul_dtype(z))
    nll, shared, head_grads = [], None, []
    for k in range(n):
        if k not in trained:
            nll.append(torch.zeros(1, device=z.device))
            head_grads += [torch.zeros_like(p) for p in model.heads[k].parameters()]
            continue
        nll_k, g_shared, g_params = _transformer_head_grads(model, k, zd, pos, unembed, targets[..., k],
                                                            scales[k : k + 1])
        shared = _sum_into(shared, g_shared, [z, norm_w, unembed_w])
        head_grads += g_params
        nll.append(nll_k)
    losses = torch.cat(nll) / counts
    return (weights * losses).sum(), losses, [*shared, *head_grads]


class _GradientsFromForward(torch.autograd.Function):
    """An objective whose gradients w.r.t. (x, *params) are computed during its forward.

    ``backward`` only scales them by the incoming gradient, so the heads' work happens
    where their activations are freshly made and can be dropped at once, while autograd
    (and every hook on it) still sees one ordinary node from x and the params to the loss.
    """

    @staticmethod
    def forward(ctx, compute: LossAndGradients, x: torch.Tensor, *params: torch.Tensor):
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


def _sequential(model: ByteMTP, z: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                trained: list[int], stacked: bool, detach: bool):
    if model.linear_heads:
        unembeds = [model.unembedding(k) for k in range(model.cfg.n_future)]
        mlps = [p for k in range(model.cfg.n_future) for p in _draft_mlp_params(model, k)]
        heads = _stacked_heads_grads if stacked and not mlps else _linear_heads_grads
        compute = functools.partial(heads, model, targets, weights, counts, trained, detach)
        return _GradientsFromForward.apply(compute, model.head_features(z, 0), *unembeds, *mlps)
    params = [model.norm.weight, model.unembedding(0), *model.heads.parameters()]
    compute = functools.partial(_transformer_heads_grads, model, targets, weights, counts, trained)
    return _GradientsFromForward.apply(compute, z, *params)


def _naive(model: ByteMTP, z: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
           detach: bool = False):
    next_ids = _next_ids(targets)

    def logits(k: int) -> torch.Tensor:
        if detach and k:  # linear heads: the shared features, cut off from the trunk and its norm
            return model.features_logits(model.head_features(z, k).detach(), k, next_ids)
        return model.head_logits(z, k, next_ids=next_ids)

    nll = [
        F.cross_entropy(logits(k).flatten(0, 1).float(), targets[..., k].flatten(), ignore_index=-1, reduction="sum")
        for k in range(targets.shape[-1])
    ]
    losses = torch.stack(nll) / counts
    return (weights * losses).sum(), losses.detach()


def resolve_loss_mode(mode: str, device: torch.device) -> str:
    """``mode``, or for ``"auto"`` the device's default head schedule (``DEFAULT_LOSS_MODE``)."""
    return DEFAULT_LOSS_MODE.get(device.type, "sequential") if mode == "auto" else mode


def multihead_loss(
    model: ByteMTP, ids: torch.Tensor, mode: str = "sequential", draft_loss_weight: float | Sequence[float] = 1.0,
    draft_detach: bool = False,
) -> LossOutput:
    """Objective of batch ``ids`` [B, T+n] (draft heads weighted ``draft_loss_weight``, see ``head_weights``);
    call ``.loss.backward()`` on the result. Training computes only the heads that weigh more than 0
    (``trained_heads``). ``draft_detach`` (linear heads only): the draft heads train only their own
    unembeddings.

    Without grad mode (evaluation) every mode computes every head's loss, head by head.
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"mode must be one of {LOSS_MODES}, got {mode!r}")
    if draft_detach and not model.linear_heads:
        raise ValueError("draft_detach needs linear heads: transformer heads share the unembedding with head 1")
    inputs, targets = split_batch(ids, model.cfg.n_future)
    counts = (targets >= 0).sum((0, 1)).clamp_min(1)
    weights = head_weights(model.cfg.n_future, draft_loss_weight, ids.device)
    z = model.trunk(inputs)
    if mode == "naive" or not torch.is_grad_enabled():
        return LossOutput(*_naive(model, z, targets, weights, counts, draft_detach))
    trained = trained_heads(model.cfg.n_future, draft_loss_weight)
    return LossOutput(*_sequential(model, z, targets, weights, counts, trained, mode == "stacked", draft_detach))
