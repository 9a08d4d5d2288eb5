"""Draft-tree bookkeeping for greedy self-speculative decoding (see ``bytemtp.decode.tree``).

Every decoding step verifies a tree, learns from head 1's bytes and, now and then,
rebuilds the tree's shape. Done with tensor ops that is some 60 small operations a
step, each costing a framework dispatch that outweighs its arithmetic many times
over: on a CPU they cost a small model's step more than its extra positions do.
Here each job is one compiled call on arrays of a few dozen entries.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# A child scores at most its parent; it ties only when its own choice is sure (log 0),
# and then this much per depth ranks the parent first, so kept paths keep their parents.
DEPTH_TIEBREAK = 1e-6


@njit(cache=True)
def best_paths(log_scores: np.ndarray, n_nodes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``n_nodes`` best paths of choices under ``log_scores`` [m, 2, K] (all <= 0).

    Choice r at depth d scores ``log_scores[d, 0, r]`` below a first choice (or the
    root), else ``log_scores[d, 1, r]``; a path scores the sum over its depths. A beam
    keeps the ``n_nodes`` best paths of each depth and extends only those: a path
    never scores more than its parent, so the best ``n_nodes`` overall are among them.

    Returns ``parent`` (indexing ``[root, nodes]``), ``choice`` and ``depth`` (from 1),
    each [n_nodes], nodes ordered by depth: a parent always comes before its children.
    Needs ``n_nodes`` <= the number of paths there are.
    """
    m, _, k = log_scores.shape
    cap = m * n_nodes
    key = np.empty(cap)
    parent = np.empty(cap, np.int64)
    choice = np.empty(cap, np.int64)
    depth = np.empty(cap, np.int64)
    count = 0
    beam = np.zeros(1, np.int64)  # the previous depth's kept paths, numbered root = 0, then 1, 2, ..
    beam_score = np.zeros(1)
    beam_below = np.zeros(1, np.int64)  # 1 when a path's last choice was a runner-up
    for d in range(m):
        cand = np.empty(beam.size * k)
        for b in range(beam.size):
            for r in range(k):
                cand[b * k + r] = beam_score[b] + log_scores[d, beam_below[b], r]
        kept = np.argsort(-cand, kind="mergesort")[: min(n_nodes, cand.size)]
        next_beam = np.empty(kept.size, np.int64)
        next_below = np.empty(kept.size, np.int64)
        for i in range(kept.size):
            b, r = kept[i] // k, kept[i] % k
            key[count] = cand[kept[i]] - DEPTH_TIEBREAK * (d + 1)
            parent[count], choice[count], depth[count] = beam[b], r, d + 1
            count += 1
            next_beam[i], next_below[i] = count, 1 if r else 0
        beam, beam_score, beam_below = next_beam, cand[kept], next_below
    keep = np.sort(np.argsort(-key[:count], kind="mergesort")[:n_nodes])  # path numbers grow with depth
    renumber = np.full(count + 1, -1, np.int64)
    renumber[0] = 0
    renumber[keep + 1] = np.arange(1, n_nodes + 1)
    return renumber[parent[keep]], choice[keep], depth[keep]


@njit(cache=True)
def ancestors(parent: np.ndarray) -> np.ndarray:
    """[n+1, n+1] bool: row i marks node i (0: the root) and every node above it."""
    n = parent.size
    out = np.zeros((n + 1, n + 1), np.bool_)
    out[0, 0] = True
    for i in range(n):
        out[i + 1] = out[parent[i]]  # the parent's row is complete: parents come first
        out[i + 1, i + 1] = True
    return out


@njit(cache=True)
def accept(parent: np.ndarray, tokens: np.ndarray, depth: np.ndarray, choice: np.ndarray, max_depth: int):
    """Head 1's choices [n+1] at ``[root, nodes]`` -> the accepted path's node numbers, one
    per depth ([max_depth], 0 past its end), and its length.

    A node is accepted when head 1 chose its byte after its parent and its parent was
    accepted; siblings hold distinct bytes, so at most one node per depth is.
    """
    ok = np.zeros(parent.size + 1, np.bool_)
    ok[0] = True
    path = np.zeros(max_depth, np.int64)
    length = 0
    for i in range(parent.size):
        p = parent[i]
        if ok[p] and tokens[i] == choice[p]:
            ok[i + 1] = True
            path[depth[i] - 1] = i + 1
            length = max(length, depth[i])
    return path, length


@njit(cache=True)
def observe_ranks(
    counts: np.ndarray, ranked: np.ndarray, choice: np.ndarray, path: np.ndarray, length: int, decay: float
) -> None:
    """Count, at each depth d the verification reached (d <= ``length``), which of head d+1's
    ``ranked`` bytes [m, R] head 1 chose there (R: none of them) into ``counts`` [m, 2, R+1],
    apart for when the byte above was its head's first choice (or d = 0) and when not.
    Each row counted is first scaled by ``decay``: a moving average over its observations."""
    m, n_ranks = ranked.shape
    below = 0
    for d in range(min(m, length + 1)):
        truth = choice[path[d - 1] if d else 0]  # head 1's byte after the accepted node above
        rank = n_ranks
        for r in range(n_ranks):
            if ranked[d, r] == truth:
                rank = r
                break
        counts[d, below] *= decay
        counts[d, below, rank] += 1
        below = 1 if rank else 0
