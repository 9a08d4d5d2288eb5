"""The training loop: it learns, logs, checkpoints, and resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from click.testing import CliRunner

from bytemtp.cli import main
from bytemtp.data.loader import BatchLoader
from bytemtp.train.checkpoint import LATEST, checkpoints_dir, list_checkpoints, read_config
from bytemtp.train.loop import train
from train_support import (
    MICRO,
    assert_same_weights,
    bytemtp_cmd,
    config_file,
    deterministic,
    metrics,
    micro_train,
    subprocess_env,
    weights,
)


def test_run_learns_logs_and_keeps_checkpoints(micro_data, tmp_path):
    run = tmp_path / "run"
    result = train(micro_train(steps=30, eval_every=10, ckpt_every=10, keep=2), MICRO, micro_data, run, progress=False)
    assert (result.step, result.stop_reason, result.exit_code) == (30, "done", 0)

    records = metrics(run)
    assert [r["step"] for r in records] == list(range(1, 31))
    for r in records:
        assert len(r["bpb_heads"]) == MICRO.n_future
        assert r["loss"] == pytest.approx(sum(r["bpb_heads"]) / MICRO.n_future)
        assert r["bytes"] == r["step"] * 4 * 32 and r["bytes_per_s"] > 0 and r["lr"] > 0
    evals = [r for r in records if "val_bpb" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(r["val_bpb"] == r["val_bpb_heads"][0] for r in evals)
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"] - 0.2, "val bpb did not fall"
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert result.val_bpb_heads == evals[-1]["val_bpb_heads"]

    # lr: linear warmup over 2 steps, then cosine down to 10% at step 30
    assert records[0]["lr"] == pytest.approx(3e-3 / 2) and records[1]["lr"] == pytest.approx(3e-3)
    assert records[-1]["lr"] == pytest.approx(3e-4)

    kept = list_checkpoints(run)
    assert [p.name for p in kept] == ["step-0000020", "step-0000030"]
    assert os.readlink(checkpoints_dir(run) / LATEST) == "step-0000030" == result.checkpoint.name
    meta = read_config(result.checkpoint)
    assert meta["step"] == 30 and meta["model"] == MICRO.to_dict()
    assert meta["train"]["seq_len"] == 32 and meta["train"]["decay_steps"] == 30  # resolved, not 0


def interrupt_at_batch(monkeypatch, n: int, signum: int = signal.SIGINT) -> None:
    """Deliver ``signum`` to this process while the loader produces its ``n``-th batch."""
    real_next = BatchLoader.__next__
    calls = {"n": 0}

    def next_batch(self):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signum)
        return real_next(self)

    monkeypatch.setattr(BatchLoader, "__next__", next_batch)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_resume_matches_uninterrupted_run(micro_data, tmp_path, monkeypatch, signum):
    cfg = micro_train(steps=12, eval_every=6, ckpt_every=4, grad_accum=2)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(cfg, MICRO, micro_data, whole, progress=False)

    interrupt_at_batch(monkeypatch, 2 * 5, signum)  # during step 5 (2 micro-batches a step)
    stopped = train(cfg, MICRO, micro_data, parts, progress=False)
    assert (stopped.step, stopped.stop_reason, stopped.exit_code) == (5, signal.Signals(signum).name, 128 + signum)
    assert stopped.checkpoint.name == "step-0000005"
    assert [r["step"] for r in metrics(parts)] == [1, 2, 3, 4, 5]
    monkeypatch.undo()

    resumed = train(cfg, None, micro_data, parts, resume=True, progress=False)
    assert (resumed.step, resumed.stop_reason) == (12, "done")
    assert deterministic(metrics(parts)) == deterministic(metrics(whole))
    assert_same_weights(weights(parts), weights(whole))


def test_cli_exits_130_after_saving_on_sigint(micro_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    interrupt_at_batch(monkeypatch, 3)
    args = ["train", "--data", str(micro_data), "--out", str(run), "--config", str(config_file(tmp_path)),
            "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130, result.output
    assert "step 3 (SIGINT)" in result.stdout and "step-0000003" in result.stdout
    assert [p.name for p in list_checkpoints(run)] == ["step-0000003"]


def test_resume_with_more_steps_extends_the_run(micro_data, tmp_path):
    """--steps is the run's total: a 6-step run resumed with --steps 10 equals a 10-step run
    (with the schedule planned for 10 steps from the start)."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(micro_train(steps=10, decay_steps=10), MICRO, micro_data, whole, progress=False)
    train(micro_train(steps=6, decay_steps=10), MICRO, micro_data, parts, progress=False)
    assert train(micro_train(steps=10), None, micro_data, parts, resume=True, progress=False).step == 10
    assert deterministic(metrics(parts)) == deterministic(metrics(whole))
    assert_same_weights(weights(parts), weights(whole))
    again = train(micro_train(steps=10), None, micro_data, parts, resume=True, progress=False)
    assert (again.step, again.stop_reason) == (10, "already done")


