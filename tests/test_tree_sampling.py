"""Tree speculative sampling is exact: the law of a step's output, computed in closed form.

A made-up model gives head 1's processed distribution after every path and the
draft heads' per depth (or per path), from seeded random logits. For a tree
shape, every draft outcome is enumerated with its probability. ``verify_tree`` is
a threshold test of each uniform against a probability it reports
(``accept_prob``, ``fallback``), so the uniforms' cube splits into cells, one per
(node where the walk stops, next byte), whose volumes are products of those
thresholds. The real function is evaluated inside every cell (near both ends and
in the middle of each coordinate's interval) and must return that cell's path and
byte; the cells' volumes then give the exact probability of every output. The
output followed by autoregressive sampling must have the law of autoregressive
sampling (that is what makes generation exact, step after step): every byte
sequence of the horizon's length must have the product of head 1's conditionals
as probability, to 1e-9 in float64. Planted-bias mutants must break that identity.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from bytemtp.decode import tree_sampling
from bytemtp.decode.coupling import DraftContext, couple
from bytemtp.decode.sampling import SamplingConfig, probabilities
from bytemtp.decode.step import nonfinite
from bytemtp.decode.tree_sampling import expected_accepted, ranked_candidates, sampled_candidates, verify_tree
from tree_shape import best_shape, rank_log_probs
from bytemtp_native.tree_sampling_ops import draw_children, nonfinite_rows, top_ranks, walk_tree

CHAIN7 = [0, 1, 2, 3, 4, 5, 6]
BUSH = [0, 0, 0, 1, 1, 2]  # three children at the root, two below the first
DEEP = [0, 0, 1, 1, 3, 5]  # two branches, one three deep
PROBES = (0.001, 0.5, 0.999)  # where in each coordinate's interval the function is evaluated


class MadeUpModel:
    """Processed distributions over ``v`` symbols from seeded random logits: head 1's after every
    path shorter than ``horizon``, the draft head's of each depth (after every path too if
    ``path_q``). Integer logits make ties (for top-k). All of a kind go through ``probabilities``
    in one call."""

    def __init__(self, v: int, cfg: SamplingConfig, seed: int, horizon: int, ties=False, path_q=False, coupling=None):
        self.v, self.path_q = v, path_q
        self.coupling = coupling  # (DraftContext, byte before the root, root byte): drafts follow the bytes before
        prefixes = [z for n in range(horizon) for z in itertools.product(range(v), repeat=n)]
        self.index = {z: i for i, z in enumerate(prefixes)}
        rng = np.random.default_rng(seed)
        shape = (1 + 2 * horizon, len(prefixes), v)  # head 1, the draft heads, the draft heads a step earlier
        logits = torch.tensor(rng.integers(-2, 3, shape) if ties else rng.normal(0.0, 1.5, shape), dtype=torch.float64)
        p = probabilities(logits, cfg).double()
        self.tables = (p / p.sum(-1, keepdim=True)).unbind(0)
        self.raw = logits.softmax(-1).unbind(0)

    def target(self, prefix: tuple) -> torch.Tensor:
        return self.tables[0][self.index[prefix]]

    def _at(self, depth: int, prefix: tuple) -> int:
        return self.index[prefix if self.path_q else ()]

    def draft(self, depth: int, prefix: tuple) -> torch.Tensor:
        q = self.tables[depth][self._at(depth, prefix)]
        if self.coupling is None:
            return q
        context, *start = self.coupling
        a, b = (*start, *prefix)[-2:]
        return couple(q, context, torch.tensor(a), torch.tensor(b))

    def stale_draft(self, depth: int, prefix: tuple) -> torch.Tensor:
        """The draft head's distribution one step earlier (another context): a mutant's q."""
        return self.tables[len(self.tables) // 2 + depth][self._at(depth, prefix)]

    def raw_draft(self, depth: int, prefix: tuple) -> torch.Tensor:
        """The draft head's softmax without temperature, top-k, top-p: a mutant's q."""
        return self.raw[depth][self._at(depth, prefix)]


def children_of(parent: list[int]) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in range(len(parent) + 1)]
    for i, a in enumerate(parent, start=1):
        kids[a].append(i)
    return kids


def depths(parent: list[int]) -> list[int]:
    d = [0]
    for a in parent:
        d.append(d[a] + 1)
    return d[1:]


def enumerate_drafts(model, parent, rank, sampled, judge=None, keep=None, chosen=None, chosen_judge=None):
    """Every draft outcome: (probability, tokens [N], q rows the verifier is given [N, V]).

    Ranked: node i holds the ``rank[i-1]``-th likeliest byte of its q. Sampled: each parent's
    children are drawn from q without replacement (children past its support get q = 0).
    ``chosen``: node -> a function of its path's bytes giving its byte (a lookup draft, which
    must come before its sampled siblings): judged by the point mass on it, its byte then taken
    from the siblings' q. ``judge(depth, prefix)`` replaces the q the verifier sees,
    ``keep(q, byte)`` = False drops a drafted node (q = 0), ``chosen_judge(q, byte)`` replaces a
    chosen node's point mass: all three are mutants. Parents are visited in order, so a
    path-dependent q is known when its parent's byte is."""
    chosen = chosen or {}
    n, v, kids, depth = len(parent), model.v, children_of(parent), depths(parent)
    judge = judge or model.draft

    def expand(a, weight, tokens, rows):
        if a > n:
            yield weight, tokens, rows
            return
        ch = kids[a]
        if not ch:
            yield from expand(a + 1, weight, tokens, rows)
            return
        prefix = path_bytes(parent, tokens, a)
        q, q_judge = model.draft(depth[ch[0] - 1], prefix), judge(depth[ch[0] - 1], prefix)
        order = sorted(range(v), key=lambda x: (-q[x].item(), x))
        looked_up = tuple(chosen[c](prefix) for c in ch if c in chosen)
        assert all(c in chosen for c in ch[: len(looked_up)]) and len(set(looked_up)) == len(looked_up)
        if not sampled:
            options = [(1.0, looked_up + tuple(order[rank[c - 1]] for c in ch[len(looked_up) :]))]
        else:
            support = [x for x in range(v) if q[x] > 0 and x not in looked_up]
            options = []
            for pick in itertools.permutations(support, min(len(ch) - len(looked_up), len(support))):
                w, left = 1.0, 1.0 - sum(q[x].item() for x in looked_up)
                for x in pick:
                    w, left = w * q[x].item() / left, left - q[x].item()
                options.append((w, looked_up + pick))
        for w, pick in options:
            t, r = dict(tokens), dict(rows)
            taken = list(looked_up)
            for c, x in itertools.zip_longest(ch, pick):
                row = torch.zeros(v, dtype=torch.float64)
                if x is not None and c in chosen:
                    row[x] = 1.0
                    if chosen_judge is not None:
                        row = chosen_judge(q_judge, x)
                elif x is not None and not sampled:
                    row[x] = 1.0
                elif x is not None:
                    row = q_judge.clone()
                    row[taken] = 0.0
                    row = row / row.sum()
                    taken.append(x)
                if x is not None and keep is not None and not keep(q, x):
                    row = torch.zeros(v, dtype=torch.float64)
                t[c], r[c] = (0 if x is None else x), row
            yield from expand(a + 1, weight * w, t, r)

    for weight, tokens, rows in expand(0, 1.0, {}, {}):
        yield weight, [tokens[i] for i in range(1, n + 1)], torch.stack([rows[i] for i in range(1, n + 1)])


