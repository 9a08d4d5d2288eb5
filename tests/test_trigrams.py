"""Byte-trigram counts: counted as the loader packs documents, kept with checkpoints, turned into
the draft coupling's weights."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bytemtp import BOS, VOCAB
from bytemtp.data.trigrams import count_byte_trigrams
from bytemtp.decode.coupling import SMOOTHING, draft_context
from bytemtp.errors import BytemtpError
from bytemtp.train.checkpoint import TRIGRAMS, latest_checkpoint, load_model
from bytemtp.train.loop import train
from conftest import random_docs
from train_support import MICRO, micro_train


def reference_counts(docs: list[bytes]) -> np.ndarray:
    """Each document as BOS, BOS, its bytes, BOS: every three adjacent ids counted -> [2, n]."""
    seen = Counter()
    for doc in docs:
        ids = [BOS, BOS, *doc, BOS]
        seen.update(zip(ids, ids[1:], ids[2:]))
    codes = sorted((a * VOCAB + b) * VOCAB + c for a, b, c in seen)
    counts = [seen[(code // VOCAB**2, code // VOCAB % VOCAB, code % VOCAB)] for code in codes]
    return np.array([codes, counts], np.int64)


def test_counts_are_every_trigram_of_the_train_split(make_dataset):
    shards = [random_docs(30, seed=1) + [b""], random_docs(20, seed=2) + [b"abab" * 50]]
    data = make_dataset({"train": shards, "val": [[b"never counted"]]})
    assert np.array_equal(count_byte_trigrams(data), reference_counts(shards[0] + shards[1]))


def test_counting_stops_after_the_document_that_reaches_the_limit(make_dataset):
    docs = [b"a" * 10, b"bc" * 10, b"xyz"]
    data = make_dataset({"train": [docs[:2], docs[2:]], "val": [[b"v"]]})
    assert np.array_equal(count_byte_trigrams(data, max_bytes=15), reference_counts(docs[:2]))
    assert np.array_equal(count_byte_trigrams(data, max_bytes=10), reference_counts(docs[:1]))


def test_training_keeps_the_counts_with_every_checkpoint(micro_data, tmp_path):
    run = tmp_path / "run"
    train(micro_train(steps=2, ckpt_every=1), MICRO, micro_data, run, progress=False)
    model, _ = load_model(run)
    assert torch.equal(model.byte_trigrams, torch.from_numpy(count_byte_trigrams(micro_data)))
    assert (latest_checkpoint(run) / TRIGRAMS).is_file()


def test_a_checkpoint_without_counts_loads_and_bad_counts_are_named(micro_data, tmp_path):
    run = tmp_path / "run"
    train(micro_train(steps=1, ckpt_every=1), MICRO, micro_data, run, progress=False)
    path = latest_checkpoint(run) / TRIGRAMS
    path.unlink()  # as older checkpoints are
    assert load_model(run)[0].byte_trigrams is None
    long = torch.tensor([1, 5, 9])
    for bad in (
        {"codes": long, "counts": -long},  # a negative count
        {"codes": long.flip(0), "counts": long},  # not ascending
        {"codes": long * VOCAB**3, "counts": long},  # no trigram's code
        {"codes": long, "counts": long[:2].clone()},  # lengths differ
        {"codes": long.int(), "counts": long},  # not int64
        {"counts": long},
    ):
        save_file(bad, str(path))
        with pytest.raises(BytemtpError, match=f"{TRIGRAMS}: expected int64 'codes'"):
            load_model(run)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(BytemtpError, match=f"{TRIGRAMS}: unreadable byte-trigram counts"):
        load_model(run)


def test_weights_are_the_smoothed_ratio_to_a_power():
    """After two bytes seen often, the trigram's share decides; after a pair never seen, the last
    byte's; after a byte never seen, nothing changes."""
    n = {(ord("d"), ord("e"), ord("f")): 9_000, (ord("d"), ord("e"), ord("x")): 1_000,
         (ord("z"), ord("e"), ord("x")): 90_000, (ord("z"), ord("e"), ord("f")): 10_000}
    codes = sorted((a * VOCAB + b) * VOCAB + c for a, b, c in n)
    counts = [n[(c // VOCAB**2, c // VOCAB % VOCAB, c % VOCAB)] for c in codes]
    trigrams = torch.tensor([codes, counts])
    one, half = draft_context(trigrams, 1.0, VOCAB), draft_context(trigrams, 0.5, VOCAB)
    d, e, f, x, z, q = (torch.tensor(ord(ch)) for ch in "defxzq")
    assert torch.isfinite(one.weights).all() and (one.weights > 0).all()
    assert torch.allclose(half.weights, one.weights.sqrt())
    p_f = 19_000 / 110_000  # P(f), smoothing aside
    assert one.after(d, e)[f] == pytest.approx(0.9 / p_f, rel=0.01)  # P(f | d, e) = 0.9
    assert one.after(z, e)[f] == pytest.approx(0.1 / p_f, rel=0.01)
    assert one.after(q, e)[f] == pytest.approx((19_000 / 110_000) / p_f, rel=0.01)  # unseen (q, e): P(f | e)
    assert one.after(q, q).sub(1).abs().max() < 1e-3  # nothing known after q
    assert SMOOTHING < 1_000  # the counts above outweigh the smoothing
