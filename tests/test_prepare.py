"""``bytemtp prepare`` and ``bytemtp info``: real inputs in, shards out, read back byte for byte."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard
from click.testing import CliRunner

from bytemtp.cli import main
from bytemtp.data.prepare import PrepareConfig, is_up_to_date, prepare
from bytemtp.data.shards import MANIFEST, SPLITS, Dataset, ShardBuffer, file_sha256, read_shard
from bytemtp.data.documents import ReadOptions
from bytemtp.data.sources import BuiltinSource
from bytemtp_corpora import CORPORA
from conftest import random_docs
from test_sources import mixed_bytes, write_jsonl


def run(*args, input: bytes | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def ok(*args, input: bytes | None = None):
    result = run(*args, input=input)
    assert result.exit_code == 0, result.output
    return result


def fails(*args, match: str, input: bytes | None = None):
    """Exit status 1 with exactly one ``Error:`` line matching ``match`` and no traceback."""
    result = run(*args, input=input)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and re.search(match, errors[0]), result.stderr
    assert result.stderr.rstrip().endswith(errors[0])  # the message is the whole last line
    return result


def read_back(out: Path) -> dict[str, list[bytes]]:
    ds = Dataset(out)
    return {split: [doc for info in ds.shards(split) for doc in ds.read(info).docs()] for split in SPLITS}


def is_subsequence(part: list, whole: list) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


def leftovers(parent: Path, name: str) -> list[str]:
    """Entries a run into ``parent/name`` may have left: the directory or its temporary siblings."""
    return sorted(p for p in os.listdir(parent) if p == name or p.startswith(f".{name}."))


# --- the built-in corpus ---------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stdlib") / "ds"
    result = ok("prepare", "builtin:python-stdlib", "--out", out)
    assert "MB/s" in result.stderr  # the progress bar
    return out


def test_stdlib_round_trip_is_byte_exact(stdlib_dataset):
    source = BuiltinSource(CORPORA["python-stdlib"]())
    files = [data for _, path in source.walk if (data := path.read_bytes())]
    assert max(map(len, files)) <= ReadOptions.max_doc_bytes  # so each file is exactly one document
    docs = read_back(stdlib_dataset)
    assert docs["val"], "the default val fraction must give the stdlib a validation split"
    assert sorted(docs["train"] + docs["val"]) == sorted(files)
    assert is_subsequence(docs["train"], files) and is_subsequence(docs["val"], files)


def test_stdlib_manifest_records_version_and_content_hash(stdlib_dataset):
    (item,) = Dataset(stdlib_dataset).manifest["source"]["inputs"]
    assert item["name"] == "python-stdlib" and item["python"] == platform.python_version()
    assert re.fullmatch(r"[0-9a-f]{64}", item["content_sha256"])
    assert item["bytes"] == Dataset(stdlib_dataset).n_bytes("train") + Dataset(stdlib_dataset).n_bytes("val")


def test_verify_passes_on_a_fresh_dataset(stdlib_dataset):
    result = ok("info", stdlib_dataset, "--verify")
    assert "all intact" in result.stdout


def test_info_reports_what_the_manifest_holds(stdlib_dataset):
    ds = Dataset(stdlib_dataset)
    out = ok("info", stdlib_dataset).stdout
    assert "builtin:python-stdlib" in out and platform.python_version() in out
    for split in SPLITS:
        row = next(line.split() for line in out.splitlines() if line.startswith(split + " "))
        assert int(row[1]) == len(ds.shards(split))
        assert int(row[2].replace(",", "")) == ds.n_docs(split)
        ratio = ds.n_bytes(split) / sum(s.compressed_bytes for s in ds.shards(split))
        assert row[-1] == f"{ratio:.2f}x"


def test_up_to_date_check_by_content_hash(stdlib_dataset, tmp_path):
    spec = ["builtin:python-stdlib"]
    assert is_up_to_date(stdlib_dataset, spec)
    assert not is_up_to_date(stdlib_dataset, spec, PrepareConfig(val_fraction=0.02))
    assert not is_up_to_date(tmp_path / "absent", spec)
    assert not is_up_to_date(stdlib_dataset, [str(tmp_path)])  # no content hash to compare
    copy = tmp_path / "copy"
    shutil.copytree(stdlib_dataset, copy)
    assert is_up_to_date(copy, spec)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["source"]["inputs"][0]["content_sha256"] = "0" * 64  # as if the stdlib had changed since
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert not is_up_to_date(copy, spec)
    shutil.rmtree(copy)
    shutil.copytree(stdlib_dataset, copy)
    (copy / Dataset(copy).shards("val")[0].file).unlink()
    assert not is_up_to_date(copy, spec)


# --- every input kind, end to end -------------------------------------------------------


def _inputs(tmp_path: Path, kind: str) -> tuple[list, bytes | None, list[bytes]]:
    """(extra CLI args, stdin, expected documents) for one kind of input."""
    a, b, c = (mixed_bytes(n, seed) for n, seed in ((40_000, 1), (3_000, 2), (70_000, 3)))
    zst = zstandard.ZstdCompressor(level=3)
    if kind == "stdin":
        return ["-"], a, [a]
    if kind == "stdin-multiframe-zst":
        return ["-"], zst.compress(a) + zst.compress(b), [a + b]
    if kind == "stdin-long":
        return ["-", "--max-doc-bytes", "4KiB"], c, [c[i : i + 4096] for i in range(0, len(c), 4096)]
    if kind in ("gz", "xz"):
        path = tmp_path / f"in.bin.{kind}"
        path.write_bytes((gzip.compress if kind == "gz" else lzma.compress)(a))
        return [path], None, [a]
    if kind == "multiframe-zst":
        path = tmp_path / "in.zst"
        path.write_bytes(zst.compress(a) + zstandard.ZstdCompressor(write_content_size=False).compress(c))
        return [path], None, [a + c]
    if kind.startswith("jsonl"):
        texts = [f"record {i}: {'é' * (i % 7)}\n{i * 'x'}" for i in range(200)]
        suffix = kind.removeprefix("jsonl")
        compress = {"": None, ".gz": gzip.compress, ".zst": zst.compress}[suffix]
        path = tmp_path / f"in.jsonl{suffix}"
        write_jsonl(path, [{"body": t, "n": i} for i, t in enumerate(texts)], compress)
        return [path, "--text-field", "body"], None, [t.encode() for t in texts]
    if kind == "dir-globs":
        src = tmp_path / "src"
        expected = []
        for i in range(40):
            sub = src / f"pkg{i % 3}" / ("tests" if i % 5 == 0 else "")
            sub.mkdir(parents=True, exist_ok=True)
            data = mixed_bytes(500 + i, 100 + i)
            (sub / f"m{i}.py").write_bytes(data)
            (sub / f"m{i}.pyc").write_bytes(b"compiled")
            if i % 5:
                expected.append(data)
        return [src, "--include", "*.py", "--exclude", "tests"], None, expected
    raise AssertionError(kind)


KINDS = ["stdin", "stdin-multiframe-zst", "stdin-long", "gz", "xz", "multiframe-zst"]
KINDS += ["jsonl", "jsonl.gz", "jsonl.zst", "dir-globs"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_input_kind_round_trips(tmp_path, kind):
    args, stdin, expected = _inputs(tmp_path, kind)
    out = tmp_path / "ds"
    ok("prepare", *args, "--out", out, "--val-fraction", "0.5", "--no-progress", input=stdin)
    docs = read_back(out)
    assert sorted(docs["train"] + docs["val"]) == sorted(expected)
    if len(expected) >= 10:
        assert docs["train"] and docs["val"]
    assert leftovers(tmp_path, "ds") == ["ds"]
    ok("info", out, "--verify", "--no-progress")


def test_python_api_returns_the_summary(tmp_path):
    args, _, expected = _inputs(tmp_path, "jsonl")
    config = PrepareConfig(val_fraction=0.2, read=ReadOptions(text_field="body"))
    summary = prepare([str(args[0])], tmp_path / "ds", config, progress=False)
    ds = Dataset(tmp_path / "ds")
    assert summary.n_docs() == len(expected) == ds.n_docs("train") + ds.n_docs("val")
    assert summary.n_docs("val") == ds.n_docs("val") > 0
    assert summary.n_bytes() == sum(map(len, expected))
    assert summary.compression_ratio > 1 and summary.stats.input_docs == len(expected)


def test_small_shards_keep_documents_in_order(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = [mixed_bytes(1000 + 37 * i, i) for i in range(80)]
    for i, data in enumerate(files):
        (src / f"f{i:03d}.txt").write_bytes(data)
    out = tmp_path / "ds"
    ok("prepare", src, "--out", out, "--shard-bytes", "8KiB", "--val-fraction", "0.3", "--no-progress")
    ds = Dataset(out)
    assert len(ds.shards("train")) > 3 and len(ds.shards("val")) > 1
    assert all(s.n_bytes < 8192 + max(map(len, files)) for s in ds.shards())
    docs = read_back(out)
    assert sorted(docs["train"] + docs["val"]) == sorted(files)
    assert is_subsequence(docs["train"], files) and is_subsequence(docs["val"], files)


def test_split_is_stable_when_data_is_appended(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(0, 600, 2):
        (src / f"doc{i:04d}.txt").write_bytes(b"document %d" % i)
    write_jsonl(src / "records.jsonl", [{"text": f"record {i}"} for i in range(300)])

    def splits(out: Path) -> dict[bytes, str]:
        return {doc: split for split, docs in read_back(out).items() for doc in docs}

    ok("prepare", src, "--out", tmp_path / "before", "--val-fraction", "0.2", "--no-progress")
    for i in range(1, 600, 2):  # new files sort in between the old ones
        (src / f"doc{i:04d}.txt").write_bytes(b"document %d" % i)
    with open(src / "records.jsonl", "a") as f:
        f.writelines(json.dumps({"text": f"record {i}"}) + "\n" for i in range(300, 600))
    ok("prepare", src, "--out", tmp_path / "after", "--val-fraction", "0.2", "--no-progress")
    before, after = splits(tmp_path / "before"), splits(tmp_path / "after")
    assert len(before) == 600 and len(after) == 1200
    assert all(after[doc] == split for doc, split in before.items())
    assert 160 < sum(split == "val" for split in after.values()) < 320


# --- verify: corruption is found and named ---------------------------------------------


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"{i}.txt").write_bytes(mixed_bytes(3000, i))
    out = tmp_path / "ds"
    ok("prepare", src, "--out", out, "--shard-bytes", "16KiB", "--val-fraction", "0.3", "--no-progress")
    return out


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x40
        path.write_bytes(data)
    elif how == "truncate":
        path.write_bytes(data[: len(data) - 7])
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["flip", "truncate", "missing"])
def test_verify_names_a_damaged_shard(small_dataset, how):
    victim = Dataset(small_dataset).shards("train")[1].file
    ok("info", small_dataset, "--verify", "--no-progress")
    _damage(small_dataset / victim, how)
    result = fails("info", small_dataset, "--verify", "--no-progress", match=rf"1 of \d+ shards.*{victim}")
    assert "all intact" not in result.stdout


def test_verify_catches_corruption_even_when_the_manifest_hash_is_updated(small_dataset):
    """The zstd content checksum inside the shard is a second, independent line of defence."""
    manifest = json.loads((small_dataset / MANIFEST).read_text())
    entry = manifest["shards"][0]
    path = small_dataset / entry["file"]
    _damage(path, "flip")
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (small_dataset / MANIFEST).write_text(json.dumps(manifest))
    fails("info", small_dataset, "--verify", "--no-progress", match=rf"{entry['file']}: corrupt shard")


def test_verify_lists_every_bad_shard(small_dataset):
    shards = Dataset(small_dataset).shards()
    _damage(small_dataset / shards[0].file, "missing")
    _damage(small_dataset / shards[-1].file, "flip")
    fails("info", small_dataset, "--verify", "--no-progress", match=rf"2 of .*{shards[0].file}.*{shards[-1].file}")


def test_info_on_a_directory_without_dataset(tmp_path):
    fails("info", tmp_path, match="not a prepared dataset")


def test_info_and_verify_on_a_dataset_from_another_writer(make_dataset):
    root = make_dataset({"train": [random_docs(20, 1), random_docs(5, 2)], "val": [random_docs(3, 3)]})
    out = ok("info", root, "--verify", "--no-progress").stdout
    assert '"kind": "test"' in out and "verified 3 shards" in out
    total = next(line.split() for line in out.splitlines() if line.startswith("total "))
    assert total[1:3] == ["3", "28"]


# --- bad input: one-line error, nothing left behind -------------------------------------


def _bad_input(tmp_path: Path, case: str) -> tuple[list, bytes | None, str]:
    """(CLI args before --out, stdin, pattern of the error line)."""
    jsonl = tmp_path / "bad.jsonl"
    if case == "missing-file":
        return [tmp_path / "absent.txt"], None, "absent.txt: no such file"
    if case == "unreadable-file":
        if not Path("/proc/self/mem").exists():
            pytest.skip("needs /proc/self/mem")
        return ["/proc/self/mem"], None, "/proc/self/mem: cannot read"
    if case == "unknown-builtin":
        return ["builtin:no-such-corpus"], None, "builtin:no-such-corpus: unknown built-in corpus"
    if case == "malformed-json":
        jsonl.write_bytes(b'{"text": "fine"}\n{"text": oops}\n')
        return [jsonl], None, r"bad\.jsonl:2: malformed JSON"
    if case == "missing-text-field":
        write_jsonl(jsonl, [{"body": "x"}])
        return [jsonl, "--text-field", "content"], None, r"bad\.jsonl:1: record has no field 'content'"
    if case in ("corrupt-gz", "corrupt-zst"):
        suffix = case.removeprefix("corrupt-")
        blob = (gzip.compress if suffix == "gz" else zstandard.ZstdCompressor().compress)(mixed_bytes(50_000, 9))
        path = tmp_path / f"in.txt.{suffix}"
        path.write_bytes(blob[: len(blob) // 2])
        return [path], None, rf"in\.txt\.{suffix}: corrupt or truncated"
    if case == "corrupt-stdin-zst":
        blob = zstandard.ZstdCompressor().compress(mixed_bytes(50_000, 9))
        return ["-"], blob[:-10], "<stdin>: corrupt or truncated zstd"
    if case == "empty-dir":
        (tmp_path / "empty").mkdir()
        return [tmp_path / "empty"], None, "no documents"
    if case == "empty-file":
        (tmp_path / "empty.txt").write_bytes(b"")
        return [tmp_path / "empty.txt"], None, "no documents"
    if case == "empty-stdin":
        return ["-"], b"", "no documents"
    if case == "blank-jsonl":
        jsonl.write_bytes(b"\n\n")
        return [jsonl], None, "no documents"
    flag, value = {
        "bad-val-fraction": ("--val-fraction", "1.5"),
        "bad-level": ("--level", "0"),
        "bad-shard-bytes": ("--shard-bytes", "0"),
        "bad-max-doc-bytes": ("--max-doc-bytes", "0"),
    }[case]
    (tmp_path / "ok.txt").write_bytes(b"ok")
    return [tmp_path / "ok.txt", flag, value], None, flag


BAD_CASES = [
    "missing-file",
    "unreadable-file",
    "unknown-builtin",
    "malformed-json",
    "missing-text-field",
    "corrupt-gz",
    "corrupt-zst",
    "corrupt-stdin-zst",
    "empty-dir",
    "empty-file",
    "empty-stdin",
    "blank-jsonl",
    "bad-val-fraction",
    "bad-level",
    "bad-shard-bytes",
    "bad-max-doc-bytes",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_cleanly(tmp_path, case):
    args, stdin, pattern = _bad_input(tmp_path, case)
    fails("prepare", *args, "--out", tmp_path / "out" / "ds", "--no-progress", input=stdin, match=pattern)
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out", "ds") == []


@pytest.mark.parametrize("case", ["malformed-json", "corrupt-gz", "empty-stdin"])
def test_failed_overwrite_leaves_the_old_dataset_intact(small_dataset, case, tmp_path):
    before = {p.name: p.read_bytes() for p in small_dataset.iterdir()}
    args, stdin, pattern = _bad_input(tmp_path, case)
    fails("prepare", *args, "--out", small_dataset, "--overwrite", "--no-progress", input=stdin, match=pattern)
    assert {p.name: p.read_bytes() for p in small_dataset.iterdir()} == before
    assert leftovers(small_dataset.parent, small_dataset.name) == [small_dataset.name]


def test_skip_bad_lines_continues_and_reports_the_count(tmp_path):
    (tmp_path / "r.jsonl").write_bytes(b'{"text": "a"}\n{broken\n{"text": "b"}\n{"other": 1}\n')
    result = ok("prepare", tmp_path / "r.jsonl", "--out", tmp_path / "ds", "--skip-bad-lines", "--no-progress")
    assert "2 bad JSON Lines records skipped" in result.stdout
    docs = read_back(tmp_path / "ds")
    assert sorted(docs["train"] + docs["val"]) == [b"a", b"b"]


# --- the output directory: refuse, replace, survive interruption ------------------------


def test_non_empty_out_is_refused_without_overwrite(tmp_path, small_dataset):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_bytes(b"precious")
    (tmp_path / "in.txt").write_bytes(b"new data")
    fails("prepare", tmp_path / "in.txt", "--out", tmp_path / "other", match="not empty.*--overwrite")
    fails("prepare", tmp_path / "in.txt", "--out", tmp_path / "other", "--overwrite", match="not a prepared dataset")
    assert (tmp_path / "other" / "keep.txt").read_bytes() == b"precious"
    fails("prepare", tmp_path / "in.txt", "--out", small_dataset, match="not empty")
    (tmp_path / "empty").mkdir()
    ok("prepare", tmp_path / "in.txt", "--out", tmp_path / "empty", "--no-progress")
    assert read_back(tmp_path / "empty")["train"] + read_back(tmp_path / "empty")["val"] == [b"new data"]


def test_overwrite_replaces_a_dataset(tmp_path, small_dataset):
    (tmp_path / "in.txt").write_bytes(b"replacement")
    ok("prepare", tmp_path / "in.txt", "--out", small_dataset, "--overwrite", "--no-progress")
    docs = read_back(small_dataset)
    assert docs["train"] + docs["val"] == [b"replacement"]
    assert sorted(os.listdir(small_dataset)) == sorted([MANIFEST] + [s.file for s in Dataset(small_dataset).shards()])
    assert leftovers(small_dataset.parent, small_dataset.name) == [small_dataset.name]


def _interrupt_midway(tmp_path: Path, out: Path, sig: int, *extra: str) -> subprocess.Popen:
    """Start ``prepare -`` on an open pipe, wait until it has written a shard, then send ``sig``.

    The child gets SIGINT's default disposition: a test run started in the background by a
    shell without job control inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt (the child would read on to the end of its input and succeed)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bytemtp", "prepare", "-", "--out", str(out), "--shard-bytes", "64KiB", *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    proc.stdin.write(mixed_bytes(1 << 20, 11))
    proc.stdin.flush()
    deadline = time.monotonic() + 30
    while not list(out.parent.glob(f".{out.name}.*.tmp/train-*.zst")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.stderr_text = proc.communicate(timeout=30)[1].decode(errors="replace")
    return proc


def test_ctrl_c_leaves_nothing_behind(tmp_path):
    out = tmp_path / "ds"
    proc = _interrupt_midway(tmp_path, out, signal.SIGINT)
    assert proc.returncode != 0, proc.stderr_text
    assert leftovers(tmp_path, "ds") == []


def test_kill_never_damages_the_existing_dataset(small_dataset, tmp_path):
    before = {p.name: p.read_bytes() for p in small_dataset.iterdir()}
    proc = _interrupt_midway(tmp_path, small_dataset, signal.SIGKILL, "--overwrite")
    assert proc.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in small_dataset.iterdir()} == before
    (partial,) = small_dataset.parent.glob(f".{small_dataset.name}.*.tmp")
    assert list(partial.glob("train-*.zst")) and not (partial / MANIFEST).exists()
    shutil.rmtree(partial)