def path_bytes(parent: list[int], tokens, node: int) -> tuple:
    """The bytes from the root down to ``node`` (0: the root, an empty path)."""
    out = []
    while node:
        out.append(tokens[node] if isinstance(tokens, dict) else tokens[node - 1])
        node = parent[node - 1]
    return tuple(reversed(out))


def production_candidates(model, parent, rank, sampled, drafts):
    """The same outcomes built by ``ranked_candidates`` / ``sampled_candidates`` (q path-independent or
    coupled to the byte before): sampled ones from Gumbel noise chosen so that each parent's
    children come out as drafted."""
    n, v, b = len(parent), model.v, len(drafts)
    depth = torch.tensor(depths(parent)).expand(b, n)
    probs = torch.stack([model.tables[d][0] for d in range(1, max(depths(parent)) + 1)]).expand(b, -1, -1)
    if not sampled:
        return ranked_candidates(probs, depth, torch.tensor(rank).expand(b, n))
    gumbel = torch.zeros(b, n + 1, v, dtype=torch.float64)
    tokens = torch.tensor([d[1] for d in drafts])
    live = torch.stack([d[2] for d in drafts]).sum(-1) > 0
    for a, ch in enumerate(children_of(parent)):
        if ch:
            q = torch.stack([model.draft(depths(parent)[ch[0] - 1], path_bytes(parent, t, a)) for t in tokens.tolist()])
            key = torch.full((b, v), -float(v + 1), dtype=torch.float64)
            for j, c in enumerate(ch):
                key[live[:, c - 1], tokens[live[:, c - 1], c - 1]] = -float(j)
            gumbel[:, a] = torch.where(q > 0, key - q.log(), 0.0)
    coupled = {}
    if model.coupling is not None:
        context, before, root = model.coupling
        coupled = {"root": torch.full((b,), root), "before": torch.full((b,), before), "context": context,
                   "max_depth": max(depths(parent))}
    return sampled_candidates(probs, torch.tensor(parent).expand(b, n), depth, gumbel, **coupled)


