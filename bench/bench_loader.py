"""Packing kernels against the NumPy reference, and the whole loader in bytes/s.

Run from the repository root (``bench/`` is outside ``testpaths``, so plain ``pytest``
never runs it; the root must be importable for ``tests.*``)::

    .venv/bin/python -m pytest bench/bench_loader.py --benchmark-enable -p no:cacheprovider

The data is the Python standard library's own ``.py`` files (about 30 MB on every
machine with Python): as one shard's arrays for the kernels, and as a prepared
dataset of 8 MB shards for the loader, which is pinned to one CPU core so the
background decompression competes with packing for that core. Numba's first-call
compile time is measured in fresh processes: one with an empty cache, one reusing it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import bytemtp_native as native
from bytemtp.data.loader import BatchLoader, LoaderConfig
from bytemtp.data.shards import Dataset
from tests.conftest import write_dataset
from tests.test_packing import reference_pack, shard_arrays

SHARD_BYTES = 8 << 20
N_FUTURE = 8


def stdlib_docs() -> list[bytes]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    return [p.read_bytes() for p in files]


@pytest.fixture
def report(capsys):
    """Print past pytest's output capture, so the numbers show without ``-s``."""

    def emit(line: str) -> None:
        with capsys.disabled():
            print(f"\n    {line}", end="", flush=True)

    return emit


@pytest.fixture(scope="module")
def docs() -> list[bytes]:
    return stdlib_docs()


@pytest.fixture(scope="module")
def shard(docs):
    data, offsets = shard_arrays(docs)
    return data, offsets, native.permutation(len(docs), 0)


@pytest.fixture(scope="module")
def dataset(docs, tmp_path_factory) -> Path:
    shards, current, size = [], [], 0
    for d in docs:
        current.append(d)
        size += len(d)
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
    shards.append(current)
    return write_dataset(tmp_path_factory.mktemp("stdlib"), {"train": shards})


@pytest.mark.parametrize("seq_len", [256, 2048])
@pytest.mark.parametrize("mode", native.PACKING_MODES)
def test_pack_kernel(benchmark, report, shard, mode, seq_len):
    data, offsets, order = shard
    native.pack(data[:1000], offsets[:2], order[:1], seq_len, N_FUTURE, mode, with_doc_ids=True)  # compiled/cached
    benchmark.group = f"pack {mode} T={seq_len}"
    rows, _, n_truncated = benchmark.pedantic(
        native.pack, (data, offsets, order, seq_len, N_FUTURE, mode, np.int32, True), rounds=5, warmup_rounds=1
    )
    plan = native.plan_rows(offsets, order, seq_len, N_FUTURE, mode)
    report(
        f"pack {mode:8s} T={seq_len:<5d} kernel {len(data) / benchmark.stats['min'] / 1e6:7.0f} MB/s  "
        f"rows {len(rows)}  truncated {n_truncated / len(order):.1%} of {len(order)} documents  "
        f"padding {plan.pad_fraction:.2%}"
    )


@pytest.mark.parametrize("seq_len", [256, 2048])
@pytest.mark.parametrize("mode", native.PACKING_MODES)
def test_pack_reference(benchmark, report, shard, mode, seq_len):
    data, offsets, order = shard
    benchmark.group = f"pack {mode} T={seq_len}"
    benchmark.pedantic(reference_pack, (data, offsets, order, seq_len, N_FUTURE, mode), rounds=2)
    report(f"pack {mode:8s} T={seq_len:<5d} NumPy reference {len(data) / benchmark.stats['min'] / 1e6:7.1f} MB/s")


@pytest.fixture
def one_core():
    """Run on one CPU core: threads created inside (the prefetch thread) inherit the mask."""
    cpus, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, {min(cpus)})
    torch.set_num_threads(1)
    yield
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", native.PACKING_MODES)
def test_loader_one_epoch(benchmark, report, dataset, one_core, mode):
    cfg = LoaderConfig(batch_size=16, seq_len=2048, n_future=N_FUTURE, mode=mode)

    n_bytes = Dataset(dataset).n_bytes("train")

    def epoch() -> None:
        loader = BatchLoader(dataset, cfg)
        while loader.epoch == 0:
            next(loader)

    epoch()  # kernels compiled or loaded from the cache, shard files in the page cache
    benchmark.group = "loader, one core"
    benchmark.pedantic(epoch, rounds=3)
    report(
        f"loader {mode:8s} B=16 T=2048: {n_bytes / benchmark.stats['min'] / 1e6:6.1f} MB/s, "
        f"one epoch ({n_bytes / 1e6:.1f} MB in {len(list(dataset.glob('*.zst')))} shards) "
        f"in {benchmark.stats['min']:.2f} s, zstd included"
    )


FIRST_CALLS = textwrap.dedent(
    """
    import json, time
    t0 = time.perf_counter()
    import numpy as np
    import bytemtp_native as native
    t1 = time.perf_counter()
    data, offsets = np.frombuffer(b"abcdefgh", np.uint8), np.array([0, 3, 8], np.uint64)
    def calls():
        for mode in native.PACKING_MODES:
            plan = native.plan_rows(offsets, native.permutation(2, 1), 4, 2, mode)
            native.fill_rows(data, offsets, plan, np.arange(plan.n_rows), np.empty((plan.n_rows, 6), np.int16))
        native.concat_stream(data, offsets)
    calls()
    t2 = time.perf_counter()
    calls()
    t3 = time.perf_counter()
    print(json.dumps({"import": t1 - t0, "first": t2 - t1, "second": t3 - t2}))
    """
)


def test_jit_first_call(benchmark, report, tmp_path):
    """Cold: a process with an empty Numba cache. Warm: the next process, reusing that cache."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}

    def run() -> dict:
        out = subprocess.run([sys.executable, "-c", FIRST_CALLS], env=env, check=True, capture_output=True, text=True)
        return json.loads(out.stdout)

    start = time.perf_counter()
    cold = run()
    cold_process = time.perf_counter() - start
    benchmark.group = "jit"
    warm = benchmark.pedantic(run, rounds=1)
    for name, t, process in (("cold cache", cold, cold_process), ("warm cache", warm, benchmark.stats["min"])):
        report(
            f"jit {name}: first calls {t['first']:.2f} s (then {t['second'] * 1e3:.2f} ms), "
            f"import {t['import']:.2f} s, whole process {process:.2f} s"
        )
