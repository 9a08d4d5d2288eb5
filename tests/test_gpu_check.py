"""bench/gpu_check.py: complete on a CPU-only machine (every section skipped), and the pieces it
runs on a GPU work on the CPU too (eager, tiny), so a changed API fails here rather than on the GPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bytemtp.model.config import ModelConfig
from bytemtp.model.transformer import ByteMTP

SECTIONS = ["gpu_tests", "train_step", "train_run", "decode", "sampling_exactness"]
TINY = ModelConfig(d_model=32, n_layers=1, n_attn_heads=2, n_future=8, max_seq_len=64)


@pytest.fixture(scope="module")
def gpu_check():
    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour")
def test_runs_to_completion_without_cuda(gpu_check, tmp_path):
    out = tmp_path / "report.json"
    returned = gpu_check.main(["--out", str(out)])
    report = json.loads(out.read_text())
    assert report == returned and report["format"] == 1 and report["finished"] and report["device"] == "cpu"
    assert list(report["sections"]) == SECTIONS
    assert all(s == {"status": "skipped", "reason": "no CUDA device", "seconds": 0.0}
               for s in report["sections"].values())


def test_a_section_that_raises_is_reported_and_the_rest_still_run(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test")
    report = gpu_check.Report(tmp_path / "r.json", budget_s=100)

    def broken():
        raise ValueError("boom")

    assert report.section("a", broken, 1)["status"] == "error"
    assert report.section("b", lambda: {"x": 1}, 1)["status"] == "ok"
    assert report.section("c", lambda: {"failures": ["no"]}, 1)["status"] == "failed"
    assert report.section("d", lambda: {}, 1000)["status"] == "skipped"  # beyond the budget
    written = json.loads((tmp_path / "r.json").read_text())["sections"]
    assert written["a"]["error"] == "ValueError: boom" and list(written) == ["a", "b", "c", "d"]


def test_training_step_report_on_the_cpu(gpu_check):
    out = gpu_check.train_step_report(TINY, batch=2, seq=32, device=torch.device("cpu"))
    assert list(out["cases"]) == ["1/sequential", "8/sequential", "8/stacked"] and not out["failures"]
    assert all(c["loss_rel_diff"] == 0.0 and c["step_ms"] > 0 for c in out["cases"].values())  # eager both ways
    assert out["n8_vs_n1"] > 0 and out["stacked_vs_sequential"] > 0


@pytest.mark.slow
def test_training_run_on_the_cpu(gpu_check, tmp_path):
    data = gpu_check.prepare_data(tmp_path / "data")
    run = gpu_check.train_run_report(data, tmp_path / "run", torch.device("cpu"), TINY, steps=2, batch_size=2)
    assert run["steps"] == 2 and run["unique_graphs"] == 0  # eager on the CPU: nothing compiled
    assert 0 < run["final_loss"] < 9 and run["mfu"] is None  # no MFU without a known peak


def test_decode_report_on_the_cpu(gpu_check):
    torch.manual_seed(0)
    model = ByteMTP(TINY).eval()
    out = gpu_check.decode_report(model, [b"import os\n", b"def f(x):"], compile=False, max_bytes=8, batches=(1, 2))
    assert out["greedy_identical"] and out["cudagraph_skips"] == 0 and not out["failures"]
    assert [(r["batch"], r["draft_heads"]) for r in out["rows"]] == [(1, 0), (1, 7), (2, 0), (2, 7)]
