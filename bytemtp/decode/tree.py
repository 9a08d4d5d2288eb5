"""Draft trees: many candidate continuations verified in one forward (greedy decoding).

A chain drafts each head's top byte, so one wrong head loses the rest of the
block; yet the right byte is often a head's runner-up. A tree spends a
forward's positions on the continuations most likely to be right. Which ones
that is cannot be read off the heads' probabilities alone: each head predicts
its offset marginally, not given the bytes drafted before it, so products of
their probabilities wildly underrate deep paths (given that head 2 was right,
heads 3.. mostly are too). ``RankStats`` instead learns, during the generation and
per depth d, how often head 1's byte lately turned out to be head d+1's r-th choice
given that verification reached depth d; a path of ranks (r_1, r_2, ..) then scores
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

The bookkeeping (verification, statistics, the beam) runs on the host in
``bytemtp_native.tree_ops``: a step hands it head 1's choices and the draft heads'
rankings in one transfer and gets back plain arrays.

Sampling keeps the chain (``bytemtp.decode.verify.SamplingVerifier``): verifying a
tree of samples without changing head 1's distribution needs a multi-draft
acceptance rule that this module does not implement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bytemtp.errors import BytemtpError
from bytemtp_native.tree_ops import accept, ancestors, best_paths, observe_ranks


@dataclass
class DraftTree:
    """``n`` draft nodes in topological order (a parent before its children); index 0 is the root.

    Host arrays: ``tokens``/``parent``/``depth`` are [n] (``parent`` indexes ``[root, nodes]``,
    depth counts from 1 below the root); ``ancestors`` is [n+1, n+1] bool, row i
    marking i and every node above it.
    """

    tokens: np.ndarray
    parent: np.ndarray
    depth: np.ndarray
    ancestors: np.ndarray

    @property
    def size(self) -> int:
        return self.tokens.size

    def prefix(self, n: int) -> "DraftTree":
        """Its first ``n`` nodes: a tree too (parents come first), for when the cache has room for no more."""
        return DraftTree(self.tokens[:n], self.parent[:n], self.depth[:n], self.ancestors[: n + 1, : n + 1])


RANKS = 8  # runner-ups considered per head: a head's 9th choice is right too rarely to pay for a node


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


def build_tree(log_scores: np.ndarray, n_nodes: int) -> DraftTree:
    """The ``n_nodes`` best paths of choices under log-scores [m, 2, K] (all <= 0): choice r at
    depth d scores ``log_scores[d, 0, r]`` below a first choice (or the root), else
    ``log_scores[d, 1, r]``; a path scores the sum over its depths. ``tokens`` are the
    choices, indices into K (the caller maps them to bytes).

    Its size depends on ``n_nodes``, m and K only, never on the values, so a compiled
    step sees the same forward shape every time.
    """
    parent, choice, depth = best_paths(np.asarray(log_scores, dtype=np.float64), n_nodes)
    return DraftTree(choice, parent, depth, ancestors(parent))


def tree_mask(tree: DraftTree, start: int, cache_len: int) -> np.ndarray:
    """Attention mask [n+1, cache_len] of a forward feeding ``[pending, nodes]`` at slots ``start ..``:
    the context before ``start``, then each position's own ancestors."""
    mask = np.zeros((tree.size + 1, cache_len), dtype=np.bool_)
    mask[:, :start] = True
    mask[:, start : start + tree.size + 1] = tree.ancestors
    return mask


def accepted_path(tree: DraftTree, choice: np.ndarray, max_depth: int) -> tuple[np.ndarray, int]:
    """Head 1's choices [n+1] at ``[pending, nodes]`` -> (the accepted path's node indices
    [max_depth], one per depth, 0 past its end; and its length)."""
    return accept(tree.parent, tree.tokens, tree.depth, choice, max_depth)


