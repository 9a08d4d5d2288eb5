"""What a built-in corpus is: files already on the machine, picked by globs, or documents a
seeded generator makes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Corpus:
    """Every file under ``root`` picked by ``include`` and not ``exclude``, one document each.

    Glob semantics are those of ``bytemtp prepare DIR --include/--exclude``. ``meta`` is
    recorded in the dataset manifest (e.g. the Python version the files came from), next
    to a content hash computed when the corpus is prepared.
    """

    name: str
    root: Path
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GeneratedCorpus:
    """Documents made by a seeded generator (a probe's synthetic data): no files on disk.

    ``documents()`` yields ``(identity, bytes)`` pairs, the same ones on every call; the
    identity decides the train/val split as a file's relative path does. ``meta`` is
    recorded in the manifest (the seed and size), next to a hash of the content.
    """

    name: str
    documents: Callable[[], Iterator[tuple[str, bytes]]]
    meta: dict[str, str] = field(default_factory=dict)