def test_time_budget_stops_cleanly_with_checkpoint_and_eval(micro_data, tmp_path):
    run = tmp_path / "run"
    result = train(micro_train(steps=100_000, time_budget=0.02, eval_every=100_000), MICRO, micro_data, run,
                   progress=False)
    assert result.stop_reason == "time budget" and 0 < result.step < 100_000 and result.exit_code == 0
    assert result.checkpoint.name == f"step-{result.step:07d}"
    last = metrics(run)[-1]
    assert last["step"] == result.step and last["val_bpb_heads"] == result.val_bpb_heads


def test_n_future_1_is_the_next_byte_baseline(micro_data, tmp_path):
    cfg = MICRO.__class__(**{**MICRO.to_dict(), "n_future": 1})
    result = train(micro_train(steps=3, eval_every=3), cfg, micro_data, tmp_path / "run", progress=False)
    assert len(result.val_bpb_heads) == 1 and len(metrics(tmp_path / "run")[0]["bpb_heads"]) == 1


def test_sigkill_then_resume_matches_uninterrupted_run(micro_data, tmp_path):
    """A process killed outright (no handler runs) loses only the steps since its last
    checkpoint; --resume replays them and the run ends as if never interrupted."""
    steps = 40
    cfg_file = config_file(tmp_path, steps=steps, ckpt_every=5, eval_every=20)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(micro_train(steps=steps, ckpt_every=5, eval_every=20), MICRO, micro_data, whole, progress=False)

    args = ("train", "--data", str(micro_data), "--out", str(parts), "--no-progress")
    proc = subprocess.Popen(bytemtp_cmd(*args, "--config", str(cfg_file)), env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = parts / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:
        if log.exists() and log.read_text().count("\n") >= 8:
            proc.kill()
            break
        time.sleep(0.005)
    assert proc.wait(timeout=30) == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    proc.stderr.close()
    killed_at = metrics(parts)[-1]["step"]
    assert 8 <= killed_at < steps

    result = CliRunner().invoke(main, [*args, "--resume"])  # in-process: spares a second torch start-up
    assert result.exit_code == 0, result.output
    assert deterministic(metrics(parts)) == deterministic(metrics(whole))
    assert_same_weights(weights(parts), weights(whole))



def test_progress_bar_shows_head_1_loss(micro_data, tmp_path, capsys):
    """The bar's bpb is head 1's training loss (what a user compares with val), not the mean over heads."""
    run = tmp_path / "run"
    train(micro_train(steps=5, eval_every=5), MICRO, micro_data, run, progress=True)
    last = metrics(run)[-1]
    shown = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert f"head 1 {last['bpb_heads'][0]:.3f} bpb" in shown and f"val {last['val_bpb']:.3f}" in shown
    assert f"{last['loss']:.3f}" not in shown  # the mean over heads (head 2's loss is far higher)


@pytest.mark.parametrize("model_extra, train_extra", [
    ({}, {}), ({"draft_mlp": 16}, {"draft_detach": True, "draft_lr_restart": True})])
def test_resume_mid_schedule_matches_uninterrupted_run(micro_data, tmp_path, monkeypatch, model_extra, train_extra):
    """The draft weight and the heads trained depend on the step alone: a run stopped halfway
    through an objective schedule and resumed trains what an uninterrupted one does (also with
    draft MLPs whose learning rate restarts when they join)."""
    model = MICRO.__class__(**{**MICRO.to_dict(), "n_future": 3, **model_extra})
    cfg = micro_train(steps=12, ckpt_every=4, objective_schedule="cosine", draft_weight_initial=1.0,
                      draft_loss_weight=0.25, heads_initial=1, objective_begin=2, **train_extra)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(cfg, model, micro_data, whole, progress=False)
    interrupt_at_batch(monkeypatch, 6)
    assert train(cfg, model, micro_data, parts, progress=False).step == 6
    monkeypatch.undo()
    assert train(cfg, None, micro_data, parts, resume=True, progress=False).step == 12
    logged = deterministic(metrics(parts))
    assert logged == deterministic(metrics(whole))
    assert logged[5]["head_weights"] != logged[-1]["head_weights"]
    assert logged[-1]["head_weights"] == pytest.approx([1 / 1.5, 0.25 / 1.5, 0.25 / 1.5], abs=1e-6)
    assert_same_weights(weights(parts), weights(whole))
