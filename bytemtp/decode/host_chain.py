"""Eager chain decisions on the host: ``chain_decide``'s rules in two compiled calls.

Written as tensor code (``bytemtp.decode.verify``), a chain step's decision is some
50 operations on a handful of bytes when sampling and 20 when greedy. Eager on a CPU,
each pays a dispatch, and right after a forward (which has pushed their code and data
out of the caches) several microseconds of it: the decision cost a sampled step of the
``tiny`` model about 280 µs, a sixth of it (170 µs now). Eager steps are not captured in any graph, so
nothing is lost by deciding on the host instead (``bytemtp_native.chain_ops``): head
1's processed distributions (``probabilities``, the one place temperature, top-k and
top-p are applied) come over once, a sampled chain is verified by the host tree walk
(a chain is a tree with one child per node; ``bytemtp.decode.tree_sampling`` proves its
maths exact), and the next drafts are drawn by inverting their cumulative
distributions (each given the two bytes before it, with draft coupling). Same uniforms,
same rules, same bytes as the tensor code (tests compare the two; a draw can differ only
where its uniform falls within float32 rounding of a boundary of the cumulative
distribution, which the host sums in float64); compiled steps keep the tensor code, which
traces whole.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from bytemtp.decode.coupling import UNCOUPLED, HostContext
from bytemtp.decode.incontext import CONTEXT_PSEUDO, RowTexts
from bytemtp.decode.sampling import RowSampling, probabilities
from bytemtp.decode.verify import ChainRule, Uniforms
from bytemtp_native.chain_ops import chain_output, greedy_chain, sampled_chain

# no rows' texts: the count tables of chain_output
_NO_TABLES = (np.zeros((0, 0), np.int64), np.zeros((0, 0, 0), np.float32), np.zeros((0, 0), np.float32))
# the sampling arguments of a greedy step, and the draft distributions of a step that judges no drafts
_NONE, _NONE_2D = np.zeros((0, 0, 0), np.float32), np.zeros((0, 0), np.float32)


def host_chain_decide(
    model: torch.nn.Module,
    rule: ChainRule,
    n_drafts: int,
    logits: torch.Tensor,
    features: torch.Tensor,
    fed: torch.Tensor,
    n_valid: torch.Tensor,
    draft_probs: torch.Tensor | None,
    u: Uniforms | None,
    *,
    context: HostContext,
    texts: RowTexts | None = None,
    mixing: np.ndarray | None = None,
    n_rows: int | None = None,
    drafted: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``bytemtp.decode.step.chain_decide``, decided on the host: the same arguments and results,
    and ``context``, the rule's draft context as host arrays (``host_arrays``; ``ChainDrafts`` binds it once). With the
    rows' ``texts`` (``bytemtp.decode.incontext``), the decided bytes of its ``active`` rows are
    appended to them before drafting, and drafts are mixed with their counts at ``mixing`` [B]
    (each row's strength). ``n_rows``: ``logits`` and ``features`` are the first ``n_rows`` rows'
    only (the rest are parked): the decision is taken for those alone, and the results are theirs
    alone, [n_rows, ...], so that a lone row among many slots costs what a batch of one does.
    ``drafted``: only the first heads draft (``bytemtp.decode.drafting``); the other drafts and
    their distributions are zeros, never judged (the next step verifies ``drafted`` at most)."""
    if n_rows is not None:
        fed, n_valid, draft_probs, u, rule = _leading_rows(n_rows, fed, n_valid, draft_probs, u, rule)
        mixing = None if mixing is None else mixing[:n_rows]
    drafted = n_drafts if drafted is None else drafted
    ints, q = _decide(model, rule, drafted, logits, features, fed, n_valid, draft_probs, u, context, texts, mixing)
    if drafted < n_drafts:  # the heads left out: zero drafts (before the flag) and distributions
        ints = torch.cat((ints[:, :-1], ints.new_zeros(len(ints), n_drafts - drafted), ints[:, -1:]), dim=1)
        if not rule.sampling.greedy:  # none drafted: no distributions came back at all
            q = q if q is not None else torch.zeros(len(ints), 0, model.cfg.vocab, device=logits.device)
            q = torch.cat((q, q.new_zeros(len(ints), n_drafts - drafted, q.shape[2])), dim=1)
    return ints, q


def _leading_rows(n: int, fed: torch.Tensor, n_valid: torch.Tensor, draft_probs: torch.Tensor | None,
                u: Uniforms | None, rule: ChainRule) -> tuple:
    """A step's per-row arguments, of its first ``n`` rows."""
    def cut(s):
        return s.first(n) if isinstance(s, RowSampling) else s

    u = None if u is None else Uniforms(u.accept[:n], u.next[:n], u.drafts[:n])
    if isinstance(rule.sampling, RowSampling) or isinstance(rule.draft, RowSampling):
        rule = dataclasses.replace(rule, sampling=cut(rule.sampling), draft=cut(rule.draft))
    return fed[:n], n_valid[:n], None if draft_probs is None else draft_probs[:n], u, rule


def _decide(model, rule, n_drafts, logits, features, fed, n_valid, draft_probs, u, context, texts, mixing):
    """``host_chain_decide`` over every row of its arguments."""
    host_logits, host_fed, host_valid = (t.cpu().numpy() for t in (logits.float(), fed, n_valid))
    host_drafts = host_fed[:, 1:]
    greedy = rule.sampling.greedy
    if greedy:
        accepted, next_byte, broken = greedy_chain(host_logits, host_drafts, host_valid)
    else:
        p = probabilities(logits, rule.sampling).cpu().numpy()
        q = draft_probs.cpu().numpy() if draft_probs is not None else _NONE
        uniforms = u.accept.cpu().numpy(), u.next.cpu().numpy()
        accepted, next_byte, broken = sampled_chain(host_logits, p, host_drafts, host_valid, q, *uniforms)
    n = len(accepted)  # the first n rows of the texts' (a prefix is a view of each array)
    if texts is not None:
        texts.extend_step(texts.active[:n], host_fed, accepted, next_byte)
    tables = _NO_TABLES if texts is None else (texts.keys[:n], texts.counts[:n], texts.totals[:n])
    mixing = np.zeros(len(accepted)) if mixing is None or texts is None else mixing
    if not n_drafts:  # autoregressive: nothing to draft
        no_drafts = np.zeros((len(accepted), 0, 0), np.float32)
        out = chain_output(
            accepted, next_byte, broken, no_drafts, _NONE, _NONE_2D, True, host_fed, *UNCOUPLED, *_NO_TABLES, mixing, 1.0
        )
        return torch.from_numpy(out).to(logits.device), None
    rows, at, decided = (torch.from_numpy(x).to(features.device) for x in (np.arange(len(accepted)), accepted,
                                                                          next_byte))
    draft_logits = model.draft_logits(features[rows, at], n_drafts, decided)  # at each row's accepted position
    q = None if greedy else probabilities(draft_logits, rule.draft_sampling)
    host_q, u_drafts = (_NONE, _NONE_2D) if greedy else (q.cpu().numpy(), u.drafts[:, :n_drafts].cpu().numpy())
    out = chain_output(
        accepted, next_byte, broken, draft_logits.float().cpu().numpy(), host_q, u_drafts, greedy, host_fed, *context,
        *tables, mixing, CONTEXT_PSEUDO,
    )
    if (context[0].size or mixing.any()) and not greedy:  # host_q now holds the distributions the drafts were drawn from
        q = torch.from_numpy(host_q).to(logits.device)
    return torch.from_numpy(out).to(logits.device), q
