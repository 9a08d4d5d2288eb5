"""Cost-aware draft counts: the choice itself, and that it never changes what is generated."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fixtures_train import stdlib_corpus, trained_model, trained_transformer_heads
from test_generate import random_logits_stub, random_model, run, sampling_matches_head_one
from test_host_chain import chain_inputs, draft_model

from bytemtp.decode.coupling import UNCOUPLED
from bytemtp.decode.drafting import (
    MEMORY, PRIOR_RATE, PRIOR_WEIGHT, DraftPolicy, draft_count, expected_bytes, interpolate_costs,
)
from bytemtp.decode.host_chain import host_chain_decide
from bytemtp.decode.sampling import SamplingConfig
from bytemtp.decode.verify import ChainRule
from bytemtp.decode.step_costs import measure_step_costs
from bytemtp.errors import BytemtpError
from bytemtp.decode.config import GenerationConfig
from bytemtp.decode.batch import RowParams
from bytemtp.decode.generate import Decoder, generate

STEEP = (1.0, 1.3, 1.6, 1.9, 2.2, 2.5, 2.8, 3.1)  # a CPU-like cost curve at a full batch


def count(rates: list[float], costs: list[float]) -> int:
    return draft_count(expected_bytes(rates), costs)


def test_draft_count_maximises_expected_bytes_per_cost():
    assert count([0.9, 0.9, 0.9], [1, 1, 1, 1]) == 3  # free forwards: verify everything
    assert count([0.1, 0.9, 0.9], [1, 2, 3, 4]) == 0  # unlikely first draft, costly forwards
    # Expected bytes 1, 1.5, 1.75 for 0, 1, 2 drafts; per cost 1, 1.25, 0.875.
    assert count([0.5, 0.5], [1, 1.2, 2]) == 1
    # Sure later drafts only count after an unlikely first one: 1.4 bytes at cost 1.5 < 1.
    assert count([0.2, 1.0, 1.0], [1, 1.5, 1.5, 2.0]) == 0
    assert count([0.2, 1.0, 1.0], [1, 1.5, 1.5, 1.5]) == 3  # unless all three come at once: 1.6 > 1.5


def test_policy_learns_each_position_from_the_verdicts_verification_reached():
    policy = DraftPolicy(((1.0,) * 4,), n_drafts=3)
    assert policy.rates() == pytest.approx(np.full((2, 3), PRIOR_RATE))
    # A greedy row: drafts 1 and 2 judged, 1 accepted, 2 rejected, 3 judged only as part of a broken
    # run (no verdict of its own). A sampled row: all three judged, all accepted.
    policy.learn([(True, 3, 1), (False, 3, 3)])
    w, p = PRIOR_WEIGHT, PRIOR_WEIGHT * PRIOR_RATE
    assert policy.rates()[1] == pytest.approx([(p + 1) / (w + 1), p / (w + 1), PRIOR_RATE])
    assert policy.rates()[0] == pytest.approx([(p + 1) / (w + 1)] * 3)
    policy.learn([(True, 0, 0)])  # a step that judged nothing teaches nothing, but older verdicts fade
    assert policy.judged[1] == pytest.approx([MEMORY, MEMORY, 0.0])
    assert policy.judged[0] == [1.0, 1.0, 1.0]  # no sampled row took part: its kind keeps its counts


def test_policy_prices_a_step_at_its_row_count_and_its_rows_kinds():
    # One row: wide steps cost next to nothing. Four rows: each draft adds half a step.
    table = ((1.0, 1.05, 1.1, 1.15),) * 3 + ((1.0, 1.5, 2.0, 2.5),)
    policy = DraftPolicy(table, n_drafts=3)
    for _ in range(400):  # greedy drafts right at 0.8, 0.625, 0.6 given the ones before; sampled ones 0.04, 0, 0
        policy.learn([(True, 3, 3)] * 3 + [(True, 3, 2)] * 2 + [(True, 3, 1)] * 3 + [(True, 3, 0)] * 2)
        policy.learn([(False, 3, 1)] + [(False, 3, 0)] * 24)
    rates = policy.rates()
    assert rates[1] == pytest.approx([0.8, 0.625, 0.6], abs=0.01) and rates[0][0] == pytest.approx(0.04, abs=0.01)
    assert policy.choose([True], rows=1) == 3  # expected 2.6 bytes at 1.15: the best at one row
    assert policy.choose([True] * 4, rows=4) == 1  # 4 x 1.8 / 1.5 beats 4 / 1, 4 x 2.3 / 2 and 4 x 2.6 / 2.5
    # a row's lookup will make the step 3 (or 2) drafts wide anyway: fewer drafts would save nothing
    assert policy.choose([True] * 4, rows=4, wide=3) == 3 and policy.choose([True] * 4, rows=4, wide=2) == 2
    assert policy.choose([False], rows=1) == 0  # 1.04 / 1.05 < 1
    assert policy.choose([], rows=1) == 0
    assert DraftPolicy(table[:1], n_drafts=3).choose([True] * 4, rows=4) == 3  # a single curve prices every step


def test_a_position_left_out_is_tried_again():
    """Verdicts fade and the prior is optimistic: after a run of steps that chose no drafts (no
    verdicts), the policy drafts again, and learns again."""
    costs = ((1.0, 1.3, 1.35),)
    policy = DraftPolicy(costs, n_drafts=2)
    for _ in range(50):
        policy.learn([(False, 2, 0)] * 4)
    assert policy.choose([False] * 4, rows=4) == 0
    steps = 0
    while policy.choose([False] * 4, rows=4) == 0:
        policy.learn([(False, 0, 0)] * 4)
        steps += 1
    assert 10 < steps < 1000


def test_an_eager_decision_drafts_from_the_first_heads_alone():
    """``drafted``: the first heads' drafts (and, sampling, their distributions) are those of a decision
    drafting from every head, the same uniforms drawing them; the rest are zeros."""
    m, k = 7, 3
    model = draft_model(m + 1)
    for sampling in (SamplingConfig(0.0), SamplingConfig(0.8)):
        rule = ChainRule(sampling)
        with torch.inference_mode():
            args = chain_inputs(rule, 16, k, m, seed=2)
            full = host_chain_decide(model, rule, m, *args, context=UNCOUPLED)
            for drafted in (0, 2):
                ints, q = host_chain_decide(model, rule, m, *args, context=UNCOUPLED, drafted=drafted)
                assert torch.equal(ints[:, : 2 + drafted], full[0][:, : 2 + drafted])
                assert torch.equal(ints[:, -1], full[0][:, -1]) and not ints[:, 2 + drafted : -1].any()
                if sampling.greedy:
                    assert q is None
                else:
                    assert q.shape == full[1].shape and torch.equal(q[:, :drafted], full[1][:, :drafted])
                    assert not q[:, drafted:].any()


def test_costs_are_interpolated_between_measured_row_counts():
    table = interpolate_costs({2: (1.0, 1.2), 6: (1.0, 2.0)})
    assert [c for _, c in table] == pytest.approx([1.2, 1.2, 1.4, 1.6, 1.8, 2.0]) and {c for c, _ in table} == {1.0}


def test_measured_costs_are_relative_to_a_step_of_no_drafts_at_each_row_count():
    model = random_model(n_future=4, max_seq_len=48)
    # 48 positions of cache: the rows' windows fill and are cut while measured
    costs = measure_step_costs(Decoder(model, GenerationConfig()), cache_len=48, rounds=4, rows=(1, 3))
    assert len(costs) == 3 and all(len(curve) == 4 and curve[0] == 1.0 for curve in costs)
    assert all(c > 0 for curve in costs for c in curve)
    assert model.kv_cache is None  # the cache is detached again


@pytest.mark.parametrize("head_kind", ["linear", "transformer"])
def test_adaptive_greedy_matches_autoregressive_and_varies_the_drafts(head_kind):
    model = trained_model() if head_kind == "linear" else trained_transformer_heads()
    n_drafts = model.cfg.n_future - 1
    corpus = stdlib_corpus()
    prompts = [b"", b"def ", bytes(corpus[3000:3040].tolist())]
    short = full = 0
    for prompt, costs in itertools.product(prompts, (STEEP, (1.0,) * 8)):
        ar = run(model, prompt=prompt, max_new_bytes=80, speculative=False)
        sp = run(model, prompt=prompt, max_new_bytes=80, draft_costs=costs, lookup=False)
        assert sp.output == ar.output, (prompt, costs)
        # with lookups of the row's own text, whose width the policy prices in
        assert run(model, prompt=prompt, max_new_bytes=80, draft_costs=costs).output == ar.output, (prompt, costs)
        steps = sp.stats.forwards - 1  # the prompt's forward verifies nothing
        short += costs == STEEP and sp.stats.drafted < steps * n_drafts  # some steps verified fewer drafts
        full += sp.stats.attempted[-1] > 0  # and some went all the way to the last head
        if costs != STEEP:  # flat costs: every step verifies every draft, as without costs
            plain = run(model, prompt=prompt, max_new_bytes=80, lookup=False).stats
            assert (sp.stats.forwards, sp.stats.attempted) == (plain.forwards, plain.attempted)
    assert short and full, (short, full, n_drafts)


def test_adaptive_sampling_is_exactly_head_one():
    sampling_matches_head_one(random_logits_stub(), {"temperature": 1.0}, draft_costs=STEEP[:4])


@pytest.mark.parametrize("costs, message", [((), "positive"), ((1.0, -1.0), "positive"), ((1.0, 1.1), "cannot price"),
                                            (((1.0,) * 4, (1.0,) * 3), "one length")])
def test_bad_draft_costs_are_named(costs, message):
    with pytest.raises(BytemtpError, match=f"draft_costs: .*{message}"):
        run(random_model(n_future=4), max_new_bytes=4, draft_costs=costs)


def test_autoregressive_ignores_draft_costs():
    assert GenerationConfig(speculative=False, draft_costs=(1.0,)).draft_policy(0) is None


def test_a_batch_verifies_the_drafts_its_row_count_pays_for():
    """Two prompts decoded together are priced by the table's second curve, not its first: whatever
    the first curve, a steep second one verifies fewer drafts than a flat one. Either way each row's
    output is its autoregressive one."""
    model = trained_model()
    corpus = stdlib_corpus()
    prompts = [b"def ", bytes(corpus[3000:3040].tolist())]
    flat = (1.0,) * 8
    drafted = {}
    for first, second in itertools.product((STEEP, flat), repeat=2):
        gen = generate(model, GenerationConfig(max_new_bytes=80, draft_costs=(first, second), lookup=False), prompts)
        outputs = gen.read_all()
        for prompt, out in zip(prompts, outputs):
            assert out == run(model, prompt=prompt, max_new_bytes=80, speculative=False).output, (first, prompt)
        drafted[first, second] = sum(row.stats.drafted for row in gen.rows)
    assert drafted[STEEP, STEEP] < drafted[STEEP, flat] and drafted[flat, STEEP] < drafted[flat, flat]


def test_a_step_is_priced_at_the_rows_it_forwards():
    """Drafts free at one row and dear at two: a row alone in a two-slot engine verifies drafts; two
    live rows verify none (an eager step forwards the live rows only, and is priced so)."""
    model = trained_model()
    n = model.cfg.n_future
    costs = ((1.0,) * n, (1.0, *(100.0,) * (n - 1)))
    engine = Decoder(model, GenerationConfig(draft_costs=costs, lookup=False)).engine(2, model.cfg.max_seq_len)
    prompts = [b"def ", bytes(stdlib_corpus()[3000:3040].tolist())]
    lone = [engine.row(prompts[0], RowParams(max_new_bytes=60), 0)]
    pair = [engine.row(p, RowParams(max_new_bytes=60), i) for i, p in enumerate(prompts)]
    for _ in engine.run(lone):
        pass
    for _ in engine.run(pair):
        pass
    assert lone[0].stats.drafted > 0
    # both rows live from their first step to the end of the shorter one: no drafts verified then
    assert min(row.stats.drafted for row in pair) == 0
