"""Shared pieces of the training, checkpoint, eval and distributed tests.

Everything trains a micro model (d=32, one layer, two heads, 32-byte context) on
real Python source (conftest's ``micro_data``), a few steps at a time, so a whole
run takes about a second. Subprocesses run torch on one thread, as the tests do,
so their numbers can be compared bitwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from bytemtp.train.checkpoint import WEIGHTS, resolve_checkpoint
from bytemtp.model.config import ModelConfig
from bytemtp.train.config import TrainConfig

MICRO = ModelConfig(d_model=32, n_layers=1, n_attn_heads=2, n_future=2, max_seq_len=32)


def micro_train(**overrides) -> TrainConfig:
    """A TrainConfig for MICRO: 4 rows of 32 bytes, short warmup, every step logged."""
    base = dict(steps=10, batch_size=4, warmup_steps=2, log_every=1, eval_every=0, ckpt_every=0, device="cpu")
    return TrainConfig(**{**base, **overrides})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def deterministic(records: list[dict]) -> list[dict]:
    """Metrics without the wall-clock throughput, which no two runs share."""
    return [{k: v for k, v in r.items() if k != "bytes_per_s"} for r in records]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(resolve_checkpoint(path) / WEIGHTS))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def config_file(tmp: Path, **extra) -> Path:
    """MICRO and micro_train() as a --config JSON file for CLI runs."""
    fields = {**MICRO.to_dict(), **dataclasses.asdict(micro_train()), **extra}
    path = tmp / "micro.json"
    path.write_text(json.dumps(fields))
    return path


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def bytemtp_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bytemtp", *args]


def run_ok(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def cli_error(*args: str) -> str:
    """Run ``bytemtp ARGS`` in-process; it must fail with exactly one ``Error:`` line on stderr."""
    from click.testing import CliRunner

    from bytemtp.cli import main

    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.fixture
def gloo_group(tmp_path):
    """A one-process gloo group, so DDP and FSDP2 wrap and run on the CPU in the test process."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
