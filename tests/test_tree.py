"""Draft trees: the tree is the best paths, the tree forward equals chain forwards, greedy output is unchanged."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures_train import stdlib_corpus, trained_model, trained_transformer_heads
from test_generate import random_model, run

from bytemtp import BOS
from bytemtp.errors import BytemtpError
from bytemtp.decode import sampled_tree
from bytemtp.decode.batch import Batch, GenerationStats, Row, RowParams
from bytemtp.decode.generate import GenerationConfig, generate
from bytemtp.decode.sampling import probabilities
from bytemtp.decode.step import accepted_node
from bytemtp.decode.tree import RANKS, DraftTree, RankStats, TreeDrafts, accepted_path, build_tree, tree_mask


def paths_of(tree: DraftTree) -> list[tuple[int, ...]]:
    """Each node's path from the root, as the tuple of its ancestors' tokens and its own."""
    parent, tokens = tree.parent.tolist(), tree.tokens.tolist()
    out: list[tuple[int, ...]] = []
    for i in range(tree.size):
        p = parent[i]
        out.append((out[p - 1] if p else ()) + (tokens[i],))
    return out


def path_score(scores: np.ndarray, path: tuple[int, ...]) -> float:
    return sum(scores[d, int(d > 0 and path[d - 1] != 0), r] for d, r in enumerate(path))


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 4), k=st.integers(1, 4), n=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_build_tree_keeps_exactly_the_best_paths(m, k, n, seed):
    scores = -np.random.default_rng(seed).random((m, 2, k)) * 3
    everything = [p for d in range(1, m + 1) for p in itertools.product(range(k), repeat=d)]
    n = min(n, len(everything))
    tree = build_tree(scores, n)
    best = sorted(everything, key=lambda p: -path_score(scores, p))[:n]
    got = paths_of(tree)
    assert sorted(got) == sorted(best)
    assert all(p < i + 1 for i, p in enumerate(tree.parent.tolist()))  # parents come first
    assert tree.depth.tolist() == [len(p) for p in got]
    anc = tree.ancestors.tolist()
    for i, path in enumerate([(), *got]):
        marked = {j for j in range(tree.size + 1) if anc[i][j]}
        expected = {0} | {j + 1 for j, q in enumerate(got) if path[: len(q)] == q}
        assert marked == expected


def test_build_tree_keeps_parents_of_sure_children():
    """A byte of probability 1 scores 0, as much as its parent: the parent must still come first."""
    scores = np.broadcast_to(np.array([[-0.1, -2.0], [0.0, -9.0], [0.0, -9.0]])[:, None], (3, 2, 2))
    tree = build_tree(scores, 3)
    assert paths_of(tree) == [(0,), (0, 0), (0, 0, 0)]


def small_tree() -> DraftTree:
    # root -> a(1) -> c(3); root -> b(2) -> d(4) -> e(5)
    parent = np.array([0, 0, 1, 2, 4])
    depth = np.array([1, 1, 2, 2, 3])
    anc = np.eye(6, dtype=bool)
    for _ in range(3):
        anc = np.eye(6, dtype=bool) | anc[np.concatenate(([0], parent))]
    return DraftTree(np.array([10, 11, 12, 13, 14]), parent, depth, anc)


def test_tree_mask_sees_the_context_and_the_ancestors():
    tree, start, cache_len = small_tree(), 5, 16
    mask = tree_mask(tree, start, cache_len)
    ancestors = {0: {0}, 1: {0, 1}, 2: {0, 2}, 3: {0, 1, 3}, 4: {0, 2, 4}, 5: {0, 2, 4, 5}}
    for row, anc in ancestors.items():
        assert set(np.flatnonzero(mask[row]).tolist()) == set(range(start)) | {start + a for a in anc}


@pytest.mark.parametrize(
    "choice, path, length",  # head 1's choice at [root, a, b, c, d, e]
    [
        ([11, 0, 13, 0, 14, 0], [2, 4, 5], 3),  # b, d, e all match
        ([11, 0, 13, 0, 99, 0], [2, 4, 0], 2),  # e rejected
        ([10, 12, 13, 0, 14, 0], [1, 3, 0], 2),  # a, c; d would match but b was rejected
        ([99, 12, 13, 0, 14, 0], [0, 0, 0], 0),  # nothing at depth 1
    ],
)
def test_accepted_path_follows_head_one(choice, path, length):
    got_path, got_len = accepted_path(small_tree(), np.array(choice), 3)
    assert got_path.tolist() == path and got_len == length


def step_inputs(tree: DraftTree, start: int, cache_len: int, pending: int = 5) -> tuple[torch.Tensor, ...]:
    """A tree step's ids, cache slots, RoPE positions and mask for one row, as ``TreeDrafts.layout``."""
    ids = torch.tensor([pending, *tree.tokens.tolist()])
    slots = start + torch.arange(tree.size + 1)
    rope = start + torch.tensor([0, *tree.depth.tolist()])
    return ids, slots, rope, torch.from_numpy(tree_mask(tree, start, cache_len))