def output_law(
    model, parent, rank, sampled, judge=None, keep=None, probe=True, chosen=None, chosen_judge=None
) -> dict[tuple, float]:
    """Exact probability of every output (accepted bytes, then the next byte) of one verification step.

    With ``probe``, ``verify_tree`` is also evaluated inside every cell and must return the
    cell's walk, and ``expected_accepted`` must give the law's mean accepted length."""
    n, kids, max_depth = len(parent), children_of(parent), max(depths(parent))
    drafts = list(enumerate_drafts(model, parent, rank, sampled, judge, keep, chosen, chosen_judge))
    b = len(drafts)
    weight = torch.tensor([d[0] for d in drafts], dtype=torch.float64)
    tokens = torch.tensor([d[1] for d in drafts])
    rows = torch.stack([d[2] for d in drafts])
    if judge is None and keep is None and not chosen and not model.path_q:  # production code draws these too
        made_tokens, made_rows = production_candidates(model, parent, rank, sampled, drafts)
        live = rows.sum(-1) > 0
        assert torch.equal(made_tokens[live], tokens[live])
        assert (made_rows - rows).abs().max() < 1e-12
        tokens, rows = made_tokens, made_rows
    targets = torch.stack(
        [torch.stack([model.target(path_bytes(parent, t, i)) for i in range(n + 1)]) for t in tokens.tolist()]
    )
    par = torch.tensor(parent).expand(b, n)
    verdict = verify_tree(par, tokens, rows, targets, torch.full((b, n + 1), 0.5, dtype=torch.float64), max_depth)
    acc, fallback = verdict.accept_prob.tolist(), verdict.fallback.tolist()
    law: dict[tuple, float] = {}
    mean_length = 0.0
    rng = np.random.default_rng(0)
    probes = []  # (outcome, uniforms, (node the walk stops at, next byte))
    for o in range(b):
        for stop in range(n + 1):
            # the interval [lo, hi) of each uniform that decides a walk stopping at ``stop``
            cells, reach, node = {}, weight[o].item(), stop
            while node:
                a = parent[node - 1]
                for s in kids[a][: kids[a].index(node)]:
                    cells[s], reach = (acc[o][s - 1], 1.0), reach * (1 - acc[o][s - 1])
                cells[node], reach = (0.0, acc[o][node - 1]), reach * acc[o][node - 1]
                node = a
            for s in kids[stop]:
                cells[s], reach = (acc[o][s - 1], 1.0), reach * (1 - acc[o][s - 1])
            if reach <= 0:
                continue
            path = path_bytes(parent, tokens[o].tolist(), stop)
            cdf, walk = list(itertools.accumulate(fallback[o][stop])), nodes_to(parent, stop, max_depth)
            for y, width in enumerate(fallback[o][stop]):
                if width <= 0:
                    continue
                law[path + (y,)] = law.get(path + (y,), 0.0) + reach * width
                mean_length += reach * width * len(path)
                cells[0] = (cdf[y] - width, cdf[y])
                for f in PROBES if probe else ():
                    u = rng.random(n + 1)
                    for i, (lo, hi) in cells.items():
                        u[i] = lo + f * (hi - lo)
                    probes.append((o, u, walk + [y]))
    if probe:
        index = torch.tensor([o for o, _, _ in probes])
        uniforms = torch.tensor(np.stack([u for _, u, _ in probes]))
        got = verify_tree(par[index], tokens[index], rows[index], targets[index], uniforms, max_depth)
        walks = torch.tensor([walk for _, _, walk in probes])
        assert torch.equal(torch.cat((got.path, got.next_byte[:, None]), dim=1), walks)
        for (o, u, walk) in probes:  # the host walk the eager engine runs decides the same in every cell
            path, length, byte = walk_tree(
                np.asarray(parent), tokens[o].numpy(), rows[o].numpy(), targets[o].numpy(), u, max_depth
            )
            assert [*path, byte] == walk
        mean = (weight * expected_accepted(par, verdict.accept_prob, max_depth)).sum().item()
        assert mean_length == pytest.approx(mean, abs=1e-12)
    return law