# --- memory -----------------------------------------------------------------------------


def test_shard_buffer_writes_its_documents_and_a_true_manifest_entry(tmp_path):
    docs = random_docs(200, 7) + [b""]
    buffer = ShardBuffer()
    for doc in docs:
        buffer.add(doc)
    assert (buffer.n_docs, buffer.n_bytes) == (len(docs), sum(map(len, docs)))
    path = tmp_path / "train-00000.zst"
    info = buffer.write(path, threads=0)
    assert list(read_shard(path).docs()) == docs
    expected = ("train-00000.zst", "train", len(docs), sum(map(len, docs)), file_sha256(path), path.stat().st_size)
    assert (info.file, info.split, info.n_docs, info.n_bytes, info.sha256, info.compressed_bytes) == expected
    assert (buffer.n_docs, buffer.n_bytes) == (0, 0)

_PEAK_RSS_OF_CHILD = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def test_peak_memory_is_bounded_whatever_the_input_size(tmp_path):
    """256 MiB through stdin as a single document: peak RSS stays far below the input size."""
    out = tmp_path / "ds"
    cmd = [sys.executable, "-c", _PEAK_RSS_OF_CHILD, sys.executable, "-m", "bytemtp", "prepare", "-"]
    cmd += ["--out", str(out), "--shard-bytes", "4MiB", "--level", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    block = b"".join(b"line %d: generated text %x\n" % (i, i * 2654435761 % 2**32) for i in range(40_000))[: 1 << 20]
    n_mib = 256
    for _ in range(n_mib):
        proc.stdin.write(block)
    proc.stdin.close()
    stdout = proc.stdout.read().decode()
    assert proc.wait() == 0, stdout
    peak_mib = int(stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux
    ds = Dataset(out)
    assert ds.n_bytes("train") + ds.n_bytes("val") == n_mib << 20
    assert len(ds.shards()) >= 50
    assert peak_mib < 160, f"peak RSS {peak_mib:.0f} MiB for a {n_mib} MiB input"
