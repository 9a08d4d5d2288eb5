"""Objective schedules: the draft heads' weight and the number of heads trained over a run."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from bytemtp.errors import BytemtpError
from bytemtp.model.config import preset
from bytemtp.train.config import TrainConfig, build_configs
from bytemtp.train.loop import train
from bytemtp.train.objective import head_weights
from bytemtp.train.flops import flops_per_byte, mean_flops_per_byte
from bytemtp.train.objective_schedule import SCHEDULE_FIELDS, draft_weights
from train_support import MICRO, cli_error, config_file, metrics, micro_train

FOUR = dataclasses.replace(MICRO, n_future=4)


def scheduled(shape: str, **fields) -> TrainConfig:
    return TrainConfig(steps=40, objective_schedule=shape, **fields)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_weight_holds_before_the_range_and_reaches_the_final_weight_at_its_end(shape):
    cfg = scheduled(shape, draft_weight_initial=0.0, draft_loss_weight=1.0, objective_begin=10, objective_end=30)
    at = {s: draft_weights(cfg, s, 4) for s in (1, 10, 15, 20, 30, 31, 40)}
    assert at[1] == at[10] == [0.0] * 3
    assert at[30] == at[31] == at[40] == [1.0] * 3
    quarter = 0.25 if shape == "linear" else (1 - math.cos(math.pi / 4)) / 2
    assert at[15] == pytest.approx([quarter] * 3, abs=1e-12) and at[20] == pytest.approx([0.5] * 3, abs=1e-12)


def test_reverse_schedule_and_the_run_end_as_default_range_end():
    cfg = scheduled("linear", draft_weight_initial=1.0, draft_loss_weight=0.25)  # objective_end 0: step 40
    assert draft_weights(cfg, 0, 8) == [1.0] * 7
    assert draft_weights(cfg, 20, 8) == pytest.approx([0.625] * 7, abs=1e-12)
    assert draft_weights(cfg, 40, 8) == [0.25] * 7


@pytest.mark.parametrize("steps", [40, 300, 2250])
def test_a_range_in_fractions_of_the_run_follows_its_length(steps):
    """``objective_begin`` 0.5, ``objective_end`` 0.6: the draft heads weigh 0 for the first half of
    any run and reach their weight at 60 % of it; fixed to those steps when the run starts."""
    cfg = TrainConfig(steps=steps, objective_schedule="linear", draft_weight_initial=0.0, draft_loss_weight=0.25,
                      objective_begin=0.5, objective_end=0.6)
    half, most = round(0.5 * steps), round(0.6 * steps)
    assert draft_weights(cfg, half, 8) == [0.0] * 7 and draft_weights(cfg, half + 1, 8)[0] > 0
    assert draft_weights(cfg, most, 8) == [0.25] * 7
    resolved = cfg.resolved(dataclasses.replace(FOUR, max_seq_len=64))
    assert (resolved.objective_begin, resolved.objective_end) == (half, most)
    longer = dataclasses.replace(resolved, steps=2 * steps)  # ``--resume --steps``: the schedule stays put
    assert all(draft_weights(longer, s, 8) == draft_weights(cfg, s, 8) for s in (1, half, half + 1, most, steps))


def test_heads_trained_grow_from_the_initial_to_the_final_number():
    cfg = scheduled("linear", draft_weight_initial=1.0, heads_initial=2, objective_begin=0, objective_end=12)
    trained = [sum(w > 0 for w in draft_weights(cfg, s, 8)) + 1 for s in range(0, 14)]
    assert trained[0] == 2 and trained[12] == trained[13] == 8
    assert trained == sorted(trained) and set(trained) == set(range(2, 9))  # one more head at a time
    shrink = scheduled("linear", heads_initial=8, heads_final=1, draft_weight_initial=1.0, objective_end=10)
    assert draft_weights(shrink, 0, 8) == [1.0] * 7 and draft_weights(shrink, 10, 8) == [0.0] * 7


def test_constant_is_the_old_objective_bit_for_bit():
    cfg = TrainConfig(draft_loss_weight=0.25)
    for step in (1, 100, 10**6):
        assert draft_weights(cfg, step, 8) == [0.25] * 7
    assert torch.equal(head_weights(8, draft_weights(cfg, 1, 8)), head_weights(8, 0.25))
    old = {k: v for k, v in TrainConfig().to_dict().items() if k not in (*SCHEDULE_FIELDS, "objective_schedule",
                                                                         "heads_final")}
    assert TrainConfig.from_dict(old) == TrainConfig()  # a config saved before the fields loads unchanged


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"objective_schedule": "step"}, "objective_schedule: 'step' is not one of constant, linear, cosine"),
        ({"objective_schedule": "linear", "draft_weight_initial": -1.0}, "draft_weight_initial: must be >= 0"),
        ({"draft_weight_initial": 0.5}, "draft_weight_initial: only used by a schedule"),
        ({"objective_schedule": "linear", "objective_begin": 20, "objective_end": 10}, "objective_end: must be after"),
        ({"objective_schedule": "linear", "objective_begin": 0.5, "objective_end": 0.4}, "objective_end: must be after"),
        ({"objective_schedule": "linear", "objective_begin": 0.5, "objective_end": 0.501, "steps": 100},
         r"objective_end: must be after objective_begin=0.5, got 0.501 \(steps 50 and 50 of 100\)"),
        ({"objective_schedule": "linear", "objective_begin": 2.5}, "objective_begin: a step number or a fraction"),
        ({"heads_final": -1}, "heads_final: must not be negative"),
    ],
)
def test_bad_schedules_are_one_line_errors(fields, message):
    with pytest.raises(BytemtpError, match=message):
        TrainConfig(**fields)


def test_cli_names_the_file_and_the_field(micro_data, tmp_path):
    out = ["--data", str(micro_data), "--out", str(tmp_path / "run")]
    too_many = config_file(tmp_path, objective_schedule="linear", heads_initial=3)  # MICRO has 2 heads
    assert "heads_initial: 3 exceeds the model's n_future=2" in cli_error("train", *out, "--config", str(too_many))
    wrong_type = tmp_path / "t.json"
    wrong_type.write_text(json.dumps({"objective_begin": "10"}))
    msg = cli_error("train", *out, "--config", str(wrong_type))
    assert str(wrong_type) in msg and "objective_begin must be int" in msg


def test_each_logged_step_records_the_weights_it_trained_with(micro_data, tmp_path):
    cfg = micro_train(steps=8, objective_schedule="linear", draft_weight_initial=0.0, draft_loss_weight=1.0,
                      heads_initial=2, objective_begin=2, objective_end=6)
    train(cfg, FOUR, micro_data, tmp_path / "run", progress=False)
    records = {r["step"]: r for r in metrics(tmp_path / "run")}
    logged = {step: r["head_weights"] for step, r in records.items()}
    assert logged[1] == logged[2] == [1.0, 0.0, 0.0, 0.0]  # head 1 alone before the range
    # heads not trained were not computed: no loss to log, and the step's loss is head 1's
    assert records[2]["bpb_heads"][1:] == [None] * 3 and records[2]["loss"] == records[2]["bpb_heads"][0]
    assert None not in records[8]["bpb_heads"]
    assert logged[4] == pytest.approx([0.5, 0.25, 0.25, 0.0], abs=1e-6)  # halfway: 3 heads, drafts at 0.5
    assert logged[6] == logged[8] == [0.25] * 4  # every head, the plain mean
    model, saved = build_configs(preset="tiny", overrides={"objective_schedule": "cosine"})
    assert saved.resolved(model).objective_end == saved.steps  # fixed when the run starts


def test_a_run_costs_the_heads_each_step_trains():
    """``mean_flops_per_byte``: a constant objective costs every head on every step; a schedule
    training head 1 alone for the first half, then all 8, costs the mean of the two (so does the
    ``tiny`` preset, whose draft heads weigh 0 for the first half); n = 1 its own. A schedule given
    replaces the preset's whole."""
    model, train_cfg = build_configs(preset="tiny", overrides={"steps": 100, "objective_schedule": "constant"})
    every = flops_per_byte(model, train_cfg.resolved(model).seq_len)
    one = flops_per_byte(dataclasses.replace(model, n_future=1), train_cfg.resolved(model).seq_len)
    assert mean_flops_per_byte(model, train_cfg.resolved(model)) == every
    late = {"steps": 100, "objective_schedule": "linear", "heads_initial": 1, "objective_begin": 50,
            "objective_end": 51}
    for overrides in (late, {"steps": 100}):
        model, train_cfg = build_configs(preset="tiny", overrides=overrides)
        assert mean_flops_per_byte(model, train_cfg.resolved(model)) == pytest.approx((50 * one + 50 * every) / 100)


