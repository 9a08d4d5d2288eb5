"""Prompts drawn from a prepared dataset: what the benchmark decodes and distillation continues."""

from __future__ import annotations

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
