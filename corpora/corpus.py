"""What a built-in corpus is: files already on the machine, picked by globs."""

from __future__ import annotations

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
