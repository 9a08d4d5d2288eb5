"""Draft trees: many candidate continuations verified in one forward (greedy decoding).

A chain drafts each head's top byte, so one wrong head loses the rest of the
block; yet the right byte is often a head's runner-up. A tree spends a
forward's positions on the continuations most likely to be right. Which ones
that is cannot be read off the heads' probabilities alone: each head predicts
its offset marginally, not given the bytes drafted before it, so products of
their probabilities wildly underrate deep paths (given that head 2 was right,
heads 3.. mostly are too). ``RankStats`` instead learns, per generation and per
depth d, how often head 1's byte turns out to be head d+1's r-th choice given
that verification reached depth d; a path of ranks (r_1, r_2, ..) then scores
the product of those rates. A score never exceeds its parent's, so the ``n``
best paths always form a tree, and a beam of ``n`` per depth finds them exactly
(``build_tree``). Every step reveals head 1's byte at each depth it reached,
whatever the tree held, so the statistics keep learning about ranks and depths
the tree left out.

The forward feeds ``[pending, node_1 .. node_n]``: node i goes at RoPE position
``start + depth_i`` into cache slot ``start + i`` and attends to the context and
its own ancestors only (``tree_mask``). Head 1 at a node's parent judges it; the
nodes whose whole path head 1 agrees with form a single path (siblings hold
distinct bytes), the accepted one. Its keys and values then move down to slots
``start + 1 ..`` so the cache again holds the context in order, and the output
is exactly greedy decoding's, whatever the tree was.

Sampling keeps the chain (``bytemtp.speculative.SamplingVerifier``): verifying a
tree of samples without changing head 1's distribution needs a multi-draft
acceptance rule that this module does not implement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bytemtp.errors import BytemtpError


@dataclass
class DraftTree:
    """``n`` draft nodes in topological order (a parent before its children); index 0 is the root.

    ``tokens``/``parent``/``depth`` are [n] (``parent`` indexes ``[root, nodes]``,
    depth counts from 1 below the root); ``ancestors`` is [n+1, n+1] bool, row i
    marking i and every node above it.
    """

    tokens: torch.Tensor
    parent: torch.Tensor
    depth: torch.Tensor
    ancestors: torch.Tensor

    @property
    def size(self) -> int:
        return self.tokens.numel()

    def prefix(self, n: int) -> "DraftTree":
        """Its first ``n`` nodes: a tree too (parents come first), for when the cache has room for no more."""
        return DraftTree(self.tokens[:n], self.parent[:n], self.depth[:n], self.ancestors[: n + 1, : n + 1])


RANKS = 8  # runner-ups considered per head: a head's 9th choice is right too rarely to pay for a node
# Steps between rebuilds of the tree's shape from the rank statistics: they move slowly, and
# a rebuild is ~100 small device ops, a large share of a small model's step on a CPU.
REBUILD_EVERY = 4


def tree_candidates(n_nodes: int, n_drafts: int, n_ranks: int) -> int:
    """How many paths of at most ``n_drafts`` bytes a beam of ``n_nodes`` per depth considers."""
    total, beam = 0, 1
    for _ in range(n_drafts):
        beam = min(n_nodes, beam * n_ranks)
        total += beam
    return total


def check_tree_request(n_nodes: int, temperature: float) -> None:
    """A tree of ``n_nodes`` asked for decoding at ``temperature``: checked before anything runs."""
    if n_nodes < 1:
        raise BytemtpError(f"--tree: a draft tree needs at least 1 node, got {n_nodes}")
    if temperature != 0:
        raise BytemtpError("--tree: draft trees verify greedy decoding only (use --temperature 0)")


def check_tree_size(n_nodes: int, n_drafts: int) -> None:
    """Whether ``n_drafts`` draft heads offer enough candidate paths for ``n_nodes``."""
    if n_nodes > tree_candidates(n_nodes, n_drafts, RANKS):
        raise BytemtpError(f"--tree: {n_drafts} draft heads cannot fill a tree of {n_nodes} nodes")


def build_tree(log_scores: torch.Tensor, n_nodes: int) -> DraftTree:
    """The ``n_nodes`` best paths of choices under log-scores [m, 2, K] (all <= 0): choice r at
    depth d scores ``log_scores[d, 0, r]`` below a first choice (or the root), else
    ``log_scores[d, 1, r]``; a path scores the sum over its depths. ``tokens`` are the
    choices, indices into K (the caller maps them to bytes).

    Shapes depend on ``n_nodes``, m and K only, never on the values, so a compiled
    or CUDA-graphed step sees the same tree shape every time.
    """
    m, _, k = log_scores.shape
    device = log_scores.device
    scores, parents, tokens, depths = [], [], [], []
    beam = log_scores.new_zeros(1)  # scores of the previous depth's kept paths (the root alone at first)
    below = torch.zeros(1, dtype=torch.long, device=device)  # 0: their last choice was a first choice
    # Paths are numbered root = 0, then depth by depth: ``first`` numbers this depth's
    # first path, ``prev_first`` the previous depth's.
    prev_first, first = 0, 1
    for d in range(m):
        paths = (beam[:, None] + log_scores[d, below]).flatten()
        beam, idx = paths.topk(min(n_nodes, paths.numel()))
        below = (idx % k != 0).long()
        scores.append(beam)
        parents.append(prev_first + idx // k)
        tokens.append(idx % k)
        depths.append(torch.full_like(idx, d + 1))
        prev_first, first = first, first + idx.numel()
    score = torch.cat(scores)
    # A child ties its parent only when its own score is 0 (a sure thing); the depth
    # term then ranks the parent first, so the kept set is always closed under parents.
    depth = torch.cat(depths)
    keep = (score - 1e-6 * depth).topk(n_nodes).indices.sort().values  # paths are ordered by depth: topological
    remap = torch.full((score.numel() + 1,), -1, dtype=torch.long, device=device)
    remap[0] = 0
    remap[keep + 1] = torch.arange(1, n_nodes + 1, device=device)
    parent = remap[torch.cat(parents)[keep]]
    full_parent = torch.cat((parent.new_zeros(1), parent))
    eye = torch.eye(n_nodes + 1, dtype=torch.bool, device=device)
    ancestors = eye
    for _ in range(m):
        ancestors = eye | ancestors[full_parent]
    return DraftTree(torch.cat(tokens)[keep], parent, depth[keep], ancestors)


def tree_mask(tree: DraftTree, start: int, cache_len: int) -> torch.Tensor:
    """Attention mask [n+1, cache_len] of a forward feeding ``[pending, nodes]`` at slots ``start ..``:
    the context before ``start``, then each position's own ancestors."""
    size = tree.size + 1
    cols = torch.arange(cache_len, device=tree.tokens.device)
    rel = cols - start
    in_tree = (rel >= 0) & (rel < size)
    return (cols < start)[None, :] | (tree.ancestors[:, rel.clamp(0, size - 1)] & in_tree[None, :])


