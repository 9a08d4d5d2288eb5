"""Tree speculative sampling driven by a trained model's heads samples what autoregressive sampling does.

Monte Carlo, so marked slow: 20,000 four-byte continuations of one prompt drawn
with ``verify_tree`` on trees shaped by ``best_shape`` (ranked and sampled
candidates, the latter also coupled to the bytes before them) and on chains looked up in each
row's own text (``bytemtp.decode.incontext``: the bytes that followed its last two bytes
earlier in it, judged by point masses; the heads' ranked bytes where it has no match),
20,000 drawn autoregressively from head 1, and a two-sample
chi-square test per byte position, Bonferroni-corrected over the positions. The
exact, analytic check is ``test_tree_sampling``; this one shows the pieces agree
with a real model's heads (processed distributions over 257 ids, top-k, BOS).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bytemtp import BOS
from bytemtp.decode.coupling import DraftContext, draft_context
from bytemtp.decode.sampling import SamplingConfig, probabilities
from bytemtp.decode.tree_sampling import ranked_candidates, sampled_candidates, verify_tree
from tree_shape import best_shape, rank_log_probs
from bytemtp.model.transformer import ByteMTP
from bytemtp_native.context_ops import lookup
from fixtures_train import trained_model

N_ROWS = 20_000
N_BYTES = 4
PROMPT = b"    'Alpha;': '"  # html/entities.py, the text the fixture model learnt
ALPHA = 1e-3  # family-wise, over the positions


class PrefixOracle:
    """Head 1's and the first ``n_drafts`` draft heads' processed distributions (float64) after
    BOS + prompt + a path of bytes, computed once per path: rows sampling the same prefix share
    one forward."""

    def __init__(self, model: ByteMTP, prompt: bytes, cfg: SamplingConfig, n_drafts: int):
        self.model, self.prompt, self.cfg, self.n_drafts = model, [BOS, *prompt], cfg, n_drafts
        self.memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, paths: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> head 1's [len(paths), V] and the draft heads' [len(paths), n_drafts, V]."""
        missing = sorted({z for z in paths if z not in self.memo}, key=len)
        for _, same_length in itertools.groupby(missing, key=len):
            group = list(same_length)
            for start in range(0, len(group), 4096):
                chunk = group[start : start + 4096]
                z = self.model.trunk(torch.tensor([self.prompt + list(path) for path in chunk]))[:, -1:]
                logits = torch.cat([self.model.head_logits(z, k) for k in range(1 + self.n_drafts)], dim=1)
                probs = probabilities(logits, self.cfg).double()
                probs = probs / probs.sum(-1, keepdim=True)
                self.memo.update((path, (p[0], p[1:])) for path, p in zip(chunk, probs))
        p, q = zip(*(self.memo[z] for z in paths))
        return torch.stack(p), torch.stack(q)


def autoregressive(oracle: PrefixOracle, gen: torch.Generator) -> torch.Tensor:
    out = torch.empty(N_ROWS, 0, dtype=torch.long)
    for _ in range(N_BYTES):
        p, _ = oracle([tuple(row) for row in out.tolist()])
        out = torch.cat((out, torch.multinomial(p, 1, generator=gen)), dim=1)
    return out


def speculative(
    oracle: PrefixOracle, n_rows: int, n_nodes: int, sampled: bool | str, gen: torch.Generator, context=None
) -> tuple[torch.Tensor, float]:
    """``N_BYTES`` per row by tree steps -> (the bytes [n_rows, N_BYTES], mean accepted drafts per step).
    ``context``: sampled candidates coupled to the bytes before them (``bytemtp.decode.coupling``);
    ``sampled="lookup"``: a chain looked up in each row's text (``looked_up_chain``)."""
    rows: list[tuple] = [()] * n_rows
    accepted, steps = 0, 0
    while any(len(row) < N_BYTES for row in rows):
        live = [i for i, row in enumerate(rows) if len(row) < N_BYTES]
        ctx = [rows[i] for i in live]
        p_root, q = oracle(ctx)
        b, v = len(live), q.shape[-1]
        shape = best_shape(rank_log_probs(q, 8), n_nodes)
        if sampled == "lookup":  # a chain as long as the heads reach
            n_nodes = oracle.n_drafts
            shape = chain_shape(b, n_nodes)
            tokens, q_nodes = looked_up_chain(q, [(BOS, *PROMPT, *c) for c in ctx], oracle.n_drafts)
        elif sampled:
            gumbel = -(-torch.rand(b, n_nodes + 1, v, generator=gen, dtype=torch.float64).log()).log()
            history = [(*PROMPT, *c) for c in ctx]
            root, before = (torch.tensor([h[i] for h in history]) for i in (-1, -2))  # the tree's root and before it
            coupled = {} if context is None else {
                "root": root, "before": before, "context": context, "max_depth": oracle.n_drafts,
            }
            tokens, q_nodes = sampled_candidates(q, shape.parent, shape.depth, gumbel, **coupled)
        else:
            tokens, q_nodes = ranked_candidates(q, shape.depth, shape.rank)
        paths = [[c] for c in ctx]
        for r, (parents, bytes_) in enumerate(zip(shape.parent.tolist(), tokens.tolist())):
            for a, x in zip(parents, bytes_):
                paths[r].append(paths[r][a] + (x,))
        p_nodes, _ = oracle([z for row in paths for z in row[1:]])
        target = torch.cat((p_root[:, None], p_nodes.view(b, n_nodes, v)), dim=1)
        uniforms = torch.rand(b, n_nodes + 1, generator=gen, dtype=torch.float64)
        most_children = torch.nn.functional.one_hot(shape.parent, n_nodes + 1).sum(1).max().item()
        verdict = verify_tree(shape.parent, tokens, q_nodes, target, uniforms, oracle.n_drafts, most_children)
        for r, i in enumerate(live):
            end = verdict.path[r, verdict.length[r] - 1].item() if verdict.length[r] else 0
            rows[i] = paths[r][end] + (verdict.next_byte[r].item(),)
        accepted, steps = accepted + verdict.length.sum().item(), steps + b
    return torch.tensor([row[:N_BYTES] for row in rows]), accepted / steps