def nodes_to(parent: list[int], node: int, max_depth: int) -> list[int]:
    """The nodes from the root's child down to ``node``, padded with 0 to ``max_depth``."""
    out = []
    while node:
        out.append(node)
        node = parent[node - 1]
    return list(reversed(out)) + [0] * (max_depth - len(out))


def identity_gap(model: MadeUpModel, law: dict[tuple, float], horizon: int) -> float:
    """Largest difference, over byte sequences z of length ``horizon``, between the probability that the
    step followed by autoregressive sampling gives z and the product of head 1's conditionals.

    Walks the prefixes depth first: for a prefix z, ``ar`` is the product of head 1's conditionals
    and ``spec`` the probability that the step's output is a prefix of z and sampling from head 1
    after it continues it to z, so ``spec(z + y) = spec(z) p(y | z) + law(z + y)``."""

    def worst(prefix: tuple, ar: float, spec: float) -> float:
        if len(prefix) == horizon:
            return abs(spec - ar)
        p = model.target(prefix).tolist()
        return max(worst(prefix + (y,), ar * p[y], spec * p[y] + law.get(prefix + (y,), 0.0)) for y in range(model.v))

    return worst((), 1.0, 0.0)


def sibling_ranks(parent: list[int]) -> list[int]:
    """Ranked candidates: each parent's children take its depth's first, second, .. choice."""
    kids = children_of(parent)
    return [kids[a].index(i) for i, a in enumerate(parent, start=1)]


