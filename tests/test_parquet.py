"""Parquet and Arrow input: round trips through ``prepare``, identities, nulls, bounded memory, bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_prepare import fails, leftovers, ok, read_back

from bytemtp.data.documents import ReadOptions, ReadStats
from bytemtp.data.prepare import split_of
from bytemtp.data.sources import read_documents, resolve_sources

MAX_DOC = 4096


def texts(n: int, seed: int) -> list[str | None]:
    """Row ``i``'s text names the row, so every document is unique; some null, some empty, some
    longer than ``MAX_DOC`` (cut into pieces), some with characters outside ASCII."""
    out: list[str | None] = []
    for i in range(n):
        if i % 11 == 3:
            out.append(None)
        elif i % 13 == 5:
            out.append("")
        elif i % 17 == 7:
            out.append(f"long {seed}/{i} " + "é ☃ x" * (3 * MAX_DOC // 7))
        else:
            out.append(f"row {seed}/{i}: " + "word " * (i % 23))
    return out


def write_parquet(path: Path, columns: dict, row_group_size: int) -> None:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def expected_docs(identity: str, values: list) -> list[tuple[str, bytes]]:
    """``(identity, piece)`` of every non-null value, cut as ``prepare`` cuts: ``FILE:ROW``, then ``#k``."""
    docs = []
    for row, value in enumerate(values):
        data = value.encode() if isinstance(value, str) else value
        if data is None:
            continue
        for k, start in enumerate(range(0, len(data), MAX_DOC)):
            docs.append((f"{identity}:{row}" + (f"#{k}" if k else ""), data[start : start + MAX_DOC]))
    return docs


def read(specs, **options) -> tuple[list[tuple[str, bytes]], ReadStats]:
    opts = ReadOptions(max_doc_bytes=MAX_DOC, **options)
    stats = ReadStats()
    return [(d.identity, d.data) for d in read_documents(resolve_sources(specs, opts), opts, stats)], stats


def by_split(docs: list[tuple[str, bytes]], val_fraction: float) -> dict[str, Counter]:
    out = {"train": Counter(), "val": Counter()}
    for identity, data in docs:
        out[split_of(identity, val_fraction)][data] += 1
    return out


def prepared(out: Path) -> dict[str, Counter]:
    return {split: Counter(docs) for split, docs in read_back(out).items()}


# --- Parquet ------------------------------------------------------------------------------


def test_parquet_rows_row_groups_nulls_and_long_values(tmp_path):
    values = texts(700, 1)
    write_parquet(tmp_path / "a.parquet", {"id": list(range(700)), "text": values}, row_group_size=64)
    assert pq.ParquetFile(tmp_path / "a.parquet").metadata.num_row_groups == 11
    docs, stats = read([str(tmp_path / "a.parquet")])
    assert docs == expected_docs("a.parquet", values)
    assert stats.null_values == values.count(None)
    assert stats.empty_docs == values.count("")
    assert stats.input_docs == 700 - values.count(None)
    assert stats.cut_docs == sum(v is not None and len(v.encode()) > MAX_DOC for v in values)


def test_parquet_binary_column_and_large_types_keep_bytes_as_they_are(tmp_path):
    blobs = [bytes(range(256)) * (i % 5) + b"\xff\xfe%d" % i for i in range(300)] + [None]
    write_parquet(tmp_path / "b.parquet", {"content": pa.array(blobs, pa.binary())}, row_group_size=50)
    strings = texts(120, 2)
    write_parquet(tmp_path / "c.parquet", {"text": pa.array(strings, pa.large_string())}, row_group_size=40)
    docs, _ = read([str(tmp_path / "b.parquet")], text_field="content")
    assert docs == expected_docs("b.parquet", blobs)
    docs, _ = read([str(tmp_path / "c.parquet")])
    assert docs == expected_docs("c.parquet", strings)


def test_parquet_round_trips_through_prepare_with_splits_by_identity(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    values = {f"shard-{k}.parquet": texts(400, k) for k in range(3)}
    for name, column in values.items():
        write_parquet(src / name, {"text": column, "n": list(range(400))}, row_group_size=70)
    ok("prepare", src, "--out", tmp_path / "ds", "--val-fraction", "0.2", "--max-doc-bytes", MAX_DOC, "--no-progress")
    expected = [doc for name, column in values.items() for doc in expected_docs(name, column)]
    assert prepared(tmp_path / "ds") == by_split(expected, 0.2)


def test_format_parquet_reads_a_file_without_the_extension(tmp_path):
    values = texts(50, 3)
    write_parquet(tmp_path / "dump.bin", {"text": values}, row_group_size=20)
    docs, _ = read([str(tmp_path / "dump.bin")], format="parquet")
    assert docs == expected_docs("dump.bin", values)


_READ_PEAK = """
import sys
import pyarrow as pa
from bytemtp.data.documents import ReadOptions, ReadStats
from bytemtp.data.sources import read_documents, resolve_sources
opts = ReadOptions(max_doc_bytes=1 << 16)
n = sum(len(d.data) for d in read_documents(resolve_sources([sys.argv[1]], opts), opts, ReadStats()))
print(n, pa.default_memory_pool().max_memory())
"""


def test_parquet_is_read_one_row_group_at_a_time(tmp_path):
    """96 MiB of text in 8 row groups: Arrow's peak allocation is a few row groups (the binary
    builder grows by doubling, and a dictionary-encoded start is decoded once more), below
    what holding the file's text alone would take."""
    body = b"bounded memory, one row group at a time. " * 1600
    values = pa.array([(b"%d " % i + body)[: 1 << 16] for i in range(1536)], pa.binary())
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": values}), path, row_group_size=192)
    del values
    out = subprocess.run([sys.executable, "-c", _READ_PEAK, str(path)], capture_output=True, check=True, text=True)
    n_bytes, peak = map(int, out.stdout.split())
    assert n_bytes == 96 << 20
    assert peak < 64 << 20, f"peak Arrow allocation {peak >> 20} MiB for 12 MiB row groups"


# --- Arrow: saved Hugging Face datasets and single files ------------------------------------


def write_arrow(path: Path, table: pa.Table, *, stream: bool = True, batch_rows: int = 100) -> None:
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_stream(sink, table.schema) if stream else pa.ipc.new_file(sink, table.schema)
        with writer:
            for batch in table.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)


