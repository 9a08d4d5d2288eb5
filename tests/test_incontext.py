"""Drafts from a row's own text (``bytemtp.decode.incontext``): the per-row counts are the text's,
lookup drafts keep sampling exact (closed form) and greedy output byte for byte."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from fixtures_train import trained_model
from test_batching import alone, corpus_prompts
from test_generate import random_model
from test_tree_sampling import BUSH, CHAIN7, CONFIGS, MadeUpModel, depths, identity_gap, output_law, sibling_ranks

from bytemtp import BOS
from bytemtp.decode.batch import RowParams
from bytemtp.decode.generate import Decoder, GenerationConfig
from bytemtp.decode.incontext import RowTexts
from bytemtp.decode.sampling import SamplingConfig


def looked_up(v: int):
    """A made-up lookup: a node's byte is a fixed function of the bytes above it (a row's lookup is a
    function of its text)."""
    return lambda prefix: (3 * len(prefix) + sum(prefix) + 1) % v


LOOKUP_TREES = {  # parent, alphabet, the nodes whose bytes are looked up (the others sampled)
    "chain of 7, looked up": (CHAIN7, 3, range(1, 8)),
    "chain, 3 looked up then 4 sampled": (CHAIN7, 3, range(1, 4)),
    "bush, a looked-up branch beside sampled siblings": (BUSH, 4, (1, 4)),
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("tree", LOOKUP_TREES)
def test_lookup_drafts_judged_by_point_masses_are_exact(tree, config):
    """A looked-up draft is chosen, not drawn: judged by the point mass on it (its sampled siblings
    drawn without it), the step followed by autoregressive sampling is autoregressive sampling."""
    parent, v, nodes = LOOKUP_TREES[tree]
    cfg, ties = CONFIGS[config]
    model = MadeUpModel(v, cfg, seed=3, horizon=max(depths(parent)) + 1, ties=ties)
    chosen = {n: looked_up(v) for n in nodes}
    law = output_law(model, parent, sibling_ranks(parent), sampled=True, chosen=chosen)
    assert identity_gap(model, law, max(depths(parent)) + 1) < 1e-9


def _point_on_next(q: torch.Tensor, x: int) -> torch.Tensor:
    row = torch.zeros_like(q)
    row[(x + 1) % q.numel()] = 1.0
    return row


LOOKUP_MUTANTS = {
    "looked-up draft judged by the heads' q, as if drawn": lambda q, x: q,
    "point mass on the wrong byte": _point_on_next,
}


@pytest.mark.parametrize("tree", ["chain of 7, looked up", "bush, a looked-up branch beside sampled siblings"])
@pytest.mark.parametrize("mutant", LOOKUP_MUTANTS)
def test_planted_lookup_bias_breaks_the_identity(mutant, tree):
    parent, v, nodes = LOOKUP_TREES[tree]
    model = MadeUpModel(v, SamplingConfig(temperature=0.9), seed=3, horizon=max(depths(parent)) + 1)
    chosen = {n: looked_up(v) for n in nodes}
    law = output_law(
        model, parent, sibling_ranks(parent), True, probe=False, chosen=chosen, chosen_judge=LOOKUP_MUTANTS[mutant]
    )
    assert identity_gap(model, law, max(depths(parent)) + 1) > 1e-4


def reference_counts(text: list[int], pairs: int) -> dict[tuple[int, int], Counter]:
    """Byte-trigram counts of ``text``, by pair, the first ``pairs`` distinct pairs only."""
    counts: dict[tuple[int, int], Counter] = {}
    for a, b, c in zip(text, text[1:], text[2:]):
        if (a, b) in counts or len(counts) < pairs:
            counts.setdefault((a, b), Counter())[c] += 1
    return counts


def table_counts(texts: RowTexts, r: int) -> dict[tuple[int, int], Counter]:
    out = {}
    for s in np.flatnonzero(texts.keys[r] >= 0):
        a, b = divmod(int(texts.keys[r, s]), 257)
        row = texts.counts[r, s]
        out[(a, b)] = Counter({c: int(row[c]) for c in np.flatnonzero(row)})
        assert texts.totals[r, s] == row.sum()
    return out


def test_counts_follow_appended_text_and_table_capacity():
    """Appended in pieces (and past the text buffer, whose older half is dropped), the counts are
    those of the whole text; a table of few pairs counts its first pairs only; reset forgets."""
    rng = np.random.default_rng(0)
    text = rng.integers(0, 6, 700).tolist()  # 36 possible pairs
    texts = RowTexts(2, 320, pairs=16, text_bytes=128)
    texts.begin(1, text[:5])
    texts.begin(1, text[:3])  # a re-encoding counts nothing again
    i = 5
    while i < len(text):
        n = int(rng.integers(1, 9))
        texts.extend(1, text[i : i + n])
        i += n
    assert table_counts(texts, 1) == reference_counts(text, 16) and table_counts(texts, 0) == {}
    assert texts.text(1) == text[-(texts.lengths[1]) :] and texts.lengths[1] >= 64
    texts.reset(1)
    assert table_counts(texts, 1) == {} and texts.text(1) == []


def engine_run(decoder: Decoder, prompts: list[bytes], params: RowParams, slots: int, cache_len: int):
    """Decode ``prompts`` through an engine of ``slots`` rows -> (outputs, rows, the chain strategy)."""
    engine = decoder.engine(slots, cache_len)
    rows = [engine.row(p, params, i) for i, p in enumerate(prompts)]
    out = [b""] * len(prompts)
    engine.start()
    try:
        waiting = list(rows)
        while waiting or engine.live:
            while waiting and engine.free:
                engine.admit(waiting.pop(0))
            for row, data in engine.step():
                out[row.index] += data
    finally:
        engine.close()
    return out, rows, engine.strategy


def test_counts_after_a_generation_are_the_rows_texts():
    """After a batch generation each row's text is BOS, its prompt and every byte decided for it
    (the last step may decide past the byte budget), its counts that text's: rows independent."""
    model = trained_model()
    prompts = corpus_prompts([40, 3, 64])
    decoder = Decoder(model, GenerationConfig(max_new_bytes=80))
    out, rows, strategy = engine_run(decoder, prompts, RowParams(max_new_bytes=80), 3, model.cfg.max_seq_len)
    for r, (prompt, output) in enumerate(zip(prompts, out)):
        text = strategy.texts.text(r)
        assert text[: 1 + len(prompt) + len(output)] == [BOS, *prompt, *output]
        assert len(text) - 1 - len(prompt) - len(output) < decoder.n_drafts + 1
        assert table_counts(strategy.texts, r) == reference_counts(text, 1024)
    _, _, single = engine_run(decoder, prompts[1:2], RowParams(max_new_bytes=80), 1, model.cfg.max_seq_len)
    assert single.texts.text(0) == strategy.texts.text(1)


