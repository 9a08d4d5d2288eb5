"""Hostile inputs to ``prepare`` and ``merge``: absurd or empty ``--part`` values, inputs that
change or are named twice, Hugging Face layouts that are not what they seem, columnar data
that is valid but unusual, and a scheduler's SIGTERM. Each is a one-line ``Error:`` naming the
file or flag (exit 1), or the right dataset; never a traceback, never duplicated or foreign
text in the training data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_merge import CONFIG, contents, expected, make_inputs
from test_prepare import fails, leftovers, ok

from bytemtp.data.shards import MANIFEST

PART_ARGS = ["--shard-bytes", CONFIG.shard_bytes, "--val-fraction", CONFIG.val_fraction,
             "--max-doc-bytes", CONFIG.read.max_doc_bytes, "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    src = tmp_path_factory.mktemp("hostile-prepare") / "src"
    return src, make_inputs(src)


# --- --part: bounded, never empty -----------------------------------------------------------


def test_an_empty_part_flag_is_an_error_not_the_whole_dataset(corpus, tmp_path):
    """``--part "$TASK/$N"`` with both unset is ``--part /``; with a variable that holds the whole
    value unset, ``--part ''``: either must fail, not prepare every input in every task."""
    src, _ = corpus
    for value in ("", "/"):
        fails("prepare", src, "--out", tmp_path / "p", "--part", value, *PART_ARGS,
              match=rf"--part: '{value}' is not I/N")
    assert leftovers(tmp_path, "p") == []
