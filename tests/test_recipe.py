"""The demo's fixed schedule and the training recipe's options."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from bytemtp import demo
from bytemtp.errors import BytemtpError
from bytemtp.decode.config import GenerationConfig
from bytemtp.decode.generate import generate
from bytemtp.demo import DEMO_STEPS, DemoConfig, StepCost, plan_steps
from bytemtp.model.config import ModelConfig
from bytemtp.model.layers import Block
from bytemtp.model.transformer import ByteMTP
from bytemtp.train.checkpoint import CONFIG, load_model, save_checkpoint
from bytemtp.train.config import TrainConfig
from bytemtp.train.optim import build_optimizer


def _demo_cfg(minutes: float | None, device: str = "cpu") -> DemoConfig:
    return DemoConfig(minutes, Path("data"), Path("run"), torch.device(device))


def test_demo_trains_a_fixed_schedule_without_timing_anything(monkeypatch):
    monkeypatch.setattr(demo, "measure_step", lambda *a, **k: pytest.fail("the fixed schedule timed a step"))
    _, cpu = plan_steps(_demo_cfg(None))
    assert cpu.steps == DEMO_STEPS["cpu"] and cpu.time_budget == 0.0  # nothing about the machine decides it
    assert cpu.eval_every == DEMO_STEPS["cpu"] and cpu.ckpt_every == DEMO_STEPS["cpu"] // 5  # one final eval
    assert plan_steps(_demo_cfg(None))[1] == cpu
    _, cuda = plan_steps(_demo_cfg(None, "cuda"))
    assert cuda.steps == DEMO_STEPS["cuda"] and cuda.device == "cuda"


def test_demo_minutes_fit_the_steps_to_the_budget(monkeypatch):
    timed = []
    monkeypatch.setattr(demo, "measure_step", lambda m, t, d: timed.append(t) or StepCost(per_step=0.5, warmup=6.0))
    _, cfg = plan_steps(_demo_cfg(2.0))
    assert cfg.steps == int(0.85 * (120 - 6) / 0.5) and cfg.time_budget == 2.0
    # the step timed is the one trained: the recipe's optimizer (Muon's step costs more than AdamW's)
    assert (timed[0].optimizer, timed[0].batch_size, timed[0].seq_len) == (cfg.optimizer, cfg.batch_size, cfg.seq_len)
    with pytest.raises(BytemtpError, match="--minutes"):
        _demo_cfg(0.0)


# -- recipe options: old configs keep their meaning, new ones round-trip ---------------------

RECIPE_MODEL = {"qk_norm": True, "zero_init_out": True, "ffn": "relu2"}
NEW_MODEL_FIELDS = ("qk_norm", "zero_init_out", "logit_cap")
NEW_TRAIN_FIELDS = ("optimizer", "muon_lr", "muon_momentum", "muon_dtype", "draft_loss_weight")


def _model(**overrides) -> ByteMTP:
    torch.manual_seed(0)
    return ByteMTP(ModelConfig(d_model=32, n_layers=2, n_attn_heads=2, n_future=3, max_seq_len=32, **overrides))


def _greedy(model: ByteMTP) -> bytes:
    return generate(model, GenerationConfig(prompt=b"def f(x):\n", max_new_bytes=12)).read()


def _strip_new_fields(ckpt: Path) -> None:
    """Rewrite a checkpoint's config.json as a version before the recipe options wrote it."""
    meta = json.loads((ckpt / CONFIG).read_text())
    meta["model"] = {k: v for k, v in meta["model"].items() if k not in NEW_MODEL_FIELDS}
    meta["train"] = {k: v for k, v in meta["train"].items() if k not in NEW_TRAIN_FIELDS}
    (ckpt / CONFIG).write_text(json.dumps(meta))


def test_old_config_without_the_recipe_fields_loads_and_decodes_identically(tmp_path):
    model = _model()
    old = {k: v for k, v in model.cfg.to_dict().items() if k not in NEW_MODEL_FIELDS}
    assert ModelConfig.from_dict(old) == model.cfg  # the options default to off
    assert not any("qk_norm" in name for name, _ in model.named_parameters())
    train_dict = {k: v for k, v in TrainConfig().to_dict().items() if k not in NEW_TRAIN_FIELDS}
    assert TrainConfig.from_dict(train_dict).optimizer == "adamw"
    assert TrainConfig.from_dict(train_dict).draft_loss_weight == 1.0  # the paper's plain mean over heads
    path = save_checkpoint(tmp_path, 1, model, train_config=TrainConfig().to_dict())
    _strip_new_fields(path)
    loaded, _ = load_model(tmp_path)
    ids = torch.randint(0, 256, (2, 20))
    model.eval()
    assert loaded.cfg == model.cfg
    assert torch.equal(loaded(ids), model(ids))
    assert _greedy(loaded) == _greedy(model)