CONFIGS = {
    "T=1": (SamplingConfig(temperature=1.0), False),
    "T=0.7,top-k=2,ties": (SamplingConfig(temperature=0.7, top_k=2), True),
    "T=1.3,top-p=0.8": (SamplingConfig(temperature=1.3, top_p=0.8), False),
    "T=0.9,top-k=3,top-p=0.9,ties": (SamplingConfig(temperature=0.9, top_k=3, top_p=0.9), True),
}
TREES = {  # parent, alphabet, sampled (else ranked) candidates, q depends on the path
    "chain of 7, sampled": (CHAIN7, 3, True, False),
    "chain of 7, ranked": (CHAIN7, 3, False, False),
    "bush, sampled": (BUSH, 4, True, False),
    "bush, ranked, q by path": (BUSH, 4, False, True),
    "deep, sampled, q by path": (DEEP, 3, True, True),
    "deep, ranked": (DEEP, 5, False, False),
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("tree", TREES)
def test_step_then_autoregressive_is_autoregressive(tree, config):
    parent, v, sampled, path_q = TREES[tree]
    cfg, ties = CONFIGS[config]
    model = MadeUpModel(v, cfg, seed=1, horizon=max(depths(parent)) + 1, ties=ties, path_q=path_q)
    law = output_law(model, parent, sibling_ranks(parent), sampled)
    assert identity_gap(model, law, max(depths(parent)) + 1) < 1e-9


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("tree", ["chain of 7, sampled", "bush, sampled", "deep, sampled, q by path"])
def test_drafts_coupled_to_the_bytes_before_are_exact(tree, config):
    """Draft coupling (``bytemtp.decode.coupling``): each draft drawn from its depth's q times the
    weights after its grandparent's and parent's bytes (the byte before the root and the root's for
    the first depth). ``sampled_candidates`` draws exactly those (checked against the enumeration
    inside ``output_law``), and the output stays head 1's."""
    parent, v, _, _ = TREES[tree]
    cfg, ties = CONFIGS[config]
    rng = np.random.default_rng(5)
    index = torch.tensor(rng.integers(0, 2 * v, (v, v)))  # some pairs share a row
    context = DraftContext(index, torch.tensor(rng.uniform(0.05, 3.0, (2 * v, v))))
    model = MadeUpModel(v, cfg, seed=2, horizon=max(depths(parent)) + 1, ties=ties, coupling=(context, 2, 1))
    law = output_law(model, parent, sibling_ranks(parent), sampled=True)
    assert identity_gap(model, law, max(depths(parent)) + 1) < 1e-9


@pytest.mark.parametrize("config", CONFIGS)
def test_tree_shaped_from_draft_probabilities_is_exact(config):
    cfg, ties = CONFIGS[config]
    model = MadeUpModel(5, cfg, seed=7, horizon=4, ties=ties)
    probs = torch.stack([model.draft(d, ()) for d in (1, 2, 3)])[None]
    shape = best_shape(rank_log_probs(probs, 4), 7)
    parent, rank = shape.parent[0].tolist(), shape.rank[0].tolist()
    law = output_law(model, parent, rank, sampled=False)
    assert identity_gap(model, law, max(depths(parent)) + 1) < 1e-9


def unclamped(residual: torch.Tensor, mass: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return residual - mass[..., None] * q


def sibling_left_in(residual: torch.Tensor, mass: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return residual


MUTANTS = {  # planted biases: name -> (sampled candidates, what changes)
    "q from the previous step": (True, {"judge": "stale_draft"}),
    "q not processed by temperature, top-k, top-p": (True, {"judge": "raw_draft"}),
    "shape chosen from the drawn bytes": (True, {"keep": lambda q, x: q[x] == q.max()}),
    "residual not clamped at zero, sampled": (True, {"after_rejection": unclamped}),
    "residual not clamped at zero, ranked": (False, {"after_rejection": unclamped}),
    "rejected sibling left in the residual, sampled": (True, {"after_rejection": sibling_left_in}),
    "rejected sibling left in the residual, ranked": (False, {"after_rejection": sibling_left_in}),
}


@pytest.mark.parametrize("mutant", MUTANTS)
def test_planted_bias_breaks_the_identity(mutant, monkeypatch):
    sampled, change = MUTANTS[mutant]
    model = MadeUpModel(3, SamplingConfig(temperature=0.7, top_k=2), seed=2, horizon=5, ties=True)
    if "after_rejection" in change:
        monkeypatch.setattr(tree_sampling, "after_rejection", change["after_rejection"])
    judge = getattr(model, change["judge"]) if "judge" in change else None
    law = output_law(model, DEEP, sibling_ranks(DEEP), sampled, judge=judge, keep=change.get("keep"), probe=False)
    assert identity_gap(model, law, 5) > 1e-4  # the exact step: below 1e-16


def test_chain_is_ordinary_speculative_sampling():
    """One child per node: accept with min(1, p/q), fall back to norm(max(0, p - q)), as ``SamplingVerifier``."""
    gen = torch.Generator().manual_seed(0)
    b, k, v = 256, 5, 7
    p = (torch.randn(b, k + 1, v, generator=gen, dtype=torch.float64) * 2).softmax(-1)
    q = (torch.randn(b, k, v, generator=gen, dtype=torch.float64) * 2).softmax(-1)
    drafts = torch.multinomial(q.flatten(0, 1), 1, generator=gen).view(b, k)
    uniforms = torch.rand(b, k + 1, generator=gen, dtype=torch.float64)
    verdict = verify_tree(torch.arange(k).expand(b, k), drafts, q, p, uniforms, k)
    ratio = p[:, :-1].gather(-1, drafts[..., None]) / q.gather(-1, drafts[..., None])
    # a ratio of two roundings of products: relative error a few eps (2.2e-16), far inside 1e-12
    assert torch.allclose(verdict.accept_prob, ratio.squeeze(-1).clamp(max=1), rtol=1e-12, atol=0)
    residual = (p[:, :-1] - q).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    residual = torch.cat((residual / total, p[:, -1:]), dim=1)
    # The residual max(0, p - m q) (m = sum(p), 1 within v eps) cancels where p is near q, so no
    # relative tolerance holds on every CPU: SIMD width changes the order of the sums, and an
    # entry's error relative to itself is about eps (p + q) / (p - q), unbounded. Its absolute
    # error is bounded instead: (v + 2) eps (p + q) for the sum, product and difference, divided by
    # the normalising sum, plus v eps relative for that sum (the last row, p / sum(p), the same
    # with q = 0). A residual that is wrong (not clamped, or q not subtracted) is off by ~q / sum.
    eps = torch.finfo(torch.float64).eps
    scale = torch.cat(((p[:, :-1] + q) / total, p[:, -1:]), dim=1)
    bound = (v + 2) * eps * scale + v * eps * residual
    assert ((verdict.fallback - residual).abs() <= bound).all()
    accepted = (uniforms[:, 1:] < verdict.accept_prob).cumprod(1).sum(1)
    assert torch.equal(verdict.length, accepted)
    assert torch.equal(verdict.path, torch.where(torch.arange(k) < accepted[:, None], torch.arange(1, k + 1), 0))
    assert 0 < accepted.float().mean() < k


def rank_paths(shape, row: int) -> list[tuple]:
    paths: list[tuple] = [()]
    for a, r in zip(shape.parent[row].tolist(), shape.rank[row].tolist()):
        paths.append(paths[a] + (r,))
    return paths[1:]


@pytest.mark.parametrize("m,k,n", [(3, 2, 5), (2, 3, 5), (3, 3, 4), (2, 4, 7)])
def test_best_shape_is_the_best_tree(m, k, n):
    """The chosen paths form a tree in topological order and no other tree of n nodes scores more,
    also when a first choice is certain (a child scoring as much as its parent)."""
    gen = torch.Generator().manual_seed(m * 10 + k)
    log_scores = torch.rand(3, m, 2, k, generator=gen, dtype=torch.float64).log().sort(-1, descending=True).values
    log_scores[2, :, :, 0] = 0.0
    shape = best_shape(log_scores, n)
    trie = [z for d in range(1, m + 1) for z in itertools.product(range(k), repeat=d)]

    def score(row: int, path: tuple) -> float:
        return math.exp(sum(log_scores[row, d, int(d > 0 and path[d - 1] > 0), r].item() for d, r in enumerate(path)))

    for row in range(3):
        paths = rank_paths(shape, row)
        assert len(set(paths)) == n and shape.depth[row].tolist() == [len(z) for z in paths]
        assert all(0 <= a < i for i, a in enumerate(shape.parent[row].tolist(), start=1))
        best = max(
            sum(score(row, z) for z in chosen)
            for chosen in itertools.combinations(trie, n)
            if all(len(z) == 1 or z[:-1] in chosen for z in chosen)
        )
        assert sum(score(row, z) for z in paths) == pytest.approx(best, rel=1e-12)


def random_step(b: int, device: str = "cpu", seed: int = 3):
    """A batch of verification inputs: a tree of 6 per row from random draft distributions, sampled candidates."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, 3, 9, generator=gen) * 2).softmax(-1)
    shape = best_shape(rank_log_probs(q, 4), 6)
    gumbel = -(-torch.rand(b, 7, 9, generator=gen).log()).log()
    tokens, rows = sampled_candidates(q, shape.parent, shape.depth, gumbel)
    p = (torch.randn(b, 7, 9, generator=gen) * 2).softmax(-1)
    args = (shape.parent, tokens, rows, p, torch.rand(b, 7, generator=gen))
    return tuple(x.to(device) for x in args)


def test_verification_is_one_graph():
    """No host synchronisation or data-dependent Python: it traces whole, and the graph computes the same."""
    args = random_step(32)
    compiled = torch.compile(verify_tree, backend="eager", fullgraph=True, dynamic=False)
    for got, want in zip(compiled(*args, max_depth=3, max_children=4), verify_tree(*args, max_depth=3, max_children=4)):
        assert torch.equal(got, want)


@pytest.mark.gpu
def test_verification_captures_in_a_cuda_graph():
    static = random_step(32, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        verify_tree(*static, max_depth=3, max_children=4)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = verify_tree(*static, max_depth=3, max_children=4)
    fresh = random_step(32, "cuda", seed=4)
    for x, y in zip(static, fresh):
        x.copy_(y)
    graph.replay()
    for got, ref in zip(out, verify_tree(*fresh, max_depth=3, max_children=4)):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("coupled", [False, True], ids=["independent", "coupled"])
def test_host_draw_is_the_tensor_draw(coupled):
    """The eager engine draws siblings on the host: the same bytes and conditionals as
    ``sampled_candidates`` from the same noise, for children within q's support, with and
    without draft coupling."""
    g = torch.Generator().manual_seed(3)
    for parent in (CHAIN7, BUSH, DEEP, [0] * 6):
        n, m, v = len(parent), max(depths(parent)), 6
        logits = torch.randn(1, m, v, generator=g, dtype=torch.float64)
        logits[0, 0, :3] = float("-inf")  # a head with support 3: a bush's fourth sibling gets nothing
        q = logits.softmax(-1)
        par, dep = torch.tensor([parent]), torch.tensor([depths(parent)])
        noise = torch.rand(1, n + 1, v, generator=g, dtype=torch.float64)
        index = torch.randint(0, 2 * v, (v, v), generator=g)
        context = DraftContext(index, torch.rand(2 * v, v, generator=g, dtype=torch.float64) + 0.1)
        before, root = 5, 4
        gumbel = -torch.log(-torch.log(noise))
        coupling = (torch.tensor([root]), torch.tensor([before]), context if coupled else None, m)
        tokens, node_q = sampled_candidates(q, par, dep, gumbel, *coupling)
        host_context = tuple(t.numpy() for t in context) if coupled else (np.zeros((0, 0), np.int64), np.zeros((0, 0)))
        host_tokens, host_q = draw_children(
            q[0].numpy(), par[0].numpy(), dep[0].numpy(), noise[0].numpy(), root, before, *host_context
        )
        live = node_q[0].sum(-1) > 0
        assert torch.equal(torch.from_numpy(host_q).sum(-1) > 0, live)
        assert torch.equal(torch.from_numpy(host_tokens)[live], tokens[0][live])
        assert (torch.from_numpy(host_q) - node_q[0]).abs().max() < 1e-12


def test_host_ranks_are_a_stable_sort():
    """``top_ranks``: the likeliest bytes first, ties to the lower byte, as a stable sort of ``-q``."""
    rng = np.random.default_rng(0)
    for q in (rng.random((7, 256)), rng.integers(0, 4, (7, 256)).astype(np.float32) / 4):  # the second: ties
        assert np.array_equal(top_ranks(q, 8), np.argsort(-q, axis=-1, kind="stable")[:, :8])


def test_host_non_finite_flag_is_the_tensor_flag():
    """``nonfinite_rows`` flags a row exactly when ``bytemtp.decode.step.nonfinite`` does."""
    logits = torch.randn(6, 3, 9)
    logits[1, 0, 4] = float("nan")
    logits[2, 2, 0] = float("inf")
    logits[3, 1] = float("-inf")  # a position with no byte left
    logits[4, 1, :8] = float("-inf")  # one byte left: fine
    logits[5, 0, 3] = float("-inf")
    assert nonfinite_rows(logits.numpy()).tolist() == nonfinite(logits).tolist() == [0, 1, 1, 1, 0, 0]
