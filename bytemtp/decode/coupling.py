"""Draft coupling: each draft chosen given the two bytes before it.

A draft head predicts its offset without the bytes drafted before it, so a sampled
chain draws each draft from a marginal over every way the text might go, and often
strings together bytes that never follow one another (``e`` after a drafted space
where the text wanted ``(``). The bytes before a draft are known when it is drawn, and
so is how much likelier the training data makes a byte after them. A sampled draft is
therefore drawn from its head's processed distribution reweighted by ``w(c) = (P(c | a, b) /
P(c)) ** strength``, ``a, b`` the two bytes before it: for head 2's draft, the byte the
accepted run ended with and the decided next byte; then each draft and the one above it
(in a sampled tree, a node's grandparent and parent). A greedy chain's draft is the likeliest
byte of that product (greedy trees rank each head's bytes alone).

``P(c | a, b)`` comes from the training data's byte-trigram counts (``bytemtp.data.trigrams``),
interpolated toward ``P(c | b)`` by ``SMOOTHING`` pseudo-counts, which is in turn smoothed
toward ``P(c)``: a pair of bytes seen a few times says little, one seen thousands of times
a lot. Only the ``MAX_CONTEXTS`` most frequent pairs keep a row of their own; the others
use their last byte's.

Exactness is untouched: speculative sampling is exact for any draft distribution,
as long as each draft is judged by the very distribution it was drawn from, which
may depend on everything drawn before it (``bytemtp.decode.tree_sampling`` proves
the tree case; a chain is a tree), and greedy verification keeps head 1's choices
whatever the drafts. Only how often drafts are accepted changes. On the 2000-step
``tiny`` model (``bytemtp bench --prompts 48 --seed 7``: val prompts not among the
benchmark's; chain of 7, bytes per forward): at T = 0.8, 2.578 uncoupled, 3.019 at strength
0.7 (0.5 to 1.2 within noise of it); greedy, 2.721 uncoupled, 3.200 at 0.3, 3.240 at 0.5, 3.207
at 0.7. Coupling to the one byte before instead gained about 7 % sampled and nothing greedy.

The corpus's ratios are one guess for every model. ``bytemtp distill`` fits greedy rows'
weights to the model's own draft heads instead (``bytemtp.train.couple``): log-weights per
pair of bytes, starting from the corpus's and fitted so that the heads' logits plus them
predict head 1's greedy continuations. A model that carries them (``ByteMTP.fitted_coupling``)
drafts greedy rows with them at strength ``FITTED_COUPLING`` (they were fitted at it); sampled
rows keep the corpus's ratios (a table fitted to the text sampled no better). Exactness is as
above, whatever the weights.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

DRAFT_COUPLING = 0.7  # strength when sampling: measured on held-out prompts, see above
# Greedy, an argmax flips outright where sampling only reweights: in the loops small models'
# greedy text falls into ("_set_set_set"), the heads know the period and the corpus does not,
# so a strong coupling makes such a row much slower (one of 8 prompts: 94 forwards uncoupled,
# 101 at 0.3, 111 at 0.5, 132 at 0.7), and a batch waits for its slowest row. 0.3 keeps most
# of the average gain (96 prompts: 2.78 -> 3.16 bytes per forward; 3.27 at 0.5).
GREEDY_COUPLING = 0.3
FITTED_COUPLING = 1.0  # fitted log-weights are used as fitted
SMOOTHING = 30.0  # pseudo-counts of the shorter context: 10 and 100 did a little worse
MAX_CONTEXTS = 16384  # rows of 257 floats: 17 MB at most (the stdlib corpus has 9,900 pairs)


class DraftContext(NamedTuple):
    """Weights [R, V] (float32, all positive) and, for every two bytes ``a, b``, the row of them
    that applies after them: ``index`` [V, V] (int64)."""

    index: torch.Tensor
    weights: torch.Tensor

    def after(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[..., V] weights after the bytes ``a`` [...] then ``b`` [...]."""
        return self.weights[self.index[a, b]]

    def to(self, device: torch.device) -> "DraftContext":
        return DraftContext(self.index.to(device), self.weights.to(device))


class FittedCoupling(NamedTuple):
    """Coupling log-weights fitted to a model's draft heads for greedy rows (``bytemtp.train.couple``):
    after the bytes ``a, b`` the row ``index[a, b]`` [V, V] (int64) of ``log_weights`` [R, V] (float32)."""

    index: torch.Tensor
    log_weights: torch.Tensor


# A context as the host kernels (``bytemtp_native``) take it: NumPy ``index`` and ``weights``;
# [0, 0] each for no coupling.
HostContext = tuple[np.ndarray, np.ndarray]
UNCOUPLED: HostContext = (np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32))


