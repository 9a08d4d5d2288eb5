"""Exact speculative sampling over a draft tree: one step's verification as a pure tensor function.

A tree holds ``N`` candidate bytes below the root (the position head 1 samples
next from). ``verify_tree`` walks it the way multi-candidate recursive rejection
sampling does (SpecInfer; Sequoia and EAGLE-2 with their sibling sets): at the
current node, with target ``r`` = head 1's processed distribution there, its
children are tried in order; child ``x`` (drawn from, or chosen under, ``q``) is
accepted with probability ``min(1, r(x) / q(x))``, and on rejection the target
becomes ``norm(max(0, r - q))`` for the next sibling. An accepted child becomes
the current node (target: head 1's distribution after it); when every child is
rejected, or the node is a leaf, the next byte is drawn from the current target.

Why the output is exactly head 1's. One candidate: ``x ~ q``, target ``r``.
``P(accept, x = y) = q(y) min(1, r(y)/q(y)) = min(q, r)(y)``, and rejection has
probability ``1 - sum(min(q, r)) = sum(max(0, r - q)) = Z``. If whatever follows a
rejection outputs ``norm(max(0, r - q))``, then ``P(Y = y) = min(q, r)(y) +
max(0, r - q)(y) = r(y)``. Siblings: after a rejection, the remaining siblings are
the same procedure with that residual as target (their ``q`` may depend on the
siblings drawn before them, as when drawing without replacement: the lemma only
needs each candidate distributed as the ``q`` the verifier is handed, given
everything before it), and with no siblings left the byte is drawn from the target
itself; by induction over the siblings, a node's next byte follows its target. Depth:
given that byte, an accepted child continues with the same procedure on its subtree
and head 1's distribution after the byte, a fallback draw ends the step and
sampling continues from head 1 there; by induction over the height, the step's
output followed by autoregressive sampling is autoregressive sampling. Hence the
requirements: every node's byte distributed exactly as its ``q`` (processed by
temperature, top-k, top-p as the drafts were drawn), drafts and tree shape fixed
before the uniforms are seen, and the residual clamped at zero.

Two ways to fill a tree (the draft heads predict each offset without the bytes
drafted before it, so all nodes at depth ``d`` share head d+1's distribution; with draft
coupling, ``bytemtp.decode.coupling``, each parent's children share that distribution
reweighted by the two bytes above them, a ``q`` that depends on the path, which the proof
allows as it allows siblings):

- ``ranked_candidates``: a node's byte is a fixed rank of its depth's draft
  distribution, ``q`` the point mass on it. Then ``min(1, r(x)/1) = r(x)`` and the
  residual is ``r`` without ``x``: the step is "draw the byte from head 1, descend if
  it is a child", a child is accepted with probability ``p(x)`` whatever the draft
  heads believed, and they only pick which bytes are worth a node.
- ``sampled_candidates``: siblings drawn from the depth's draft distribution without
  replacement (Gumbel top-k); a child is accepted with ``min(1, r(x)/q(x))``, so a
  single child is accepted with probability ``sum(min(p, q))``, ordinary
  speculative sampling when the tree is a chain.

Sampled candidates accept more: where the draft head is close to head 1,
``sum(min(p, q))`` is near 1 while a ranked child gets only ``p`` of its byte. On the
``tiny`` model after 1000 of 2000 steps, over text positions (exact expectations from
``expected_accepted``, trees from ``best_shape`` in the tests), a tree of 15 accepts 1.36 drafts per
step at T = 0.8 and 1.40 at T = 1 with sampled candidates, 0.88 and 0.81 with ranked
ones, and the greedy tree of 15 1.04 at T = 0; a sampled chain of 7, 0.84 and 1.04.

Everything is fixed-shape tensor code over a batch of rows, with loops bounded by
static sizes only, and takes its random numbers as inputs: it can be compiled and
captured in a CUDA graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from bytemtp.decode.coupling import DraftContext, couple


class TreeVerdict(NamedTuple):
    """What ``verify_tree`` decided, per row.

    ``path`` [B, max_depth]: the accepted nodes (1..N, one per depth), 0 past ``length``
    [B]; ``next_byte`` [B]: the byte after them. ``accept_prob`` [B, N]: each node's
    acceptance probability once its parent is reached and its earlier siblings are
    rejected (the threshold its uniform is compared with); ``fallback`` [B, N+1, V]: the
    distribution the next byte is drawn from when verification stops at the root (0) or
    at a node. Both let a caller compute expected acceptance (``expected_accepted``).
    """

    path: torch.Tensor
    length: torch.Tensor
    next_byte: torch.Tensor
    accept_prob: torch.Tensor
    fallback: torch.Tensor


def sibling_slots(parent: torch.Tensor) -> torch.Tensor:
    """[B, N] parents (indices into ``[root, nodes]``) -> each node's place among its parent's children."""
    n = parent.shape[-1]
    same = parent[..., :, None] == parent[..., None, :]
    earlier = torch.ones(n, n, dtype=torch.bool, device=parent.device).tril(-1)
    return (same & earlier).sum(-1)


def children_table(parent: torch.Tensor, max_children: int) -> torch.Tensor:
    """[B, N] parents -> [B, N+1, max_children]: the children (1..N) of the root and of every node,
    in node order, 0 where there are fewer. A child past ``max_children`` is left out (it is
    then never verified, which keeps the output exact but wastes the node)."""
    b, n = parent.shape
    slot = sibling_slots(parent)
    dump = (n + 1) * max_children
    where = torch.where(slot < max_children, parent * max_children + slot, dump)
    table = parent.new_zeros(b, dump + 1)
    table.scatter_(1, where, torch.arange(1, n + 1, device=parent.device).expand(b, n))
    return table[:, :dump].view(b, n + 1, max_children)


def after_rejection(residual: torch.Tensor, mass: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The target after rejecting a candidate drawn from ``q``, unnormalised: ``max(0, r - |r| q)``,
    proportional to ``max(0, norm(r) - q)``. Without the clamp, or without subtracting ``q``,
    later siblings and the fallback draw would over-weight the rejected bytes."""
    return (residual - mass[..., None] * q).clamp_min(0)


