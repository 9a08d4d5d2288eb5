"""The inputs of ``bytemtp prepare``: files, directories, stdin and built-in corpora as documents.

A source spec is a path (file or directory), ``-`` for stdin, or ``builtin:NAME``.
Every document carries a *source identity* that decides its train/val split, so the
identity depends only on the document itself, never on what else is prepared with it:

- a file given by path: its name (``notes.txt``);
- a file found in a directory (or a built-in corpus): its path relative to that
  directory (``json/decoder.py``);
- a JSON Lines record: the file's identity plus the line number (``dump.jsonl.zst:17``);
- stdin: ``<stdin>`` (``<stdin>:17`` for a record).

Documents longer than ``max_doc_bytes`` are cut into consecutive pieces so one huge
input (a 500 MB file, an endless stdin) never has to fit in memory. Each piece is a
document of its own: the first keeps the identity, the next ones get ``#1``, ``#2``, …
appended, so a long document still contributes to the validation split.

Compression is chosen by file extension (``.gz``, ``.zst``/``.zstd``, ``.xz``,
``.bz2``) and, for stdin, by the stream's magic bytes (gzip, zstd and xz). JSON Lines are recognised by
``.jsonl`` / ``.ndjson`` before the compression extension, or forced with ``format``.
"""

from __future__ import annotations

import bz2
import contextlib
import fnmatch
import gzip
import hashlib
import io
import json
import lzma
import os
import struct
import sys
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, ContextManager, Iterator, Sequence

import zstandard

from bytemtp.errors import BytemtpError
from bytemtp_corpora import CORPORA, Corpus

BUILTIN_PREFIX = "builtin:"
STDIN = "-"
FORMATS = ("auto", "text", "jsonl")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".xz": "xz", ".bz2": "bzip2"}
_STDIN_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"))
_READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error, zstandard.ZstdError)


@dataclass(frozen=True, slots=True)
class Document:
    """A document (or one piece of a long one) and the identity that decides its split."""

    identity: str
    data: bytes


