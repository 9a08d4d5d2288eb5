"""BatchLoader and iter_eval_batches on real prepared datasets.

The expected row stream is rebuilt independently from the documents, the NumPy
reference packer and the orders the loader documents; resume and multi-rank runs
are checked batch for batch against uninterrupted single-process runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import random_docs
from test_packing import reference_pack, shard_arrays

from bytemtp import BOS
from bytemtp.errors import BytemtpError
from bytemtp.data.loader import DOC_ORDER, ROW_ORDER, BatchLoader, LoaderConfig, iter_eval_batches
from bytemtp_native import PACKING_MODES, permutation

# Shards of different sizes: documents longer than a row, empty documents, a shard
# whose only document is empty (no concat rows at all) and one with no documents.
TRAIN = [
    random_docs(25, 1) + [b""],
    random_docs(4, 2),
    [b""],
    random_docs(12, 3, max_len=900),
    [],
    random_docs(9, 4, max_len=40),
]
VAL = [random_docs(7, 10), [b""], [], random_docs(5, 11, max_len=50)]


def expected_rows(shards: list[list[bytes]], cfg: LoaderConfig, epochs: int) -> tuple[np.ndarray, list[int], list[int]]:
    """The loader's row stream for ``epochs`` epochs, and per epoch its rows and truncated documents."""
    rows, epoch_rows, epoch_truncated = [], [], []
    for epoch in range(epochs):
        n_rows = n_truncated = 0
        for i in permutation(len(shards), cfg.seed, epoch).tolist():
            data, offsets = shard_arrays(shards[i])
            order = permutation(len(shards[i]), cfg.seed, epoch, i, DOC_ORDER)
            packed, _, truncated = reference_pack(data, offsets, order, cfg.seq_len, cfg.n_future, cfg.mode)
            packed = packed[permutation(len(packed), cfg.seed, epoch, i, ROW_ORDER)]
            rows.append(packed)
            n_rows += len(packed)
            n_truncated += truncated
        epoch_rows.append(n_rows)
        epoch_truncated.append(n_truncated)
    return np.concatenate(rows), epoch_rows, epoch_truncated


def take(loader: BatchLoader, n: int) -> list[torch.Tensor]:
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("mode", PACKING_MODES)
def test_batches_follow_the_documented_row_stream(make_dataset, mode):
    cfg = LoaderConfig(batch_size=4, seq_len=24, n_future=3, mode=mode, seed=3)
    rows, epoch_rows, _ = expected_rows(TRAIN, cfg, epochs=3)
    n_batches = (epoch_rows[0] + epoch_rows[1]) // cfg.batch_size + 1  # ends inside epoch 2
    loader = BatchLoader(make_dataset({"train": TRAIN}), cfg)
    batches = take(loader, n_batches)
    assert all(b.dtype == torch.int64 and b.shape == (4, 27) for b in batches)
    np.testing.assert_array_equal(torch.cat(batches).numpy(), rows[: n_batches * cfg.batch_size])
    assert loader.epoch == 2
    # Each epoch reshuffles: the first rows of epochs 0 and 1 differ.
    assert not np.array_equal(rows[:10], rows[epoch_rows[0] : epoch_rows[0] + 10])


@pytest.mark.parametrize("mode", PACKING_MODES)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_resume_is_exact_across_shard_and_epoch_boundaries(make_dataset, mode, batch_size):
    path = make_dataset({"train": TRAIN})
    cfg = LoaderConfig(batch_size=batch_size, seq_len=16, n_future=4, mode=mode, seed=7)
    uninterrupted = BatchLoader(path, cfg)
    states = [json.loads(json.dumps(uninterrupted.state_dict()))]
    batches = []
    while uninterrupted.epoch < 2:
        batches.append(next(uninterrupted))
        states.append(json.loads(json.dumps(uninterrupted.state_dict())))
    batches += take(uninterrupted, 5)
    # Resume right after every batch that crossed into another shard, and right before it
    # (with batch_size 1, exactly at the boundary).
    crossings = [k for k in range(1, len(states)) if states[k]["shard"] != states[k - 1]["shard"]]
    resume_at = sorted({0, *crossings, *(k - 1 for k in crossings)})
    assert states[crossings[-1]]["epoch"] == 2
    restored = BatchLoader(path, cfg)
    for k in reversed(resume_at):  # jumping backwards too, with prefetches in flight
        restored.load_state_dict(states[k])
        for j in range(k, min(k + 4, len(batches))):
            assert torch.equal(next(restored), batches[j]), f"batch {j} after resuming at {k}"
    fresh = BatchLoader(path, cfg)
    fresh.load_state_dict(states[crossings[-1]])
    assert torch.equal(next(fresh), batches[crossings[-1]])


