"""Cost-aware draft counts: the choice itself, and that it never changes what is generated."""

from __future__ import annotations

import itertools

import pytest
import torch

from fixtures_train import stdlib_corpus, trained_model, trained_transformer_heads
from test_generate import random_logits_stub, random_model, run, sampling_matches_head_one

from bytemtp.decode.drafting import DraftPolicy, draft_count, interpolate_costs
from bytemtp.decode.step_costs import measure_step_costs
from bytemtp.errors import BytemtpError
from bytemtp.decode.config import GenerationConfig
from bytemtp.decode.batch import RowParams
from bytemtp.decode.generate import Decoder, generate

STEEP = (1.0, 1.15, 1.35, 1.5, 1.6, 1.7, 1.8, 1.9)  # a CPU-like cost curve


def count(confidence: list[float], costs: list[float]) -> int:
    return int(draft_count(torch.tensor(confidence), torch.tensor(costs)))


def test_draft_count_maximises_expected_bytes_per_cost():
    assert count([0.9, 0.9, 0.9], [1, 1, 1, 1]) == 3  # free forwards: verify everything
    assert count([0.1, 0.9, 0.9], [1, 2, 3, 4]) == 0  # unlikely first draft, costly forwards
    # Expected bytes 1, 1.5, 1.75 for 0, 1, 2 drafts; per cost 1, 1.25, 0.875.
    assert count([0.5, 0.5], [1, 1.2, 2]) == 1
    # Sure later drafts only count after an unlikely first one: 1.4 bytes at cost 1.5 < 1.
    assert count([0.2, 1.0, 1.0], [1, 1.5, 1.5, 2.0]) == 0
    assert count([0.2, 1.0, 1.0], [1, 1.5, 1.5, 1.5]) == 3  # unless all three come at once: 1.6 > 1.5


def choose(policy: DraftPolicy, confidence: list[float], n_judged: int = 0, accepted: int = 0) -> int:
    """One row's choice: how many of the drafts of ``confidence`` the next step verifies."""
    one = torch.tensor([True])
    return int(policy.choose(torch.tensor([confidence]), torch.tensor([n_judged]), torch.tensor([accepted]), one)[0])


def test_policy_counts_the_drafts_worth_verifying_for_the_whole_step():
    policy = DraftPolicy(torch.tensor([1.0, 1.1, 2.0, 2.1]), n_rows=3)
    confidence = torch.tensor([[0.9, 0.3, 0.9], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    zeros = torch.zeros(3, dtype=torch.long)
    # Alone, the sure row would verify 3 drafts (4 / 2.1), the other 1 (1.9 / 1.1): together they
    # expect 2, 3.9, 5.17, 6.41 bytes from 0..3 drafts, best per cost at 1 (3.9 / 1.1). The third
    # row waits this step: its drafts count for nothing.
    counts = policy.choose(confidence, zeros, zeros, torch.tensor([True, True, False]))
    assert counts.tolist() == [1, 1, 1]
    assert policy.choose(confidence, zeros, zeros, torch.tensor([False, True, False])).tolist() == [3, 3, 3]


def test_policy_calibrates_each_head_on_what_verification_reached():
    policy = DraftPolicy(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    choose(policy, [0.5, 0.4, 0.3])
    # Draft 1 accepted, draft 2 rejected, draft 3 never judged; learnt before the next choice.
    choose(policy, [0.5, 0.4, 0.3], 3, 1)
    assert policy.hits[0].tolist() == [2.0, 1.0, 1.0]
    assert policy.predicted[0].tolist() == pytest.approx([1.5, 1.4, 1.0])
    # Head 3 hit less often than it claimed: its 0.5 is worth 0.36, and a second draft no
    # longer pays (2.36 bytes / 1.8 < 2 / 1.5), which it would at face value (2.5 / 1.8).
    policy.costs = torch.tensor([[1.0, 1.5, 1.8, 9.0]])
    assert choose(policy, [1.0, 0.5, 0.5]) == 1
    assert choose(DraftPolicy(policy.costs), [1.0, 0.5, 0.5]) == 2


def test_policy_prices_a_step_at_its_row_count():
    # One row: wide forwards cost next to nothing. Four rows: each draft adds half a forward.
    table = torch.tensor([[1.0, 1.05, 1.1, 1.15]] * 3 + [[1.0, 1.5, 2.0, 2.5]])
    confidence = [0.8, 0.6, 0.5]  # expected bytes 1, 1.8, 2.28, 2.52
    assert choose(DraftPolicy(table), confidence) == 3  # 2.52 / 1.15 is the best at one row
    policy = DraftPolicy(table, n_rows=4)
    counts = policy.choose(torch.tensor([confidence] * 4), torch.zeros(4, dtype=torch.long),
                           torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool), rows=4)
    assert counts.tolist() == [1] * 4  # 4 x 1.8 / 1.5 beats 4 x 1 / 1, 4 x 2.28 / 2 and 4 x 2.52 / 2.5
    assert choose(DraftPolicy(table[:1]), confidence) == 3  # a single curve prices every step alike


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
        sp = run(model, prompt=prompt, max_new_bytes=80, draft_costs=costs)
        assert sp.output == ar.output, (prompt, costs)
        steps = sp.stats.forwards - 1  # the prompt's forward verifies nothing
        short += costs == STEEP and sp.stats.attempted[0] < steps  # some steps verified no draft
        full += sp.stats.attempted[-1] > 0  # and some went all the way to the last head
        if costs != STEEP:  # flat costs: every step verifies every draft, as without costs
            plain = run(model, prompt=prompt, max_new_bytes=80).stats
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
    assert GenerationConfig(speculative=False, draft_costs=(1.0,)).draft_policy(0, torch.device("cpu")) is None


def test_a_batch_verifies_the_drafts_its_row_count_pays_for():
    """Two prompts decoded together are priced by the table's second curve, not its first: flat at
    two rows, they verify every draft (as without costs); steep at two rows, fewer. Either way each
    row's output is its autoregressive one."""
    model = trained_model()
    corpus = stdlib_corpus()
    prompts = [b"def ", bytes(corpus[3000:3040].tolist())]
    flat = (1.0,) * 8
    attempted = {}
    for name, table in (("steep at 2", (flat, STEEP)), ("flat at 2", (STEEP, flat))):
        gen = generate(model, GenerationConfig(max_new_bytes=80, draft_costs=table), prompts)
        outputs = gen.read_all()
        for prompt, out in zip(prompts, outputs):
            assert out == run(model, prompt=prompt, max_new_bytes=80, speculative=False).output, (name, prompt)
        attempted[name] = [row.stats.attempted for row in gen.rows]
    plain = generate(model, GenerationConfig(max_new_bytes=80), prompts)
    plain.read_all()
    assert attempted["flat at 2"] == [row.stats.attempted for row in plain.rows]
    assert sum(map(sum, attempted["steep at 2"])) < sum(map(sum, attempted["flat at 2"]))


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