class RankStats:
    """Per depth d (head d+1), how often head 1's byte was that head's r-th choice (r < ``RANKS``)
    or none of them, counted over the steps whose verification reached depth d, apart
    for when the byte above it was its own head's first choice (or d = 1) and when not:
    after a runner-up was right, the heads below are right less often.

    Starts from a few pseudo-counts that trust every depth's top choice alike, so the
    first trees of a generation reach deep and the statistics learn what the heads
    are worth. The counts are moving averages (``DECAY`` per observation of a row): how
    well the heads do drifts with the text being generated, and following it gave 8% more
    bytes per forward than counting the whole generation alike (see bench/RESULTS.md),
    while carrying counts from one generation into the next gave fewer.
    """

    PRIOR = (4.0, 0.5, 0.25) + (0.1,) * (RANKS - 3) + (0.5,)  # ranks 0..RANKS-1, then "not among them"
    DECAY = 0.85  # an observation weighs as much as ~7 earlier ones together

    def __init__(self, n_drafts: int):
        self.counts = np.tile(np.array(self.PRIOR), (n_drafts, 2, 1))

    def log_rates(self) -> np.ndarray:
        """[m, 2, RANKS] log of each rank's share at each depth, below a first choice or not."""
        return np.log(self.counts[..., :RANKS] / self.counts.sum(axis=-1, keepdims=True))

    def observe(self, ranked: np.ndarray, choice: np.ndarray, path: np.ndarray, length: int) -> None:
        """Learn from a verification that accepted ``path[:length]``: ``ranked`` [m, RANKS] are
        the bytes each draft head ranked first, second, ..; ``choice`` head 1's bytes at
        ``[root, nodes]``."""
        observe_ranks(self.counts, ranked, choice, path, length, self.DECAY)


class TreeVerifier:
    """Greedy verification of the latest draft tree, then a new tree from the draft heads
    at the accepted byte.

    Returns ``decision`` = ``[a, next_byte, depth of the new tree, path bytes ...]``
    (the first ``a`` path bytes are accepted) and the accepted path's node indices (for
    ``ByteMTP.move_cache``). The new tree is ``self.tree``.

    On a CPU the draft heads run at the accepted position only, once it is known. On
    an accelerator they run at every position in the same launch as head 1's choices,
    so the step still waits on the device once.
    """

    def __init__(self, drafter, n_nodes: int, n_drafts: int, device: torch.device):
        self.drafter = drafter
        self.n_nodes = n_nodes
        self.n_drafts = n_drafts
        self.max_path = min(n_nodes, n_drafts)
        self.draft_everywhere = device.type != "cpu"
        self.stats = RankStats(n_drafts)
        self.tree: DraftTree | None = None
        self.ranked: np.ndarray | None = None  # [m, RANKS] bytes each head ranked first, second, ...

    def _ranked(self, features: torch.Tensor) -> torch.Tensor:
        """Each draft head's top ``RANKS`` bytes from ``decode`` features [.., F, d] -> [.., m, RANKS]."""
        return self.drafter(features).topk(RANKS, dim=-1).indices

    def __call__(
        self, logits: torch.Tensor, features: torch.Tensor, tree: DraftTree | None
    ) -> tuple[list[int], np.ndarray]:
        n_pos = logits.shape[0]
        if self.draft_everywhere:
            host = torch.cat((logits.argmax(dim=-1), self._ranked(features).flatten())).cpu().numpy()
            choice, ranked = host[:n_pos], host[n_pos:].reshape(n_pos, self.n_drafts, RANKS)
        else:
            choice = logits.argmax(dim=-1).numpy()
        if tree is None or tree.size == 0:
            path, length = np.zeros(self.max_path, np.int64), 0
        else:
            path, length = accepted_path(tree, choice, self.max_path)
            self.stats.observe(self.ranked, choice, path, length)
        last = path[length - 1] if length else 0
        self.ranked = ranked[last] if self.draft_everywhere else self._ranked(features[last]).numpy()
        shape = build_tree(self.stats.log_rates(), self.n_nodes)  # tokens are ranks; ~30 us
        self.tree = DraftTree(self.ranked[shape.depth - 1, shape.tokens], shape.parent, shape.depth, shape.ancestors)
        path_bytes = tree.tokens[path[:length] - 1].tolist() if length else []
        return [length, int(choice[last]), int(shape.depth.max()), *path_bytes], path[:length]
