"""A coupling table fitted to a model's draft heads: greedy drafts' weights after two bytes, learnt.

A draft is drawn (or, greedy, chosen) from its head's distribution times weights that depend
on the two bytes before it (``bytemtp.decode.coupling``). The corpus's trigram ratios
``P(c | a, b) / P(c)`` at a fixed strength are one guess at those weights for every model;
they count again what the heads already know, and know nothing of where the heads go wrong.
Here the log-weights are fitted instead: per pair of bytes (the corpus coupling's rows),
``log w = s * log ratio + delta``, ``s`` and ``delta`` (from ``s = GREEDY_COUPLING``, ``delta = 0``,
so the fit starts from today's coupling) minimising the cross-entropy of each draft head's
logits plus ``log w`` after the two bytes before its target, on head 1's greedy continuations
(``distill``'s): the target head 1's choice and the bytes before it the continuation's, as a
greedy chain's accepted drafts are. Such a table learns the model's own habits (the runs its
greedy text falls into, the names it repeats) where the corpus knows only the corpus.

Only greedy drafts change: verification keeps the output identical to plain decoding. (A
table fitted the same way to the training text, for sampled rows, sampled no better than the
corpus's ratios.) The trunk and heads are frozen; the fit runs on their logits, computed once
(at most ``MAX_EXAMPLES``, in bfloat16).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bytemtp.decode.coupling import GREEDY_COUPLING, DraftContext, FittedCoupling, draft_context
from bytemtp.errors import BytemtpError
from bytemtp.model.transformer import ByteMTP

MAX_EXAMPLES = 1 << 19  # (position, head) pairs per table: 270 MB of bfloat16 logits at most
FIT_STEPS, FIT_ROWS, FIT_LR = 1000, 4096, 0.02  # Adam on minibatches of examples
L2 = 1e-5  # on delta, summed: a pair seen a few times moves little from the corpus's ratios
Examples = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # draft logits, coupling rows, targets


@torch.no_grad()
def examples(model: ByteMTP, seqs: torch.Tensor, z: torch.Tensor, choice: torch.Tensor, start: int,
             index: torch.Tensor, batch_size: int, seed: int) -> tuple[Examples, int]:
    """Every draft head's logits at positions ``start..`` of the continuations ``seqs`` [N, T] (trunk
    output ``z``, head 1's ``choice``) with the coupling row after the two bytes before its target,
    and the target, head 1's choice there -> ((logits [M, V] bfloat16, rows [M], targets [M]), a
    seeded subset of at most ``MAX_EXAMPLES``; how many draft logits were computed for them). Draft
    heads that read the next byte read head 1's choice, as decoding feeds them."""
    T = seqs.shape[1]
    # a linear head reads each position alone: only the positions with a target are computed; a
    # transformer head attends to every position before, so it runs from the first
    lo = 0 if model.cfg.head_kind == "transformer" else start
    logits, rows, targets, computed = [], [], [], 0
    for i in range(0, len(seqs), batch_size):
        s, zi, ci = seqs[i : i + batch_size], z[i : i + batch_size], choice[i : i + batch_size]
        for k in range(1, model.cfg.n_future):  # head k+1 at t drafts byte t+k+1 after bytes t+k-1, t+k
            t = torch.arange(start, T - k - 1, device=s.device)
            if not len(t):
                continue
            lg = model.head_logits(zi[:, lo : T - k - 1], k, next_ids=ci[:, lo : T - k - 1])[:, start - lo :]
            computed += lg.shape[0] * (T - k - 1 - lo)
            logits.append(lg.flatten(0, 1).to(torch.bfloat16).cpu())
            rows.append(index[s[:, t + k - 1], s[:, t + k]].flatten().cpu())
            targets.append(ci[:, t + k].flatten().cpu())
    if not logits:
        raise BytemtpError(f"distill: sequences of {T} positions leave no draft targets past position {start}")
    logits, rows, targets = torch.cat(logits), torch.cat(rows), torch.cat(targets)
    if len(targets) > MAX_EXAMPLES:
        keep = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))[:MAX_EXAMPLES]
        logits, rows, targets = logits[keep], rows[keep], targets[keep]
    return (logits, rows, targets), computed


def bits(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, log_weights: torch.Tensor,
         batch: int = 1 << 15) -> float:
    """Mean cross-entropy in bits of ``logits`` plus the log-weights of their ``rows``."""
    total = 0.0
    for i in range(0, len(targets), batch):
        adjusted = logits[i : i + batch].float() + log_weights[rows[i : i + batch]]
        total += F.cross_entropy(adjusted, targets[i : i + batch], reduction="sum").item()
    return total / max(1, len(targets)) / math.log(2)


def fit_table(fit: Examples, log_ratio: torch.Tensor, strength: float, seed: int,
              steps: int = FIT_STEPS) -> torch.Tensor:
    """Log-weights [R, V] ``s * log_ratio + delta`` minimising the cross-entropy of ``fit``'s
    (logits, rows, targets) (``examples``), from ``s = strength`` and ``delta = 0``: ``steps`` of Adam."""
    logits, rows, targets = fit
    s = torch.tensor(float(strength), requires_grad=True)
    delta = torch.zeros_like(log_ratio, requires_grad=True)
    opt = torch.optim.Adam([s, delta], lr=FIT_LR)
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(steps):
            pick = torch.randint(len(targets), (FIT_ROWS,), generator=gen)
            r = rows[pick]
            adjusted = logits[pick].float() + s * log_ratio[r] + delta[r]
            loss = F.cross_entropy(adjusted, targets[pick]) + L2 * delta.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return (s * log_ratio + delta).detach()


def corpus_ratios(model: ByteMTP) -> DraftContext:
    """The corpus coupling's rows (``index``) and log-ratios ``log(P(c | a, b) / P(c))`` [R, V], where
    the fit starts."""
    if model.byte_trigrams is None:
        raise BytemtpError("the checkpoint has no byte_trigrams.safetensors to fit the coupling from (it predates them)")
    base = draft_context(model.byte_trigrams.cpu(), 1.0, model.cfg.vocab)
    return DraftContext(base.index, base.weights.log())


def fit_coupling(base: DraftContext, fit: Examples, held: Examples | None, seed: int = 0, steps: int = FIT_STEPS
                 ) -> tuple[FittedCoupling, dict[str, float]]:
    """The table fitted from the ``corpus_ratios`` ``base`` on the ``fit`` examples in ``steps``, and,
    on the ``held`` ones (if any), the bits per draft byte under the corpus coupling at its greedy
    strength and under the fit."""
    table = fit_table(fit, base.weights, GREEDY_COUPLING, seed, steps)
    report = {} if held is None else {"corpus": bits(*held, GREEDY_COUPLING * base.weights),
                                      "fitted": bits(*held, table)}
    return FittedCoupling(base.index, table), report
