"""What every input reader produces: documents with identities, cut to a bounded size.

A document carries a *source identity* that decides its train/val split, so the
identity depends only on the document itself, never on what else is prepared with it
(see ``bytemtp.data.sources`` for how each kind of input names its documents).

Documents longer than ``max_doc_bytes`` are cut into consecutive pieces so one huge
input (a 500 MB file, an endless stdin) never has to fit in memory. Each piece is a
document of its own: the first keeps the identity, the next ones get ``#1``, ``#2``, …
appended, so a long document still contributes to the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from bytemtp.errors import BytemtpError

FORMATS = ("auto", "text", "jsonl", "parquet", "arrow")


@dataclass(slots=True)
class Document:
    """A document (or one piece of a long one) and the identity that decides its split.

    Not frozen: a frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__``, twice the cost of a plain one, and one is built per row of a
    Parquet file of millions of tiny rows.
    """

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

    input_docs: int = 0  # files, records and rows read, before cutting long ones into pieces
    cut_docs: int = 0  # of those, how many were longer than max_doc_bytes
    empty_docs: int = 0  # dropped: a document of no bytes has nothing to learn from
    bad_lines: int = 0  # JSON Lines records skipped by skip_bad_lines
    null_values: int = 0  # Parquet/Arrow rows whose text is null: skipped

    def add(self, other: ReadStats) -> None:
        """Add ``other``'s counts to these (the stats of a merged dataset are its parts' sums)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def piece_identity(identity: str, k: int) -> str:
    """The identity of piece ``k`` of a document cut into pieces."""
    return identity if k == 0 else f"{identity}#{k}"


def cut(identity: str, data: bytes | memoryview, max_bytes: int, stats: ReadStats) -> list[Document]:
    """One whole in-memory document (a record, a row) as pieces of at most ``max_bytes``, counted.

    A list, not a generator: most documents are one piece, and a generator per row cost
    a fifth of the time of preparing millions of tiny rows. The pieces of a long one are
    copies of data already in memory, so the list at most doubles what a record holds.
    """
    stats.input_docs += 1
    if len(data) <= max_bytes:
        if not data:
            stats.empty_docs += 1
            return []
        return [Document(identity, bytes(data))]
    stats.cut_docs += 1
    return [
        Document(piece_identity(identity, k), bytes(data[start : start + max_bytes]))
        for k, start in enumerate(range(0, len(data), max_bytes))
    ]