def test_accepted_node_on_the_device_is_the_end_of_the_host_path():
    """Rows of random trees (and prefixes of them) at different cache lengths, with head 1's
    choices agreeing with a random share of the nodes: the device finds the node the host's
    path ends at."""
    rng = np.random.default_rng(0)
    rows, wanted = [], []
    for r in range(64):
        log_scores = np.log(rng.dirichlet(np.ones(RANKS + 1), size=(4, 2))[..., :RANKS])
        tree = build_tree(log_scores, 12).prefix(12 - r % 3)
        tree = DraftTree(tree.tokens + 40, tree.parent, tree.depth, tree.ancestors)
        choice = rng.integers(0, 50, tree.size + 1)
        for j in rng.permutation(tree.size)[: rng.integers(0, tree.size + 1)]:
            choice[tree.parent[j]] = tree.tokens[j]  # head 1 agrees with node j + 1
        path, length = accepted_path(tree, choice, 4)
        wanted.append(int(path[length - 1]) if length else 0)
        ids, slots, rope, mask = step_inputs(tree, 10 + 3 * r, 256)
        pad = 13 - ids.numel()  # narrower trees: padded as a parked row's positions would be
        rows.append((
            torch.cat((ids, ids.new_zeros(pad))), torch.cat((slots, slots[-1:].expand(pad))),
            torch.cat((rope, rope[:1].expand(pad))), torch.cat((mask, mask[:1].expand(pad, -1))),
            torch.cat((torch.from_numpy(choice), torch.zeros(pad, dtype=torch.long))),
        ))
    ids, slots, rope, mask, choice = (torch.stack(t) for t in zip(*rows))
    assert accepted_node(ids, choice, slots, rope, mask).tolist() == wanted
    assert len(set(wanted)) > 5  # roots, shallow and deep ends all occur