def chain_shape(b: int, n: int):
    """The shape of a chain of ``n`` nodes, ``best_shape``'s fields."""
    line = torch.arange(n).expand(b, n)
    return type("Chain", (), {"parent": line, "depth": line + 1, "rank": torch.zeros_like(line)})


def looked_up_chain(q: torch.Tensor, texts: list[tuple], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``n`` bytes that followed its text's last two bytes where they occurred before
    (the production lookup, ``bytemtp_native.context_ops.lookup``), or the heads' top bytes where
    they did not: chosen either way, so each is judged by the point mass on it."""
    history = np.zeros((len(texts), max(map(len, texts))), np.int64)
    for r, t in enumerate(texts):
        history[r, : len(t)] = t
    lengths = np.array([len(t) for t in texts])
    tokens = q.argmax(-1)
    out = np.zeros(n, np.int64)
    for r in range(len(texts)):
        if lookup(history, lengths, r, 2, n, out):
            tokens[r] = torch.from_numpy(out)
    return tokens, torch.nn.functional.one_hot(tokens, q.shape[-1]).double()


def two_sample_p_value(a: torch.Tensor, b: torch.Tensor) -> float:
    """Chi-square test that two equally many samples of ids come from one distribution; ids seen
    fewer than 10 times in both together share one bin (dropped if still under 10)."""
    ids, pooled = torch.cat((a, b)).unique(return_counts=True)
    count_a = (a[:, None] == ids).sum(0)
    rare = pooled < 10
    table = torch.stack((count_a, pooled - count_a), dim=1).double()
    table = torch.cat((table[~rare], table[rare].sum(0, keepdim=True)))
    table = table[table.sum(1) >= 10]
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    dof = torch.tensor(table.shape[0] - 1.0, dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, stat / 2).item()


@pytest.mark.slow
@pytest.mark.parametrize(
    "candidates,cfg",
    [
        ("ranked", SamplingConfig(temperature=1.0)),
        ("sampled", SamplingConfig(temperature=0.8, top_k=16)),
        ("coupled", SamplingConfig(temperature=1.0)),
        ("lookup", SamplingConfig(temperature=0.8)),
    ],
    ids=["ranked-T=1", "sampled-T=0.8-top-k=16", "sampled-coupled-T=1", "looked-up-T=0.8"],
)
def test_tree_sampling_matches_autoregressive(candidates, cfg):
    model = trained_model()
    oracle = PrefixOracle(model, PROMPT, cfg, n_drafts=3)
    gen = torch.Generator().manual_seed(0)
    reference = autoregressive(oracle, gen)
    context = None
    if candidates == "coupled":
        context = draft_context(model.byte_trigrams, 0.7, model.cfg.vocab)
        context = DraftContext(context.index, context.weights.double())
    # in blocks of rows: a step's tensors are [rows, nodes, 257] floats
    sampled = "lookup" if candidates == "lookup" else candidates != "ranked"
    blocks = [speculative(oracle, 2000, 7, sampled, gen, context) for _ in range(N_ROWS // 2000)]
    tree = torch.cat([samples for samples, _ in blocks])
    mean_accepted = sum(accepted for _, accepted in blocks) / len(blocks)
    assert mean_accepted > 0.25  # the drafts are doing something: the test is not autoregressive sampling twice
    p_values = [two_sample_p_value(tree[:, k], reference[:, k]) for k in range(N_BYTES)]
    assert min(p_values) > ALPHA / N_BYTES, p_values
