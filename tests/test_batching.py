"""Batched decoding: every row decodes exactly as it would alone, whatever else is in the batch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from fixtures_train import stdlib_corpus, trained_model
from test_generate import random_model, run

from bytemtp.decode.batch import Batch, GenerationStats, Row, RowParams
from bytemtp.decode.generate import Decoder, GenerationConfig, generate
from bytemtp.errors import BytemtpError


def corpus_prompts(lengths: list[int], start: int = 2000) -> list[bytes]:
    text = bytes(stdlib_corpus()[start : start + 20_000].tolist())
    return [text[i * 997 : i * 997 + n] for i, n in enumerate(lengths)]


def alone(model, prompt: bytes, **kw) -> bytes:
    return run(model, prompt=prompt, **kw).output


@pytest.mark.parametrize("decoder", [{"speculative": False}, {}, {"tree_nodes": 12}, {"draft_heads": 3}])
def test_greedy_rows_equal_single_row_autoregressive(decoder):
    """Prompts of different lengths, rows stopping at different times (a stop string, the budget)."""
    model = trained_model()
    prompts = [b"", *corpus_prompts([5, 40, 17, 64, 1])]
    config = GenerationConfig(max_new_bytes=70, temperature=0, stop=(b"rr;",), **decoder)
    gen = generate(model, config, prompts)
    outputs = gen.read_all()
    want = [alone(model, p, max_new_bytes=70, stop=(b"rr;",), speculative=False) for p in prompts]
    assert outputs == want
    reasons = {row.stats.stop_reason for row in gen.rows}
    assert len({len(o) for o in outputs}) > 2 and len(reasons) > 1, reasons  # rows did stop at different times


@pytest.mark.parametrize("decoder", [{"speculative": False}, {}, {"tree_nodes": 7}])
def test_greedy_rows_equal_single_row_across_window_cuts(decoder):
    model = random_model(n_future=4, max_seq_len=24)
    prompts = [b"", bytes(range(200, 230)), b"abc", b"x" * 23]
    config = GenerationConfig(max_new_bytes=60, temperature=0, **decoder)
    gen = generate(model, config, prompts)
    assert gen.read_all() == [alone(model, p, max_new_bytes=60, speculative=False) for p in prompts]
    assert all(row.stats.window_cuts > 0 for row in gen.rows)


@pytest.mark.parametrize("decoder", [{"speculative": False}, {}, {"tree_nodes": 7}])
def test_sampled_row_does_not_depend_on_the_batch(decoder):
    """Same prompt, seed and settings: the same bytes alone or among 15 other rows."""
    model = trained_model()
    prompt = corpus_prompts([30])[0]
    config = GenerationConfig(max_new_bytes=60, temperature=0.8, top_k=20, **decoder)
    single = generate(model, config, [prompt], [7]).read()
    others = corpus_prompts([3 * i + 1 for i in range(15)], start=9000)
    batch = generate(model, config, [*others[:9], prompt, *others[9:]], [100 + i for i in range(9)] + [7] +
                     [200 + i for i in range(6)]).read_all()
    assert batch[9] == single
    assert len(set(batch)) > 10  # the rows did sample different things


def test_seeds_default_to_consecutive_ones():
    model = random_model()
    config = GenerationConfig(max_new_bytes=20, temperature=1.0, seed=5)
    gen = generate(model, config, [b"a", b"a", b"a"])
    outputs = gen.read_all()
    assert [row.stats.seed for row in gen.rows] == [5, 6, 7]
    alone = GenerationConfig(prompt=b"a", max_new_bytes=20, temperature=1.0, seed=6)
    assert outputs[1] == generate(model, alone).read()


def test_non_finite_logits_are_an_error_not_bytes():
    model = copy.deepcopy(random_model())
    with torch.no_grad():
        model.blocks[0].mlp.w_out.weight.fill_(float("nan"))
    for decoder in ({"speculative": False}, {}, {"tree_nodes": 4}):
        for temperature in (0, 0.8):
            with pytest.raises(BytemtpError, match="logits are not finite"):
                run(model, prompt=b"x", max_new_bytes=10, temperature=temperature, seed=1, **decoder)


@pytest.mark.slow  # inductor builds C++ kernels for each step shape
def test_compiled_step_decodes_as_eager_and_compiles_once_per_shape():
    model = copy.deepcopy(trained_model())
    prompts = corpus_prompts([40, 12, 33, 25])
    torch.compiler.reset()
    counters.clear()
    graphs = []
    for speculative in (False, True):
        config = GenerationConfig(max_new_bytes=48, temperature=0, speculative=speculative)
        compiled = Decoder(model, config, compile=True)
        for batch in (prompts[:2], prompts[2:]):  # two generations of the same (B, P)
            assert compiled.generate(batch).read_all() == generate(model, config, batch).read_all()
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] == 1 and graphs[2] == graphs[3] == 2, graphs


def test_a_step_never_writes_past_the_cache():
    """Near the end of the window the step narrows: no position may land on a slot in use."""
    rows = [Row(r, [0] * n, RowParams(), GenerationStats(7)) for r, n in enumerate((63, 10, 60))]
    batch = Batch(rows, cache_len=64, device=torch.device("cpu"))
    assert batch.fits([True, True, True]) == 0 and batch.fits([False, True, True]) == 3
    slots = batch.slots(1 + batch.fits([False, True, True]), [False, True, True]).tolist()
    assert slots == [[63] * 4, [10, 11, 12, 13], [60, 61, 62, 63]]


@pytest.mark.parametrize("decoder", [{"speculative": False}, {}, {"tree_nodes": 7}, {"tree_nodes": 7, "temperature": 0.8}])
def test_a_step_computes_only_the_live_rows(decoder):
    """Rows leave (their budget, a retired client) and join a free slot: each eager forward takes
    only the rows it decodes or encodes, and every row still decodes as it would alone."""
    model = trained_model()
    params = {**{"temperature": 0.0}, **{k: v for k, v in decoder.items() if k == "temperature"}}
    config = GenerationConfig(**decoder)
    engine = Decoder(model, config).engine(4, 128)
    seen: list[int] = []
    hook = model.embed.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
    prompts = corpus_prompts([12, 30, 7, 20])
    budgets = [60, 6, 60, 30]
    rows = [engine.row(p, RowParams(max_new_bytes=n, seed=3, **params), i) for i, (p, n) in enumerate(zip(prompts, budgets))]
    out = {i: b"" for i in range(5)}
    try:
        engine.start()
        for row in rows[:3]:
            engine.admit(row)
        while not rows[1].done:
            for row, data in engine.step():
                out[row.index] += data
        engine.retire(rows[0])  # slot 0's client has gone; slot 1 has stopped by its budget
        assert rows[1].done and engine.free == [0, 1, 3]
        seen.clear()
        while not rows[2].done:
            for row, data in engine.step():
                out[row.index] += data
        assert set(seen) == {1}  # slot 2 alone, not the batch of 4
        late = engine.row(prompts[3], RowParams(max_new_bytes=30, seed=3, **params), 3)
        assert engine.admit(late) == 0
        seen.clear()
        while not late.done:
            for row, data in engine.step():
                out[row.index] += data
        assert set(seen) == {1}
    finally:
        hook.remove()
        engine.close()
    for i in (1, 2, 3):
        kw = {"temperature": params["temperature"], "seed": 3, **decoder}
        assert out[i] == alone(model, prompts[i], max_new_bytes=budgets[i], **kw), i