def test_counts_survive_window_cuts_and_reset_on_admission():
    """Rows re-encoded after their windows were cut keep counting their whole text once; a slot that
    takes the next request starts that request's text afresh."""
    model = random_model(n_future=4, max_seq_len=24)
    prompts = [bytes(range(200, 230)), b"abc", b"x" * 23]
    decoder = Decoder(model, GenerationConfig(max_new_bytes=60))
    out, rows, strategy = engine_run(decoder, prompts, RowParams(max_new_bytes=60), 2, 24)
    assert all(row.stats.window_cuts > 0 for row in rows)
    contexts = [[BOS, *p][-12:] if len(p) + 1 > 24 else [BOS, *p] for p in prompts]  # cut to half the window
    held = []  # the request each slot held last: prompt 2 and the one that did not free its slot first
    for slot in (0, 1):
        text = strategy.texts.text(slot)
        i = next(i for i, c in enumerate(contexts) if text[: len(c)] == c)
        assert text[: len(contexts[i]) + len(out[i])] == contexts[i] + list(out[i])
        assert table_counts(strategy.texts, slot) == reference_counts(text, 1024)
        held.append(i)
    assert 2 in held and len(set(held)) == 2
    assert out == [alone(model, p, max_new_bytes=60, speculative=False) for p in prompts]


@pytest.mark.parametrize("drafts", [
    {"lookup": True, "context_mixing": 0.0},
    {"lookup": False, "context_mixing": 0.6},
    {"lookup": True, "context_mixing": 2.0},
    {"lookup": True, "draft_heads": 3, "draft_coupling": 0.0},
])
def test_greedy_output_is_autoregressive_with_drafts_from_the_text(drafts):
    """Greedy chains drafting from the rows' own text, in a batch with rows stopping at different
    times, produce exactly autoregressive greedy decoding; the lookups did happen."""
    model = trained_model()
    text = corpus_prompts([48])[0]
    prompts = [text + b"\n" + text[:6], *corpus_prompts([5, 40, 17])]  # the first repeats its context
    config = GenerationConfig(max_new_bytes=90, stop=(b"rr;",), **drafts)
    decoder = Decoder(model, config)
    want = [alone(model, p, max_new_bytes=90, stop=(b"rr;",), speculative=False) for p in prompts]
    gen = decoder.generate(prompts)
    assert gen.read_all() == want
    assert (sum(row.stats.lookups for row in gen.rows) > 0) == drafts["lookup"]
    single = decoder.generate(prompts[:1])  # alone, a lookup runs past the heads' reach
    assert single.read() == want[0] and (single.stats.lookups > 0) == drafts["lookup"]


def test_a_row_left_alone_in_a_batch_looks_up_past_the_heads(monkeypatch):
    """Once the other rows of a batch have stopped, the last one's lookups run past the heads'
    reach (its forward widens no other row's), and its output is still greedy decoding's."""
    model = trained_model()
    text = corpus_prompts([48])[0]
    prompts = [text + b"\n" + text[:6], *corpus_prompts([5, 17])]
    decoder = Decoder(model, GenerationConfig(lookup=True))
    engine = decoder.engine(3, model.cfg.max_seq_len)
    widths: list[tuple[int, int]] = []  # (rows computed, positions) of every step's forward
    decode = model.decode

    def spy(ids, input_pos, *args, rows=None, **kw):
        computed = range(ids.shape[0]) if rows is None else rows
        if input_pos[computed, 0].min() > 0:  # a step (a prompt's forward starts at slot 0)
            widths.append((len(computed), ids.shape[1]))
        return decode(ids, input_pos, *args, rows=rows, **kw)

    monkeypatch.setattr(model, "decode", spy)
    rows = [engine.row(p, RowParams(max_new_bytes=n), i) for i, (p, n) in enumerate(zip(prompts, (60, 3, 3)))]
    out = b"".join(data for i, data in engine.run(rows) if i == 0)
    monkeypatch.undo()
    assert out == alone(model, prompts[0], max_new_bytes=60, speculative=False)
    heads = model.cfg.n_future - 1
    assert max(p for b, p in widths if b > 1) <= 1 + heads
    assert max(p for b, p in widths if b == 1) > 1 + heads
