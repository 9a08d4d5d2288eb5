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

The bookkeeping (verification, statistics, the beam) runs on the host, per row, in
``bytemtp_native.tree_ops``: a step (``bytemtp.decode.step.tree_step``) hands it head 1's
choices at every position and the draft heads' rankings at the accepted node (found on
the device too, ``accepted_node``) in one transfer for the whole batch, and gets back plain
arrays; the accepted paths' cache moves run at the start of the next step.

Sampling verifies trees too: ``bytemtp.decode.sampled_tree`` keeps these shapes
and draws the nodes' bytes, verified by recursive rejection sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bytemtp.decode.batch import Batch, Decision, Row
from bytemtp.decode.sampling import SamplingConfig
from bytemtp.decode.step import RANKS, tree_decide, tree_step
from bytemtp.decode.transfer import download, upload
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


# A step's positions: beyond this, a tree's extra nodes are ever less likely to be accepted,
# while the step costs more; it also keeps ``--tree`` from asking for an absurd forward.
MAX_TREE_NODES = 128


def tree_candidates(n_nodes: int, n_drafts: int, n_ranks: int) -> int:
    """How many paths of at most ``n_drafts`` bytes a beam of ``n_nodes`` per depth considers."""
    total, beam = 0, 1
    for _ in range(n_drafts):
        beam = min(n_nodes, beam * n_ranks)
        total += beam
    return total


def check_tree_request(n_nodes: int) -> None:
    """A tree of ``n_nodes`` asked for: checked before anything runs."""
    if not 1 <= n_nodes <= MAX_TREE_NODES:
        raise BytemtpError(f"--tree: a draft tree has 1 to {MAX_TREE_NODES} nodes, got {n_nodes}")


def check_tree_size(n_nodes: int, n_drafts: int, window: int) -> None:
    """Whether ``n_drafts`` draft heads offer enough candidate paths for ``n_nodes``, and a step
    of ``1 + n_nodes`` positions fits a window of ``window``."""
    if n_nodes > tree_candidates(n_nodes, n_drafts, RANKS):
        raise BytemtpError(f"--tree: {n_drafts} draft heads cannot fill a tree of {n_nodes} nodes")
    if n_nodes + 1 > window:
        raise BytemtpError(f"--tree: a tree of {n_nodes} nodes does not fit the model's window of {window}")


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


def send(batch: Batch, host: dict[str, np.ndarray | None]) -> dict[str, torch.Tensor | None]:
    """A step's ``host`` inputs on the batch's device, in one copy (None stays None)."""
    sent = upload(batch.device, {name: a for name, a in host.items() if a is not None})
    return {name: sent.get(name) for name in host}


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


