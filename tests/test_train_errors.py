"""Bad input to ``bytemtp train``: one-line errors that name the culprit, and no damage done."""

from __future__ import annotations

import errno
import json

import pytest
import torch

import bytemtp.train.checkpoint
from bytemtp.errors import BytemtpError
from bytemtp.train.checkpoint import latest_checkpoint, list_checkpoints, load_model
from bytemtp.train.loop import train
from bytemtp.train.parallel import MTPObjective
from train_support import MICRO, cli_error, config_file, metrics, micro_train


def test_missing_or_unprepared_dataset(tmp_path):
    (tmp_path / "raw").mkdir()
    for data in (tmp_path / "nowhere", tmp_path / "raw"):
        msg = cli_error("train", "--data", str(data), "--out", str(tmp_path / "run"))
        assert str(data) in msg and "not a prepared dataset" in msg
    assert not (tmp_path / "run").exists()


def test_dataset_without_val_split_needs_eval_off(make_dataset, tmp_path):
    data = make_dataset({"train": [[b"print('hello')\n" * 50]]})
    msg = cli_error("train", "--data", str(data), "--out", str(tmp_path / "run"))
    assert "no val split" in msg and "--eval-every 0" in msg


def test_resume_without_checkpoint(micro_data, tmp_path):
    msg = cli_error("train", "--data", str(micro_data), "--out", str(tmp_path / "run"), "--resume")
    assert "--resume" in msg and "no checkpoint" in msg


def test_new_run_refuses_a_run_dir_with_checkpoints(micro_data, tmp_path):
    run = tmp_path / "run"
    train(micro_train(steps=1), MICRO, micro_data, run, progress=False)
    assert "--resume" in cli_error("train", "--data", str(micro_data), "--out", str(run))


def test_resume_flag_contradicting_checkpoint_names_the_field(micro_data, tmp_path):
    run = tmp_path / "run"
    train(micro_train(steps=2), MICRO, micro_data, run, progress=False)
    base = ("train", "--data", str(micro_data), "--out", str(run), "--resume", "--steps", "3")
    msg = cli_error(*base, "--n-future", "4")
    assert "n_future=4" in msg and "n_future=2" in msg and str(latest_checkpoint(run)) in msg
    assert "lr=0.01" in cli_error(*base, "--lr", "0.01")
    assert "seed" in cli_error(*base, "--seed", "7")
    assert list_checkpoints(run)[-1].name == "step-0000002"  # nothing was trained


def test_seq_len_beyond_max_seq_len(micro_data, tmp_path):
    cfg = config_file(tmp_path)
    msg = cli_error("train", "--data", str(micro_data), "--out", str(tmp_path / "run"), "--config", str(cfg),
                    "--seq-len", "33")
    assert "--seq-len" in msg and "max_seq_len=32" in msg


def test_config_file_unknown_field_and_bad_values(micro_data, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"d_model": 32, "learning_rate": 1e-3}))
    msg = cli_error("train", "--data", str(micro_data), "--out", str(tmp_path / "r"), "--config", str(bad))
    assert "'learning_rate'" in msg and str(bad) in msg
    msg = cli_error("train", "--data", str(micro_data), "--out", str(tmp_path / "r"), "--batch-size", "0")
    assert "batch_size" in msg


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(micro_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_forward = MTPObjective.forward
    calls = {"n": 0}

    def forward(self, ids):
        calls["n"] += 1
        loss, head_losses = real_forward(self, ids)
        if calls["n"] == 5:  # step 5
            return loss * float("nan"), head_losses * float("nan")
        return loss, head_losses

    monkeypatch.setattr(MTPObjective, "forward", forward)
    expected = r"non-finite .* at step 5: stopped; the last good checkpoint is .*step-0000004"
    with pytest.raises(BytemtpError, match=expected):
        train(micro_train(steps=10, ckpt_every=2), MICRO, micro_data, run, progress=False)
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002", "step-0000004"]
    assert latest_checkpoint(run).name == "step-0000004"
    model, _ = load_model(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]


def test_disk_full_while_checkpointing_keeps_previous_checkpoint(micro_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = bytemtp.train.checkpoint.save_file
    calls = {"n": 0}

    def save_file(tensors, path):
        calls["n"] += 1
        if calls["n"] == 3:  # each checkpoint writes its weights, then its byte-pair counts
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path)

    monkeypatch.setattr(bytemtp.train.checkpoint, "save_file", save_file)
    expected = r"step-0000006: checkpoint not written \(No space left on device\); .*step-0000003 is intact"
    with pytest.raises(BytemtpError, match=expected):
        train(micro_train(steps=9, ckpt_every=3), MICRO, micro_data, run, progress=False)
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000003"]  # no temp leftovers
    model, meta = load_model(run)
    assert meta["step"] == 3
