"""Prompts: drawn from a prepared dataset (what the benchmark decodes and distillation continues),
or read from a file (``bytemtp sample --prompts-file``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from bytemtp.data.shards import Dataset
from bytemtp.errors import BytemtpError


WORKLOADS = ("text", "copy")
COPY_OPENING = 8  # bytes of the document's opening repeated after a copy prompt's newline


def sample_prompts(
    data_dir: str | Path, n: int, prompt_bytes: int, seed: int, split: str = "val", workload: str = "text"
) -> list[bytes]:
    """``n`` seeded prompts from random documents of ``split``.

    ``text``: ``prompt_bytes`` from a random offset. ``copy``: the document's first ``prompt_bytes``,
    a newline and its first ``COPY_OPENING`` bytes again, so the likely continuation repeats text
    already in the context, as editing code or quoting a document does (what drafts looked up in
    a row's own context are for). Only the shards that the draws land on are read, so this
    stays cheap on large datasets.
    """
    if workload not in WORKLOADS:
        raise BytemtpError(f"--workload: one of {', '.join(WORKLOADS)}, got {workload!r}")
    ds = Dataset(data_dir)
    shards = ds.shards(split)
    if not shards:
        raise BytemtpError(f"{data_dir}: no {split} split to take prompts from")
    rng = random.Random(seed)
    cache: dict[int, list[bytes]] = {}
    prompts: list[bytes] = []
    for _ in range(100 * n):
        if len(prompts) == n:
            return prompts
        i = rng.randrange(len(shards))
        if i not in cache:
            cache[i] = [d for d in ds.read(shards[i]).docs() if len(d) >= prompt_bytes]
        if cache[i]:
            doc = rng.choice(cache[i])
            if workload == "copy":
                prompts.append(doc[:prompt_bytes] + b"\n" + doc[: min(COPY_OPENING, prompt_bytes)])
                continue
            start = rng.randrange(len(doc) - prompt_bytes + 1)
            prompts.append(doc[start : start + prompt_bytes])
    raise BytemtpError(f"{data_dir}: too few {split} documents of at least {prompt_bytes} bytes for {n} prompts")


def read_prompts_file(path: str | Path) -> list[bytes]:
    """Prompts from a file: JSON Lines with a string ``prompt`` in each record (when the first
    non-blank line starts with ``{``), otherwise one prompt per line (its bytes, without the
    line ending). Blank lines are skipped."""
    lines = [line for line in Path(path).read_bytes().splitlines() if line.strip()]
    if not lines:
        raise BytemtpError(f"--prompts-file: {path} holds no prompts")
    if not lines[0].lstrip().startswith(b"{"):
        return lines
    prompts = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError as e:
            raise BytemtpError(f"--prompts-file: {path}: record {i} is not JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise BytemtpError(f"--prompts-file: {path}: record {i} has no string field 'prompt'")
        prompts.append(record["prompt"].encode("utf-8", "surrogateescape"))
    return prompts
