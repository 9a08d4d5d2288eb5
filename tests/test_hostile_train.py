"""Hostile input and faults around training, evaluation and checkpoints: a one-line error
naming the file and what is wrong, never a traceback, never a figure for what was not measured,
and no completed step lost to an interrupted final evaluation."""

from __future__ import annotations

import json
import os
import pickle
import random
import resource
import signal
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError

import bytemtp.memory
import bytemtp.train.checkpoint
import bytemtp.train.loop
from bytemtp.cli import main
from bytemtp.errors import BytemtpError
from bytemtp.train.checkpoint import CONFIG, TRAIN_STATE, latest_checkpoint, list_checkpoints
from bytemtp.train.loop import train
from train_support import MICRO, cli_error, config_file, micro_train



@pytest.fixture(scope="module")
def trained_run(micro_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("hostile") / "run"
    train(micro_train(steps=2), MICRO, micro_data, run, progress=False)
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the trained run (its latest checkpoint as a real directory), to damage."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    return run


# -- row 2: configs of the wrong shape ------------------------------------------------------------
@pytest.mark.parametrize("fields", [{"d_model": "big"}, {"lr": "fast"}, {"n_future": 2.5}, {"compile": "yes"},
                                    {"batch_size": True}, {"steps": None}])
def test_config_file_with_a_value_of_the_wrong_type(micro_data, tmp_path, fields):
    cfg = config_file(tmp_path, **fields)
    msg = cli_error("train", "--data", str(micro_data), "--out", str(tmp_path / "run"), "--config", str(cfg))
    name = next(iter(fields))
    assert str(cfg) in msg and name in msg and repr(fields[name]) in msg
    assert not (tmp_path / "run").exists()


def edit_config(run, edit) -> str:
    path = latest_checkpoint(run) / CONFIG
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    return str(path)


@pytest.mark.parametrize("command", ["sample", "eval", "resume"])
@pytest.mark.parametrize("damage", ["string d_model", "no model", "model not an object", "d_model vs weights"])
def test_checkpoint_config_of_the_wrong_shape(run_copy, micro_data, command, damage):
    edits = {
        "string d_model": lambda m: m["model"].update(d_model="32"),
        "no model": lambda m: m.pop("model"),
        "model not an object": lambda m: m.update(model=[32]),
        "d_model vs weights": lambda m: m["model"].update(d_model=64),
    }
    path = edit_config(run_copy, edits[damage])
    args = {
        "sample": ["sample", str(run_copy), "--prompt", "x", "--max-bytes", "4"],
        "eval": ["eval", str(run_copy), "--data", str(micro_data)],
        "resume": ["train", "--data", str(micro_data), "--out", str(run_copy), "--resume", "--steps", "3"],
    }[command]
    msg = cli_error(*args)
    assert str(latest_checkpoint(run_copy)) in msg or path in msg
    assert ("d_model" in msg) or ("model" in msg and "config" in msg)


# -- row 3: a full disk while checkpointing -------------------------------------------------------
@pytest.mark.parametrize("where", ["weights", "train state"])
def test_disk_full_inside_the_serialisers(micro_data, tmp_path, monkeypatch, where):
    """safetensors and torch.save report a full disk with their own exception types, not OSError."""
    if where == "weights":
        def save_file(tensors, path):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')

        monkeypatch.setattr(bytemtp.train.checkpoint, "save_file", save_file)
    else:
        def save(obj, f, *args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed "
                               "writing file data/3: file write failed")

        monkeypatch.setattr(bytemtp.train.checkpoint.torch, "save", save)
    args = ["train", "--data", str(micro_data), "--out", str(tmp_path / "run"),
            "--config", str(config_file(tmp_path, steps=2)), "--no-progress"]
    msg = cli_error(*args)
    assert "step-0000002: checkpoint not written" in msg and "there is no earlier checkpoint" in msg
    assert ("No space left" in msg) if where == "weights" else ("file write failed" in msg)
    assert not list_checkpoints(tmp_path / "run")


# -- row 4: a damaged train_state.pt --------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty", "not a dict"])
def test_damaged_train_state_on_resume(run_copy, micro_data, damage):
    path = latest_checkpoint(run_copy) / TRAIN_STATE
    data = path.read_bytes()
    path.write_bytes({
        "truncated": data[: len(data) // 2],
        "random bytes": random.Random(4096).randbytes(4096),  # seeded: the same damage every run
        "empty": b"",
        "not a dict": pickle.dumps([1, 2, 3]),
    }[damage])
    msg = cli_error("train", "--data", str(micro_data), "--out", str(run_copy), "--resume", "--steps", "3")
    assert str(path) in msg and "damaged" in msg


# -- row 8: heads with no targets -----------------------------------------------------------------
def test_heads_without_targets_are_missing_not_perfect(trained_run, make_dataset):
    data = make_dataset({"train": [[b"x = 1\n"]], "val": [[b"a"]]})  # BOS a: one target, head 1's only
    result = CliRunner().invoke(main, ["eval", str(trained_run), "--data", str(data), "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["val_bpb_heads"][0] > 0 and report["val_bpb_heads"][1] is None
    table = CliRunner().invoke(main, ["eval", str(trained_run), "--data", str(data), "--no-progress"])
    assert table.exit_code == 0, table.output
    head2 = next(line for line in table.stdout.splitlines() if line.startswith("head  2"))
    assert "n/a" in head2 and "no targets" in head2 and "0.0000" not in head2


# -- row 10: a signal during the final evaluation -------------------------------------------------
def signal_during_final_eval(monkeypatch, times: int) -> None:
    """SIGINT ``times`` times while the run's last evaluation is running."""
    real_evaluate = bytemtp.train.loop.evaluate

    def evaluate(*args, **kwargs):
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(bytemtp.train.loop, "evaluate", evaluate)


def test_sigint_during_final_eval_says_so_and_the_step_is_saved(micro_data, tmp_path, monkeypatch, capfd):
    signal_during_final_eval(monkeypatch, times=1)
    result = train(micro_train(steps=3, eval_every=3), MICRO, micro_data, tmp_path / "run", progress=False)
    assert result.step == 3 and result.checkpoint.name == "step-0000003"
    err = capfd.readouterr().err
    assert "SIGINT: step 3 is saved" in err and "finishing the final evaluation" in err and "again to abort" in err


def test_second_sigint_aborts_the_final_eval_but_not_the_checkpoint(micro_data, tmp_path, monkeypatch):
    signal_during_final_eval(monkeypatch, times=2)
    with pytest.raises(KeyboardInterrupt):
        train(micro_train(steps=3, eval_every=3), MICRO, micro_data, tmp_path / "run", progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000003"]


def test_a_bad_config_error_is_a_bytemtp_error_in_the_api_too(trained_run, tmp_path):
    """The library raises the same one-line error the CLI prints (no KeyError, TypeError, ...)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    edit_config(run, lambda m: m["model"].update(n_layers="1"))
    with pytest.raises(BytemtpError, match="n_layers must be int, got '1'"):
        bytemtp.train.checkpoint.load_model(run)


# -- issue 32, rows 2, 3, 8-11: sizes and values past any reason ---------------------------------
def train_args(micro_data, run, cfg) -> list[str]:
    return ["train", "--data", str(micro_data), "--out", str(run), "--config", str(cfg), "--no-progress"]


def raw_config(tmp_path, text: str):
    """MICRO's config file with ``text`` (raw JSON, e.g. ``"lr": 1e309``) appended to its fields."""
    path = config_file(tmp_path)
    path.write_text(path.read_text()[:-1] + ", " + text + "}")
    return path


@pytest.mark.parametrize(
    "text, field",
    [
        ('"draft_loss_weight": 1e308', "draft_loss_weight"),
        ('"objective_schedule": "linear", "draft_weight_initial": 1e308', "draft_weight_initial"),
        ('"seed": 123456789012345678901234567890', "seed"),
        ('"lr": 1e300', "lr"),
        ('"muon_lr": 1e300, "optimizer": "muon"', "muon_lr"),
        ('"lr": 1e309', "lr"),  # JSON's way to write infinity
        ('"lr": Infinity', "lr"),
        ('"grad_clip": NaN', "grad_clip"),
        ('"beta2": 1e308', "beta2"),
        ('"weight_decay": 1e308', "weight_decay"),
        ('"logit_cap": 1e308', "logit_cap"),
        ('"rope_theta": 0', "rope_theta"),
        ('"norm_eps": -1', "norm_eps"),
        ('"max_seq_len": 100000000', "max_seq_len"),
        ('"d_model": 100000, "n_layers": 100', "d_model"),
        ('"n_future": 100000', "n_future"),
    ],
)
def test_absurd_config_values_are_one_line_errors(micro_data, tmp_path, text, field):
    msg = cli_error(*train_args(micro_data, tmp_path / "run", raw_config(tmp_path, text)))
    assert field in msg
    assert not list_checkpoints(tmp_path / "run")


def test_absurd_lr_flag_is_one_line_error(micro_data, tmp_path):
    msg = cli_error("train", "--data", str(micro_data), "--out", str(tmp_path / "run"), "--lr", "1e300")
    assert "lr" in msg and not (tmp_path / "run").exists()


def test_a_model_that_cannot_fit_is_refused_before_allocating(micro_data, tmp_path, monkeypatch):
    """Sizes within the hard bounds are checked against the memory there is (here forced to 1 GiB)."""
    monkeypatch.setattr(bytemtp.memory, "available_memory", lambda device="cpu": 1 << 30)
    allocated = []
    monkeypatch.setattr(bytemtp.train.loop, "ByteMTP", lambda cfg: allocated.append(cfg))
    cfg = config_file(tmp_path, d_model=4096, n_layers=32, n_attn_heads=32)  # 6.4e9 parameters
    msg = cli_error(*train_args(micro_data, tmp_path / "run", cfg))
    assert "needs at least" in msg and "GiB" in msg and "d_model=4096" in msg and "1.0 GiB is available" in msg
    assert not allocated and not list_checkpoints(tmp_path / "run")


def test_a_model_that_fits_is_not_refused(micro_data, tmp_path, monkeypatch):
    monkeypatch.setattr(bytemtp.memory, "available_memory", lambda device="cpu": 1 << 30)
    train(micro_train(steps=1), MICRO, micro_data, tmp_path / "run", progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000001"]


def test_the_memory_check_sees_an_address_space_limit(micro_data, tmp_path):
    """A real limit (``ulimit -v``, 2 GiB) in a child process: a model needing about 6 GiB is one
    error line, not a traceback from an allocation (nor, without the limit, the kernel's OOM kill)."""
    cfg = config_file(tmp_path, d_model=1024, n_layers=32, n_attn_heads=16)  # 4e8 parameters

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    cmd = [sys.executable, "-m", "bytemtp", *train_args(micro_data, tmp_path / "run", cfg)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: training a model of") and "needs at least" in lines[0]


def nan_after_update(monkeypatch, at_step: int) -> None:
    """The optimizer's update at step ``at_step`` leaves a NaN in the weights, while that step's loss
    and gradients are finite: what an infinite or overflowing learning rate does."""
    real = bytemtp.train.loop.build_optimizer

    def build(model, cfg, device):
        optimizer, taken = real(model, cfg, device), []

        def poison(optimizer, args, kwargs):
            taken.append(1)
            if len(taken) == at_step:
                with torch.no_grad():
                    model.embed.weight[0, 0] = float("nan")

        optimizer.register_step_post_hook(poison)
        return optimizer

    monkeypatch.setattr(bytemtp.train.loop, "build_optimizer", build)


def test_non_finite_weights_are_never_saved(micro_data, tmp_path, monkeypatch):
    nan_after_update(monkeypatch, at_step=2)
    with pytest.raises(BytemtpError, match=r"step 2: not saved: 1 of \d+ weight tensors hold NaN or infinity "
                                           r"\(first embed.weight\); stopped; the last good checkpoint is .*step-0000001"):
        train(micro_train(steps=2, ckpt_every=1, keep=0), MICRO, micro_data, tmp_path / "run", progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000001"]


def test_the_issue_case_inf_lr_one_step_saves_nothing(micro_data, tmp_path):
    msg = cli_error(*train_args(micro_data, tmp_path / "run", raw_config(tmp_path, '"lr": 1e309, "steps": 1')))
    assert "lr must be a finite number" in msg and not list_checkpoints(tmp_path / "run")


def test_resume_refuses_a_checkpoint_with_non_finite_weights(run_copy, micro_data):
    """A checkpoint written before weights were checked (or damaged since) is no 'last good' one."""
    from safetensors.torch import load_file, save_file

    path = latest_checkpoint(run_copy) / "model.safetensors"
    weights = load_file(str(path))
    weights["norm.weight"][0] = float("inf")
    save_file(weights, str(path))
    msg = cli_error("train", "--data", str(micro_data), "--out", str(run_copy), "--resume", "--steps", "3")
    assert str(latest_checkpoint(run_copy)) in msg and "NaN or infinity" in msg and "norm.weight" in msg


@pytest.mark.parametrize("fields", [{}, {"ffn": "relu2", "qk_norm": True}, {"head_kind": "transformer", "ffn": "gelu",
                                     "head_layers": 2}, {"n_future": 1, "d_ff": 100, "head_kind": "transformer"},
                                    {"draft_mlp": 48}, {"draft_mlp": 40, "ffn": "relu2", "draft_next_byte": True}])
def test_the_parameter_count_from_the_config_is_the_models(fields):
    """The memory checks count a model's parameters without building it; the count is the model's own."""
    from bytemtp.model.config import ModelConfig
    from bytemtp.model.size import parameter_count
    from bytemtp.model.transformer import ByteMTP

    cfg = ModelConfig(d_model=64, n_layers=2, n_attn_heads=4, **fields)
    assert parameter_count(cfg) == ByteMTP(cfg).param_counts()["total"]
