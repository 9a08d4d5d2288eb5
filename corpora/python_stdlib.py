"""``builtin:python-stdlib``: the running interpreter's standard library source.

Every ``.py`` file under sysconfig's ``stdlib`` directory, one document per file, in
sorted path order: about 30 MB of real, varied code on every machine with Python.
Third-party packages are not part of it, so ``site-packages`` (``dist-packages`` on
Debian) is pruned. The files differ between Python versions, so the version goes
into the manifest next to the corpus's content hash.
"""

from __future__ import annotations

import platform
import sys
import sysconfig
from pathlib import Path

from bytemtp_corpora.corpus import Corpus


def corpus() -> Corpus:
    return Corpus(
        name="python-stdlib",
        root=Path(sysconfig.get_paths()["stdlib"]),
        include=("*.py",),
        exclude=("site-packages", "dist-packages", "__pycache__"),
        meta={"python": platform.python_version(), "implementation": sys.implementation.name},
    )
