"""The demo's fixed schedule and the training recipe's options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bytemtp import demo
from bytemtp.errors import BytemtpError
from bytemtp.demo import DEMO_STEPS, DemoConfig, StepCost, plan_steps


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
    monkeypatch.setattr(demo, "measure_step", lambda *a, **k: StepCost(per_step=0.5, warmup=6.0))
    _, cfg = plan_steps(_demo_cfg(2.0))
    assert cfg.steps == int(0.85 * (120 - 6) / 0.5) and cfg.time_budget == 2.0
    with pytest.raises(BytemtpError, match="--minutes"):
        _demo_cfg(0.0)
