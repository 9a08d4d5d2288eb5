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


PROMPTS_FORMATS = ("auto", "jsonl", "lines")


def read_prompts_file(path: str | Path, fmt: str = "auto") -> list[bytes]:
    """Prompts from a file, in the order of its lines, so an output's ``prompt_index`` is its prompt's place.

    ``lines``: every line is one prompt, its bytes without the line ending, blank or not (a line of
    spaces is a prompt of spaces, an empty line an empty prompt: a new document), so prompt i is
    line i + 1. ``jsonl``: one JSON object per line with a string ``prompt``; lines holding only
    whitespace are not records and are skipped, so prompt i is record i + 1. ``auto``: ``jsonl``
    when the first non-blank line starts with ``{``, else ``lines`` (a plain-text file whose first
    line starts with ``{`` needs ``lines``).
    """
    if fmt not in PROMPTS_FORMATS:
        raise BytemtpError(f"--prompts-format: {fmt!r} is not one of {', '.join(PROMPTS_FORMATS)}")
    lines = Path(path).read_bytes().splitlines()
    if fmt == "auto":
        first = next((line for line in lines if line.strip()), None)
        if first is None:
            raise BytemtpError(f"--prompts-file: {path} holds no prompts (only blank lines)")
        fmt = "jsonl" if first.lstrip().startswith(b"{") else "lines"
        guess = " (read as JSON Lines, its first line starting with '{'; --prompts-format lines reads plain lines)"
    else:
        guess = ""
    prompts = lines if fmt == "lines" else [
        _json_prompt(line, f"--prompts-file: {path}: line {number}", guess) for number, line in enumerate(lines, 1)
        if line.strip()
    ]
    if not prompts:
        raise BytemtpError(f"--prompts-file: {path} holds no prompts")
    return prompts


def _json_prompt(line: bytes, where: str, hint: str) -> bytes:
    """The prompt of the JSON Lines record ``line`` as bytes; errors name ``where`` and end with ``hint``.

    Escaped lone surrogates ``\\udc80``..``\\udcff`` stand for the raw bytes 0x80..0xff (Python's
    surrogateescape), so any bytes can be written; any other lone surrogate is neither text nor a byte.
    """
    try:
        record = json.loads(line)
    except ValueError as e:
        raise BytemtpError(f"{where} is not JSON ({e}){hint}") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise BytemtpError(f"{where} has no string field 'prompt'{hint}")
    try:
        return record["prompt"].encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        bad = record["prompt"][e.start]
        raise BytemtpError(f"{where}: 'prompt' holds the lone surrogate {ascii(bad)}, which is no text") from None
