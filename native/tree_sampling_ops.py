"""Tree speculative sampling on the host, one row at a time (see ``bytemtp.decode.sampled_tree``).

The same maths as ``bytemtp.decode.tree_sampling`` (which states and proves it as
batched tensor code): siblings drawn without replacement by the Gumbel trick,
recursive rejection sampling down the tree. Tensor code must evaluate every
node's acceptance threshold and residual, in some 150 small operations a step;
a CPU pays a framework dispatch for each, more than the verifying forward's extra
positions cost. Here a row's walk touches only the nodes it visits, in one
compiled call. Tests check that both give the same bytes from the same numbers.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def draw_children(
    q: np.ndarray, parent: np.ndarray, depth: np.ndarray, noise: np.ndarray, root: int, before: int, index, weights
):
    """A tree's bytes, each parent's children drawn from their depth's draft distribution ``q``
    [m, V] without replacement: child s holds the s-th largest ``log q + g`` for Gumbel noise
    ``g = -log(-log u)`` from the parent's row of uniforms ``noise`` [n+1, V]. With a draft
    context (``index`` [V, V], ``weights`` [R, V]; [0, 0] each: uncoupled), a parent's children
    are drawn from ``q`` times the weights after its parent's byte and its own (the root's byte
    is ``root``, the one before it ``before``), renormalised. -> (tokens [n], each child's
    distribution given its earlier siblings [n, V]: that distribution without their bytes,
    renormalised; zero when nothing is left, so such a child is never accepted)."""
    n, v = parent.size, q.shape[1]
    tokens = np.zeros(n, np.int64)
    node_q = np.zeros((n, v))
    taken = np.zeros(v, np.bool_)
    dist = np.zeros(v, q.dtype)
    for a in range(n + 1):
        first = True
        for i in range(n):
            if parent[i] != a:
                continue
            if first:  # the parent's first child: every byte still available
                dist[:] = q[depth[i] - 1]
                if index.shape[0] > 0:
                    byte = root if a == 0 else tokens[a - 1]
                    above = before if a == 0 else (root if parent[a - 1] == 0 else tokens[parent[a - 1] - 1])
                    dist *= weights[index[above, byte]]
                    dist /= dist.sum()
                taken[:] = False
                first = False
            best, key = -1, -np.inf
            mass = 0.0
            for x in range(v):
                if taken[x] or dist[x] <= 0:
                    continue
                mass += dist[x]
                k = np.log(dist[x]) - np.log(-np.log(noise[a, x]))
                if best < 0 or k > key:
                    best, key = x, k
            if best < 0:  # the support is used up: a child that can never be accepted
                continue
            tokens[i] = best
            for x in range(v):
                if not taken[x] and dist[x] > 0:
                    node_q[i, x] = dist[x] / mass
            taken[best] = True
    return tokens, node_q


@njit(cache=True)
def walk_tree(
    parent: np.ndarray, tokens: np.ndarray, node_q: np.ndarray, p: np.ndarray, uniforms: np.ndarray, max_depth: int
):
    """Recursive rejection sampling down one row's tree: at the current node (the root first,
    target its head-1 distribution ``p[node]``), child i (in node order) is accepted when
    ``uniforms[i+1] < min(1, r(x) / (|r| q_i(x)))`` for the target ``r`` left by its rejected
    elder siblings, each rejection leaving ``max(0, r - |r| q_i)``; past the last child (or at
    depth ``max_depth``) the next byte is drawn from the target at ``uniforms[0]``.
    -> (the accepted nodes [max_depth], 1-based, 0 past the end; their number; the next byte)."""
    n = parent.size
    path = np.zeros(max_depth, np.int64)
    length, node = 0, 0
    target = p[0].astype(np.float64)
    while length < max_depth:
        moved = False
        for i in range(n):
            if parent[i] != node:
                continue
            x = tokens[i]
            mass = target.sum()
            scale = mass * node_q[i, x]
            if scale > 0 and uniforms[i + 1] < min(1.0, target[x] / scale):
                node = i + 1
                path[length] = node
                length += 1
                target = p[node].astype(np.float64)
                moved = True
                break
            rejected = np.maximum(target - mass * node_q[i], 0.0)
            if rejected.sum() > 0:  # else: rejection had probability zero, rounding got here
                target = rejected
        if not moved:
            break
    return path, length, draw_byte(target, uniforms[0])


@njit(cache=True)
def draw_byte(dist: np.ndarray, u: float) -> int:
    """One byte from ``dist`` [V] (not necessarily normalised) by inverting its cumulative sum at
    ``u`` in [0, 1), as ``bytemtp.decode.sampling.draw`` does; never a byte of probability zero."""
    cdf = np.cumsum(dist.astype(np.float64))
    byte = int(np.sum(cdf <= u * cdf[-1]))
    last = dist.size - 1
    while last > 0 and dist[last] <= 0:  # rounding must not pick a byte of probability zero
        last -= 1
    return min(byte, last)


@njit(cache=True)
def top_ranks(q: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` likeliest bytes, likeliest first, ties to the lower byte (a stable sort of
    ``-q``): ``q`` [m, V] -> [m, k] int64. A few hundred comparisons per row, where a full sort
    of the row costs as much as the rest of the walk."""
    m, v = q.shape
    out = np.zeros((m, k), np.int64)
    for j in range(m):
        taken = np.zeros(v, np.bool_)
        for r in range(k):
            best = -1
            for x in range(v):
                if not taken[x] and (best < 0 or q[j, x] > q[j, best]):
                    best = x
            out[j, r] = best
            taken[best] = True
    return out


@njit(cache=True)
def nonfinite_rows(logits: np.ndarray) -> np.ndarray:
    """[B, P, V] -> [B] bool, as ``bytemtp.decode.step.nonfinite``: some position's largest logit
    is NaN or infinite (a single -inf only rules a byte out)."""
    out = np.zeros(logits.shape[0], np.bool_)
    for b in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            top = -np.inf
            for x in range(logits.shape[2]):
                v = logits[b, j, x]
                if v != v:  # NaN
                    top = np.nan
                    break
                top = max(top, v)
            if not np.isfinite(top):
                out[b] = True
    return out