def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table [B, M, V], index [B, K] -> [B, K, V]."""
    return table.gather(1, index[..., None].expand(*index.shape, table.shape[-1]))


def verify_tree(
    parent: torch.Tensor,
    tokens: torch.Tensor,
    draft_q: torch.Tensor,
    target_p: torch.Tensor,
    uniforms: torch.Tensor,
    max_depth: int,
    max_children: int | None = None,
) -> TreeVerdict:
    """Recursive rejection sampling down a draft tree (see the module docstring for the proof).

    Per row: ``parent`` [B, N] (into ``[root, nodes]``, a parent before its children;
    siblings are tried in node order), ``tokens`` [B, N] the nodes' bytes, ``draft_q``
    [B, N, V] the distribution each node's byte was drawn from given the siblings drawn
    before it (a point mass for a chosen byte; all zeros for a node left out),
    ``target_p`` [B, N+1, V] head 1's processed distribution at the root and after each
    node's path, ``uniforms`` [B, N+1] in [0, 1): entry i decides node i, entry 0 draws
    the next byte. ``max_depth`` >= the tree's depth; ``max_children`` >= any node's
    number of children (default N). Both are static, so the shapes never depend on values.
    """
    b, n = parent.shape
    v = target_p.shape[-1]
    # At least one slot, so that a tree of no nodes (a step at the very end of the cache) still walks.
    children = children_table(parent, max(1, n if max_children is None else max_children))
    # Index 0 of these stands for "no child": its q is zero, so it is never accepted and
    # rejecting it leaves the residual as it was.
    tokens_at = torch.cat((tokens.new_zeros(b, 1), tokens), dim=1)
    q_at = torch.cat((draft_q.new_zeros(b, 1, v), draft_q), dim=1)
    residual = target_p
    accept = target_p.new_zeros(b, n + 1)
    for slot in range(children.shape[-1]):  # every parent's slot-th child at once
        child = children[..., slot]  # [B, N+1]
        q = _gather_rows(q_at, child)
        x = tokens_at.gather(1, child)[..., None]
        mass = residual.sum(-1)
        scale = mass * q.gather(-1, x).squeeze(-1)
        r_x = residual.gather(-1, x).squeeze(-1)
        accept.scatter_(1, child, torch.where(scale > 0, r_x / scale, 0.0).clamp(max=1.0))
        rejected = after_rejection(residual, mass, q)
        # Everything rejected where the target was exactly q has probability zero; rounding can
        # still get there, and the target before is then as right as any.
        residual = torch.where(rejected.sum(-1, keepdim=True) > 0, rejected, residual)
    accept = torch.cat((accept.new_zeros(b, 1), accept[:, 1:]), dim=1)  # column 0 collected "no child"

    node = parent.new_zeros(b)
    alive = torch.ones(b, dtype=torch.bool, device=parent.device)
    path = []
    for _ in range(max_depth):
        kids = children.gather(1, node[:, None, None].expand(b, 1, children.shape[-1])).squeeze(1)
        ok = (uniforms.gather(1, kids) < accept.gather(1, kids)) & (kids > 0) & alive[:, None]
        alive = ok.any(dim=1)
        chosen = kids.gather(1, ok.int().argmax(dim=1, keepdim=True)).squeeze(1)  # the first accepted
        node = torch.where(alive, chosen, node)
        path.append(torch.where(alive, chosen, 0))
    path = torch.stack(path, dim=1) if path else parent.new_zeros(b, 0)

    final = _gather_rows(residual, node[:, None]).squeeze(1)  # [B, V]
    cdf = final.cumsum(-1)
    byte = (cdf <= uniforms[:, :1] * cdf[:, -1:]).sum(-1)
    last_possible = v - 1 - (final > 0).flip(-1).int().argmax(-1)  # rounding must not pick a 0-probability byte
    byte = torch.minimum(byte, last_possible)
    fallback = residual / residual.sum(-1, keepdim=True)
    return TreeVerdict(path, (path > 0).sum(1), byte, accept[:, 1:], fallback)


def expected_accepted(parent: torch.Tensor, accept_prob: torch.Tensor, max_depth: int) -> torch.Tensor:
    """[B] expected number of accepted nodes of a verification with these ``accept_prob`` (from
    ``verify_tree``): the sum over nodes of the probability the walk reaches them, which has
    no sampling noise, unlike the accepted length of one draw."""
    b, n = parent.shape
    children = children_table(parent, n)
    rejected = torch.cat((accept_prob.new_zeros(b, 1), 1 - accept_prob), dim=1)
    kept = rejected.gather(1, children.flatten(1)).view(b, n + 1, n)  # 1 - a of each slot's child
    before = torch.cat((kept.new_ones(b, n + 1, 1), kept.cumprod(-1)[..., :-1]), dim=-1)  # earlier siblings rejected
    given_parent = accept_prob.new_zeros(b, n + 1).scatter_(1, children.flatten(1), before.flatten(1))[:, 1:]
    given_parent = given_parent * accept_prob
    reach = torch.ones(b, n + 1, dtype=accept_prob.dtype, device=accept_prob.device)
    for _ in range(max_depth):
        reach = torch.cat((reach[:, :1], reach.gather(1, parent) * given_parent), dim=1)
    return reach[:, 1:].sum(1)


def ranked_candidates(
    draft_probs: torch.Tensor, depth: torch.Tensor, rank: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic candidates: node i holds the ``rank[i]``-th likeliest byte of its depth's
    draft distribution (``draft_probs`` [B, m, V], depth 1 = the first draft head; ties go to
    the lower byte) and is judged under the point mass on it. -> (tokens [B, N], q [B, N, V])."""
    order = draft_probs.sort(dim=-1, descending=True, stable=True).indices  # [B, m, V]
    tokens = order.flatten(1).gather(1, (depth - 1) * order.shape[-1] + rank)
    return tokens, torch.nn.functional.one_hot(tokens, draft_probs.shape[-1]).to(draft_probs.dtype)


