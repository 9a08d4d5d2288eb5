"""Byte-pair counts: counted as the loader packs documents, kept with checkpoints, turned into weights."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bytemtp import BOS, VOCAB
from bytemtp.data.pairs import count_byte_pairs
from bytemtp.decode.coupling import pair_weights
from bytemtp.errors import BytemtpError
from bytemtp.train.checkpoint import PAIRS, latest_checkpoint, load_model
from bytemtp.train.loop import train
from conftest import random_docs
from train_support import MICRO, micro_train


def reference_counts(docs: list[bytes]) -> np.ndarray:
    """Each document as BOS, its bytes, the next BOS: every adjacent pair counted."""
    pairs = Counter()
    for doc in docs:
        ids = [BOS, *doc, BOS]
        pairs.update(zip(ids, ids[1:]))
    counts = np.zeros((VOCAB, VOCAB), np.int64)
    for (a, b), n in pairs.items():
        counts[a, b] = n
    return counts


def test_counts_are_every_adjacent_pair_of_the_train_split(make_dataset):
    shards = [random_docs(30, seed=1) + [b""], random_docs(20, seed=2)]
    data = make_dataset({"train": shards, "val": [[b"never counted"]]})
    assert np.array_equal(count_byte_pairs(data), reference_counts(shards[0] + shards[1]))


def test_counting_stops_after_the_document_that_reaches_the_limit(make_dataset):
    docs = [b"a" * 10, b"bc" * 10, b"xyz"]
    data = make_dataset({"train": [docs[:2], docs[2:]], "val": [[b"v"]]})
    assert np.array_equal(count_byte_pairs(data, max_bytes=15), reference_counts(docs[:2]))
    assert np.array_equal(count_byte_pairs(data, max_bytes=10), reference_counts(docs[:1]))


def test_training_keeps_the_counts_with_every_checkpoint(micro_data, tmp_path):
    run = tmp_path / "run"
    train(micro_train(steps=2, ckpt_every=1), MICRO, micro_data, run, progress=False)
    model, _ = load_model(run)
    assert torch.equal(model.byte_pairs, torch.from_numpy(count_byte_pairs(micro_data)))
    assert (latest_checkpoint(run) / PAIRS).is_file()


def test_a_checkpoint_without_counts_loads_and_bad_counts_are_named(micro_data, tmp_path):
    run = tmp_path / "run"
    train(micro_train(steps=1, ckpt_every=1), MICRO, micro_data, run, progress=False)
    path = latest_checkpoint(run) / PAIRS
    path.unlink()  # as older checkpoints are
    assert load_model(run)[0].byte_pairs is None
    for bad in ({"counts": torch.zeros(3, 3, dtype=torch.int64)}, {"counts": -torch.ones(VOCAB, VOCAB).long()},
                {"other": torch.zeros(1)}):
        save_file(bad, str(path))
        with pytest.raises(BytemtpError, match=f"{PAIRS}: expected non-negative int64 byte-pair counts"):
            load_model(run)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(BytemtpError, match=f"{PAIRS}: unreadable byte-pair counts"):
        load_model(run)


def test_weights_are_the_pointwise_ratio_to_a_power():
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.long)
    counts[ord("a"), ord("b")] = 90_000
    counts[ord("a"), ord("c")] = 10_000
    counts[ord("c"), ord("b")] = 100_000
    w1, half = pair_weights(counts, 1.0), pair_weights(counts, 0.5)
    assert torch.isfinite(w1).all() and (w1 > 0).all()
    assert torch.allclose(half, w1.sqrt()) and torch.equal(pair_weights(counts, 0.0), torch.ones(VOCAB, VOCAB))
    # P(b | a) = 0.9 against P(b) = 0.95 (smoothing aside): below 1; P(c | a) = 0.1 against 0.05: about 2
    assert w1[ord("a"), ord("b")] < 1 < w1[ord("a"), ord("c")]
    assert w1[ord("a"), ord("c")] == pytest.approx(2.0, rel=0.05)
    assert w1[ord("z")].sub(1).abs().max() < 1e-6  # a byte never seen first: no reweighting
