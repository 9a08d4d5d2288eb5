"""bench/bench_probes.py: which models it trains for each comparison, its table, and (slow) its
smoke setting end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bytemtp.train.flops import flops_per_byte


def _load():
    path = Path(__file__).parent.parent / "bench" / "bench_probes.py"
    spec = importlib.util.spec_from_file_location("bench_probes", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_equal_flops_steps_spend_the_largest_models_compute():
    cfg = bench.SIZES["d64"]
    settings = bench.plan(["induction"], {"d64": cfg}, [1, 2, 8], [0, 1], 200, 256)
    assert {s.seed for s in settings} == {0, 1}
    top = [s for s in settings if s.n == 8]
    assert [(s.steps, s.comparisons) for s in top] == [(200, bench.COMPARISONS)] * 2  # shared by both tables
    budget = 200 * flops_per_byte(replace(cfg, n_future=8), 256)
    for n in (1, 2):
        mine = [s for s in settings if s.n == n and s.seed == 0]
        assert [s.steps for s in mine if "equal steps" in s.comparisons] == [200]
        (equal,) = [s.steps for s in mine if "equal FLOPs" in s.comparisons]
        spent = equal * flops_per_byte(replace(cfg, n_future=n), 256)
        assert equal > 200 and abs(spent - budget) <= flops_per_byte(replace(cfg, n_future=n), 256) / 2


def test_table_cells_are_mean_and_spread_over_seeds():
    rows = [{"probe": "induction", "size": "d64", "n": n, "steps": 10, "comparisons": bench.COMPARISONS,
             "repeat_accuracy": acc} for n, acc in ((1, 0.1), (1, 0.2), (1, 0.3), (2, 0.5))]
    text = bench.tables(rows, [1, 2], 10)
    assert text.count("| induction | d64 | repeat_accuracy | 20.0% ± 10.0% | 50.0% |") == 2


@pytest.mark.slow
def test_smoke_setting_trains_and_scores_every_model(tmp_path, capsys):
    bench.main(["--smoke", "--out", str(tmp_path), "--json", str(tmp_path / "probes.json")])
    rows = json.loads((tmp_path / "probes.json").read_text())["rows"]
    assert sorted((r["probe"], r["n"], r["steps"]) for r in rows) == sorted(
        (p, n, s) for p in ("induction", "arithmetic") for n, s in ((1, 6), (1, 7), (2, 6)))
    assert all(0 <= r[k] <= 1 for r in rows for k in bench.SCORES[r["probe"]])
    assert "equal FLOPs (6 steps for n = 2" in capsys.readouterr().out
