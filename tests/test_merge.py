"""``prepare --part I/N`` and ``merge``: N parts merged are exactly the one-process dataset.

Every document of the test inputs names its own identity in its text, so the multiset of
``(split, bytes)`` pairs of a dataset determines which identities it holds and in which
split; the expected multiset is built here from the inputs alone.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_prepare import fails, leftovers, ok, read_back

from bytemtp.data.documents import ReadOptions, ReadStats
from bytemtp.data.merge import merge
from bytemtp.data.partition import Part, plan_parts, read_part
from bytemtp.data.prepare import PrepareConfig, prepare, split_of
from bytemtp.data.shards import MANIFEST, Dataset
from bytemtp.data.sources import read_documents, resolve_sources

VAL = 0.25
MAX_DOC = 2048
CONFIG = PrepareConfig(shard_bytes=8 << 10, val_fraction=VAL, threads=0, read=ReadOptions(max_doc_bytes=MAX_DOC))


def text_of(identity: str, size: int) -> bytes:
    return (f"<{identity}> " + "lorem ipsum " * (size // 12)).encode()


def make_inputs(root: Path) -> dict[str, bytes]:
    """A directory of every input kind (Parquet files of several row groups, JSON Lines, gzip,
    plain text), returning ``identity -> text`` of every document before cutting."""
    docs: dict[str, bytes] = {}
    root.mkdir()
    for k in range(3):
        rows = [text_of(f"web-{k}.parquet:{i}", (i * 37) % 3000) if i % 9 else None for i in range(150)]
        table = pa.table({"text": [r.decode() if r else None for r in rows]})
        pq.write_table(table, root / f"web-{k}.parquet", row_group_size=16 + 7 * k)
        docs.update({f"web-{k}.parquet:{i}": r for i, r in enumerate(rows) if r})
    lines = [json.dumps({"text": text_of(f"dump.jsonl.gz:{n}", n * 50).decode()}) for n in range(1, 61)]
    (root / "dump.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode() + b"\n"))
    docs.update({f"dump.jsonl.gz:{n}": text_of(f"dump.jsonl.gz:{n}", n * 50) for n in range(1, 61)})
    (root / "notes").mkdir()
    for i in range(25):
        docs[f"notes/{i:02d}.txt"] = text_of(f"notes/{i:02d}.txt", i * 300)
        (root / "notes" / f"{i:02d}.txt").write_bytes(docs[f"notes/{i:02d}.txt"])
    return docs


def expected(docs: dict[str, bytes]) -> dict[str, Counter]:
    """``split -> Counter(piece)`` as a one-process ``prepare`` must write them."""
    out = {"train": Counter(), "val": Counter()}
    for identity, data in docs.items():
        for k, start in enumerate(range(0, len(data), MAX_DOC)):
            out[split_of(identity + (f"#{k}" if k else ""), VAL)][data[start : start + MAX_DOC]] += 1
    return out


def contents(out: Path) -> dict[str, Counter]:
    return {split: Counter(docs) for split, docs in read_back(out).items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, bytes], Path]:
    """The inputs, their documents, and the one-process dataset of them."""
    root = tmp_path_factory.mktemp("merge")
    docs = make_inputs(root / "in")
    prepare([str(root / "in")], root / "whole", CONFIG, progress=False)
    return root / "in", docs, root / "whole"


def prepare_parts(src: Path, out: Path, n: int) -> list[Path]:
    parts = [out / f"part-{i}" for i in range(n)]
    for i, path in enumerate(parts):
        prepare([str(src)], path, CONFIG, part=Part(i, n), progress=False)
    return parts


@pytest.mark.parametrize("n", [1, 3, 7])
def test_merged_parts_are_the_one_process_dataset(corpus, tmp_path, n):
    src, docs, whole = corpus
    assert contents(whole) == expected(docs)
    parts = prepare_parts(src, tmp_path, n)
    assert sum(bool(Dataset(p).shards()) for p in parts) == n  # every part got documents
    merge(list(reversed(parts)), tmp_path / "merged", progress=False)
    assert contents(tmp_path / "merged") == contents(whole)
    one, merged = Dataset(whole).manifest, Dataset(tmp_path / "merged").manifest
    assert merged["params"] == one["params"]
    assert merged["source"]["inputs"] == one["source"]["inputs"]
    assert merged["source"]["stats"] == one["source"]["stats"]
    assert merged["source"]["merged"]["parts"] == n
    ok("info", tmp_path / "merged", "--verify", "--no-progress")


def test_parts_split_the_inputs_exactly_once(corpus):
    """Documents with identities: each part reads a disjoint share, together all of them, in order."""
    src, _, _ = corpus
    sources = resolve_sources([str(src)], CONFIG.read)
    everything = [d.identity for d in read_documents(sources, CONFIG.read, ReadStats())]
    shares = []
    for i in range(5):
        plan = plan_parts(sources, CONFIG.read, Part(i, 5))
        shares.append([d.identity for d in read_part(sources, CONFIG.read, ReadStats(), plan)])
    assert [identity for share in shares for identity in share] == everything
    assert all(shares)


def test_a_single_parquet_file_is_split_by_row_group(tmp_path):
    rows = [text_of(f"big.parquet:{i}", 200 + i % 50).decode() for i in range(1000)]
    pq.write_table(pa.table({"text": rows}), tmp_path / "big.parquet", row_group_size=100)
    sources = resolve_sources([str(tmp_path / "big.parquet")], CONFIG.read)
    shares = []
    for i in range(4):
        plan = plan_parts(sources, CONFIG.read, Part(i, 4))
        shares.append([d.identity for d in read_part(sources, CONFIG.read, ReadStats(), plan)])
    assert all(len(s) in (200, 300) for s in shares)  # 10 row groups of about equal weight in 4 runs
    assert [i for s in shares for i in s] == [f"big.parquet:{i}" for i in range(1000)]


def test_merge_links_shards_instead_of_recompressing(corpus, tmp_path):
    src, _, _ = corpus
    parts = prepare_parts(src, tmp_path, 2)
    merge(parts, tmp_path / "merged", progress=False)
    merged = Dataset(tmp_path / "merged")
    part_inodes = {(tmp_path / p / s.file).stat().st_ino for p in parts for s in Dataset(p).shards()}
    assert {(merged.root / s.file).stat().st_ino for s in merged.shards()} == part_inodes
    assert sorted(os.listdir(merged.root)) == sorted([MANIFEST] + [s.file for s in merged.shards()])


def test_part_flag_on_the_command_line(corpus, tmp_path):
    src, _, whole = corpus
    args = ["--shard-bytes", CONFIG.shard_bytes, "--val-fraction", VAL, "--max-doc-bytes", MAX_DOC, "--no-progress"]
    for i in range(2):
        result = ok("prepare", src, "--out", tmp_path / f"p{i}", "--part", f"{i}/2", *args)
        assert f"part     {i} of 2" in result.stdout
    result = ok("merge", tmp_path / "p1", tmp_path / "p0", "--out", tmp_path / "m", "--no-progress")
    assert "merged 2 parts" in result.stdout and "merged   from 2 parts" in result.stdout
    assert contents(tmp_path / "m") == contents(whole)


# --- parts that do not belong together: one error line, nothing written ---------------------


@pytest.fixture(scope="module")
def prepared_parts(corpus, tmp_path_factory) -> list[Path]:
    return prepare_parts(corpus[0], tmp_path_factory.mktemp("parts"), 3)


@pytest.fixture
def three_parts(prepared_parts, tmp_path) -> list[Path]:
    """A fresh copy of three parts, for a test to damage."""
    copies = [tmp_path / p.name for p in prepared_parts]
    for part, copy in zip(prepared_parts, copies):
        shutil.copytree(part, copy)
    return copies


def _bad_merge(tmp_path: Path, parts: list[Path], case: str) -> tuple[list, str]:
    if case == "missing":
        return [parts[0], parts[2]], r"PART: part 1 of 3 missing"
    if case == "same-path-twice":
        return [parts[0], parts[1], parts[2], parts[1]], r"part-1: given twice"
    if case == "same-index-twice":
        shutil.copytree(parts[1], tmp_path / "copy")
        return [*parts, tmp_path / "copy"], r"copy: part 1/3 again \(also .*part-1\)"
    if case == "other-settings":
        manifest = json.loads((parts[2] / MANIFEST).read_text())
        manifest["params"]["val_fraction"] = 0.5
        (parts[2] / MANIFEST).write_text(json.dumps(manifest))
        return parts, r"part-2: prepared with other settings than .*part-0 \(val_fraction\)"
    if case == "other-count":
        manifest = json.loads((parts[1] / MANIFEST).read_text())
        manifest["source"]["part"]["count"] = 4
        (parts[1] / MANIFEST).write_text(json.dumps(manifest))
        return parts, r"part-1: a part of 4, but .*part-0 is a part of 3"
    if case == "other-files":
        manifest = json.loads((parts[1] / MANIFEST).read_text())
        manifest["source"]["part"]["units_sha256"] = "0" * 64
        (parts[1] / MANIFEST).write_text(json.dumps(manifest))
        return parts, r"part-1: the input files differ"
    if case == "not-a-part":
        prepare([str(parts[0] / MANIFEST)], tmp_path / "whole", CONFIG, progress=False)
        return [*parts, tmp_path / "whole"], r"whole: not a part dataset"
    if case == "damaged-shard":
        shard = parts[2] / Dataset(parts[2]).shards()[0].file
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
        return parts, r"part-2/train-00000.zst: sha256 mismatch"
    assert case == "not-a-dataset"
    return [*parts, tmp_path], r"not a prepared dataset"


@pytest.mark.parametrize(
    "case",
    ["missing", "same-path-twice", "same-index-twice", "other-settings", "other-count", "other-files",
     "not-a-part", "damaged-shard", "not-a-dataset"],
)
def test_parts_that_do_not_belong_together_are_refused(tmp_path, three_parts, case):
    args, match = _bad_merge(tmp_path, three_parts, case)
    out = tmp_path / "merged"
    fails("merge", *args, "--out", out, "--no-progress", match=match)
    assert leftovers(tmp_path, "merged") == []


def test_merge_into_a_part_is_refused(tmp_path, three_parts):
    fails("merge", *three_parts, "--out", three_parts[0] / "inner", match="lies inside the part")
    fails("merge", *three_parts, "--out", three_parts[0], "--overwrite", match="lies inside the part")
    assert all(Dataset(p).shards() for p in three_parts)