def sampled_candidates(
    draft_probs: torch.Tensor,
    parent: torch.Tensor,
    depth: torch.Tensor,
    gumbel: torch.Tensor,
    root: torch.Tensor | None = None,
    before: torch.Tensor | None = None,
    context: DraftContext | None = None,
    max_depth: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled candidates: the children of each parent drawn from their depth's draft distribution
    (``draft_probs`` [B, m, V]) without replacement, as the top bytes of ``log q + g`` for
    standard Gumbel noise ``gumbel`` [B, N+1, V] (one row per parent, drawn beforehand). A
    child is judged under q without its earlier siblings' bytes, renormalised; a child past
    the support of q gets a zero q, so it is never accepted. -> (tokens [B, N], q [B, N, V]).

    With a draft ``context`` (``bytemtp.decode.coupling``), a parent's children are drawn from
    their q coupled to the parent's byte and the one above it (``root`` [B]: the root's byte,
    ``before`` [B] the one before the root). Those bytes are known depth by depth, so the draw
    runs ``max_depth`` (>= the tree's depth) times, each settling one more depth; the shapes
    stay static."""
    base = _gather_rows(draft_probs, depth - 1)  # [B, N, V]
    slot = sibling_slots(parent)[..., None]
    noise = _gather_rows(gumbel, parent)
    tokens = parent.new_zeros(parent.shape)
    if context is not None:  # [before, root, nodes]: each node's parent and grandparent there
        at_parent = parent + 1
        above = torch.cat((parent.new_zeros(parent.shape[0], 1), parent + 1), dim=1).gather(1, parent)
    for _ in range(max(1, max_depth) if context is not None else 1):
        q = base
        if context is not None:
            history = torch.cat((before[:, None], root[:, None], tokens), dim=1)
            q = couple(base, context, history.gather(1, above), history.gather(1, at_parent))
        order = (q.log() + noise).argsort(dim=-1, descending=True)
        tokens = order.gather(-1, slot).squeeze(-1)
    remaining = q * (order.argsort(dim=-1) >= slot)  # drop the bytes of earlier siblings
    mass = remaining.sum(-1, keepdim=True)
    return tokens, torch.where(mass > 0, remaining / mass, 0.0)
