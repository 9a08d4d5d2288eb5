"""Speculative sampling over draft trees: the greedy tree's shapes, sampled bytes, exact verification.

Per row and step the host picks the tree's *shape* as the greedy tree does (the
paths of draft ranks that ``RankStats`` rates likeliest to be accepted, learnt from
earlier steps only); the step then draws the nodes' bytes, each parent's children
from their depth's draft distribution (coupled to the two bytes above them,
``bytemtp.decode.coupling``) without replacement, and verifies them by recursive
rejection sampling (``bytemtp.decode.tree_sampling``), so every output byte is
distributed exactly as head 1's processed distribution, whatever the drafts were. Shapes never look at the step's random numbers or at the
bytes drawn with them: that is what keeps the output exact (a tree reshaped after
seeing its bytes verifies bytes no longer distributed as their ``q``).

Sampled siblings beat ranked ones (each node a fixed rank of its head): a sampled
child is accepted with probability ``sum(min(p, q))``, a ranked one only with ``p``
of its byte, so when a draft head is close to head 1 the tree reaches deeper.

Eager, the walk runs on the host (``bytemtp_native.tree_sampling_ops``: it visits only
the nodes it reaches, where tensor code pays a dispatch for every node's threshold
and residual), on head 1's distributions at every position; the draft heads then run
at the one node each row stopped at (running them at all 16 positions of a tree of 15,
as the walk's input, was a fifth of the step); compiled, the whole verification runs
inside the step (``bytemtp.decode.step.sampled_tree_step``), one graph with no host
round trip.

Every row draws the same count of uniforms from its own generator every step (a
Gumbel row per possible parent and one number per node), however wide the step,
so a row's output does not depend on the other rows.
"""

from __future__ import annotations

import numpy as np
import torch

from bytemtp.decode.batch import Batch, Decision
from bytemtp.decode.coupling import UNCOUPLED, HostContext
from bytemtp.decode.sampling import SamplingConfig, probabilities
from bytemtp.decode.step import RANKS, sampled_tree_decide, sampled_tree_step, tree_forward
from bytemtp.decode.transfer import download, upload
from bytemtp.decode.tree import DraftTree, TreeDrafts, send
from bytemtp.errors import BytemtpError
from bytemtp_native.tree_sampling_ops import draw_children, nonfinite_rows, top_ranks, walk_tree