def host_arrays(context: DraftContext | None) -> HostContext:
    """A host-side ``context`` (or None) as NumPy arrays for the eager steps' kernels: made once per
    ``Decoder`` from the host copy, never per step (on a GPU that would copy up to 17 MB back
    every step)."""
    return UNCOUPLED if context is None else (context.index.numpy(), context.weights.numpy())


_latest: dict[str, tuple] = {}  # per kind of context: (its source tensor, that tensor's version, args, context)
_placed: tuple = ()  # (context, device, the context there) of the latest ``placed``


def _kept(kind: str, source: torch.Tensor, args: tuple, build) -> DraftContext:
    """``build()``, or the ``kind`` of context the latest call built from the same, unchanged
    ``source`` tensor and ``args``: every ``Decoder`` (one per ``generate`` call) asks for one."""
    last = _latest.get(kind)
    if last and last[0] is source and last[1] == source._version and last[2] == args:
        return last[3]
    context = build()
    _latest[kind] = (source, source._version, args, context)
    return context


def draft_context(trigrams: torch.Tensor, strength: float, vocab: int) -> DraftContext:
    """Byte-trigram codes and counts [2, n] (``bytemtp.data.trigrams``) -> the coupling's weights
    ``(P(c | a, b) / P(c)) ** strength`` for the ``MAX_CONTEXTS`` most frequent pairs ``a, b``,
    and ``(P(c | b) / P(c)) ** strength`` for the rest (one row per ``b``).

    Building them takes 5-10 ms, as much as several decoding steps: the latest result is kept,
    with a reference to its counts, and returned while they are the same unchanged tensor."""
    return _kept("trigrams", trigrams, (strength, vocab), lambda: _build(trigrams, strength, vocab))


def fitted_context(fitted: FittedCoupling, strength: float) -> DraftContext:
    """The weights ``exp(strength * log_weights)`` of ``fitted``, kept as ``draft_context``'s are:
    building them is an exp over the whole table."""
    table = fitted.log_weights
    return _kept("fitted", table, (strength,),
                 lambda: DraftContext(fitted.index, (strength * table.double()).exp().float()))


def placed(context: DraftContext, device: torch.device) -> DraftContext:
    """``context`` (from ``draft_context``) on ``device``, copied there once, not per ``Decoder``,
    and marked as a static input of compiled steps: a CUDA graph then reads the tables (up to
    17 MB) where they lie instead of copying them into its own input buffers at every replay,
    and every decoder of the model finds them at the same address (a new one would be recorded
    again)."""
    global _placed
    if _placed and _placed[0] is context and _placed[1] == device:
        return _placed[2]
    on_device = context.to(device)
    for table in on_device:
        torch._dynamo.mark_static_address(table)
    _placed = (context, device, on_device)
    return on_device


def _build(trigrams: torch.Tensor, strength: float, vocab: int) -> DraftContext:
    codes, counts = trigrams[0], trigrams[1].double()
    v = vocab
    context, last = codes // v, codes % v  # (a, b) and c, as indices
    pair = torch.zeros(v * v, dtype=torch.float64).index_add_(0, codes % (v * v), counts).view(v, v)  # (b, c)
    unigram = (pair.sum(0) + 1) / (pair.sum() + v)
    after_one = (pair + unigram) / (pair.sum(1, keepdim=True) + 1)
    seen = torch.zeros(v * v, dtype=torch.float64).index_add_(0, context, counts)  # each pair as a context
    kept = seen.argsort(descending=True)[: min(MAX_CONTEXTS, int((seen > 0).sum()))]
    row = torch.full((v * v,), -1, dtype=torch.long)
    row[kept] = torch.arange(len(kept))
    mine = row[context] >= 0
    tri = torch.zeros(len(kept) * v, dtype=torch.float64)
    tri = tri.index_add_(0, row[context[mine]] * v + last[mine], counts[mine]).view(len(kept), v)
    after_two = (tri + SMOOTHING * after_one[kept % v]) / (seen[kept, None] + SMOOTHING)
    weights = (torch.cat((after_one, after_two)) / unigram).pow(strength).float()
    index = torch.arange(v).repeat(v)  # pair (a, b) -> row b: one byte of context
    index[kept] = v + torch.arange(len(kept))
    return DraftContext(index.view(v, v), weights)


def couple(q: torch.Tensor, context: DraftContext, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Draft distributions ``q`` [..., V] given the two bytes ``a``, ``b`` [...] before each: ``q``
    times the weights after them, renormalised."""
    coupled = q * context.after(a, b)
    return coupled / coupled.sum(-1, keepdim=True)
