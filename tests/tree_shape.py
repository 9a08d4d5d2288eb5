"""Which draft tree to verify when sampling: the ``n`` paths of draft ranks worth the most, as tensor
code (the tests' reference: the decoder shapes its trees on the host, ``bytemtp.decode.tree.build_tree``).

A node is a path of ranks ``(r_1, .., r_d)``: its byte at depth j is the draft head
j+1's ``r_j``-th likeliest. With ranked candidates (``bytemtp.decode.tree_sampling``)
the walk reaches a node exactly when head 1's samples along the way are the node's
bytes, so the expected number of accepted drafts is the sum over the tree's nodes
of the probability of that event, and the best tree of ``n`` nodes holds the ``n``
paths of highest probability. Under the independence model, head 1's byte at depth
j is the r-th likeliest of head j+1 with probability ``q_j(r)`` (the draft head's
own processed probability: ``rank_log_probs``) whatever came before; measured rates
per rank and depth (``bytemtp.decode.tree.RankStats``, which also tell a first
choice above apart) fit the heads better, and are just as legitimate as long as
they come from earlier steps. Either way the score is the sum of log-rates along
the path and never exceeds the parent's, so the ``n`` best paths form a tree and a
beam of ``n`` per depth finds them. Sampled candidates draw a node's byte instead of
taking a rank, but the same shapes serve them: a rank path's score still says roughly how
likely the walk is to get that far, and which depths deserve siblings.

The shape comes from probabilities known before the step's random numbers are
drawn, never from the bytes drawn or from the uniforms that judge them: a tree
that kept a drafted node because of its value would be verifying a byte that is no
longer distributed as its ``q``. All of it is fixed-shape tensor code (its output
size depends on ``n``, the number of heads and ranks only), batched over rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from bytemtp.errors import BytemtpError


class TreeShape(NamedTuple):
    """``n`` nodes per row in topological order: ``parent`` [B, n] (into ``[root, nodes]``),
    ``depth`` [B, n] (1 = the first draft head), ``rank`` [B, n] (which of that head's
    bytes); siblings come in order of decreasing score."""

    parent: torch.Tensor
    depth: torch.Tensor
    rank: torch.Tensor


def rank_log_probs(draft_probs: torch.Tensor, n_ranks: int) -> torch.Tensor:
    """Draft distributions [B, m, V] -> log-scores [B, m, 2, n_ranks] of the independence model:
    each head's top ``n_ranks`` log-probabilities, the same whatever the rank above was."""
    top = draft_probs.topk(n_ranks, dim=-1).values.log()
    return top[:, :, None, :].expand(-1, -1, 2, -1)


def best_shape(log_scores: torch.Tensor, n_nodes: int) -> TreeShape:
    """The ``n_nodes`` paths of ranks with the highest summed log-scores [B, m, 2, K]: rank r at
    depth d scores ``log_scores[:, d, 0, r]`` below a first choice (or the root), else
    ``log_scores[:, d, 1, r]`` (all <= 0). Ties go to the shallower path, so a path is never
    chosen without its parent."""
    b, m, _, k = log_scores.shape
    scores, parents, ranks, depths = [], [], [], []
    score = log_scores.new_zeros(b, 1)
    first = torch.ones(b, 1, dtype=torch.bool, device=log_scores.device)
    beam_start = -1  # where the previous depth's beam starts among all entries; -1: the root
    width, total = 1, 0
    for d in range(m):
        below = torch.where(first[..., None], log_scores[:, d, None, 0], log_scores[:, d, None, 1])  # [B, W, K]
        new_width = min(n_nodes, width * k)
        score, pick = (score[..., None] + below).flatten(1).topk(new_width, dim=1)
        rank = pick % k
        parent = beam_start + pick // k if d else pick.new_full(pick.shape, -1)
        scores.append(score)
        parents.append(parent)
        ranks.append(rank)
        depths.append(torch.full_like(rank, d + 1))
        first = rank == 0
        beam_start, width, total = total, new_width, total + new_width
    if n_nodes > total:
        raise BytemtpError(f"--tree: {m} draft heads of {k} ranks cannot fill a tree of {n_nodes} nodes")
    score, parent, rank, depth = (torch.cat(x, dim=1) for x in (scores, parents, ranks, depths))
    # Entries are depth-major, so a stable sort puts a parent before a child of equal score, and
    # sorting the chosen entries back by position is a topological order.
    chosen = score.sort(dim=1, descending=True, stable=True).indices[:, :n_nodes].sort(dim=1).values
    node_of = parent.new_zeros(b, total + 1)  # entry -> node number 1..n; the last column: the root
    node_of.scatter_(1, chosen, torch.arange(1, n_nodes + 1, device=parent.device).expand(b, n_nodes))
    parent = parent.gather(1, chosen)
    parent = node_of.gather(1, torch.where(parent < 0, total, parent))
    return TreeShape(parent, depth.gather(1, chosen), rank.gather(1, chosen))
