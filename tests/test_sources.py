"""Inputs of ``prepare``: every kind of source turned into documents, and every way it can fail."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import random
import sysconfig
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from bytemtp.data.compression import ZstdFrames
from bytemtp.data.documents import ReadOptions, ReadStats
from bytemtp.data.sources import BuiltinSource, read_documents, resolve_sources
from bytemtp.errors import BytemtpError
from bytemtp_corpora import CORPORA, Corpus

COMPRESSORS = {
    ".gz": gzip.compress,
    ".xz": lzma.compress,
    ".bz2": bz2.compress,
    ".zst": lambda b: zstandard.ZstdCompressor(level=3).compress(b),
}


def read(specs, stdin=None, **options) -> tuple[list[tuple[str, bytes]], ReadStats]:
    opts = ReadOptions(**options)
    stats = ReadStats()
    docs = [(d.identity, d.data) for d in read_documents(resolve_sources(specs, opts, stdin), opts, stats)]
    return docs, stats


def mixed_bytes(n: int, seed: int) -> bytes:
    """Text, invalid UTF-8 and every byte value, so nothing may be decoded on the way."""
    rng = random.Random(seed)
    chunks = [b"def f(x):\n    return x\n", bytes(range(256)), b"\xff\xfe\x80 caf\xc3\xa9 \xed\xa0\x80"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(chunks) + rng.randbytes(rng.randint(0, 50))
    return bytes(out[:n])


def write_jsonl(path: Path, records: list, compress=None) -> None:
    raw = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    path.write_bytes(compress(raw) if compress else raw)


# --- plain and compressed files --------------------------------------------------------


def test_a_file_is_one_document_named_after_the_file(tmp_path):
    data = mixed_bytes(5000, 0)
    (tmp_path / "notes.bin").write_bytes(data)
    docs, stats = read([str(tmp_path / "notes.bin")])
    assert docs == [("notes.bin", data)]
    assert stats.input_docs == 1 and stats.cut_docs == 0


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
def test_compressed_files_are_decompressed(tmp_path, suffix):
    data = mixed_bytes(300_000, 1)
    path = tmp_path / f"blob.txt{suffix}"
    path.write_bytes(COMPRESSORS[suffix](data))
    docs, _ = read([str(path)])
    assert docs == [(path.name, data)]


def test_multi_frame_zst_is_read_to_the_end(tmp_path):
    parts = [mixed_bytes(70_000, seed) for seed in range(3)]
    frames = [
        zstandard.ZstdCompressor(level=1).compress(parts[0]),
        zstandard.ZstdCompressor(level=5, write_checksum=True).compress(parts[1]),
        zstandard.ZstdCompressor(level=3, write_content_size=False).compress(parts[2]),
    ]
    path = tmp_path / "multi.zst"
    path.write_bytes(b"".join(frames))
    docs, _ = read([str(path)])
    assert docs == [("multi.zst", b"".join(parts))]


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
@pytest.mark.parametrize("where", ["header", "middle", "end"])
def test_truncated_compressed_input_is_an_error_naming_the_file(tmp_path, suffix, where):
    blob = COMPRESSORS[suffix](mixed_bytes(200_000, 2))
    cut = {"header": 3, "middle": len(blob) // 2, "end": len(blob) - 1}[where]
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(blob[:cut])
    with pytest.raises(BytemtpError, match=r"cut\.\w+: corrupt or truncated"):
        read([str(path)])


def test_truncated_second_zst_frame_is_an_error(tmp_path):
    c = zstandard.ZstdCompressor()
    second = c.compress(mixed_bytes(50_000, 4))
    path = tmp_path / "two.zst"
    path.write_bytes(c.compress(b"complete first frame") + second[: len(second) // 2])
    with pytest.raises(BytemtpError, match="two.zst: corrupt or truncated zstd input"):
        read([str(path)])


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
def test_garbage_with_a_compressed_extension_is_an_error(tmp_path, suffix):
    path = tmp_path / f"fake{suffix}"
    path.write_bytes(b"this was never compressed\n" * 100)
    with pytest.raises(BytemtpError, match=r"fake\.\w+: corrupt or truncated"):
        read([str(path)])


def test_zstd_reader_memory_stays_bounded_on_extreme_compression():
    """64 MiB of zeros is a few KiB of zstd: decoding must not materialise it at once."""
    cobj = zstandard.ZstdCompressor(level=3).compressobj()
    zeros = bytes(1 << 20)
    blob = b"".join(cobj.compress(zeros) for _ in range(64)) + cobj.flush()
    assert len(blob) < 10_000
    tracemalloc.start()
    try:
        reader = io.BufferedReader(ZstdFrames(io.BytesIO(blob)), buffer_size=1 << 20)
        total = 0
        while chunk := reader.read(1 << 20):
            assert not any(chunk)
            total += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 64 << 20
    assert peak < 32 << 20


def test_unreadable_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(BytemtpError, match="nothing-here.txt: no such file or directory"):
        read([str(tmp_path / "nothing-here.txt")])
    if Path("/proc/self/mem").exists():  # a regular file whose read fails with EIO, even for root
        with pytest.raises(BytemtpError, match="/proc/self/mem: cannot read"):
            read(["/proc/self/mem"])


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_file_without_read_permission_is_an_error(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_bytes(b"x")
    path.chmod(0)
    with pytest.raises(BytemtpError, match="secret.txt: cannot read"):
        read([str(path)])


# --- stdin ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [None, *sorted(s for s in COMPRESSORS if s != ".bz2")])
def test_stdin_is_one_document_and_compression_is_sniffed(suffix):
    data = mixed_bytes(100_000, 5)
    raw = COMPRESSORS[suffix](data) if suffix else data
    docs, _ = read(["-"], stdin=io.BytesIO(raw))
    assert docs == [("<stdin>", data)]


def test_stdin_as_jsonl():
    raw = b'{"text": "first"}\n{"text": "second"}\n'
    docs, _ = read(["-"], stdin=io.BytesIO(raw), format="jsonl")
    assert docs == [("<stdin>:1", b"first"), ("<stdin>:2", b"second")]


def test_stdin_only_once():
    with pytest.raises(BytemtpError, match="more than once"):
        read(["-", "-"], stdin=io.BytesIO(b"x"))


# --- long and empty documents ----------------------------------------------------------


def test_long_documents_are_cut_into_consecutive_pieces(tmp_path):
    data = mixed_bytes(10_000, 6)
    (tmp_path / "long.txt").write_bytes(data)
    docs, stats = read([str(tmp_path / "long.txt")], max_doc_bytes=3000)
    assert [i for i, _ in docs] == ["long.txt", "long.txt#1", "long.txt#2", "long.txt#3"]
    assert [len(d) for _, d in docs] == [3000, 3000, 3000, 1000]
    assert b"".join(d for _, d in docs) == data
    assert stats.input_docs == 1 and stats.cut_docs == 1


def test_long_records_are_cut_too(tmp_path):
    text = "é" * 2500  # 5000 UTF-8 bytes
    write_jsonl(tmp_path / "r.jsonl", [{"text": "short"}, {"text": text}])
    docs, stats = read([str(tmp_path / "r.jsonl")], max_doc_bytes=2048)
    assert [i for i, _ in docs] == ["r.jsonl:1", "r.jsonl:2", "r.jsonl:2#1", "r.jsonl:2#2"]
    assert b"".join(d for _, d in docs[1:]) == text.encode()
    assert stats.input_docs == 2 and stats.cut_docs == 1


def test_empty_documents_are_dropped_and_counted(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "empty.txt").write_bytes(b"")
    (tmp_path / "d" / "full.txt").write_bytes(b"content")
    write_jsonl(tmp_path / "d" / "r.jsonl", [{"text": ""}, {"text": "x"}])
    docs, stats = read([str(tmp_path / "d")])
    assert docs == [("full.txt", b"content"), ("r.jsonl:2", b"x")]
    assert stats.empty_docs == 2 and stats.input_docs == 4


# --- directories -----------------------------------------------------------------------


def make_tree(root: Path, rels: list[str]) -> dict[str, bytes]:
    contents = {}
    for i, rel in enumerate(rels):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        contents[rel] = f"file {i}: {rel}\n".encode()
        path.write_bytes(contents[rel])
    return contents


def test_directory_documents_come_in_sorted_relative_path_order(tmp_path):
    rels = ["b.txt", "a/x.txt", "a.txt", "a-b/y.txt", "A.txt", "a/b/c/deep.txt", "a/z.txt", "ab.txt"]
    contents = make_tree(tmp_path / "src", rels)
    docs, _ = read([str(tmp_path / "src")])
    assert docs == [(rel, contents[rel]) for rel in sorted(rels)]


def test_include_and_exclude_globs(tmp_path):
    rels = ["keep.py", "pkg/mod.py", "pkg/data.txt", "pkg/tests/test_mod.py", "build/gen.py", "docs/x.py", "notes.txt"]
    contents = make_tree(tmp_path / "src", rels)
    docs, _ = read([str(tmp_path / "src")], include=("*.py",), exclude=("tests", "build", "docs/*"))
    assert docs == [(rel, contents[rel]) for rel in ["keep.py", "pkg/mod.py"]]
    docs, _ = read([str(tmp_path / "src")], include=("pkg/*",))
    assert [i for i, _ in docs] == ["pkg/data.txt", "pkg/mod.py", "pkg/tests/test_mod.py"]


def test_compressed_and_jsonl_files_inside_directories(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt.gz").write_bytes(gzip.compress(b"plain text"))
    write_jsonl(src / "b.jsonl.zst", [{"text": "one"}, {"text": "two"}], COMPRESSORS[".zst"])
    write_jsonl(src / "c.ndjson.xz", [{"text": "three"}], lzma.compress)
    docs, _ = read([str(src)])
    assert docs == [
        ("a.txt.gz", b"plain text"),
        ("b.jsonl.zst:1", b"one"),
        ("b.jsonl.zst:2", b"two"),
        ("c.ndjson.xz:1", b"three"),
    ]


# --- JSON Lines ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,compress", [("r.jsonl", None), ("r.jsonl.gz", gzip.compress), ("r.JSONL.ZST", COMPRESSORS[".zst"])]
)
def test_jsonl_records_with_a_chosen_text_field(tmp_path, name, compress):
    records = [{"content": "héllo", "id": 1}, {"content": "wörld\n\u2603", "meta": {"x": 1}}, {"content": "\ud800!"}]
    write_jsonl(tmp_path / name, records, compress)
    docs, _ = read([str(tmp_path / name)], text_field="content")
    assert docs == [
        (f"{name}:1", "héllo".encode()),
        (f"{name}:2", "wörld\n\u2603".encode()),
        (f"{name}:3", b"\xed\xa0\x80!"),  # a lone surrogate is kept, not a failure
    ]


def test_jsonl_blank_lines_are_ignored_but_counted_in_line_numbers(tmp_path):
    (tmp_path / "r.jsonl").write_bytes(b'{"text": "a"}\n\n   \n{"text": "b"}\n')
    docs, _ = read([str(tmp_path / "r.jsonl")])
    assert docs == [("r.jsonl:1", b"a"), ("r.jsonl:4", b"b")]


BAD_LINES = {
    "malformed": (b'{"text": "unterminated\n', "malformed JSON"),
    "not-utf8": (b'{"text": "\xff\xfe"}\n', "malformed JSON"),
    "not-object": (b'["text"]\n', "not a JSON object"),
    "missing-field": (b'{"body": "x"}\n', "no field 'text'"),
    "not-string": (b'{"text": 42}\n', "field 'text' is not a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_jsonl_record_names_file_and_line(tmp_path, case):
    line, message = BAD_LINES[case]
    (tmp_path / "data.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "ok too"}\n' + line)
    with pytest.raises(BytemtpError, match=rf"data\.jsonl:3: .*{message}") as err:
        read([str(tmp_path / "data.jsonl")])
    assert "\n" not in str(err.value)


def test_skip_bad_lines_counts_and_continues(tmp_path):
    lines = [b'{"text": "a"}\n'] + [BAD_LINES[c][0] for c in sorted(BAD_LINES)] + [b'{"text": "b"}\n']
    (tmp_path / "data.jsonl").write_bytes(b"".join(lines))
    docs, stats = read([str(tmp_path / "data.jsonl")], skip_bad_lines=True)
    assert docs == [("data.jsonl:1", b"a"), (f"data.jsonl:{len(lines)}", b"b")]
    assert stats.bad_lines == len(BAD_LINES)


def test_format_text_reads_jsonl_files_verbatim(tmp_path):
    raw = b'{"text": "a"}\n{not json\n'
    (tmp_path / "r.jsonl").write_bytes(raw)
    assert read([str(tmp_path / "r.jsonl")], format="text")[0] == [("r.jsonl", raw)]


# --- built-in corpora ------------------------------------------------------------------


def test_unknown_builtin_is_an_error_listing_the_known_ones():
    with pytest.raises(BytemtpError, match="builtin:nope: unknown built-in corpus.*python-stdlib"):
        read(["builtin:nope"])


def test_python_stdlib_is_every_stdlib_py_file_in_sorted_order():
    source = BuiltinSource(CORPORA["python-stdlib"]())
    root = Path(sysconfig.get_paths()["stdlib"])
    assert source.walk.root == root
    expected = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages")]
        rel = Path(directory).relative_to(root)
        expected += [(rel / f).as_posix() for f in files if f.endswith(".py")]
    expected.sort()
    listed = [rel for rel, _ in source.walk]
    assert listed == expected
    assert len(listed) > 500 and "json/decoder.py" in listed


def test_builtin_fingerprint_follows_content(tmp_path):
    make_tree(tmp_path / "corpus", ["a.py", "pkg/b.py", "skip/c.py", "notes.txt"])
    corpus = Corpus("test", tmp_path / "corpus", include=("*.py",), exclude=("skip",))
    n_files, n_bytes, digest = BuiltinSource(corpus).fingerprint()
    assert n_files == 2
    assert n_bytes == sum(len((tmp_path / "corpus" / r).read_bytes()) for r in ["a.py", "pkg/b.py"])
    (tmp_path / "corpus" / "notes.txt").write_bytes(b"not part of the corpus")
    (tmp_path / "corpus" / "skip" / "c.py").write_bytes(b"excluded")
    assert BuiltinSource(corpus).fingerprint()[2] == digest
    (tmp_path / "corpus" / "a.py").write_bytes((tmp_path / "corpus" / "a.py").read_bytes().replace(b"0", b"1"))
    assert BuiltinSource(corpus).fingerprint()[2] != digest
