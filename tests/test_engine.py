"""The engine's seam: rows admitted into free slots and retired between steps, each with its own settings."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from fixtures_train import trained_model
from test_batching import alone, corpus_prompts

from bytemtp.decode.batch import RowParams
from bytemtp.decode.generate import Decoder, GenerationConfig, generate
from bytemtp.decode.sampling import RowSampling, SamplingConfig, probabilities
from bytemtp.errors import BytemtpError


def drive(engine, rows, retire_after: dict[int, int] | None = None) -> dict[int, bytes]:
    """Admit ``rows`` in order whenever a slot is free, step until all are done -> output per row
    index. ``retire_after``: row index -> steps after its admission at which its client leaves."""
    waiting, out, age = deque(rows), {row.index: b"" for row in rows}, {}
    engine.start()
    try:
        while waiting or engine.live:
            while waiting and engine.free:
                row = waiting.popleft()
                engine.admit(row)
                age[row.index] = 0
            for row, data in engine.step():
                out[row.index] += data
            for row in rows:
                if row.index in age and not row.done:
                    age[row.index] += 1
                    if (retire_after or {}).get(row.index) == age[row.index]:
                        engine.retire(row)
    finally:
        engine.close()
    return out


@pytest.mark.parametrize("decoder", [{}, {"speculative": False}])
def test_rows_join_and_leave_a_running_batch(decoder):
    """Seven requests through three slots, greedy and sampled side by side, each with its own budget
    and stop strings: every greedy row is byte for byte greedy decoding alone, every seeded
    sampled row what the same settings give alone."""
    model = trained_model()
    prompts = [b"", *corpus_prompts([5, 40, 17, 64, 1, 23])]
    sampled = RowParams(temperature=0.8, top_k=20, seed=5, max_new_bytes=50)
    settings = [
        RowParams(max_new_bytes=40), sampled, RowParams(max_new_bytes=70, stop=(b"rr;",)),
        RowParams(temperature=1.1, top_p=0.9, seed=9, max_new_bytes=30), RowParams(max_new_bytes=25),
        RowParams(max_new_bytes=60), sampled,
    ]
    decoder = Decoder(model, GenerationConfig(**decoder))
    engine = decoder.engine(3, model.cfg.max_seq_len)
    rows = [engine.row(p, s, i) for i, (p, s) in enumerate(zip(prompts, settings))]
    out = drive(engine, rows)
    for row, prompt, s in zip(rows, prompts, settings):
        kw = dict(max_new_bytes=s.max_new_bytes, stop=s.stop, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        if s.temperature == 0:
            assert out[row.index] == alone(model, prompt, speculative=False, **kw), row.index
        else:
            single = generate(model, GenerationConfig(seed=s.seed, speculative=decoder.n_drafts > 0, **kw), [prompt])
            assert out[row.index] == single.read(), row.index
        assert row.done and row.stats.stop_reason in ("max_bytes", "stop_string", "end_of_document")
    assert engine.batch.rows and all(row.done for row in engine.batch.rows)  # every slot free again


def test_a_retired_row_frees_its_slot_for_the_next():
    model = trained_model()
    prompts = corpus_prompts([12, 30, 7])
    engine = Decoder(model, GenerationConfig()).engine(2, model.cfg.max_seq_len)
    rows = [engine.row(p, RowParams(max_new_bytes=40), i) for i, p in enumerate(prompts)]
    out = drive(engine, rows, retire_after={0: 3})
    assert rows[0].stats.stop_reason == "cancelled" and len(out[0]) < 40
    assert out[0] == alone(model, prompts[0], max_new_bytes=40, speculative=False)[: len(out[0])]
    for i in (1, 2):
        assert out[i] == alone(model, prompts[i], max_new_bytes=40, speculative=False)


def test_a_tree_engine_refuses_rows_it_cannot_verify():
    model = trained_model()
    engine = Decoder(model, GenerationConfig(tree_nodes=7)).engine(2, model.cfg.max_seq_len)
    engine.start()
    try:
        with pytest.raises(BytemtpError, match="greedily"):
            engine.admit(engine.row(b"x", RowParams(temperature=0.5), 0))
        assert len(engine.free) == 2
    finally:
        engine.close()


def test_row_sampling_is_each_rows_own_distribution():
    """Per-row settings give each row what its own ``SamplingConfig`` gives, and a greedy row a point
    mass at the argmax."""
    logits = torch.randn(4, 3, 257, generator=torch.Generator().manual_seed(0)) * 3
    configs = [SamplingConfig(0.7, 20, 1.0), SamplingConfig(), SamplingConfig(1.3, 0, 0.8), SamplingConfig(1.0)]
    rows = probabilities(logits, RowSampling.of(configs, torch.device("cpu")))
    for r, c in enumerate(configs):
        want = torch.nn.functional.one_hot(logits[r].argmax(-1), 257).float() if c.greedy else probabilities(logits[r], c)
        torch.testing.assert_close(rows[r], want, rtol=0, atol=1e-6)
