"""bytemtp_corpora: named built-in corpora for ``bytemtp prepare builtin:NAME``.

A built-in corpus is a directory that already exists on the machine plus the globs
that pick its files, so it costs no download and no disk space until prepared. Each
recipe is a function returning a ``Corpus``; it runs only when the corpus is used.
"""

from __future__ import annotations

from typing import Callable

from bytemtp_corpora import python_stdlib
from bytemtp_corpora.corpus import Corpus

CORPORA: dict[str, Callable[[], Corpus]] = {
    "python-stdlib": python_stdlib.corpus,
}

__all__ = ["CORPORA", "Corpus"]