class TreeDrafts:
    """Greedy verification of each row's latest draft tree, then a new tree from the draft heads
    at the accepted byte (the strategy ``bytemtp.decode.engine`` drives).

    Per row: the tree verified next, its rank statistics, and the cache move of the path it
    accepted last, applied by the next step. Near the end of the cache the rows verify the
    prefix of their trees that fits (``Batch.fits``; nodes come in topological order, so a
    prefix is a tree). ``SampledTreeDrafts`` (``bytemtp.decode.sampled_tree``) shares all of
    this and verifies on the device instead.
    """

    def __init__(self, model: torch.nn.Module, n_nodes: int, n_drafts: int, step=None):
        self.model, self.n_nodes, self.n_drafts = model, n_nodes, n_drafts
        self.step_fn = step  # a compiled step bound to model and n_drafts; None: eager
        self.max_path = min(n_nodes, n_drafts)

    def start(self, batch: Batch) -> None:
        n = len(batch.rows)
        self.stats = [RankStats(self.n_drafts) for _ in range(n)]
        self.trees: list[DraftTree | None] = [None] * n
        self.verified: list[DraftTree | None] = [None] * n
        self.ranked: list[np.ndarray | None] = [None] * n  # [m, RANKS] bytes each head ranked first, second, ..
        # Per row, the source and destination slots of the latest accepted path's move. No move is
        # a copy of the cache's last slot onto itself: a row's accepted path ends there only when
        # its cache is full, and the row is then re-encoded anyway.
        self.still = batch.cache_len - 1
        self.moves = np.full((n, 2, self.max_path), self.still, np.int64)

    def admit(self, batch: Batch, r: int) -> None:
        """Slot ``r`` holds a new row: fresh rank statistics, no tree, no move. A tree strategy decodes
        rows of one sampling setting (greedy here)."""
        self.check(batch.rows[r].params.sampling)
        self.stats[r] = RankStats(self.n_drafts)
        self.trees[r] = self.verified[r] = self.ranked[r] = None
        self.moves[r] = self.still

    def check(self, sampling: SamplingConfig) -> None:
        if not sampling.greedy:
            raise BytemtpError("this draft tree decodes greedily (temperature 0) only")

    def flush(self) -> None:
        """Moves pending from the last step, applied now (before a prompt's forward reuses slots)."""
        sent = upload(next(self.model.parameters()).device, {"moves": self.moves.copy()})["moves"]
        self.model.move_cache(sent[:, 0], sent[:, 1])
        self.moves[:] = self.still

    def first(
        self, batch: Batch, active: list[bool], logits: torch.Tensor, features: torch.Tensor
    ) -> dict[int, Decision]:
        root = torch.zeros(len(batch.rows), dtype=torch.long, device=batch.device)
        choice = logits.argmax(dim=-1)
        host = download(tree_decide(self.model, self.n_drafts, logits, choice, features, root))
        self._forget(active)
        return self.read(batch, active, host, fed=False)

    def _forget(self, active: list[bool]) -> None:
        """A prompt's forward verified no tree for the ``active`` rows."""
        for r, on in enumerate(active):
            if on:
                self.verified[r] = None

    def layout(self, batch: Batch, active: list[bool]) -> tuple[int, dict[str, np.ndarray | None]]:
        """The width of this step's forward and its inputs, on the host (``bytemtp.decode.transfer``
        sends them in one copy): ``ids`` ``[pending, tree bytes]``, cache slots, RoPE positions (each
        node at its depth), masks (each node sees the context and its ancestors), the pending cache
        moves. Sets each active row's ``verified`` tree."""
        n_rows, S = len(batch.rows), batch.cache_len
        width = 1 + min(self.n_nodes, batch.fits(active))
        ids = np.zeros((n_rows, width), np.int64)
        depth = np.zeros((n_rows, width), np.int64)
        mask = np.zeros((n_rows, width, S), np.bool_)
        for r, row in enumerate(batch.rows):
            L = min(row.length, S - 1)
            if not active[r]:
                mask[r, :, : L + 1] = True  # parked: attends what it overwrites, nothing is read back
                continue
            tree = self.verified[r] = self.trees[r].prefix(width - 1)
            ids[r] = [row.pending, *tree.tokens]
            depth[r, 1:] = tree.depth
            mask[r] = tree_mask(tree, L, S)
        lengths = np.array([min(row.length, S - 1) for row in batch.rows])[:, None]
        rope = np.where(np.array(active)[:, None], lengths + depth, lengths)
        moving = not batch.eager or (self.moves != self.still).any()  # eager and nothing to move: skip the copy
        src, dst = (self.moves[:, i].copy() if moving else None for i in (0, 1))
        inputs = {"ids": ids, "input_pos": batch.slot_array(width, active), "rope_pos": rope, "mask": mask,
                  "move_src": src, "move_dst": dst}
        return width, inputs

    def step(self, batch: Batch, active: list[bool]) -> dict[int, Decision]:
        width, host = self.layout(batch, active)
        inputs = send(batch, host)
        if self.compiled(width):
            out = self.step_fn(**inputs)
        else:
            out = tree_step(self.model, self.n_drafts, **inputs, **batch.extent(width, active))
        return self.read(batch, active, download(out), fed=True)  # the step's one host transfer

    def compiled(self, width: int) -> bool:
        """Whether a step of ``width`` runs compiled: a compiled step has the one width of the
        whole tree (one graph per batch size); the few steps near the window's end that verify
        only the prefix of their trees that fits (``Batch.fits``) run eager instead of
        compiling and recording a graph for every width."""
        return self.step_fn is not None and width == 1 + self.n_nodes

    def read(self, batch: Batch, active: list[bool], host: np.ndarray, fed: bool) -> dict[int, Decision]:
        """Per row: verify the tree against head 1's choices, learn, build the next tree, plan the move."""
        width = host.shape[1] - 1 - self.n_drafts * RANKS
        choices = host[:, :width]
        ranked = host[:, width:-1].reshape(-1, self.n_drafts, RANKS)  # at each row's accepted node
        decisions = {}
        self.moves[:] = self.still
        for r, row in enumerate(batch.rows):
            if not active[r]:
                continue
            tree, choice = self.verified[r], choices[r]
            if tree is None or tree.size == 0:
                path, length = np.zeros(self.max_path, np.int64), 0
            else:
                path, length = accepted_path(tree, choice[: tree.size + 1], self.max_path)
            last = path[length - 1] if length else 0
            decisions[r] = self.advance(
                r, row, path, length, int(choice[last]), choice, ranked[r], bool(host[r, -1]), fed
            )
        return decisions

    def advance(
        self,
        r: int,
        row: Row,
        path: np.ndarray,
        length: int,
        next_byte: int,
        choice: np.ndarray,
        ranked: np.ndarray,
        broken: bool,
        fed: bool,
    ) -> Decision:
        """Row ``r`` accepted ``path[:length]`` of its verified tree and decided ``next_byte``;
        ``choice`` [n+1] holds the byte decided after the root and after each accepted node,
        ``ranked`` [m, RANKS] the draft heads' likeliest bytes after the last of them. Learn,
        shape the next tree, plan the cache move -> the row's ``Decision``."""
        tree = self.verified[r]
        if tree is not None and tree.size:
            self.stats[r].observe(self.ranked[r], choice, path, length)
        self.ranked[r] = ranked
        shape = build_tree(self.stats[r].log_rates(), self.n_nodes)  # tokens are ranks; ~30 us
        self.trees[r] = self.shaped(r, shape)
        path_bytes = tree.tokens[path[:length] - 1].tolist() if length else []
        judged = int(tree.depth.max()) if tree is not None and tree.size else 0
        entered = [row.pending, *path_bytes] if fed else []
        if length and path[length - 1] != length:  # node numbers grow with depth: in place iff they are 1..a
            L = row.length
            self.moves[r, 0, :length] = L + path[:length]
            self.moves[r, 1, :length] = L + 1 + np.arange(length)
        return Decision(entered, [*path_bytes, next_byte], judged, broken)

    def shaped(self, r: int, shape: DraftTree) -> DraftTree:
        """Row ``r``'s next tree of ``shape`` (whose tokens are ranks): greedy, each node holds
        its rank's byte."""
        return DraftTree(self.ranked[r][shape.depth - 1, shape.tokens], shape.parent, shape.depth, shape.ancestors)
