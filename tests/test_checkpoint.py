"""Checkpoint directories: atomic writes, ``latest``, keep-K, and failures that harm nothing."""

from __future__ import annotations

import errno
import os

import pytest
import torch

import bytemtp.train.checkpoint as ckpt
from bytemtp.train.checkpoint import (
    LATEST,
    checkpoints_dir,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    load_train_state,
    remove_stale,
    resolve_checkpoint,
    save_checkpoint,
)
from bytemtp.errors import BytemtpError
from bytemtp.model.transformer import ByteMTP
from train_support import MICRO


def micro_model(seed: int) -> ByteMTP:
    torch.manual_seed(seed)
    return ByteMTP(MICRO)


def test_save_keep_latest_and_load_roundtrip(tmp_path):
    run = tmp_path / "run"
    models = {step: micro_model(step) for step in (1, 2, 3, 4)}
    for step, model in models.items():
        save_checkpoint(run, step, model, train_config={"lr": 1.0}, train_state={"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(run)] == ["step-0000003", "step-0000004"]
    assert os.readlink(checkpoints_dir(run) / LATEST) == "step-0000004"
    assert resolve_checkpoint(run) == latest_checkpoint(run) == checkpoints_dir(run) / "step-0000004"
    loaded, meta = load_model(run)
    assert meta["step"] == 4 and meta["train"] == {"lr": 1.0} and load_train_state(run) == {"step": 4}
    for name, value in models[4].state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    earlier, _ = load_model(checkpoints_dir(run) / "step-0000003")
    assert torch.equal(earlier.embed.weight, models[3].embed.weight)


def test_explicit_weights_replace_the_models_own(tmp_path):
    model, other = micro_model(0), micro_model(1)
    save_checkpoint(tmp_path, 7, model, weights=other.state_dict())
    loaded, _ = load_model(tmp_path)
    assert torch.equal(loaded.embed.weight, other.embed.weight)
    assert not torch.equal(loaded.embed.weight, model.embed.weight)


@pytest.mark.parametrize("failing", ["save_file", "save"])
def test_disk_full_leaves_previous_checkpoint_and_latest(tmp_path, monkeypatch, failing):
    run = tmp_path / "run"
    first = micro_model(0)
    save_checkpoint(run, 1, first, train_state={"step": 1})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = ckpt if failing == "save_file" else ckpt.torch
    monkeypatch.setattr(target, failing, no_space)
    with pytest.raises(BytemtpError) as err:
        save_checkpoint(run, 2, micro_model(1), train_state={"step": 2})
    msg = str(err.value)
    assert "step-0000002" in msg and "No space left on device" in msg and "step-0000001 is intact" in msg
    assert sorted(p.name for p in checkpoints_dir(run).iterdir()) == [LATEST, "step-0000001"]
    loaded, meta = load_model(run)
    assert meta["step"] == 1 and torch.equal(loaded.embed.weight, first.embed.weight)


def test_remove_stale_clears_interrupted_writes_only(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, 1, micro_model(0))
    root = checkpoints_dir(run)
    (root / ".step-0000002.abc.tmp").mkdir()
    (root / ".step-0000002.abc.tmp" / "model.safetensors").write_bytes(b"partial")
    os.symlink("step-0000002", root / ".latest.tmp")
    remove_stale(run)
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step-0000001"]


def test_latest_falls_back_to_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(run, step, micro_model(step))
    (checkpoints_dir(run) / LATEST).unlink()
    assert latest_checkpoint(run).name == "step-0000002"


def test_not_a_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(BytemtpError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)
    save_checkpoint(tmp_path / "run", 1, micro_model(0))
    with pytest.raises(BytemtpError, match="not a training checkpoint"):
        load_train_state(tmp_path / "run")
