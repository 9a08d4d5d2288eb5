"""Readers of columnar files: Parquet, and Arrow IPC (the files of a saved Hugging Face dataset).

One document per row: the value of the text column (``--text-field``), a string
column as its UTF-8 bytes or a binary column as it is, also dictionary-encoded (what
pandas categoricals and some writers produce); a null value is counted and skipped.
A row's identity is ``FILE:ROW``, ROW counted from 0 over the whole file, so it does
not depend on how the file is split into row groups or record batches.

Memory is bounded by a row group, whatever the file size: pyarrow decodes the text
column of one Parquet row group at a time (its batches are views of it), three to four
times that column's size at peak, and reads the compressed column through a buffered stream.
Arrow files are memory-mapped, so a record batch is a view of the file. A Parquet file
can be split between the parts of ``prepare --part`` by row group: ``parquet_row_groups``
says what each one weighs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bytemtp.data.documents import Document, ReadOptions, ReadStats, cut
from bytemtp.errors import BytemtpError

PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow", ".feather")
_ARROW_FILE_MAGIC = b"ARROW1"
_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
_BINARY_TYPES = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)


def parquet_row_groups(path: Path, name: str, field: str) -> list[int]:
    """Per row group, the compressed bytes of the text column: what reading that row group costs."""
    pf = _open_parquet(path, name)
    column = _leaf_index(pf, name, field)
    meta = pf.metadata
    return [meta.row_group(i).column(column).total_compressed_size for i in range(meta.num_row_groups)]


def read_parquet(
    path: Path, name: str, identity: str, options: ReadOptions, stats: ReadStats, row_groups: Sequence[int] | None
) -> Iterator[Document]:
    """The documents of ``row_groups`` of a Parquet file (None: all of them), in file order."""
    pf = _open_parquet(path, name)
    _text_column(pf.schema_arrow, name, options.text_field)
    meta = pf.metadata
    first_rows = np.concatenate(([0], np.cumsum([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])))
    for group in range(meta.num_row_groups) if row_groups is None else row_groups:
        row = int(first_rows[group])
        try:
            for batch in pf.iter_batches(row_groups=[group], columns=[options.text_field], use_threads=False):
                yield from _column_documents(batch.column(0), identity, row, options.max_doc_bytes, stats)
                row += batch.num_rows
        except MemoryError:  # pyarrow's ArrowMemoryError is one too, and an ArrowException: not corruption
            size = meta.row_group(group).column(_leaf_index(pf, name, options.text_field)).total_uncompressed_size
            raise BytemtpError(
                f"{name}: out of memory reading row group {group} (its text column is {size / 1e6:,.0f} MB, "
                "decoded whole at 3-4 times that); give the process more memory, or rewrite the file with "
                "smaller row groups"
            ) from None
        except (pa.ArrowException, OSError) as e:
            raise _damaged(name, e, f"corrupt Parquet data in row group {group}") from None


def read_arrow(path: Path, name: str, identity: str, options: ReadOptions, stats: ReadStats) -> Iterator[Document]:
    """The documents of an Arrow IPC stream (what ``save_to_disk`` writes) or IPC file, in order."""
    try:
        with pa.memory_map(str(path)) as source:
            is_file = source.read(len(_ARROW_FILE_MAGIC)) == _ARROW_FILE_MAGIC
            source.seek(0)
            reader = pa.ipc.open_file(source) if is_file else pa.ipc.open_stream(source)
            index = _text_column(reader.schema, name, options.text_field)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if is_file else reader
            row = 0
            for batch in batches:
                yield from _column_documents(batch.column(index), identity, row, options.max_doc_bytes, stats)
                row += batch.num_rows
    except MemoryError:
        raise BytemtpError(f"{name}: out of memory reading a record batch; give the process more memory") from None
    except (pa.ArrowException, OSError) as e:
        raise _damaged(name, e, "not an Arrow IPC stream or file, or truncated") from None


def _open_parquet(path: Path, name: str) -> pq.ParquetFile:
    try:
        # buffer_size: pages are read through a buffered stream, not one whole column chunk at once
        return pq.ParquetFile(path, buffer_size=1 << 20)
    except (pa.ArrowException, OSError) as e:
        raise _damaged(name, e, "not a Parquet file, or truncated") from None


def _damaged(name: str, e: Exception, what: str) -> BytemtpError:
    """A failure of the operating system (it sets errno) is one of reading; pyarrow's own errors
    (some of them ``OSError`` too) mean the content is not what it should be."""
    if isinstance(e, OSError) and e.errno:
        return BytemtpError(f"{name}: cannot read ({e.strerror})")
    return BytemtpError(f"{name}: {what} ({' '.join(str(e).split())})")


def _leaf_index(pf: pq.ParquetFile, name: str, field: str) -> int:
    """The Parquet column chunk index of the text field (checked to be a text column)."""
    _text_column(pf.schema_arrow, name, field)
    schema = pf.metadata.schema
    return next(i for i in range(len(schema)) if schema.column(i).path == field)


def _text_column(schema: pa.Schema, name: str, field: str) -> int:
    """The index of ``field`` in ``schema``, refused unless it holds strings or bytes."""
    index = schema.get_field_index(field)
    if index < 0:
        columns = ", ".join(schema.names) or "none"
        raise BytemtpError(f"{name}: no column {field!r} (columns: {columns}; choose one with --text-field)")
    kind = schema.field(index).type
    values = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not any(is_type(values) for is_type in _TEXT_TYPES + _BINARY_TYPES):
        raise BytemtpError(f"{name}: column {field!r} holds {kind}, not text (a string or binary column)")
    return index


def _column_documents(
    column: pa.Array, identity: str, first_row: int, max_bytes: int, stats: ReadStats
) -> Iterator[Document]:
    """One document per non-null value, sliced straight out of the Arrow buffers (no Python str)."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()  # values in row order; a null index stays null
    column = column.cast(pa.large_binary())  # strings are UTF-8 already: only the offsets widen
    _, offsets_buffer, data_buffer = column.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[column.offset : column.offset + len(column) + 1]
    data = memoryview(data_buffer) if data_buffer is not None else memoryview(b"")
    valid = column.is_valid().to_numpy(zero_copy_only=False) if column.null_count else None
    bounds = offsets.tolist()
    for i in range(len(column)):
        if valid is not None and not valid[i]:
            stats.null_values += 1
            continue
        yield from cut(f"{identity}:{first_row + i}", data[bounds[i] : bounds[i + 1]], max_bytes, stats)
