"""Readers of byte streams: a plain file as one document, JSON Lines as one document per record.

Both read a stream already decompressed (``bytemtp.data.compression``), so they serve
files, compressed files and stdin alike.
"""

from __future__ import annotations

import json
import re
from typing import BinaryIO, Iterator

from bytemtp.data.documents import Document, ReadOptions, ReadStats, cut, piece_identity
from bytemtp.errors import BytemtpError


def read_text(stream: BinaryIO, identity: str, max_bytes: int, stats: ReadStats) -> Iterator[Document]:
    """The whole stream as one document, read piece by piece (never whole in memory)."""
    stats.input_docs += 1
    k = 0
    while data := stream.read(max_bytes):
        if k == 1:
            stats.cut_docs += 1
        yield Document(piece_identity(identity, k), data)
        k += 1
    if k == 0:
        stats.empty_docs += 1


def read_records(
    stream: BinaryIO, name: str, identity: str, options: ReadOptions, stats: ReadStats
) -> Iterator[Document]:
    """One document per JSON Lines record: the string in ``options.text_field``, UTF-8 encoded.

    A record is parsed whole, so one line must fit in memory; its text is then cut
    into pieces like any long document. Blank lines are ignored but keep their line
    numbers, so a record's identity ``identity:LINE`` is where an editor shows it.
    """
    for lineno, line in enumerate(stream, 1):
        if not line.strip():
            continue
        text, problem = _record_text(line, options.text_field)
        if problem:
            if not options.skip_bad_lines:
                raise BytemtpError(f"{name}:{lineno}: {problem} (or pass --skip-bad-lines)")
            stats.bad_lines += 1
            continue
        # surrogatepass: a lone \ud800 escape is kept as bytes rather than failing the run
        yield from cut(f"{identity}:{lineno}", text.encode("utf-8", "surrogatepass"), options.max_doc_bytes, stats)


def _record_text(line: bytes, field: str) -> tuple[str, str | None]:
    """The record's text, or what is wrong with the record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        # e.msg alone can end mid-sentence ("Invalid control character at"): the column completes it
        return "", f"malformed JSON at column {e.colno} ({re.sub(r'( starting)? at$', '', e.msg)})"
    except ValueError as e:  # bytes that are not UTF-8
        return "", f"malformed JSON ({e})"
    if not isinstance(record, dict):
        return "", "record is not a JSON object"
    if field not in record:
        return "", f"record has no field {field!r} (choose one with --text-field)"
    if not isinstance(record[field], str):
        return "", f"field {field!r} is not a string"
    return record[field], None
