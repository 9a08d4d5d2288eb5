"""bytemtp_corpora: named built-in corpora for ``bytemtp prepare builtin:NAME``.

A built-in corpus is a directory that already exists on the machine plus the globs
that pick its files, so it costs no download and no disk space until prepared, or a
seeded generator of synthetic documents (the probes: ``induction``, ``arithmetic``). Each
recipe is a function returning a ``Corpus`` or ``GeneratedCorpus``; it runs only when the
corpus is used.
"""

from __future__ import annotations

from typing import Callable

from bytemtp_corpora import arithmetic, induction, python_stdlib
from bytemtp_corpora.corpus import Corpus, GeneratedCorpus

CORPORA: dict[str, Callable[[], Corpus | GeneratedCorpus]] = {
    "python-stdlib": python_stdlib.corpus,
    "induction": induction.corpus,
    "arithmetic": arithmetic.corpus,
}

__all__ = ["CORPORA", "Corpus", "GeneratedCorpus"]