@pytest.mark.parametrize(
    "options", [RECIPE_MODEL, {"qk_norm": True}, {"ffn": "relu2"}, {"zero_init_out": True}, {"logit_cap": 0.1}]
)
def test_recipe_configs_round_trip(tmp_path, options):
    model = _model(**options).eval()
    assert ModelConfig.from_dict(json.loads(json.dumps(model.cfg.to_dict()))) == model.cfg
    train_cfg = TrainConfig(optimizer="muon", muon_lr=0.05, draft_loss_weight=0.25)
    assert TrainConfig.from_dict(json.loads(json.dumps(train_cfg.to_dict()))) == train_cfg
    save_checkpoint(tmp_path, 1, model, train_config=train_cfg.to_dict())
    loaded, meta = load_model(tmp_path)
    ids = torch.randint(0, 256, (2, 20))
    assert loaded.cfg == model.cfg and meta["train"]["optimizer"] == "muon"
    assert torch.equal(loaded(ids), model(ids))
    assert _greedy(loaded) == _greedy(model)


@pytest.mark.parametrize("value", [-0.5, float("nan")])
def test_negative_draft_loss_weight_is_refused(value):
    with pytest.raises(BytemtpError, match="draft_loss_weight: must be >= 0"):
        TrainConfig(draft_loss_weight=value)


def test_recipe_options_change_the_model():
    ids = torch.randint(0, 256, (2, 20))
    base = _model()
    for options in ({"qk_norm": True}, {"ffn": "relu2"}, {"zero_init_out": True}, {"logit_cap": 0.1}):
        assert not torch.allclose(_model(**options)(ids), base(ids)), options
    zero = _model(zero_init_out=True)
    outputs = [p for n, p in zero.named_parameters() if n.endswith(("wo.weight", "w_out.weight"))]
    assert outputs and all(not p.any() for p in outputs)
    # Zero output projections: every block starts as the identity, z is the embedding.
    torch.testing.assert_close(zero.trunk(ids), zero.embed(ids))


@pytest.mark.parametrize("head_kind", ["linear", "transformer"])
def test_cached_decoding_matches_the_full_forward_with_qk_norm(head_kind):
    model = _model(qk_norm=True, ffn="relu2", head_kind=head_kind).eval()
    ids = torch.randint(0, 256, (1, 12))
    model.setup_cache(1, 32)
    head1, _ = model.decode(ids, torch.arange(12), n_heads=3)
    torch.testing.assert_close(head1, model(ids)[:, :, 0], rtol=1e-5, atol=1e-5)


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = _model(head_kind="transformer")
    opt = build_optimizer(model, TrainConfig(optimizer="muon", muon_lr=0.05), torch.device("cpu"))
    blocks = {id(p) for m in model.modules() if isinstance(m, Block) for p in m.parameters() if p.dim() == 2}
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert muon == blocks and not muon & adamw and muon | adamw == {id(p) for p in model.parameters()}
    assert id(model.unembed.weight) in adamw and id(model.embed.weight) in adamw
    assert {g["lr"] for g in opt.muon.param_groups} == {0.05}
    assert isinstance(build_optimizer(model, TrainConfig(), torch.device("cpu")), torch.optim.AdamW)


def test_muon_adamw_state_round_trips_and_steps_like_its_parts():
    ids = torch.randint(0, 256, (2, 20))
    cfg = TrainConfig(optimizer="muon")
    models = [_model() for _ in range(2)]
    opts = [build_optimizer(m, cfg, torch.device("cpu")) for m in models]
    for model, opt in zip(models, opts):
        model(ids).square().mean().backward()
        opt.step()
    opts[1].load_state_dict(copy.deepcopy(opts[0].state_dict()))  # a copy, as a checkpoint would hold
    assert opts[1].muon.state is opts[1].state and opts[1].muon.param_groups[0] is opts[1].param_groups[0]
    for model, opt in zip(models, opts):
        opt.zero_grad()
        model(ids).square().mean().backward()
        opt.step()
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)
    with pytest.raises(BytemtpError, match="optimizer"):
        TrainConfig(optimizer="sgd")
