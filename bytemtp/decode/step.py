"""The decode step: one forward over ``[B, P]`` ids, verification and the next drafts, on the device.

A step is a pure function of its inputs (the ids, their cache slots and positions, the
random numbers drawn before it) apart from the KV cache it writes, and its shapes depend
only on (B, P), so it can be compiled once per (B, P) and captured in a CUDA graph. It
returns one small integer tensor per row (``StepOutput`` names its columns), read by the
host in one transfer for the whole batch; the few float tensors the next step needs
(sampling's draft distributions) stay on the device.

``P = 1 + drafts``: a chain step feeds ``[pending, d_1 .. d_k]`` (``chain_step``), a tree
step ``[pending, node_1 .. node_n]`` (``tree_step`` greedy, ``sampled_tree_step`` sampling,
which draws the nodes' bytes itself); ``P = 1`` is autoregressive decoding, the same code.
The first decision of a generation comes from the prompt's forward instead
(``chain_decide`` and ``tree_decide`` on its last position), which is why deciding is a
function of its own. Eager chain steps take that decision on the host instead
(``bytemtp.decode.host_chain``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bytemtp.decode.coupling import DraftContext
from bytemtp.decode.incontext import InContext
from bytemtp.decode.sampling import SamplingConfig, probabilities
from bytemtp.decode.tree_sampling import sampled_candidates, verify_tree
from bytemtp.decode.verify import ChainRule, Uniforms
from bytemtp.model.cache import first_rows

# What a chain step returns: the ``StepOutput`` tensor and the new drafts' distributions when sampling.
ChainOutput = tuple[torch.Tensor, torch.Tensor | None]

RANKS = 8  # runner-ups a tree considers per draft head: a head's 9th choice is right too rarely to pay for a node


def nonfinite(logits: torch.Tensor) -> torch.Tensor:
    """[B, ..., V] -> [B] bool: the row has a NaN or +inf logit (broken weights: report, never decode).
    The maximum of a position's logits is NaN or +inf exactly then (a logit of -inf is a byte
    ruled out, which is fine): one reduction instead of a test of every logit."""
    return ~torch.isfinite(logits.amax(dim=-1)).flatten(1).all(dim=1)


@dataclass
class StepOutput:
    """A chain step's integer tensor [B, 3 + m], read on the host: per row the number of drafts
    accepted, the next byte (head 1's, after them), the ``m`` new drafts, and a flag set when
    the logits were not finite."""

    accepted: list[int]
    next_byte: list[int]
    drafts: list[list[int]]
    broken: list[bool]

    @staticmethod
    def read(out: torch.Tensor) -> "StepOutput":
        rows = out.tolist()  # the step's one host transfer
        return StepOutput([r[0] for r in rows], [r[1] for r in rows], [r[2:-1] for r in rows], [r[-1] != 0 for r in rows])


def chain_decide(
    model: torch.nn.Module,
    rule: ChainRule,
    n_drafts: int,
    logits: torch.Tensor,
    features: torch.Tensor,
    fed: torch.Tensor,
    n_valid: torch.Tensor,
    draft_probs: torch.Tensor | None,
    u: Uniforms | None,
    counts: InContext | None = None,
) -> ChainOutput:
    """Verify the drafts of ``fed`` [B, P] (the pending byte, then the drafts; a prompt's forward:
    its last id) against head-1 ``logits`` [B, P, V] and draft the next block at the accepted
    position (``decode`` ``features`` [B, P, F, d]) -> (the ``StepOutput`` tensor, the new drafts'
    distributions when sampling)."""
    drafts = fed[:, 1:]
    accepted, next_byte = rule.verify(logits, drafts, n_valid, draft_probs, u)
    broken = nonfinite(logits)
    new, q = drafts.new_zeros(drafts.shape[0], 0), None
    if n_drafts:
        at = accepted[:, None, None, None].expand(-1, 1, *features.shape[2:])
        draft_logits = model.draft_logits(features.gather(1, at)[:, 0], n_drafts, next_byte)  # [B, m, V]
        new, q = rule.propose(draft_logits, u, fed.gather(1, accepted[:, None])[:, 0], next_byte, counts)
        broken = broken | nonfinite(draft_logits)
    out = torch.cat((accepted[:, None], next_byte[:, None], new, broken[:, None].long()), dim=1)
    return out, q


def chain_step(
    model: torch.nn.Module,
    rule: ChainRule,
    n_drafts: int,
    ids: torch.Tensor,
    input_pos: torch.Tensor,
    n_valid: torch.Tensor,
    draft_probs: torch.Tensor | None,
    u: Uniforms | None,
    kv_len: int | None = None,
    decide: Callable[..., ChainOutput] | None = None,
    counts: InContext | None = None,
    rows: list[int] | None = None,
) -> ChainOutput:
    """Forward ``[pending, drafts]`` (``ids`` [B, P]) at cache slots ``input_pos`` [B, P] and decide
    (``decide``, with ``chain_decide``'s arguments and results; default ``chain_decide``, which
    traces whole, weighing drafts by the rows' in-context ``counts`` when given; eager steps pass
    ``bytemtp.decode.host_chain.host_chain_decide``, which reads the rows' texts on the host).
    ``kv_len``, ``rows``: eager steps read only the cache slots in use and compute only the live rows
    (``Batch.extent``); when those are the first rows, ``decide`` decides for them alone too
    (``n_rows``), as a batch of that many would."""
    n_rows = first_rows(rows) if decide is not None else None
    logits, features = model.decode(ids, input_pos, n_drafts + 1, kv_len=kv_len, rows=rows, spread=n_rows is None)
    if decide is not None:
        first = {} if n_rows is None else {"n_rows": n_rows}
        return decide(model, rule, n_drafts, logits, features, ids, n_valid, draft_probs, u, **first)
    return chain_decide(model, rule, n_drafts, logits, features, ids, n_valid, draft_probs, u, counts)


def tree_decide(
    model: torch.nn.Module,
    n_drafts: int,
    logits: torch.Tensor,
    choice: torch.Tensor,
    features: torch.Tensor,
    at: torch.Tensor,
) -> torch.Tensor:
    """Head 1's ``choice`` at every position (``logits.argmax(-1)``) and each draft head's
    ``RANKS`` likeliest bytes at position ``at`` [B] (the accepted node, ``accepted_node``):
    [B, P + m * RANKS + 1], the last column the non-finite flag. The host walks the same
    accepted path (``bytemtp.decode.tree``) and shapes the next tree from these rankings."""
    next_byte = choice.gather(1, at[:, None])[:, 0]
    at = at[:, None, None, None].expand(-1, 1, *features.shape[2:])
    draft_logits = model.draft_logits(features.gather(1, at)[:, 0], n_drafts, next_byte)  # [B, m, V]
    ranked = draft_logits.topk(RANKS, dim=-1).indices.flatten(1)
    broken = nonfinite(logits) | nonfinite(draft_logits)
    return torch.cat((choice, ranked, broken[:, None].long()), dim=1)


def accepted_node(
    ids: torch.Tensor, choice: torch.Tensor, input_pos: torch.Tensor, rope_pos: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The deepest node of each row's greedy tree whose whole path head 1 agrees with -> [B]
    (0: the root, the pending byte). The tree's structure is read off the forward's own
    inputs: node k is an ancestor of node j (or j itself) when j attends to k's cache slot,
    and a node's depth is its RoPE position past the root's. A few tensor ops on [B, P, P],
    so the draft heads run at that one node instead of at every position."""
    P = ids.shape[1]
    above = mask.gather(2, input_pos[:, None, :].expand(-1, P, -1))  # [B, P, P]: k is j or above it
    depth = rope_pos - rope_pos[:, :1]
    parent = (above & (depth[:, None, :] == depth[:, :, None] - 1)).long().argmax(dim=-1)  # root: 0
    agrees = (ids == choice.gather(1, parent)) | (depth == 0)  # its byte is head 1's choice after its parent
    accepted = ~(above & ~agrees[:, None, :]).any(dim=-1)
    return (accepted * (depth + 1)).argmax(dim=-1)  # siblings hold distinct bytes: one per depth


def tree_forward(
    model: torch.nn.Module,
    n_drafts: int,
    ids: torch.Tensor,
    input_pos: torch.Tensor,
    rope_pos: torch.Tensor,
    mask: torch.Tensor,
    move_src: torch.Tensor | None,
    move_dst: torch.Tensor | None,
    kv_len: int | None = None,
    rows: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the previous step's accepted paths into place in the cache (``move_src`` ->
    ``move_dst`` [B, m]; None: no row moves, an eager step skips the copy), then forward
    ``[pending, nodes]`` with the tree's RoPE positions and mask -> ``decode``'s head-1 logits
    and draft features at every position."""
    if move_src is not None:
        model.move_cache(move_src, move_dst)
    return model.decode(ids, input_pos, n_drafts + 1, rope_pos, mask, kv_len, rows)


def tree_step(
    model: torch.nn.Module,
    n_drafts: int,
    ids: torch.Tensor,
    input_pos: torch.Tensor,
    rope_pos: torch.Tensor,
    mask: torch.Tensor,
    move_src: torch.Tensor | None,
    move_dst: torch.Tensor | None,
    kv_len: int | None = None,
    rows: list[int] | None = None,
) -> torch.Tensor:
    """Forward a tree (``tree_forward``) and decide greedily (``tree_decide``, drafting at the
    ``accepted_node``)."""
    logits, features = tree_forward(
        model, n_drafts, ids, input_pos, rope_pos, mask, move_src, move_dst, kv_len, rows
    )
    choice = logits.argmax(dim=-1)
    at = accepted_node(ids, choice, input_pos, rope_pos, mask)
    return tree_decide(model, n_drafts, logits, choice, features, at)


def sampled_tree_decide(
    model: torch.nn.Module,
    sampling: SamplingConfig,
    n_drafts: int,
    logits: torch.Tensor,
    features: torch.Tensor,
    parent: torch.Tensor,
    tokens: torch.Tensor,
    node_q: torch.Tensor,
    uniforms: torch.Tensor,
    max_depth: int,
    max_children: int | None = None,
    draft_sampling: SamplingConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify a tree of sampled drafts (``parent``, ``tokens`` [B, N], each drawn from ``node_q``
    [B, N, V]) against head 1's ``logits`` [B, N+1, V] by recursive rejection sampling
    (``bytemtp.decode.tree_sampling.verify_tree``, with ``uniforms`` [B, N+1]), and draft at the
    node it stops at -> (ints [B, N + max_depth + 3 + m * RANKS]: the tokens, the accepted path,
    its length, the next byte, the draft heads' ``RANKS`` likeliest bytes there (the host's rank
    statistics learn from them), the non-finite flag; and the new draft distributions [B, m, V],
    processed by ``draft_sampling`` (default: ``sampling``))."""
    p = probabilities(logits, sampling)
    verdict = verify_tree(parent, tokens, node_q, p, uniforms, max_depth, max_children)
    last = verdict.path.gather(1, (verdict.length - 1).clamp_min(0)[:, None])[:, 0] if max_depth else verdict.length
    at = last[:, None, None, None].expand(-1, 1, *features.shape[2:])
    draft_logits = model.draft_logits(features.gather(1, at)[:, 0], n_drafts, verdict.next_byte)  # [B, m, V]
    q = probabilities(draft_logits, draft_sampling or sampling)
    ranked = q.topk(RANKS, dim=-1).indices.flatten(1)
    broken = nonfinite(logits) | nonfinite(draft_logits)
    columns = (tokens, verdict.path, verdict.length[:, None], verdict.next_byte[:, None], ranked, broken[:, None])
    return torch.cat([c.long() for c in columns], dim=1), q


def sampled_tree_step(
    model: torch.nn.Module,
    sampling: SamplingConfig,
    n_drafts: int,
    max_depth: int,
    ids: torch.Tensor,
    input_pos: torch.Tensor,
    rope_pos: torch.Tensor,
    mask: torch.Tensor,
    move_src: torch.Tensor,
    move_dst: torch.Tensor,
    parent: torch.Tensor,
    depth: torch.Tensor,
    draft_probs: torch.Tensor,
    noise: torch.Tensor,
    before: torch.Tensor,
    kv_len: int | None = None,
    max_children: int | None = None,
    draft_sampling: SamplingConfig | None = None,
    context: DraftContext | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the previous accepted path into place, draw the tree's bytes (siblings from their
    depth's ``draft_probs`` [B, m, V] without replacement, by the Gumbel trick; with a draft
    ``context``, coupled to their parent's and grandparent's bytes, ``before`` [B] being the byte
    before the root), forward ``[pending, nodes]`` (``ids[:, 0]`` the pending byte) and verify
    (``sampled_tree_decide``).

    ``noise`` [B, N+1, V+1]: uniforms drawn before the step, per parent a row of Gumbel
    noise and, in the last column, the number that judges node i (0: draws the next byte)."""
    gumbel = -torch.log(-torch.log(noise[..., :-1]))
    tokens, node_q = sampled_candidates(draft_probs, parent, depth, gumbel, ids[:, 0], before, context, max_depth)
    ids = torch.cat((ids[:, :1], tokens), dim=1)
    logits, features = tree_forward(model, n_drafts, ids, input_pos, rope_pos, mask, move_src, move_dst, kv_len)
    return sampled_tree_decide(
        model, sampling, n_drafts, logits, features, parent, tokens, node_q, noise[..., -1], max_depth, max_children,
        draft_sampling,
    )
