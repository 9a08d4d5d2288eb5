"""A chain step's decision on the host, in two compiled calls (see ``bytemtp.decode.host_chain``).

The same rules as ``bytemtp.decode.verify``'s tensor code. Between a CPU forward and
the next, every framework or NumPy operation costs several microseconds (the forward
has just pushed their code and data out of the caches), so a decision made of 20 to
50 of them costs more than the rules themselves: here it is one call before the draft
heads run and one after.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from bytemtp_native.context_ops import apply_context, pair_slot
from bytemtp_native.tree_sampling_ops import draw_byte, nonfinite_rows, walk_tree


@njit(cache=True)
def greedy_chain(logits: np.ndarray, drafts: np.ndarray, n_valid: np.ndarray):
    """Per row, the drafts accepted while each equals head 1's argmax (the first of tied maxima,
    as ``torch.argmax``) among the first ``n_valid``, and head 1's choice after them.
    ``logits`` [B, P, V], ``drafts`` [B, P-1] -> (accepted [B], next byte [B], non-finite [B])."""
    n_rows = logits.shape[0]
    accepted, next_byte = np.zeros(n_rows, np.int64), np.zeros(n_rows, np.int64)
    for b in range(n_rows):
        a = 0
        while True:
            choice = np.argmax(logits[b, a])
            if a < n_valid[b] and choice == drafts[b, a]:
                a += 1
            else:
                break
        accepted[b], next_byte[b] = a, choice
    return accepted, next_byte, nonfinite_rows(logits)


@njit(cache=True)
def sampled_chain(logits, p: np.ndarray, drafts: np.ndarray, n_valid: np.ndarray, q: np.ndarray, u_accept, u_next):
    """Per row, speculative sampling of the first ``n_valid`` drafts (each drawn from its ``q``
    [B, P-1, V]) against head 1's distributions ``p`` [B, P, V] (its ``logits`` processed):
    the walk down a chain (a tree with one child per node), judged by ``u_accept`` [B, P-1],
    the next byte drawn at ``u_next`` [B] -> (accepted [B], next byte [B], non-finite [B])."""
    n_rows = p.shape[0]
    accepted, next_byte = np.zeros(n_rows, np.int64), np.zeros(n_rows, np.int64)
    uniforms = np.zeros(drafts.shape[1] + 1, u_accept.dtype)
    for b in range(n_rows):
        n = n_valid[b]
        uniforms[0] = u_next[b]
        uniforms[1 : n + 1] = u_accept[b, :n]
        chain = np.arange(n)  # node i+1's parent is node i
        _, accepted[b], next_byte[b] = walk_tree(chain, drafts[b, :n], q[b, :n], p[b, : n + 1], uniforms[: n + 1], n)
    return accepted, next_byte, nonfinite_rows(logits)


@njit(cache=True)
def chain_output(
    accepted, next_byte, broken, draft_logits, q, u_drafts, greedy: bool, fed, index, weights, keys, counts, totals,
    mixing: np.ndarray, pseudo: float,
) -> np.ndarray:
    """The step's integer rows [B, 3 + m] (``StepOutput``'s columns): the verdicts, the next drafts
    (greedy: each draft head's argmax in ``draft_logits`` [B, m, V]; else drawn from ``q`` at
    ``u_drafts`` [B, m]) and the non-finite flag, raised by the draft heads' logits too.
    With a draft context (``index`` [V, V], ``weights`` [R, V]; [0, 0] each: uncoupled), each
    draft follows the two bytes before it (the accepted run's last byte of ``fed`` [B, P], the
    next byte, then the drafts): greedy, it is the argmax of its logits plus the log-weights
    after them; sampled, it is drawn from its ``q`` times those weights, renormalised, and ``q``
    is overwritten by those distributions (the next step judges the drafts by them). Where a
    row's ``mixing`` [B] is above 0, its weights are multiplied by each row's in-context factor after the two
    bytes (``bytemtp_native.context_ops.apply_context`` on the row's counts ``keys``, ``counts``,
    ``totals``), which the row's text makes more than 1 only after pairs it has had."""
    n_rows, m = draft_logits.shape[0], draft_logits.shape[1]
    out = np.zeros((n_rows, 3 + m), np.int64)
    flags = broken | nonfinite_rows(draft_logits)
    coupled = index.shape[0] > 0
    w = np.ones(draft_logits.shape[2], np.float32)
    for b in range(n_rows):
        out[b, 0], out[b, 1], out[b, 2 + m] = accepted[b], next_byte[b], flags[b]
        before, after = fed[b, accepted[b]], next_byte[b]
        for j in range(m):
            weighed = coupled
            if coupled:
                w[:] = weights[index[before, after]]
            if mixing[b] > 0:
                if not coupled:
                    w[:] = 1
                slot = pair_slot(keys, b, before, after)
                weighed |= apply_context(w, counts, totals, b, slot, pseudo, mixing[b])
            if greedy and weighed:  # the likeliest byte of the head's distribution times the weights
                draft = np.argmax(draft_logits[b, j] + np.log(w))
            elif greedy:
                draft = np.argmax(draft_logits[b, j])
            else:
                if weighed:
                    row = q[b, j]
                    row *= w
                    row /= row.sum()
                draft = draw_byte(q[b, j], u_drafts[b, j])
            before, after = after, draft
            out[b, 2 + j] = draft
    return out