def test_detached_draft_heads_cost_their_forward_and_weight_gradient():
    """``draft_detach``: a draft head's unembedding costs 4 FLOPs per weight (forward, weight
    gradient), not 6, on the steps that train it; head 1 and the trunk cost what they did. An older
    config (no such field) trains shared heads, and transformer heads refuse it."""
    model, shared = build_configs(preset="tiny", overrides={"steps": 100, "objective_schedule": "constant"})
    _, detached = build_configs(preset="tiny", overrides={"steps": 100, "objective_schedule": "constant",
                                                          "draft_detach": True})
    T = shared.resolved(model).seq_len
    unembedding = model.d_model * model.vocab_padded
    saved = 2 * (model.n_future - 1) * unembedding
    assert flops_per_byte(model, T) - flops_per_byte(model, T, draft_detach=True) == saved
    assert mean_flops_per_byte(model, shared.resolved(model)) - mean_flops_per_byte(model, detached.resolved(model)) \
        == saved
    assert TrainConfig.from_dict({"steps": 5}).draft_detach is False
    transformer = dataclasses.replace(model, head_kind="transformer")
    with pytest.raises(BytemtpError, match="draft_detach: needs linear heads"):
        detached.resolved(transformer)


@pytest.mark.parametrize("ffn, inner", [("relu2", 1), ("swiglu", 2)])
def test_draft_mlps_cost_six_flops_per_weight_and_four_for_their_first_product_when_detached(ffn, inner):
    """``draft_mlp``: each draft head adds its MLP's weights at 6 FLOPs per weight; detached, its first
    product (the MLP's input projection, no longer the unembedding, whose input gradient the MLP
    needs) costs 4."""
    model = dataclasses.replace(preset("tiny"), ffn=ffn)
    mlp = dataclasses.replace(model, draft_mlp=96)
    T, drafts = 256, model.n_future - 1
    weights = (inner + 1) * model.d_model * 96
    assert flops_per_byte(mlp, T) - flops_per_byte(model, T) == 6 * drafts * weights
    first = inner * model.d_model * 96
    assert flops_per_byte(mlp, T) - flops_per_byte(mlp, T, draft_detach=True) == 2 * drafts * first
    assert flops_per_byte(dataclasses.replace(mlp, n_future=1), T) == flops_per_byte(
        dataclasses.replace(model, n_future=1), T)