def save_to_disk_layout(root: Path, columns: list[list]) -> list[str]:
    """What ``datasets.Dataset.save_to_disk`` writes: Arrow stream files, state.json, dataset_info.json."""
    root.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(columns):05d}.arrow" for i in range(len(columns))]
    for name, column in zip(names, columns):
        write_arrow(root / name, pa.table({"text": column, "label": list(range(len(column)))}))
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0" * 16, "_split": "train"}
    (root / "state.json").write_text(json.dumps(state))
    (root / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    return names


def test_saved_dataset_directory_reads_its_data_files_only(tmp_path):
    columns = [texts(230, 5), texts(90, 6)]
    names = save_to_disk_layout(tmp_path / "saved", columns)
    docs, stats = read([str(tmp_path / "saved")])
    assert docs == [doc for name, column in zip(names, columns) for doc in expected_docs(name, column)]
    assert stats.null_values == sum(c.count(None) for c in columns)


def test_saved_dataset_dict_splits_are_read_under_their_directories(tmp_path):
    train, test = texts(40, 7), texts(30, 8)
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "train"]}))
    [test_file] = save_to_disk_layout(tmp_path / "dd" / "test", [test])
    [train_file] = save_to_disk_layout(tmp_path / "dd" / "train", [train])
    docs, _ = read([str(tmp_path / "dd")], exclude=("dataset_dict.json",))
    assert docs == expected_docs(f"test/{test_file}", test) + expected_docs(f"train/{train_file}", train)


@pytest.mark.parametrize("stream", [True, False], ids=["ipc-stream", "ipc-file"])
def test_single_arrow_file(tmp_path, stream):
    values = texts(150, 9)
    write_arrow(tmp_path / "one.arrow", pa.table({"text": values}), stream=stream, batch_rows=33)
    docs, _ = read([str(tmp_path / "one.arrow")])
    assert docs == expected_docs("one.arrow", values)
    ok("prepare", tmp_path / "one.arrow", "--out", tmp_path / "ds", "--max-doc-bytes", MAX_DOC, "--no-progress")
    assert prepared(tmp_path / "ds") == by_split(expected_docs("one.arrow", values), 0.01)


# --- bad input: one line naming the file, nothing written -----------------------------------


def _bad_parquet(tmp_path: Path, case: str) -> tuple[list, str]:
    good = tmp_path / "good.parquet"
    write_parquet(good, {"text": texts(300, 4), "score": [float(i) for i in range(300)]}, row_group_size=50)
    path = tmp_path / "bad.parquet"
    if case == "not-parquet":
        path.write_text('{"text": "this is JSON"}\n')
        return [path], r"bad\.parquet: not a Parquet file"
    if case == "truncated":
        path.write_bytes(good.read_bytes()[:-100])
        return [path], r"bad\.parquet: not a Parquet file, or truncated"
    if case == "missing-column":
        return [good, "--text-field", "body"], r"good\.parquet: no column 'body' \(columns: text, score;"
    if case == "non-text-column":
        return [good, "--text-field", "score"], r"good\.parquet: column 'score' holds double, not text"
    if case == "compressed":
        path = tmp_path / "bad.parquet.gz"
        path.write_bytes(good.read_bytes())
        return [path], r"bad\.parquet\.gz: a gzip-compressed parquet file"
    if case == "arrow-garbage":
        path = tmp_path / "bad.arrow"
        path.write_bytes(b"\xff" * 64)
        return [path], r"bad\.arrow: not an Arrow IPC stream or file"
    if case == "arrow-truncated":
        path = tmp_path / "bad.arrow"
        write_arrow(path, pa.table({"text": texts(300, 4)}))
        path.write_bytes(path.read_bytes()[:-700])
        return [path], r"bad\.arrow: not an Arrow IPC stream or file, or truncated"
    assert case == "stdin"
    return ["-", "--format", "parquet"], r"SOURCE '-': --format parquet needs a file"


@pytest.mark.parametrize(
    "case",
    ["not-parquet", "truncated", "missing-column", "non-text-column", "compressed", "arrow-garbage",
     "arrow-truncated", "stdin"],
)
def test_bad_columnar_input_is_one_error_line_and_writes_nothing(tmp_path, case):
    args, match = _bad_parquet(tmp_path, case)
    fails("prepare", *args, "--out", tmp_path / "ds", "--no-progress", match=match)
    assert leftovers(tmp_path, "ds") == []