@pytest.mark.parametrize("head_kind", ["linear", "transformer"])
def test_tree_forward_equals_the_chain_forward_of_every_path(head_kind):
    """Every node's head-1 logits are those of a plain cached forward of its path after the context."""
    model = random_model(head_kind, n_future=4, max_seq_len=64)
    context = [BOS, *b"def tree(x):\n"]
    start = len(context)
    tree = build_tree(-np.random.default_rng(0).random((3, 2, 5)), 12)
    tree.tokens = np.random.default_rng(1).integers(0, 256, tree.size)
    ids = torch.tensor([ord("y"), *tree.tokens.tolist()])
    with torch.inference_mode():
        model.setup_cache(1, 64)
        model.decode(torch.tensor([context]), torch.arange(start), 4)
        rope = start + torch.tensor([0, *tree.depth.tolist()])
        logits, feats = model.decode(ids[None], torch.arange(start, start + ids.numel()), 4, rope,
                                     torch.from_numpy(tree_mask(tree, start, 64)))
        for i, path in enumerate(paths_of(tree)):
            chain = torch.tensor([[*context, ord("y"), *path]])
            ref_logits, ref_feats = model.decode(chain, torch.arange(chain.shape[1]), 4)
            torch.testing.assert_close(logits[0, i + 1], ref_logits[0, -1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(feats[0, i + 1], ref_feats[0, -1], rtol=1e-5, atol=1e-5)
        model.clear_cache()


def assert_tree_greedy(model, prompt: bytes, n: int, nodes: int, draft_heads: int | None = None):
    ar = run(model, prompt=prompt, max_new_bytes=n, speculative=False)
    tr = run(model, prompt=prompt, max_new_bytes=n, tree_nodes=nodes, draft_heads=draft_heads)
    assert tr.output == ar.output, (prompt, nodes, draft_heads)
    assert tr.stats.stop_reason == ar.stats.stop_reason and tr.stats.window_cuts == ar.stats.window_cuts
    return ar, tr


@pytest.mark.parametrize("head_kind", ["linear", "transformer"])
def test_tree_greedy_matches_autoregressive_random_weights(head_kind):
    model = random_model(head_kind, n_future=4, max_seq_len=24)  # small window: cuts, and trees that do not fit
    for prompt, nodes, heads in itertools.product([b"", bytes(range(200, 230)), b"x" * 23], (1, 5, 17), (1, 3)):
        if nodes <= RANKS * heads:
            assert_tree_greedy(model, prompt, 60, nodes, heads)


@pytest.mark.parametrize("head_kind", ["linear", "transformer"])
def test_tree_greedy_matches_autoregressive_trained_and_accepts_more(head_kind):
    model = trained_model() if head_kind == "linear" else trained_transformer_heads()
    corpus = stdlib_corpus()
    prompts = [b"    '", bytes(corpus[3000:3040].tolist()), bytes(corpus[20000:20064].tolist())]
    chain_forwards = tree_forwards = 0
    for prompt in prompts:
        _, tr = assert_tree_greedy(model, prompt, 120, 16)
        tree_forwards += tr.stats.forwards
        # the chain of the heads' drafts alone (not drafting from its own text, which the tree does not)
        plain = {"context_mixing": 0.0, "lookup": False}
        chain_forwards += run(model, prompt=prompt, max_new_bytes=120, temperature=0, **plain).stats.forwards
    assert tree_forwards < chain_forwards  # 16 nodes cover more than one chain of at most 7


def step_output(choice: list[int], ranked: np.ndarray) -> np.ndarray:
    """A tree step's host output for one row: head 1's ``choice`` at each position, the draft
    heads' ``ranked`` bytes [m, RANKS] at the accepted node, no non-finite flag."""
    return np.array([[*choice, *ranked.ravel(), 0]])


def test_rank_stats_count_head_ones_bytes_at_every_depth_reached():
    """After a step accepting 1 draft, depths 1 and 2 are learnt (the byte at depth 2 being
    head 1's correction, whether or not the tree held it), depth 3 is not."""
    ranked = np.tile(np.arange(40, 48), (3, 1))  # every head ranks bytes 40, 41, ..., 47
    drafts = TreeDrafts(None, n_nodes=4, n_drafts=3)
    batch = Batch([Row(0, [BOS], RowParams(), GenerationStats(3))], cache_len=64, device=torch.device("cpu"))
    drafts.start(batch)
    drafts.read(batch, [True], step_output([0], ranked), fed=False)
    tree = drafts.verified[0] = drafts.trees[0]
    before = drafts.stats[0].counts.copy()
    # Head 1 agrees with the first node (byte 40, depth 1), then picks 42 below it.
    choice = [7] * (tree.size + 1)
    choice[0] = int(tree.tokens[0])
    first_child_of_root = 1
    choice[first_child_of_root] = 42
    decision = drafts.read(batch, [True], step_output(choice, ranked), fed=True)[0]
    assert decision.accepted >= 1
    expected = before.copy()
    for depth, rank in ((0, 0), (1, 2)):  # both below a first choice (or the root)
        expected[depth, 0] *= RankStats.DECAY
        expected[depth, 0, rank] += 1
    np.testing.assert_allclose(drafts.stats[0].counts, expected)


def test_rank_stats_prior_is_a_distribution_over_ranks():
    stats = RankStats(3)
    rates = np.exp(stats.log_rates())
    assert rates.shape == (3, 2, RANKS) and (rates.sum(axis=-1) < 1).all() and (rates[..., 0] > rates[..., 1]).all()
    ranked = np.arange(3 * RANKS).reshape(3, RANKS)  # head d+2 ranks bytes 8d, 8d+1, ..
    # Head 1 chose byte 99 after the root (not among head 2's), then head 3's runner-up
    # after the accepted node 1; the path ends there, so depth 3 is not reached.
    stats.observe(ranked, np.array([99, ranked[1, 1], ranked[2, 0]]), np.array([1, 0, 0]), 1)
    prior = RankStats(3).counts
    # depth 1 (below the root) missed; depth 2, below a miss, was the runner-up; depth 3 not reached
    changed = np.argwhere((stats.counts != prior).any(axis=-1)).tolist()
    assert changed == [[0, 0], [1, 1]]
    learnt = stats.counts - RankStats.DECAY * prior
    np.testing.assert_allclose(learnt[0, 0], [0] * RANKS + [1], atol=1e-12)
    np.testing.assert_allclose(learnt[1, 1], [0, 1] + [0] * (RANKS - 1), atol=1e-12)


@pytest.mark.parametrize(
    "kw, flag",
    [
        ({"tree_nodes": 4, "draft_costs": (1.0, 1.1)}, "--tree"),
        ({"tree_nodes": 100_000}, "--tree: a draft tree has 1 to 128 nodes"),
    ],
)
def test_bad_tree_config_names_the_flag(kw, flag):
    with pytest.raises(BytemtpError, match=flag):
        GenerationConfig(**kw)


def test_tree_larger_than_the_heads_can_fill_is_an_error():
    with pytest.raises(BytemtpError, match="--tree: 1 draft heads cannot fill a tree of 9 nodes"):
        run(random_model(n_future=2), max_new_bytes=4, tree_nodes=9)


@pytest.mark.slow  # inductor builds C++ kernels for the step shapes
def test_compiled_tree_step_matches_eager():
    model = copy.deepcopy(trained_model())
    for prompt in (b"    '", bytes(stdlib_corpus()[5000:5040].tolist())):
        config = GenerationConfig(prompt=prompt, max_new_bytes=64, tree_nodes=12)
        eager = generate(model, config).read()
        assert generate(model, config, compile=True).read() == eager
        assert eager == run(model, prompt=prompt, max_new_bytes=64, speculative=False).output


@pytest.mark.slow  # inductor builds C++ kernels for the step shapes
@pytest.mark.parametrize("decoder", [{"tree_nodes": 5}, {}], ids=["tree", "chain"])
def test_compiled_sampling_step_matches_eager(decoder):
    """Compiled, the sampled step decides with tensor code; eager, on the host: from the same seed,
    with drafts at the default 0.8x the temperature, the same bytes."""
    model = copy.deepcopy(trained_model())
    config = GenerationConfig(prompt=b"    '", max_new_bytes=40, temperature=0.8, seed=3, **decoder)
    assert generate(model, config, compile=True).read() == generate(model, config).read()


def test_tree_that_leaves_no_room_for_context_is_an_error():
    with pytest.raises(BytemtpError, match="--tree: a tree of 100 nodes does not fit the model's window of 64"):
        run(random_model(n_future=4, max_seq_len=64), max_new_bytes=4, tree_nodes=100)


def test_sampled_tree_draws_its_drafts_at_the_draft_temperature(monkeypatch):
    """Every eager step processes head 1's logits at --temperature and the draft heads' at
    --draft-temperature (the distribution the tree's bytes are then drawn from and judged by)."""
    seen = []

    def spy(logits, cfg):
        seen.append(cfg.temperature)
        return probabilities(logits, cfg)

    monkeypatch.setattr(sampled_tree, "probabilities", spy)
    for kw, drafts in (({"draft_temperature": 0.3}, 0.3), ({}, 0.8)):  # default: 0.8 x the temperature
        seen.clear()
        config = GenerationConfig(max_new_bytes=40, temperature=1.0, tree_nodes=5, seed=0, **kw)
        generate(trained_model(), config).read()
        assert len(seen) >= 4 and seen == [1.0, drafts] * (len(seen) // 2)
