"""Shared fixtures, the ``slow`` / ``gpu`` markers, and single-threaded torch.

``slow`` tests run only with ``--runslow`` (or BYTEMTP_SLOW=1); ``gpu`` tests only
where CUDA is available. Both are skipped cleanly otherwise.
"""

from __future__ import annotations

import os
import random
import sysconfig
from pathlib import Path

import pytest

from bytemtp.data.shards import ShardBuffer, ShardInfo, shard_name, write_manifest


def pytest_configure(config):
    """One thread per process, for this process and every subprocess a test starts.

    The test models are too small to gain from a second thread, and on a busy
    2-core machine OpenMP's spin-waiting threads slow every op down many times over.
    """
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("BYTEMTP_SLOW") == "1"
    gpu_items = [it for it in items if "gpu" in it.keywords]
    has_cuda = False
    if gpu_items:
        import torch

        has_cuda = torch.cuda.is_available()
    for it in items:
        if "slow" in it.keywords and not run_slow:
            it.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))
        if "gpu" in it.keywords and not has_cuda:
            it.add_marker(pytest.mark.skip(reason="needs CUDA"))


def write_shard(path: Path, docs: list[bytes]) -> ShardInfo:
    """One shard holding ``docs``, through the writer ``prepare`` uses."""
    buffer = ShardBuffer()
    for doc in docs:
        buffer.add(doc)
    return buffer.write(path)


def write_dataset(root: Path, splits: dict[str, list[list[bytes]]], *, source: dict | None = None) -> Path:
    """A prepared dataset from explicit documents: ``splits[split]`` is a list of shards' docs."""
    root.mkdir(parents=True, exist_ok=True)
    infos: list[ShardInfo] = []
    for split, shards in splits.items():
        for i, docs in enumerate(shards):
            infos.append(write_shard(root / shard_name(split, i), docs))
    write_manifest(root, infos, source=source or {"kind": "test"}, params={})
    return root


def random_docs(n: int, seed: int, max_len: int = 300) -> list[bytes]:
    rng = random.Random(seed)
    return [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, max_len))) for _ in range(n)]


@pytest.fixture
def make_dataset(tmp_path):
    """Factory: ``make_dataset({"train": [[b"doc", ...], ...], "val": [[...]]})`` -> dataset dir."""
    counter = iter(range(1_000_000))

    def make(splits: dict[str, list[list[bytes]]]) -> Path:
        return write_dataset(tmp_path / f"ds{next(counter)}", splits)

    return make


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory) -> Path:
    """json/{decoder,encoder,scanner,tool}.py for training (~34 kB), json/__init__.py (~14 kB) for validation."""
    package = Path(sysconfig.get_paths()["stdlib"]) / "json"
    init, *rest = [p.read_bytes() for p in sorted(package.glob("*.py"))]
    return write_dataset(tmp_path_factory.mktemp("data") / "micro", {"train": [rest], "val": [[init]]})
