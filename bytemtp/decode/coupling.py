"""Byte-pair coupling: each sampled draft drawn given the byte before it.

A draft head predicts its offset without the bytes drafted before it, so a sampled
chain draws each draft from a marginal over every way the text might go, and often
strings together bytes that never follow one another (``e`` after a drafted space
where the text wanted ``(``). The bytes before a draft are known when it is drawn, and
so is how much likelier the corpus makes a byte after the previous one. A draft at
offset k is therefore drawn from its head's processed distribution reweighted by
``w[a, b] = (P(b | a) / P(b)) ** strength``, ``a`` the byte before it: the decided next
byte for head 2, the draft above it for the others (a tree node's parent's byte).

Exactness is untouched: speculative sampling is exact for any draft distribution,
as long as each draft is judged by the very distribution it was drawn from, which
may depend on everything drawn before it (``bytemtp.decode.tree_sampling`` proves
the tree case; a chain is a tree). Only how often drafts are accepted changes: on
the 2000-step ``tiny`` model at T = 0.8, +9 % bytes per forward at strength 0.5
(bench/RESULTS.md). Greedy decoding keeps each head's argmax: there it gained nothing.

The pair counts come from the training data (``bytemtp.data.pairs``) with the checkpoint;
a model without them drafts uncoupled.
"""

from __future__ import annotations

import torch

PAIR_COUPLING = 0.5  # 0.3 to 0.7 came within noise of each other on the tiny model; 1 lost half the gain


def pair_weights(counts: torch.Tensor, strength: float) -> torch.Tensor:
    """Adjacent-byte ``counts`` [V, V] -> float32 weights [V, V], ``w[a, b] = (P(b | a) / P(b)) **
    strength``. ``P(b | a)`` is smoothed toward ``P(b)`` by one pseudo-count (and ``P(b)`` by one
    per byte), so every weight is positive and finite: a reweighted distribution keeps its
    whole support, and a byte never seen after ``a`` keeps weight about 1."""
    c = counts.double()
    unigram = (c.sum(0) + 1) / (c.sum() + c.shape[1])
    conditional = (c + unigram) / (c.sum(1, keepdim=True) + 1)
    return (conditional / unigram).pow(strength).float()


def couple(q: torch.Tensor, weights: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Draft distributions ``q`` [..., V] given the byte ``before`` [...] each follows: ``q`` times
    that byte's row of ``weights``, renormalised."""
    coupled = q * weights[before]
    return coupled / coupled.sum(-1, keepdim=True)
