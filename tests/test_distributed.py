"""torchrun scale-out on the CPU (gloo): 2 processes train what 1 process with the same
global batch trains, under DDP and under FSDP2, and write the same checkpoints."""

from __future__ import annotations

import sys

import pytest
import torch

from bytemtp.train.checkpoint import load_train_state
from bytemtp.train.loop import train
from train_support import MICRO, config_file, metrics, micro_train, run_ok, weights

STEPS = 4


def torchrun(data, out, cfg_file, *extra: str) -> None:
    run_ok([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "bytemtp", "train", "--data", str(data), "--out", str(out), "--config", str(cfg_file),
            "--no-progress", *extra])


@pytest.fixture(scope="module")
def single(micro_data, tmp_path_factory):
    """The reference: one process, 4 rows per micro-batch, 2 micro-batches per step."""
    run = tmp_path_factory.mktemp("single") / "run"
    train(micro_train(steps=STEPS, batch_size=4, grad_accum=2, eval_every=2), MICRO, micro_data, run, progress=False)
    return run


def assert_same_run(got, want) -> None:
    a, b = metrics(got), metrics(want)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert x["bytes"] == y["bytes"] and x["lr"] == y["lr"]
        assert x["bpb_heads"] == pytest.approx(y["bpb_heads"], rel=1e-5)
        if "val_bpb_heads" in y:
            assert x["val_bpb_heads"] == pytest.approx(y["val_bpb_heads"], rel=1e-5)
    wa, wb = weights(got), weights(want)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("engine", ["--ddp", "--fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(engine, single, micro_data, tmp_path):
    """2 ranks x 2 rows x 2 micro-batches (gradient sync on the last only) == 1 x 4 x 2."""
    run = tmp_path / "run"
    torchrun(micro_data, run, config_file(tmp_path, steps=STEPS, batch_size=2, grad_accum=2, eval_every=2), engine)
    assert_same_run(run, single)
    state = load_train_state(run)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == STEPS


@pytest.mark.slow
def test_fsdp_resume_matches_uninterrupted(single, micro_data, tmp_path):
    """FSDP2 optimizer state gathered into a checkpoint and scattered back on resume."""
    run = tmp_path / "run"
    cfg = config_file(tmp_path, steps=STEPS, batch_size=2, grad_accum=2, eval_every=2)
    torchrun(micro_data, run, cfg, "--fsdp", "--steps", str(STEPS // 2), "--decay-steps", str(STEPS))
    torchrun(micro_data, run, cfg, "--fsdp", "--resume")
    assert_same_run(run, single)
