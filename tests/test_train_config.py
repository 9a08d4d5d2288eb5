"""Training configs (precedence, resume rules) and the optimizer's schedule and decay groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bytemtp.errors import BytemtpError
from bytemtp.model.config import PRESETS, ModelConfig
from bytemtp.model.transformer import ByteMTP
from bytemtp.train.config import TRAIN_PRESETS, TrainConfig, build_configs, merge_for_resume
from bytemtp.train.optim import WarmupCosine, build_optimizer, build_scheduler, param_groups

CKPT = Path("run/checkpoints/step-0000010")


def test_precedence_preset_then_file_then_flags(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"d_model": 256, "n_attn_heads": 8, "lr": 1e-4, "batch_size": 3}))
    model, train = build_configs(preset="small", config_file=cfg_file, overrides={"lr": 5e-4, "n_future": 4})
    assert (model.d_model, model.n_layers, model.n_future) == (256, PRESETS["small"].n_layers, 4)
    assert (train.lr, train.batch_size, train.warmup_steps) == (5e-4, 3, TRAIN_PRESETS["small"]["warmup_steps"])
    model, train = build_configs()
    assert model == PRESETS["tiny"] and train == TrainConfig(**TRAIN_PRESETS["tiny"])


def test_resume_starts_from_the_saved_configs():
    saved = (
        ModelConfig(d_model=64, n_attn_heads=4, n_future=4),
        TrainConfig(lr=1e-3, steps=50, seq_len=128, time_budget=5.0, device="cuda:1", keep=1),
    )
    model, train = build_configs(overrides={"steps": 80}, saved=saved)
    assert model == saved[0] and (train.lr, train.steps, train.seq_len, train.keep) == (1e-3, 80, 128, 1)
    assert (train.time_budget, train.device) == (0.0, "auto")  # an invocation's, not the run's


def test_merge_for_resume_allows_only_run_length_and_place_to_change():
    saved = (PRESETS["tiny"], TrainConfig(steps=100, seq_len=256, decay_steps=100, batch_size=32))
    model, train = merge_for_resume(saved, None, TrainConfig(steps=300, batch_size=32, device="cpu", keep=1), CKPT)
    assert model == saved[0] and (train.steps, train.device, train.keep, train.decay_steps) == (300, "cpu", 1, 100)
    with pytest.raises(BytemtpError, match=r"batch_size=8 contradicts the checkpoint's batch_size=32 \(run/"):
        merge_for_resume(saved, None, TrainConfig(batch_size=8), CKPT)
    with pytest.raises(BytemtpError, match="n_future=4"):
        merge_for_resume(saved, ModelConfig(n_future=4), TrainConfig(batch_size=32), CKPT)


def test_bad_fields_are_named(tmp_path):
    with pytest.raises(BytemtpError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(BytemtpError, match="loader_mode"):
        TrainConfig(loader_mode="shuffled")
    with pytest.raises(BytemtpError, match="'warmup'"):
        build_configs(overrides={"warmup": 3})
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(BytemtpError, match="JSON object"):
        build_configs(config_file=bad)
    with pytest.raises(BytemtpError, match="--seq-len: 300 exceeds the model's max_seq_len=256"):
        TrainConfig(seq_len=300).resolved(PRESETS["tiny"])


def test_warmup_then_cosine_to_the_floor_then_flat():
    schedule = WarmupCosine(warmup_steps=10, decay_steps=110, min_ratio=0.1)
    assert [schedule(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert schedule(59) == pytest.approx(0.55)  # half-way down the cosine
    assert schedule(109) == pytest.approx(0.1) and schedule(500) == pytest.approx(0.1)
    values = [schedule(s) for s in range(9, 111)]
    assert values[0] > values[1]  # the peak is held for one step only
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_scheduler_drives_the_optimizer_lr():
    model = ByteMTP(ModelConfig(d_model=32, n_layers=1, n_attn_heads=2, max_seq_len=16))
    cfg = TrainConfig(lr=2e-3, warmup_steps=4, steps=20).resolved(model.cfg)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3]) and lrs[5] < lrs[4] < lrs[3]
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_no_weight_decay_on_embeddings_and_norms():
    model = ByteMTP(ModelConfig(d_model=32, n_layers=2, n_attn_heads=2, max_seq_len=16, head_kind="transformer"))
    decay, keep = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in keep["params"]}
    assert "embed.weight" in kept and "norm.weight" in kept and "blocks.0.attn_norm.weight" in kept
    assert all("norm" in n or n == "embed.weight" for n in kept)
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"blocks.0.attn.wqkv.weight", "blocks.1.mlp.w_out.weight", "unembed.weight"} <= decayed
    assert len(decayed) + len(kept) == len(names)