def test_draft_lr_restart_gives_the_draft_heads_a_schedule_from_when_they_join():
    """``draft_lr_restart``: the draft heads' parameters (and theirs alone) are in groups whose
    learning rate is 0 until ``objective_begin``, then the run's warm-up and cosine over the rest of
    the run; every other group keeps the run's schedule, as without it."""
    from bytemtp.model.transformer import ByteMTP
    from bytemtp.train.optim import build_optimizer, build_scheduler

    overrides = {"steps": 100, "warmup_steps": 5, "objective_begin": 0.6, "objective_end": 0.7, "draft_detach": True,
                 "draft_mlp": 32}
    model_cfg, plain = build_configs(preset="tiny", overrides=overrides)
    _, restart = build_configs(preset="tiny", overrides={**overrides, "draft_lr_restart": True})
    assert plain.draft_lr_restart is False and TrainConfig.from_dict({"steps": 5}).draft_lr_restart is False
    model = ByteMTP(model_cfg)
    runs = {}
    for name, cfg in (("plain", plain), ("restart", restart)):
        cfg = cfg.resolved(model_cfg)
        optimizer = build_optimizer(model, cfg, torch.device("cpu"))
        scheduler = build_scheduler(optimizer, cfg)
        lrs = []
        for _ in range(cfg.steps):
            lrs.append([g["lr"] for g in optimizer.param_groups])
            optimizer.step()
            scheduler.step()
        runs[name] = (optimizer.param_groups, lrs)
    groups, lrs = runs["restart"]
    drafts = [i for i, g in enumerate(groups) if g.get("draft")]
    assert {id(p) for i in drafts for p in groups[i]["params"]} == {id(p) for p in model.draft_parameters()}
    others = [i for i in range(len(groups)) if i not in drafts]
    plain_lrs = runs["plain"][1]
    assert [[step[i] for i in others] for step in lrs] == [step for step in plain_lrs]  # the same groups, same lrs
    base = [groups[i]["initial_lr"] for i in drafts]
    assert all(step[i] == 0 for step in lrs[:60] for i in drafts)
    assert [lrs[64][i] for i in drafts] == pytest.approx(base)  # warmed up: the peak, 5 steps after joining
    assert [lrs[99][i] for i in drafts] == pytest.approx([0.1 * b for b in base])  # the run's floor at its end
