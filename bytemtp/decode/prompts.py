"""Prompts: drawn from a prepared dataset (what the benchmark decodes and distillation continues),
or read from a file (``bytemtp sample --prompts-file``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from bytemtp.data.shards import Dataset
from bytemtp.errors import BytemtpError


def sample_prompts(data_dir: str | Path, n: int, prompt_bytes: int, seed: int, split: str = "val") -> list[bytes]:
    """``n`` seeded prompts: a random document of ``split``, a random offset, ``prompt_bytes`` long.

    Only the shards that the draws land on are read, so this stays cheap on large datasets.
    """
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