def accepted_path(tree: DraftTree, choice: torch.Tensor, max_depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head 1's choices [n+1] at ``[pending, nodes]`` -> (the accepted path's node indices
    [max_depth], one per depth, 0 past its end; and its length [1])."""
    matched = torch.cat((choice.new_ones(1, dtype=torch.bool), tree.tokens == choice[tree.parent]))
    accepted = (tree.ancestors <= matched[None, :]).all(dim=-1)[1:]  # [n]: every node of its path matched
    depths = torch.arange(1, max_depth + 1, device=choice.device)
    at_depth = accepted[None, :] & (tree.depth[None, :] == depths[:, None])
    path = (at_depth * torch.arange(1, tree.size + 1, device=choice.device)).sum(dim=-1)  # one node per depth
    return path, at_depth.any(dim=-1).sum().view(1)


class RankStats:
    """Per depth d (head d+1), how often head 1's byte was that head's r-th choice (r < ``RANKS``)
    or none of them, counted over the steps whose verification reached depth d, apart
    for when the byte above it was its own head's first choice (or d = 1) and when not:
    after a runner-up was right, the heads below are right less often.

    Starts from a few pseudo-counts that trust every depth's top choice alike, so the
    first trees of a generation reach deep and the statistics learn what the heads
    are worth. All on the device.
    """

    PRIOR = (4.0, 0.5, 0.25) + (0.1,) * (RANKS - 3) + (0.5,)  # ranks 0..RANKS-1, then "not among them"

    def __init__(self, n_drafts: int, device: torch.device):
        self.counts = torch.tensor(self.PRIOR, device=device).repeat(n_drafts, 2, 1)

    def log_rates(self) -> torch.Tensor:
        """[m, 2, RANKS] log of each rank's share at each depth, below a first choice or not."""
        return (self.counts[..., :RANKS] / self.counts.sum(dim=-1, keepdim=True)).log()

    def observe(self, ranks: torch.Tensor, reached: torch.Tensor) -> None:
        """``ranks`` [m] of head 1's bytes, depth by depth (``RANKS``: not among the choices);
        ``reached`` [m] bool."""
        below = torch.cat((ranks.new_zeros(1), (ranks[:-1] != 0).long()))
        self.counts[torch.arange(ranks.numel(), device=ranks.device), below, ranks] += reached.to(self.counts.dtype)


