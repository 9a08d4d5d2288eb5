"""Autoregressive vs self-speculative decoding in bytes/s, side by side in one run.

Run from the repository root::

    BYTEMTP_BENCH_CKPT=runs/demo BYTEMTP_BENCH_DATA=~/.cache/bytemtp/python-stdlib \
        .venv/bin/python -m pytest bench/bench_generate.py --benchmark-enable -p no:cacheprovider -s

``BYTEMTP_BENCH_CKPT`` is a checkpoint or run directory (``bytemtp demo`` leaves one
in ``runs/demo``) and ``BYTEMTP_BENCH_DATA`` the dataset whose val split supplies
the prompts. Without them, a small model is trained for a few seconds on a few
stdlib modules and prompted with text from other stdlib modules.

Each mode decodes the same prompts greedily; pytest-benchmark times whole
generations (rounds alternate prompts), and the last test reports the speedup as
the ratio of the two modes' median bytes/s and checks the outputs were identical.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

import pytest

from bytemtp.decode.prompts import sample_prompts
from bytemtp.decode.bench import DecoderResult
from bytemtp.train.checkpoint import load_model
from bytemtp.decode.generate import GenerationConfig, generate

MAX_BYTES = 256
PROMPT_BYTES = 64
N_PROMPTS = 8


def report(line: str) -> None:
    """Print past pytest's capture, so the numbers show even without ``-s``."""
    sys.__stdout__.write(f"\n    {line}")
    sys.__stdout__.flush()


@pytest.fixture(scope="module")
def model():
    ckpt = os.environ.get("BYTEMTP_BENCH_CKPT")
    if ckpt:
        return load_model(ckpt)[0]
    from tests.fixtures_train import trained_model

    return trained_model(steps=300)


@pytest.fixture(scope="module")
def prompts() -> list[bytes]:
    data = os.environ.get("BYTEMTP_BENCH_DATA")
    if data:
        return sample_prompts(Path(data).expanduser(), N_PROMPTS, PROMPT_BYTES, seed=0)
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = [root / name for name in ("heapq.py", "calendar.py", "difflib.py", "pprint.py")]
    return [p.read_bytes()[i * 500 : i * 500 + PROMPT_BYTES] for p in sources for i in (1, 3)][:N_PROMPTS]


results: dict[str, DecoderResult] = {}


def _decode(model, prompts, speculative: bool):
    """A benchmark target that cycles through the prompts, recording every run in a ``DecoderResult``."""
    mode = DecoderResult(model.cfg.n_future - 1 if speculative else 0)

    def once():
        prompt = prompts[len(mode.outputs) % len(prompts)]
        gen = generate(model, GenerationConfig(prompt=prompt, max_new_bytes=MAX_BYTES, speculative=speculative))
        output = gen.read()
        mode.add([output], [gen.stats], gen.stats.wall_s)

    return once, mode


@pytest.mark.parametrize("mode", ["autoregressive", "speculative"])
def test_decode(benchmark, model, prompts, mode):
    once, result = _decode(model, prompts, speculative=mode == "speculative")
    benchmark.group = "generation"
    benchmark.pedantic(once, rounds=2 * len(prompts), warmup_rounds=1, iterations=1)
    results[mode] = result
    report(f"{mode}: median {result.median_bytes_per_s:.1f} bytes/s, {result.bytes_per_forward:.2f} bytes/forward")


def test_speedup(model, prompts):
    if set(results) != {"autoregressive", "speculative"}:
        pytest.skip("needs both decode benchmarks")
    speedup = results["speculative"].median_bytes_per_s / results["autoregressive"].median_bytes_per_s
    identical = results["speculative"].outputs == results["autoregressive"].outputs
    report(f"speedup {speedup:.2f}x (ratio of median bytes/s), outputs identical: {identical}")
    assert identical
