"""The Numba packing kernels against a plain NumPy reference, and the packing rules themselves.

``reference_pack`` is written for clarity, not speed; ``bench/bench_loader.py``
times the kernels against it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bytemtp_native as native
from bytemtp import BOS


def shard_arrays(docs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``data``/``offsets`` as ``bytemtp.data.shards.read_shard`` returns them."""
    offsets = np.zeros(len(docs) + 1, np.uint64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    return np.frombuffer(b"".join(docs), np.uint8), offsets


def _with_bos(data: np.ndarray, offsets: np.ndarray, d: int) -> np.ndarray:
    return np.concatenate(([BOS], data[int(offsets[d]) : int(offsets[d + 1])])).astype(np.int32)


def _best_fit_rows(pieces: list[tuple[int, np.ndarray]], row_len: int) -> list[list[tuple[int, np.ndarray]]]:
    """Best-fit decreasing: longest first; the open row with least room that fits, latest-changed on ties."""
    rows: list[dict] = []
    open_rows: list[dict] = []  # rows with room left
    for clock, (d, ids) in enumerate(sorted(pieces, key=lambda p: -len(p[1]))):
        fits = [row for row in open_rows if row["room"] >= len(ids)]
        if fits:
            row = min(fits, key=lambda row: (row["room"], -row["changed"]))
        else:
            row = {"room": row_len, "pieces": []}
            rows.append(row)
            open_rows.append(row)
        row["pieces"].append((d, ids))
        row["room"] -= len(ids)
        row["changed"] = clock
        if row["room"] == 0:
            open_rows.remove(row)
    return [row["pieces"] for row in rows]


def _count_truncated(doc_ids: np.ndarray, lengths: dict[int, int]) -> int:
    """Documents that no single row holds entirely."""
    most = dict.fromkeys(lengths, 0)
    for row in doc_ids:
        ids, counts = np.unique(row[row >= 0], return_counts=True)
        for d, c in zip(ids.tolist(), counts.tolist()):
            most[d] = max(most[d], c)
    return sum(most[d] < m for d, m in lengths.items())


def reference_pack(
    data: np.ndarray, offsets: np.ndarray, order: np.ndarray, seq_len: int, n_future: int, mode: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(rows, doc_ids, n_truncated)`` exactly as ``bytemtp_native.pack`` defines them, in NumPy."""
    T, C = seq_len, seq_len + n_future
    docs = [(int(d), _with_bos(data, offsets, int(d))) for d in order]
    if mode == "concat":
        stream = np.concatenate([ids for _, ids in docs] + [np.zeros(0, np.int32)])
        owner = np.concatenate([np.full(len(ids), d, np.int32) for d, ids in docs] + [np.zeros(0, np.int32)])
        row_list = []
        for start in range(0, max(len(stream) - 1, 0), T):
            row_list.append([(owner[start : start + C], stream[start : start + C])])
    else:
        pieces = []
        for d, ids in docs:
            k = 0
            while len(ids) > C and k * T + C <= len(ids):
                pieces.append((d, ids[k * T : k * T + C]))
                k += 1
            if k == 0 or len(ids) - k * T >= 2:
                pieces.append((d, ids[k * T :]))
        row_list = [[(np.full(len(ids), d, np.int32), ids) for d, ids in row] for row in _best_fit_rows(pieces, C)]
    rows = np.full((len(row_list), C), -1, np.int32)
    doc_ids = np.full((len(row_list), C), -1, np.int32)
    for r, row in enumerate(row_list):
        row_owner = np.concatenate([o for o, _ in row])
        rows[r, : len(row_owner)] = np.concatenate([ids for _, ids in row])
        doc_ids[r, : len(row_owner)] = row_owner
    n_truncated = _count_truncated(doc_ids, {d: len(ids) for d, ids in docs}) if len(rows) else 0
    return rows, doc_ids, n_truncated


documents = st.lists(st.binary(max_size=40), max_size=25)


@st.composite
def packing_cases(draw):
    docs = draw(documents)
    order = np.array(draw(st.permutations(range(len(docs)))), np.int64)
    return docs, order, draw(st.integers(1, 12)), draw(st.integers(1, 5))


@settings(max_examples=300, deadline=None)
@given(case=packing_cases(), mode=st.sampled_from(native.PACKING_MODES), dtype=st.sampled_from([np.int16, np.int32]))
def test_kernel_equals_reference(case, mode, dtype):
    docs, order, T, n = case
    data, offsets = shard_arrays(docs)
    rows, doc_ids, n_truncated = native.pack(data, offsets, order, T, n, mode, dtype, with_doc_ids=True)
    ref_rows, ref_doc_ids, ref_truncated = reference_pack(data, offsets, order, T, n, mode)
    assert rows.dtype == dtype
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_array_equal(doc_ids, ref_doc_ids)
    assert n_truncated == ref_truncated


def _content_lengths(rows: np.ndarray) -> np.ndarray:
    """Ids before the padding; also checks that padding only ever ends a row."""
    lengths = (rows != -1).sum(axis=1)
    for row, k in zip(rows, lengths):
        assert (row[k:] == -1).all()
    return lengths


@settings(max_examples=150, deadline=None)
@given(case=packing_cases())
def test_concat_every_id_but_the_first_is_a_head1_target_once(case):
    docs, order, T, n = case
    data, offsets = shard_arrays(docs)
    rows, _, _ = native.pack(data, offsets, order, T, n, "concat")
    stream = [i for d in order for i in (BOS, *docs[d])]
    targets = rows[:, 1 : T + 1]
    assert targets[targets >= 0].tolist() == stream[1:]
    # Rows are full up to the end of the stream: every input has all n targets that exist.
    starts = np.arange(len(rows)) * T
    np.testing.assert_array_equal(_content_lengths(rows), np.minimum(T + n, len(stream) - starts))


@settings(max_examples=150, deadline=None)
@given(case=packing_cases())
def test_best_fit_keeps_fitting_documents_whole_and_rows_unmergeable(case):
    docs, order, T, n = case
    C = T + n
    data, offsets = shard_arrays(docs)
    rows, doc_ids, n_truncated = native.pack(data, offsets, order, T, n, "best-fit", with_doc_ids=True)
    lengths = _content_lengths(rows)
    assert n_truncated == sum(len(d) + 1 > C for d in docs)
    for d in order.tolist():
        ids = [BOS, *docs[d]]
        if len(ids) <= C:
            where = np.argwhere(doc_ids == d)
            assert len(where) == len(ids) and len(set(where[:, 0].tolist())) == 1
            r, start = where[0]
            assert rows[r, start : start + len(ids)].tolist() == ids
    # Any-fit decreasing never leaves two rows whose contents would fit in one.
    if len(lengths) > 1:
        two_smallest = np.sort(lengths)[:2]
        assert two_smallest.sum() > C


def test_best_fit_splits_long_documents_like_concat():
    doc = bytes(range(1, 30))  # 30 ids with the BOS
    data, offsets = shard_arrays([doc])
    T, n = 8, 3
    rows, _, n_truncated = native.pack(data, offsets, np.arange(1), T, n, "best-fit")
    concat, _, _ = native.pack(data, offsets, np.arange(1), T, n, "concat")
    assert n_truncated == 1
    # Full pieces are concat's rows; the remainder [24, 30) carries the last new targets.
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, concat.tolist()))


def test_fill_rows_writes_any_subset_in_any_order():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, rng.integers(0, 200), dtype=np.uint8).tobytes() for _ in range(60)]
    data, offsets = shard_arrays(docs)
    order = native.permutation(len(docs), 7)
    for mode in native.PACKING_MODES:
        plan = native.plan_rows(offsets, order, 16, 4, mode)
        full, full_docs, _ = native.pack(data, offsets, order, 16, 4, mode, np.int16, with_doc_ids=True)
        assert plan.n_rows == len(full)
        pick = rng.permutation(plan.n_rows)[: plan.n_rows // 2]
        out = np.empty((len(pick), 20), np.int16)
        docs_out = np.empty(out.shape, np.int32)
        native.fill_rows(data, offsets, plan, pick, out, docs_out)
        np.testing.assert_array_equal(out, full[pick])
        np.testing.assert_array_equal(docs_out, full_docs[pick])
        assert plan.pad_fraction == pytest.approx((full == -1).mean())


def test_best_fit_truncates_fewer_documents_than_concat():
    rng = np.random.default_rng(1)
    docs = [b"x" * int(k) for k in rng.integers(0, 120, 400)]
    data, offsets = shard_arrays(docs)
    order = native.permutation(len(docs), 3)
    concat = native.plan_rows(offsets, order, 128, 8, "concat")
    best_fit = native.plan_rows(offsets, order, 128, 8, "best-fit")
    assert best_fit.n_truncated == 0 < concat.n_truncated


@settings(max_examples=50, deadline=None)
@given(docs=documents)
def test_concat_stream(docs):
    data, offsets = shard_arrays(docs)
    assert native.concat_stream(data, offsets).tolist() == [i for d in docs for i in (BOS, *d)]


def test_permutation_is_a_fixed_function_of_its_key():
    p = native.permutation(1000, 5, 1)
    assert sorted(p.tolist()) == list(range(1000))
    np.testing.assert_array_equal(p, native.permutation(1000, 5, 1))
    assert not np.array_equal(p, native.permutation(1000, 1, 5))
    assert not np.array_equal(p, native.permutation(1000, 5, 2))
    assert native.permutation(0, 1).tolist() == [] and native.permutation(1, 1).tolist() == [0]


def test_bad_arguments():
    data, offsets = shard_arrays([b"abc"])
    with pytest.raises(ValueError, match="mode"):
        native.plan_rows(offsets, np.arange(1), 4, 2, "greedy")
    with pytest.raises(ValueError, match="seq_len"):
        native.plan_rows(offsets, np.arange(1), 0, 2)
    plan = native.plan_rows(offsets, np.arange(1), 4, 2)
    with pytest.raises(ValueError, match="shape"):
        native.fill_rows(data, offsets, plan, np.arange(1), np.empty((1, 5), np.int32))
    with pytest.raises(ValueError, match="out of range"):
        native.fill_rows(data, offsets, plan, np.array([1]), np.empty((1, 6), np.int32))


class _PackedShards(torch.utils.data.Dataset):
    """Each item packs one random shard: the kernels running inside DataLoader worker processes."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng(i)
        docs = [rng.integers(0, 256, rng.integers(0, 300), dtype=np.uint8).tobytes() for _ in range(20)]
        data, offsets = shard_arrays(docs)
        return native.pack(data, offsets, native.permutation(len(docs), i), 32, 4, native.PACKING_MODES[i % 2])[0]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_kernels_run_in_dataloader_workers(context):
    """No Numba threading-layer trouble in worker processes, forked or spawned."""
    dataset = _PackedShards()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=2, multiprocessing_context=context
    )
    for got, want in zip(loader, (dataset[i] for i in range(len(dataset))), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