class TreeVerifier:
    """Greedy verification of the latest draft tree, then a new tree from the draft heads
    at the accepted byte, all on the device.

    Returns ``decision`` = ``[a, next_byte, depth of the new tree, path bytes ...]``
    (the one host transfer of the step; the first ``a`` path bytes are accepted) and the
    accepted path's node indices (for ``ByteMTP.move_cache``). The new tree is ``self.tree``.
    """

    def __init__(self, drafter, n_nodes: int, n_drafts: int, device: torch.device):
        self.drafter = drafter
        self.n_nodes = n_nodes
        self.n_drafts = n_drafts
        self.max_path = min(n_nodes, n_drafts)
        self.stats = RankStats(n_drafts, device)
        self.shape: DraftTree | None = None  # the tree of choices (tokens are ranks), rebuilt now and then
        self.steps = 0
        self.tree: DraftTree | None = None
        self.choices: torch.Tensor | None = None  # [m, RANKS] bytes each head ranked first, second, ...

    def __call__(
        self, logits: torch.Tensor, features: torch.Tensor, tree: DraftTree | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        choice = logits.argmax(dim=-1)  # [P]
        if tree is None or tree.size == 0:
            path = choice.new_zeros(self.max_path)
            accepted = choice.new_zeros(1)
            path_bytes = path
        else:
            path, accepted = accepted_path(tree, choice, self.max_path)
            path_bytes = tree.tokens[(path - 1).clamp(min=0)]
            self._learn(choice, path, accepted)
        last = path.gather(0, (accepted - 1).clamp(min=0)) * (accepted > 0)  # [1] position of the last accepted byte
        self.choices = self.drafter(features.index_select(0, last)[0]).topk(RANKS, dim=-1).indices
        if self.steps % REBUILD_EVERY == 0:
            self.shape = build_tree(self.stats.log_rates(), self.n_nodes)
        self.steps += 1
        shape = self.shape
        self.tree = DraftTree(self.choices[shape.depth - 1, shape.tokens], shape.parent, shape.depth, shape.ancestors)
        decision = torch.cat((accepted, choice.index_select(0, last), self.tree.depth.amax().view(1), path_bytes))
        return decision, path

    def _learn(self, choice: torch.Tensor, path: torch.Tensor, accepted: torch.Tensor) -> None:
        """Head 1's byte at each depth verification reached, ranked by the head that drafted it."""
        m = self.n_drafts
        at = torch.cat((path.new_zeros(1), path, path.new_zeros(max(0, m - 1 - path.numel()))))[:m]
        truth = choice[at]  # [m]: head 1's byte below the accepted node of depth d-1
        hit = self.choices == truth[:, None]  # [m, RANKS]
        ranks = torch.where(hit.any(dim=-1), hit.int().argmax(dim=-1), RANKS)
        reached = torch.arange(m, device=choice.device) <= accepted
        self.stats.observe(ranks, reached)