@dataclass(frozen=True)
class ReadOptions:
    """How inputs become documents (the options of ``prepare`` that shape the content)."""

    max_doc_bytes: int = 1 << 20
    text_field: str = "text"
    format: str = "auto"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_bad_lines: bool = False

    def __post_init__(self) -> None:
        if self.max_doc_bytes < 1:
            raise BytemtpError(f"--max-doc-bytes: must be at least 1, got {self.max_doc_bytes}")
        if self.format not in FORMATS:
            raise BytemtpError(f"--format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if not self.text_field:
            raise BytemtpError("--text-field: must not be empty")


@dataclass
class ReadStats:
    """Counts gathered while reading, reported after ``prepare`` and kept in the manifest."""

    input_docs: int = 0  # files and records read, before cutting long ones into pieces
    cut_docs: int = 0  # of those, how many were longer than max_doc_bytes
    empty_docs: int = 0  # dropped: a document of no bytes has nothing to learn from
    bad_lines: int = 0  # JSON Lines records skipped by skip_bad_lines


@dataclass(frozen=True)
class _Entry:
    """One input stream: a file, or stdin."""

    identity: str
    name: str  # for messages: the path as the user can find it
    compression: str | None
    jsonl: bool
    open_raw: Callable[[], ContextManager[BinaryIO]]


class Source(ABC):
    """One SOURCE argument of ``prepare``."""

    @abstractmethod
    def describe(self) -> dict:
        """What the manifest records about this source."""

    @abstractmethod
    def entries(self, skip: frozenset[Path]) -> Iterator[_Entry]:
        """The input streams, in a deterministic order; directories in ``skip`` are not entered."""


class FileSource(Source):
    def __init__(self, path: Path, format: str):
        self.path = path
        self.format = format

    def describe(self) -> dict:
        return {"kind": "file", "path": str(self.path.absolute())}

    def entries(self, skip: frozenset[Path]) -> Iterator[_Entry]:
        yield _file_entry(self.path.name, self.path, self.format)


class DirSource(Source):
    """Every file under a directory picked by the globs, in sorted relative-path order."""

    def __init__(self, root: Path, include: tuple[str, ...], exclude: tuple[str, ...], format: str):
        self.root = root
        self.include = include
        self.exclude = exclude
        self.format = format

    def describe(self) -> dict:
        return {
            "kind": "dir",
            "path": str(self.root.absolute()),
            "include": list(self.include),
            "exclude": list(self.exclude),
        }

    def files(self, skip: frozenset[Path] = frozenset()) -> Iterator[tuple[str, Path]]:
        """``(relative path, path)`` of every picked file, sorted by relative path.

        Each directory is listed and sorted on its own, with sub-directories keyed as
        ``name/``, which yields exactly the global sort order without ever holding the
        whole tree's listing. Symlinked directories are not followed (no cycles).
        """
        yield from self._visit(self.root, "", skip)

    def _visit(self, directory: Path, prefix: str, skip: frozenset[Path]) -> Iterator[tuple[str, Path]]:
        try:
            with os.scandir(directory) as it:
                listing = [(e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e) for e in it]
        except OSError as e:
            raise BytemtpError(f"{directory}: cannot list directory ({e.strerror})") from None
        for key, entry in sorted(listing, key=lambda item: item[0]):
            rel = prefix + entry.name
            if any(_glob_match(rel, entry.name, g) for g in self.exclude):
                continue
            if key.endswith("/"):
                if not (skip and Path(entry.path).resolve() in skip):
                    yield from self._visit(Path(entry.path), rel + "/", skip)
            elif entry.is_file() and (not self.include or any(_glob_match(rel, entry.name, g) for g in self.include)):
                yield rel, Path(entry.path)

    def entries(self, skip: frozenset[Path]) -> Iterator[_Entry]:
        for rel, path in self.files(skip):
            yield _file_entry(rel, path, self.format)


class BuiltinSource(DirSource):
    """A named corpus from ``bytemtp_corpora``: a directory with fixed globs, read as text."""

    def __init__(self, corpus: Corpus):
        super().__init__(corpus.root, corpus.include, corpus.exclude, "text")
        self.corpus = corpus

    def describe(self) -> dict:
        n_files, n_bytes, digest = self.fingerprint()
        return {
            "kind": "builtin",
            "name": self.corpus.name,
            **self.corpus.meta,
            "files": n_files,
            "bytes": n_bytes,
            "content_sha256": digest,
        }

    def fingerprint(self) -> tuple[int, int, str]:
        """Files, bytes and a sha256 over every file's relative path, size and content.

        This is what tells whether a prepared copy of the corpus is still current.
        """
        h = hashlib.sha256()
        n_files = n_bytes = 0
        for rel, path in self.files():
            data = _read_file(path)
            h.update(rel.encode("utf-8", "surrogateescape") + b"\0" + struct.pack("<Q", len(data)))
            h.update(data)
            n_files += 1
            n_bytes += len(data)
        return n_files, n_bytes, h.hexdigest()


class StdinSource(Source):
    """One document, or JSON Lines records with ``format="jsonl"``; compression is sniffed."""

    def __init__(self, stream: BinaryIO, format: str):
        self.stream = stream if hasattr(stream, "peek") else io.BufferedReader(stream)
        self.format = format

    def describe(self) -> dict:
        return {"kind": "stdin"}

    def entries(self, skip: frozenset[Path]) -> Iterator[_Entry]:
        head = self.stream.peek(8)[:8]
        compression = next((kind for magic, kind in _STDIN_MAGIC if head.startswith(magic)), None)
        jsonl = self.format == "jsonl"
        yield _Entry("<stdin>", "<stdin>", compression, jsonl, lambda: contextlib.nullcontext(self.stream))


def resolve_sources(specs: Sequence[str], options: ReadOptions, stdin: BinaryIO | None = None) -> list[Source]:
    """Check every SOURCE up front (so a typo fails before any work) and build its reader."""
    if not specs:
        raise BytemtpError("SOURCE: give at least one file, directory, '-' or builtin:NAME")
    if list(specs).count(STDIN) > 1:
        raise BytemtpError("SOURCE: '-' (stdin) given more than once")
    sources: list[Source] = []
    for spec in specs:
        if spec == STDIN:
            sources.append(StdinSource(stdin if stdin is not None else sys.stdin.buffer, options.format))
        elif spec.startswith(BUILTIN_PREFIX):
            name = spec[len(BUILTIN_PREFIX) :]
            if name not in CORPORA:
                raise BytemtpError(f"{spec}: unknown built-in corpus (known: {', '.join(sorted(CORPORA))})")
            sources.append(BuiltinSource(CORPORA[name]()))
        else:
            path = Path(spec)
            if path.is_dir():
                sources.append(DirSource(path, options.include, options.exclude, options.format))
            elif not path.exists():
                raise BytemtpError(f"{spec}: no such file or directory")
            elif not os.access(path, os.R_OK):
                raise BytemtpError(f"{spec}: cannot read (permission denied)")
            else:
                sources.append(FileSource(path, options.format))
    return sources


def read_documents(
    sources: Sequence[Source], options: ReadOptions, stats: ReadStats, *, skip: frozenset[Path] = frozenset()
) -> Iterator[Document]:
    """Every document of every source, in order, as pieces of at most ``max_doc_bytes``.

    A read or decompression failure is a ``BytemtpError`` naming the file.
    """
    for source in sources:
        for entry in source.entries(skip):
            yield from _entry_documents(entry, options, stats)


def _glob_match(rel: str, name: str, pattern: str) -> bool:
    """A pattern with a ``/`` matches the relative path, one without matches the name at any depth."""
    return fnmatch.fnmatchcase(rel if "/" in pattern else name, pattern)


def _file_entry(identity: str, path: Path, format: str) -> _Entry:
    stem, suffix = os.path.splitext(path.name.lower())
    compression = COMPRESSION_SUFFIXES.get(suffix)
    inner_suffix = os.path.splitext(stem)[1] if compression else suffix
    jsonl = format == "jsonl" or (format == "auto" and inner_suffix in JSONL_SUFFIXES)
    return _Entry(identity, str(path), compression, jsonl, lambda: open(path, "rb"))


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise BytemtpError(f"{path}: cannot read ({e.strerror})") from None


def _decompressed(raw: BinaryIO, compression: str | None) -> ContextManager[BinaryIO]:
    if compression is None:
        return contextlib.nullcontext(raw)
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "xz":
        return lzma.LZMAFile(raw)
    if compression == "bzip2":
        return bz2.BZ2File(raw)
    return io.BufferedReader(ZstdFrames(raw), buffer_size=1 << 20)


def _entry_documents(entry: _Entry, options: ReadOptions, stats: ReadStats) -> Iterator[Document]:
    try:
        with entry.open_raw() as raw, _decompressed(raw, entry.compression) as stream:
            if entry.jsonl:
                yield from _records(stream, entry, options, stats)
            else:
                yield from _text(stream, entry.identity, options.max_doc_bytes, stats)
    except _READ_ERRORS as e:
        what = f"corrupt or truncated {entry.compression} input" if entry.compression else "cannot read"
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise BytemtpError(f"{entry.name}: {what} ({reason})") from None


def _piece_identity(identity: str, k: int) -> str:
    return identity if k == 0 else f"{identity}#{k}"


def _text(stream: BinaryIO, identity: str, max_bytes: int, stats: ReadStats) -> Iterator[Document]:
    """The whole stream as one document, read piece by piece."""
    stats.input_docs += 1
    k = 0
    while data := stream.read(max_bytes):
        if k == 1:
            stats.cut_docs += 1
        yield Document(_piece_identity(identity, k), data)
        k += 1
    if k == 0:
        stats.empty_docs += 1


def _records(stream: BinaryIO, entry: _Entry, options: ReadOptions, stats: ReadStats) -> Iterator[Document]:
    """One document per JSON Lines record: the string in ``options.text_field``, UTF-8 encoded.

    A record is parsed whole, so one line must fit in memory; its text is then cut
    into pieces like any long document. Blank lines are ignored.
    """
    field = options.text_field
    for lineno, line in enumerate(stream, 1):
        if not line.strip():
            continue
        problem = None
        try:
            record = json.loads(line)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            problem = f"malformed JSON ({e.msg if isinstance(e, json.JSONDecodeError) else e})"
        else:
            if not isinstance(record, dict):
                problem = "record is not a JSON object"
            elif field not in record:
                problem = f"record has no field {field!r} (choose one with --text-field)"
            elif not isinstance(record[field], str):
                problem = f"field {field!r} is not a string"
        if problem:
            if not options.skip_bad_lines:
                raise BytemtpError(f"{entry.name}:{lineno}: {problem} (or pass --skip-bad-lines)")
            stats.bad_lines += 1
            continue
        # surrogatepass: a lone \ud800 escape is kept as bytes rather than failing the run
        data = record[field].encode("utf-8", "surrogatepass")
        stats.input_docs += 1
        if not data:
            stats.empty_docs += 1
        elif len(data) > options.max_doc_bytes:
            stats.cut_docs += 1
        identity = f"{entry.identity}:{lineno}"
        for k, start in enumerate(range(0, len(data), options.max_doc_bytes)):
            yield Document(_piece_identity(identity, k), data[start : start + options.max_doc_bytes])


class ZstdFrames(io.RawIOBase):
    """Decode a (multi-frame) zstd stream and fail if it ends inside a frame.

    python-zstandard's ``stream_reader`` returns a short result without any error when
    its input is truncated, which would turn a cut-off download into silently missing
    documents. A ``decompressobj`` knows whether its frame ended, but has no output
    limit, so it is fed small slices: one slice expands to at most about 8 MiB
    (a 3-byte RLE block yields 128 KiB), which keeps memory bounded on any input.
    """

    _FEED = 256
    _READ = 1 << 16

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None
        self._input = memoryview(b"")
        self._output = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._output:
            if not self._decode_more():
                return 0
        n = min(len(buf), len(self._output))
        buf[:n] = self._output[:n]
        self._output = self._output[n:]
        return n

    def _decode_more(self) -> bool:
        if not self._input:
            self._input = memoryview(self._raw.read(self._READ))
            if not self._input:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("input ends inside a zstd frame")
                return False
        if self._frame is None or self._frame.eof:
            self._frame = self._dctx.decompressobj()
        piece = self._input[: self._FEED]
        self._output = memoryview(self._frame.decompress(piece))
        used = len(piece) - len(self._frame.unused_data) if self._frame.eof else len(piece)
        self._input = self._input[used:]
        return True