@pytest.mark.parametrize("mode", PACKING_MODES)
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_together_equal_one_process(make_dataset, mode, world_size):
    path = make_dataset({"train": TRAIN})
    B = 2
    single = BatchLoader(path, LoaderConfig(batch_size=world_size * B, seq_len=16, n_future=4, mode=mode))
    ranks = [
        BatchLoader(path, LoaderConfig(batch_size=B, seq_len=16, n_future=4, mode=mode), rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    n_batches = 0
    while single.epoch < 1 or n_batches < 3:  # across an epoch boundary
        assert torch.equal(torch.cat([next(loader) for loader in ranks]), next(single))
        n_batches += 1
    assert all(loader.state_dict() == single.state_dict() for loader in ranks)


@pytest.mark.parametrize("seq_len", [5, 64])
def test_eval_batches_cover_every_byte_once(make_dataset, seq_len):
    n_future, batch_size = 3, 4
    path = make_dataset({"train": TRAIN[:1], "val": VAL})
    stream = [i for shard in VAL for doc in shard for i in (BOS, *doc)]
    padded = stream + [-1] * (seq_len + n_future)
    expected = [padded[s : s + seq_len + n_future] for s in range(0, len(stream) - 1, seq_len)]
    batches = list(iter_eval_batches(path, batch_size, seq_len, n_future))
    assert all(len(b) == batch_size for b in batches[:-1]) and 1 <= len(batches[-1]) <= batch_size
    rows = torch.cat(batches)
    assert rows.dtype == torch.int64 and rows.tolist() == expected
    targets = rows[:, 1 : seq_len + 1]
    assert targets[targets >= 0].tolist() == stream[1:]  # bits per byte counts each byte once
    assert torch.equal(torch.cat(list(iter_eval_batches(path, batch_size, seq_len, n_future))), rows)


def test_a_corrupt_shard_is_reported_from_the_background_thread(make_dataset):
    path = make_dataset({"train": [random_docs(20, 30), random_docs(20, 31)]})
    bad = path / "train-00001.zst"
    bad.write_bytes(bad.read_bytes()[:-40])
    loader = BatchLoader(path, LoaderConfig(batch_size=2, seq_len=32, n_future=2))
    with pytest.raises(BytemtpError, match="train-00001.zst"):
        take(loader, 1000)


def test_bad_datasets_and_arguments(make_dataset, tmp_path):
    cfg = LoaderConfig(batch_size=2, seq_len=8, n_future=2)
    with pytest.raises(BytemtpError, match="not a prepared dataset"):
        BatchLoader(tmp_path / "missing", cfg)
    path = make_dataset({"train": [[b"abc", b""]], "val": [[b"", b""]]})
    with pytest.raises(BytemtpError, match="'val' split is empty"):
        BatchLoader(path, cfg, split="val")
    with pytest.raises(BytemtpError, match="'val' split is empty"):
        iter_eval_batches(path, 2, 8, 2)
    with pytest.raises(BytemtpError, match="split: 'test'"):
        BatchLoader(path, cfg, split="test")
    with pytest.raises(BytemtpError, match="rank"):
        BatchLoader(path, cfg, rank=2, world_size=2)
    with pytest.raises(BytemtpError, match="mode"):
        LoaderConfig(batch_size=2, seq_len=8, n_future=2, mode="greedy")
    with pytest.raises(BytemtpError, match="batch_size"):
        iter_eval_batches(path, 0, 8, 2, split="train")


def test_a_state_from_another_run_is_refused(make_dataset):
    path = make_dataset({"train": [random_docs(10, 40)]})
    other = make_dataset({"train": [random_docs(10, 41)]})
    state = BatchLoader(path, LoaderConfig(batch_size=2, seq_len=8, n_future=2)).state_dict()
    with pytest.raises(BytemtpError, match="seq_len is 8 in the saved state but 16 now"):
        BatchLoader(path, LoaderConfig(batch_size=2, seq_len=16, n_future=2)).load_state_dict(state)
    with pytest.raises(BytemtpError, match="different 'train' shards"):
        BatchLoader(other, LoaderConfig(batch_size=2, seq_len=8, n_future=2)).load_state_dict(state)
    with pytest.raises(BytemtpError, match="missing field 'row'"):
        BatchLoader(path, LoaderConfig(batch_size=2, seq_len=8, n_future=2)).load_state_dict(
            {k: v for k, v in state.items() if k != "row"}
        )


@pytest.mark.gpu
@pytest.mark.parametrize("mode", PACKING_MODES)
def test_cuda_batches_equal_cpu_batches(make_dataset, mode):
    path = make_dataset({"train": TRAIN, "val": VAL})
    cfg = LoaderConfig(batch_size=3, seq_len=16, n_future=4, mode=mode)
    cpu, cuda = BatchLoader(path, cfg), BatchLoader(path, cfg, device="cuda")
    for _ in range(80):
        batch = next(cuda)
        assert batch.is_cuda and batch.dtype == torch.int64
        assert torch.equal(batch.cpu(), next(cpu))
    on_cuda = torch.cat(list(iter_eval_batches(path, 3, 16, 4, device="cuda")))
    assert on_cuda.is_cuda and torch.equal(on_cuda.cpu(), torch.cat(list(iter_eval_batches(path, 3, 16, 4))))
