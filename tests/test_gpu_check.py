"""bench/gpu_check.py: complete on a CPU-only machine (every GPU section skipped, with its reason),
sections cut at their limits without costing the next one, and the decoding section's pieces
working on the CPU too (eager, a tiny model), so a changed API fails here rather than on the GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from bytemtp.model.config import ModelConfig
from bytemtp.model.transformer import ByteMTP

BENCH = Path(__file__).resolve().parent.parent / "bench"
TINY = ModelConfig(d_model=32, n_layers=1, n_attn_heads=2, n_future=8, max_seq_len=128)


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return load("gpu_check")


@pytest.fixture(scope="module")
def sections():
    sys.path.insert(0, str(BENCH))
    try:
        return load("gpu_sections")
    finally:
        sys.path.remove(str(BENCH))


def test_the_limits_fit_five_minutes(gpu_check, sections):
    assert sum(gpu_check.LIMITS.values()) <= 300
    assert list(gpu_check.LIMITS) == list(sections.SECTIONS) == ["environment", "training", "decoding", "gpu_tests"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour")
def test_runs_to_completion_without_cuda(gpu_check, tmp_path):
    out = tmp_path / "report.json"
    returned = gpu_check.main(["--out", str(out)])
    report = json.loads(out.read_text())
    assert report == returned and report["format"] == 2 and report["finished"]
    sections = report["sections"]
    assert list(sections) == ["environment", "training", "decoding", "gpu_tests"]
    env = sections["environment"]
    assert env["status"] == "skipped" and env["reason"] == "no CUDA device" and env["torch"] == torch.__version__
    skipped = {"status": "skipped", "reason": "no CUDA device", "seconds": 0.0}
    assert all(s == skipped for s in list(sections.values())[1:])
    assert (tmp_path / "report-logs" / "environment.log").is_file()


def section_script(body: str) -> list[str]:
    """A stand-in section: Python running ``body`` with ``result`` its ``--result`` file."""
    return [sys.executable, "-c", f"import json, sys, time; result = open(sys.argv[2], 'w'); {body}"]


def test_a_section_over_its_limit_is_cut_and_reported_and_the_next_still_runs(gpu_check, tmp_path):
    report = gpu_check.Report(tmp_path / "r.json", tmp_path / "logs")
    start = time.monotonic()
    slow = report.section("slow", section_script(
        "json.dump({'status': 'running', 'done': 1}, result); result.close(); print('working'); time.sleep(60)"), 3)
    assert time.monotonic() - start < 30
    assert slow["status"] == "timeout" and slow["done"] == 1 and "3 s" in slow["reason"]  # what it finished
    assert 3 <= slow["seconds"] < 30
    assert json.loads((tmp_path / "r.json").read_text())["sections"]["slow"]["status"] == "timeout"
    assert report.section("next", section_script("json.dump({'status': 'ok', 'x': 2}, result)"), 30)["x"] == 2
    broken = report.section("broken", section_script("print('boom'); sys.exit(3)"), 30)
    assert broken["status"] == "error" and "status 3" in broken["error"] and broken["trace"] == ["boom"]
    written = json.loads((tmp_path / "r.json").read_text())["sections"]
    assert list(written) == ["slow", "next", "broken"] and written["next"]["status"] == "ok"


def test_a_section_that_raises_is_its_own_error(gpu_check, tmp_path, monkeypatch, sections):
    monkeypatch.setitem(sections.SECTIONS, "training", lambda work, emit, deadline: 1 / 0)
    monkeypatch.setitem(sys.modules, "gpu_sections", sections)
    gpu_check.run_section("training", tmp_path, tmp_path / "t.json", 10)
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["status"] == "error" and result["error"] == "ZeroDivisionError: division by zero"


def test_decoding_pieces_on_the_cpu(sections, monkeypatch):
    """A decoder's figures (eager here) and the greedy identity check: a difference from
    autoregressive decoding is found at its first byte, with head 1's margin there."""
    monkeypatch.setattr(sections, "DEVICE", torch.device("cpu"))
    monkeypatch.setattr(sections, "MAX_BYTES", 8)
    torch.manual_seed(0)
    model = ByteMTP(TINY).eval()
    prompts = [b"import os\n", b"def f(x):", b"class A:"]
    case, outputs = sections.run_decoder(model, {}, prompts, 2, torch.float32)
    assert len(outputs) == 3 and case["bytes"] == sum(len(o) for o in outputs) > 0
    assert case["bytes_per_s"] > 0 and case["bytes_per_forward"] >= 1
    assert case["graphs_compiled"] == case["graphs_recorded"] == case["cudagraph_skips"] == 0
    assert sections.differences(model, prompts, outputs, outputs) == []
    planted = [outputs[0], outputs[1][:3] + bytes([(outputs[1][3] + 1) % 256]), outputs[2]]
    (diff,) = sections.differences(model, prompts, outputs, planted)
    assert diff["prompt"] == 1 and diff["at_byte"] == 3 and diff["margin"] >= 0 and diff["margin_ulps"] >= 0


def test_decoding_section_without_a_checkpoint_decodes_random_weights(sections, monkeypatch, tmp_path):
    """A training section cut before its checkpoint leaves ``run/checkpoints`` empty: the decoding
    section still runs (random weights, said so) and reports its cases as the GPU run would."""
    monkeypatch.setattr(sections, "DEVICE", torch.device("cpu"))
    monkeypatch.setattr(sections, "PROMPTS", 2)
    monkeypatch.setattr(sections, "MAX_BYTES", 4)
    monkeypatch.setattr(sections, "CASES", sections.CASES[:1])
    monkeypatch.setattr(sections, "preset", lambda name: TINY)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    out = sections.decoding(tmp_path, lambda partial: None, time.monotonic() + 600)
    assert out["model"].startswith("random weights") and not out["failures"] and not out["not_reached"]
    (case,) = out["cases"].values()
    assert case["differences"] == [] and case["bytes"] > 0 and case["speedup"] > 0
