"""The SOURCE arguments of ``bytemtp prepare``: files, directories, stdin and built-in corpora.

A source spec is a path (file or directory), ``-`` for stdin, or ``builtin:NAME``.
Each source is a sequence of *entries* (one file, or stdin), and each entry is read by
the reader of its format: plain text (``bytemtp.data.text``), JSON Lines (the same
module), Parquet or Arrow (``bytemtp.data.columnar``). Document identities, which
decide the train/val split:

- a file given by path: its name (``notes.txt``);
- a file found in a directory (or a built-in corpus): its path relative to that
  directory (``json/decoder.py``);
- a JSON Lines record: the file's identity plus the line number (``dump.jsonl.zst:17``);
- a Parquet or Arrow row: the file's identity plus the row number from 0 (``part-0.parquet:4``);
- stdin: ``<stdin>`` (``<stdin>:17`` for a record).

Formats are recognised by extension (``.jsonl``/``.ndjson``, also before a compression
extension; ``.parquet``/``.pq``; ``.arrow``/``.feather``) or forced with ``format``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import struct
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, ContextManager, Iterator, Sequence

from bytemtp.data.columnar import ARROW_SUFFIXES, PARQUET_SUFFIXES, read_arrow, read_parquet
from bytemtp.data.compression import COMPRESSION_SUFFIXES, READ_ERRORS, decompressed, sniff_compression
from bytemtp.data.documents import Document, ReadOptions, ReadStats
from bytemtp.data.text import read_records, read_text
from bytemtp.data.walk import DirectoryWalk
from bytemtp.errors import BytemtpError
from bytemtp_corpora import CORPORA, Corpus, GeneratedCorpus

BUILTIN_PREFIX = "builtin:"
STDIN = "-"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
COLUMNAR_FORMATS = ("parquet", "arrow")


@dataclass(frozen=True)
class Entry:
    """One input stream: a file, or stdin (``path`` None)."""

    identity: str
    name: str  # for messages: the path as the user can find it
    format: str  # "text", "jsonl", "parquet" or "arrow"
    compression: str | None
    path: Path | None
    open_raw: Callable[[], ContextManager[BinaryIO]]


class Source(ABC):
    """One SOURCE argument of ``prepare``."""

    @abstractmethod
    def describe(self) -> dict:
        """What the manifest records about this source. A path is recorded as its real path
        (``resolve``), so the parts of one ``prepare --part`` run from other directories, or
        through a symlink, still record the same inputs and ``merge`` accepts them."""

    @abstractmethod
    def entries(self) -> Iterator[Entry]:
        """The input streams, in a deterministic order."""

    def paths(self) -> list[Path]:
        """The files or directories this source reads (none for stdin or a built-in corpus)."""
        return []


class FileSource(Source):
    def __init__(self, path: Path, format: str):
        self.path = path
        self.format = format

    def describe(self) -> dict:
        return {"kind": "file", "path": str(self.path.resolve())}

    def entries(self) -> Iterator[Entry]:
        yield file_entry(self.path.name, self.path, self.format)

    def paths(self) -> list[Path]:
        return [self.path]


class DirSource(Source):
    """Every file under a directory picked by the globs, in the order of ``DirectoryWalk``."""

    def __init__(self, root: Path, include: tuple[str, ...], exclude: tuple[str, ...], format: str):
        self.walk = DirectoryWalk(root, include, exclude)
        self.format = format

    def describe(self) -> dict:
        return {
            "kind": "dir",
            "path": str(self.walk.root.resolve()),
            "include": list(self.walk.include),
            "exclude": list(self.walk.exclude),
        }

    def entries(self) -> Iterator[Entry]:
        for rel, path in self.walk:
            yield file_entry(rel, path, self.format)

    def paths(self) -> list[Path]:
        return [self.walk.root]


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
        for rel, path in self.walk:
            data = _read_file(path)
            h.update(rel.encode("utf-8", "surrogateescape") + b"\0" + struct.pack("<Q", len(data)))
            h.update(data)
            n_files += 1
            n_bytes += len(data)
        return n_files, n_bytes, h.hexdigest()

    def paths(self) -> list[Path]:
        return []  # the interpreter's own files: never where a dataset is written


class GeneratedSource(Source):
    """A named generated corpus from ``bytemtp_corpora`` (a probe's data): each document is an
    entry of its own, read as text from memory."""

    def __init__(self, corpus: GeneratedCorpus):
        self.corpus = corpus

    def describe(self) -> dict:
        h = hashlib.sha256()
        n_docs = n_bytes = 0
        for identity, data in self.corpus.documents():
            h.update(identity.encode() + b"\0" + struct.pack("<Q", len(data)) + data)
            n_docs += 1
            n_bytes += len(data)
        return {"kind": "builtin", "name": self.corpus.name, **self.corpus.meta, "documents": n_docs,
                "bytes": n_bytes, "content_sha256": h.hexdigest()}

    def entries(self) -> Iterator[Entry]:
        name = BUILTIN_PREFIX + self.corpus.name
        for identity, data in self.corpus.documents():
            yield Entry(identity, name, "text", None, None, lambda data=data: contextlib.nullcontext(io.BytesIO(data)))


class StdinSource(Source):
    """One document, or JSON Lines records with ``format="jsonl"``; compression is sniffed."""

    def __init__(self, stream: BinaryIO, format: str):
        if format in COLUMNAR_FORMATS:
            raise BytemtpError(f"SOURCE '-': --format {format} needs a file, not stdin")
        self.stream = stream if hasattr(stream, "peek") else io.BufferedReader(stream)
        self.format = format

    def describe(self) -> dict:
        return {"kind": "stdin"}

    def entries(self) -> Iterator[Entry]:
        compression = sniff_compression(self.stream.peek(8)[:8])
        format = "jsonl" if self.format == "jsonl" else "text"
        yield Entry("<stdin>", "<stdin>", format, compression, None, lambda: contextlib.nullcontext(self.stream))


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
            corpus = CORPORA[name]()
            sources.append(BuiltinSource(corpus) if isinstance(corpus, Corpus) else GeneratedSource(corpus))
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
    _refuse_overlaps(specs, sources)
    return sources


def _refuse_overlaps(specs: Sequence[str], sources: Sequence[Source]) -> None:
    """Refuse a file or directory given twice, or inside a directory also given, by any
    spelling of its path (``src src``, ``dir dir/a.parquet``, ``mix ../w/mix``): its
    documents would be read twice, as stdin given twice would be. Real paths compared,
    each against its own parents: linear in the number of sources, which a shell glob
    can make thousands."""
    seen: dict[Path, str] = {}
    for spec, source in zip(specs, sources):
        for path in source.paths():
            real = path.resolve()
            if real in seen:
                raise BytemtpError(
                    f"SOURCE {spec}: the same as SOURCE {seen[real]} (its documents would be read twice)"
                )
            seen[real] = spec
    for real, spec in seen.items():
        outer = next((seen[parent] for parent in real.parents if parent in seen), None)
        if outer is not None:
            raise BytemtpError(f"SOURCE {spec}: inside SOURCE {outer}, which reads it already")


def read_documents(sources: Sequence[Source], options: ReadOptions, stats: ReadStats) -> Iterator[Document]:
    """Every document of every source, in order, as pieces of at most ``max_doc_bytes``.

    A read or decompression failure is a ``BytemtpError`` naming the file.
    """
    for source in sources:
        for entry in source.entries():
            yield from entry_documents(entry, options, stats)


def file_entry(identity: str, path: Path, format: str) -> Entry:
    """The entry of a file: its format from ``format`` or, for ``auto``, from its extension."""
    stem, suffix = os.path.splitext(path.name.lower())
    compression = COMPRESSION_SUFFIXES.get(suffix)
    inner = os.path.splitext(stem)[1] if compression else suffix
    if format == "auto":
        by_suffix = ((JSONL_SUFFIXES, "jsonl"), (PARQUET_SUFFIXES, "parquet"), (ARROW_SUFFIXES, "arrow"))
        format = next((kind for suffixes, kind in by_suffix if inner in suffixes), "text")
    if format in COLUMNAR_FORMATS and compression:
        raise BytemtpError(f"{path}: a {compression}-compressed {format} file; decompress it first")
    return Entry(identity, str(path), format, compression, path, lambda: open(path, "rb"))


def entry_documents(
    entry: Entry, options: ReadOptions, stats: ReadStats, row_groups: Sequence[int] | None = None
) -> Iterator[Document]:
    """The documents of one entry (of some of its row groups, for a Parquet file)."""
    if entry.format == "parquet":
        yield from read_parquet(entry.path, entry.name, entry.identity, options, stats, row_groups)
        return
    if entry.format == "arrow":
        yield from read_arrow(entry.path, entry.name, entry.identity, options, stats)
        return
    try:
        with entry.open_raw() as raw, decompressed(raw, entry.compression) as stream:
            if entry.format == "jsonl":
                yield from read_records(stream, entry.name, entry.identity, options, stats)
            else:
                yield from read_text(stream, entry.identity, options.max_doc_bytes, stats)
    except READ_ERRORS as e:
        what = f"corrupt or truncated {entry.compression} input" if entry.compression else "cannot read"
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise BytemtpError(f"{entry.name}: {what} ({reason})") from None


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise BytemtpError(f"{path}: cannot read ({e.strerror})") from None