class SampledTreeDrafts(TreeDrafts):
    """Tree speculative sampling at ``sampling``'s temperature, top-k and top-p, the drafts drawn
    from the draft heads processed by ``draft_sampling`` (default: ``sampling``). ``step``: the
    compiled ``sampled_tree_step`` (verification on the device); None: eager, walked on the host."""

    def __init__(
        self,
        model: torch.nn.Module,
        sampling: SamplingConfig,
        n_nodes: int,
        n_drafts: int,
        step=None,
        draft_sampling: SamplingConfig | None = None,
        host_context: HostContext = UNCOUPLED,
    ):
        super().__init__(model, n_nodes, n_drafts, step)
        self.sampling, self.draft_sampling = sampling, draft_sampling or sampling
        self.vocab = model.cfg.vocab
        # eager: the draft context the host draws with (``bytemtp.decode.coupling.host_arrays``; a
        # compiled step holds its own)
        self.host_context = host_context

    def start(self, batch: Batch) -> None:
        super().start(batch)
        n, shape = len(batch.rows), (self.n_drafts, self.vocab)
        if self.step_fn is None:  # eager: each row's draft distributions and its tree's nodes', on the host
            self.host_q = np.zeros((n, *shape), np.float32)
            self.node_q: list[np.ndarray | None] = [None] * n
        else:  # compiled: the draft distributions stay on the device
            self.draft_probs = torch.zeros(n, *shape, device=batch.device)

    def admit(self, batch: Batch, r: int) -> None:
        super().admit(batch, r)
        if self.step_fn is None:
            self.host_q[r], self.node_q[r] = 0.0, None
        else:
            self.draft_probs[r] = 0.0

    def check(self, sampling: SamplingConfig) -> None:
        if sampling != self.sampling:
            raise BytemtpError(
                f"this draft tree samples at temperature {self.sampling.temperature:g}, top-k {self.sampling.top_k}, "
                f"top-p {self.sampling.top_p:g} only"
            )

    def noise(self, batch: Batch, active: list[bool]) -> torch.Tensor:
        """[B, n+1, V+1] uniforms of a step: per possible parent a row of Gumbel noise, and each
        node's acceptance number in the last column (row 0's draws the next byte). Each active
        row draws them all from its own generator whatever the step's width; parked rows get zeros."""
        u = torch.zeros(len(batch.rows), self.n_nodes + 1, self.vocab + 1)
        for r, row in enumerate(batch.rows):
            if active[r]:
                u[r] = torch.rand(self.n_nodes + 1, self.vocab + 1, generator=row.generator)
        return u

    def first(
        self, batch: Batch, active: list[bool], logits: torch.Tensor, features: torch.Tensor
    ) -> dict[int, Decision]:
        noise = self.noise(batch, active)
        self._forget(active)
        if self.step_fn is None:
            return self.walk(batch, active, logits, features, noise[..., -1].numpy(), fed=False)
        none = torch.zeros(len(batch.rows), 0, dtype=torch.long, device=batch.device)
        node_q = features.new_zeros(len(batch.rows), 0, self.vocab)
        uniforms = upload(batch.device, {"u": noise[:, :1, -1].numpy()})["u"]
        out = sampled_tree_decide(
            self.model, self.sampling, self.n_drafts, logits, features, none, none, node_q, uniforms, 0,
            draft_sampling=self.draft_sampling,
        )
        return self.read(batch, active, out, fed=False)

    def step(self, batch: Batch, active: list[bool]) -> dict[int, Decision]:
        noise = self.noise(batch, active)
        if self.step_fn is None:
            gumbel = noise[..., :-1].numpy()
            for r, on in enumerate(active):
                if on:
                    tree = self.trees[r]
                    row = batch.rows[r]
                    tokens, self.node_q[r] = draw_children(
                        self.host_q[r], tree.parent, tree.depth, gumbel[r], row.pending, row.last,
                        *self.host_context,
                    )
                    self.trees[r] = DraftTree(tokens, tree.parent, tree.depth, tree.ancestors)
        width, host = self.layout(batch, active)
        if self.step_fn is None:
            inputs = send(batch, host)
            logits, features = tree_forward(self.model, self.n_drafts, **inputs, **batch.extent(width, active))
            return self.walk(batch, active, logits, features, noise[..., -1].numpy(), fed=True)
        parent = np.zeros((len(batch.rows), width - 1), np.int64)  # a parked row: a star, never read
        depth = np.ones_like(parent)
        for r, on in enumerate(active):
            if on:
                parent[r], depth[r] = self.verified[r].parent, self.verified[r].depth
        before = np.array([row.last for row in batch.rows])
        inputs = send(batch, {**host, "parent": parent, "depth": depth, "noise": noise[:, :width].numpy(),
                              "before": before, "active": np.array(active)})
        active_t, inputs["draft_probs"] = inputs.pop("active"), self.draft_probs
        if self.compiled(width):
            return self.read(batch, active, self.step_fn(**inputs), fed=True, active_t=active_t)
        with torch.compiler.set_stance("force_eager"):  # narrower near the window's end: the same step, eager
            return self.read(batch, active, self.step_fn(**inputs), fed=True, active_t=active_t)

    def walk(
        self,
        batch: Batch,
        active: list[bool],
        logits: torch.Tensor,
        features: torch.Tensor,
        uniforms: np.ndarray,
        fed: bool,
    ) -> dict[int, Decision]:
        """Eager: verify each row's tree on the host from head 1's distributions at every position
        (the step's ``logits``), then run the draft heads at the node each row stopped at only."""
        p = probabilities(logits, self.sampling).cpu().numpy()
        rows = [r for r in range(len(batch.rows)) if active[r]]
        verdicts = {}
        for r in rows:
            tree = self.verified[r]
            n = tree.size if tree is not None else 0
            parent, tokens = (tree.parent, tree.tokens) if n else (np.zeros(0, np.int64),) * 2
            node_q = self.node_q[r][:n] if n else np.zeros((0, self.vocab))
            path, length, byte = walk_tree(parent, tokens, node_q, p[r, : n + 1], uniforms[r, : n + 1], self.max_path)
            verdicts[r] = (path, length, byte, tokens, n)
        last = torch.tensor([path[length - 1] if length else 0 for path, length, *_ in verdicts.values()])
        at = torch.tensor(rows), last.to(features.device)
        decided = torch.tensor([byte for _, _, byte, *_ in verdicts.values()], device=features.device)
        draft_logits = self.model.draft_logits(features[at], self.n_drafts, decided)  # [rows, m, V]
        q = probabilities(draft_logits, self.draft_sampling).cpu().numpy()
        host_logits, host_drafts = (t.float().cpu().numpy() for t in (logits[at[0]], draft_logits))
        broken = nonfinite_rows(host_logits) | nonfinite_rows(host_drafts)
        decisions = {}
        self.moves[:] = self.still
        for i, (r, (path, length, byte, tokens, n)) in enumerate(verdicts.items()):
            self.host_q[r] = q[i]
            ranked = top_ranks(q[i], RANKS)
            choice = observed(tokens, path, length, byte, n)
            decisions[r] = self.advance(r, batch.rows[r], path, length, byte, choice, ranked, bool(broken[i]), fed)
        return decisions

    def read(
        self, batch: Batch, active: list[bool], out: tuple, fed: bool, active_t: torch.Tensor | None = None
    ) -> dict[int, Decision]:
        """Compiled: the drawn bytes, the accepted path and the next byte from the step's integer
        tensor (one transfer for the batch); keep the active rows' new draft distributions (into
        a tensor of their own: a captured step's next replay overwrites its outputs). ``active_t``:
        ``active`` on the device, if the step's inputs brought it."""
        ints, q = out
        active_t = torch.tensor(active, device=batch.device) if active_t is None else active_t
        self.draft_probs = torch.where(active_t[:, None, None], q, self.draft_probs)
        host = download(ints)  # the step's one host transfer
        depth = self.max_path if fed else 0
        n = host.shape[1] - 3 - self.n_drafts * RANKS - depth
        tokens, path = host[:, :n], host[:, n : n + depth]
        length, next_byte = host[:, n + depth], host[:, n + depth + 1]
        ranked = host[:, n + depth + 2 : -1].reshape(-1, self.n_drafts, RANKS)
        decisions = {}
        self.moves[:] = self.still
        for r, row in enumerate(batch.rows):
            if not active[r]:
                continue
            a, byte = int(length[r]), int(next_byte[r])
            if fed:
                tree = self.verified[r]
                self.verified[r] = DraftTree(tokens[r], tree.parent, tree.depth, tree.ancestors)
            row_path = np.zeros(self.max_path, np.int64)
            row_path[:a] = path[r, :a]
            choice = observed(tokens[r], row_path, a, byte, n)
            decisions[r] = self.advance(r, row, row_path, a, byte, choice, ranked[r], bool(host[r, -1]), fed)
        return decisions

    def shaped(self, r: int, shape: DraftTree) -> DraftTree:
        """The shape alone: its bytes are drawn when the step runs."""
        return shape


def observed(tokens: np.ndarray, path: np.ndarray, length: int, next_byte: int, n: int) -> np.ndarray:
    """The byte decided after the root and after each accepted node ([n+1], as the rank statistics
    read head 1's choices): the accepted nodes' bytes, then the next byte."""
    choice = np.zeros(n + 1, np.int64)
    choice[[0, *path[:length]]] = [*tokens[path[:length] - 1], next_byte]
    return choice
