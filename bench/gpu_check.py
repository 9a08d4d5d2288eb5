"""The GPU check: one command that proves the CUDA paths in a few minutes.

Run from the repository root on a machine with one GPU (about 5 minutes on an
H100/H200; ``--budget`` seconds at most, sections that would start later are
reported as skipped)::

    .venv/bin/python bench/gpu_check.py --out gpu_check.json

On a machine without CUDA it runs to completion in seconds, every section
reported as skipped. The report is rewritten after every section (and marks the
one running), so a run cut short still holds everything it finished. Sections,
most important first:

1. ``gpu_tests``: ``pytest -m gpu`` over ``tests/``.
2. ``train_step``: the compiled bf16 training step of ``small`` and ``base``.
3. ``train_run``: a 200-step ``small`` run through ``bytemtp.train.loop.train``.
4. ``decode``: compiled decoding (CUDA graphs) at batch 1 and 16, autoregressive
   against self-speculative, on the model section 3 trained.
5. ``sampling_exactness``: the speculative-sampling Monte-Carlo test on CUDA.

Output format (JSON object)::

    {
      "format": 1,
      "started": "2026-01-01T00:00:00+00:00", "finished": null until the end,
      "device": "NVIDIA H200" or "cpu", "torch": "2.x", "cuda": "12.x" or null,
      "budget_s": 330, "elapsed_s": 123.4,
      "sections": {NAME: SECTION, ...}          # in the order above, as they finish
    }

Every SECTION has ``"status"``: ``"running"`` (the run stopped inside it),
``"ok"``, ``"failed"`` (ran; a check did not hold: see ``"failures"``, a list of
sentences), ``"error"`` (raised: ``"error"`` holds the exception, ``"trace"`` its
last lines) or ``"skipped"`` (with ``"reason"``); and ``"seconds"``. Their
other fields:

- ``gpu_tests``: ``passed``, ``failed``, ``skipped``, ``errors`` (counts), ``tail``
  (pytest's last output lines).
- ``train_step``: per preset (``"small"``, ``"base"``, besides ``failures``): ``batch``, ``seq_len``,
  ``flops_per_byte``, ``peak_tflops``, and ``cases``, one per (n_future, schedule)
  of ``1/sequential``, ``8/sequential``, ``8/stacked``: ``compile_s`` (first step),
  ``step_ms`` (median of the timed steps: forward, backward, AdamW), ``bytes_per_s``,
  ``mfu``, ``peak_mib`` (peak allocated during a step), ``loss_compiled``,
  ``loss_eager`` (the same batch and weights, bf16 autocast, eager), ``loss_rel_diff``;
  then ``n8_vs_n1`` (step time of the faster n = 8 schedule over n = 1) and
  ``stacked_vs_sequential`` (step time ratio at n = 8).
- ``train_run``: ``steps``, ``unique_graphs`` (graphs dynamo compiled during the
  run: the training step's, the evaluation's), ``host_syncs`` and
  ``host_syncs_per_step`` (synchronising CUDA calls counted by
  ``torch.cuda.set_sync_debug_mode``), ``bytes_per_s``, ``mfu``, ``final_loss``,
  ``final_val_bpb`` (the run's last logged figures).
- ``decode``: ``cudagraph_skips`` (inductor's counter; must be 0), ``greedy_identical``,
  ``rows``: per batch size and decoder, ``batch``, ``draft_heads``, ``bytes_per_s``,
  ``speedup``, ``bytes_per_forward``, ``identical`` (as ``bytemtp bench --json``).
- ``sampling_exactness``: as ``gpu_tests``, for the gpu-marked sampling tests of
  ``tests/test_generate.py`` (the Monte-Carlo check's CUDA variant); skipped while
  there is none.

Checks that make a section ``failed``: any failed test; compiled loss more than
2% from eager; a decode row not identical to autoregressive greedy decoding;
cudagraph skips.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

from bytemtp.compile import compile_model
from bytemtp.data.atomic import atomic_write_bytes
from bytemtp.model.config import ModelConfig, preset
from bytemtp.model.transformer import ByteMTP
from bytemtp.train.config import TrainConfig
from bytemtp.train.flops import flops_per_byte, peak_flops
from bytemtp.train.objective import multihead_loss
from bytemtp.train.optim import build_optimizer
from bytemtp.train.precision import autocast, training_precision
from bytemtp.train.step_timing import peak_step_bytes, synchronize, timed, training_step

ROOT = Path(__file__).resolve().parent.parent
LOSS_TOLERANCE = 0.02  # compiled vs eager loss, relative: bf16 rounding in a different order
STEP_SHAPES = {"small": (16, 1024), "base": (8, 2048)}  # rows, bytes per row: 16k bytes a step either way
TIMED_STEPS = 5
RUN_STEPS = 200


class Report:
    """The JSON report, rewritten atomically whenever a section starts or ends."""

    def __init__(self, path: Path, budget_s: float):
        self.path, self.budget_s, self.start = path, budget_s, time.monotonic()
        cuda = torch.cuda.is_available()
        self.data: dict[str, Any] = {
            "format": 1,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "finished": None,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None,
            "budget_s": budget_s,
            "elapsed_s": 0.0,
            "sections": {},
        }

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def section(self, name: str, run: Callable[[], dict[str, Any]], needs_s: float) -> dict[str, Any]:
        """Run one section (unless CUDA is missing or too little of the budget is left) and record it."""
        if not torch.cuda.is_available():
            return self._record(name, {"status": "skipped", "reason": "no CUDA device", "seconds": 0.0})
        if self.left() < needs_s:
            reason = f"{self.left():.0f} s of the budget left, the section needs about {needs_s:.0f} s"
            return self._record(name, {"status": "skipped", "reason": reason, "seconds": 0.0})
        self._record(name, {"status": "running"})
        start = time.monotonic()
        try:
            result = run()
            result.setdefault("status", "failed" if result.get("failures") else "ok")
        except Exception as e:  # one broken section must not cost the others their report
            result = {"status": "error", "error": f"{type(e).__name__}: {e}",
                      "trace": traceback.format_exc().splitlines()[-12:]}
        result["seconds"] = round(time.monotonic() - start, 1)
        return self._record(name, result)

    def _record(self, name: str, result: dict[str, Any]) -> dict[str, Any]:
        self.data["sections"][name] = result
        self.write()
        return result

    def write(self, finished: bool = False) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
        if finished:
            self.data["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_bytes(self.path, (json.dumps(self.data, indent=2) + "\n").encode())


# -- 1 and 5: tests ---------------------------------------------------------------------------
def pytest_counts(args: list[str], timeout_s: float) -> dict[str, Any]:
    """Run pytest in a subprocess; its counts of passed/failed/skipped/errors and its last lines."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:  # its output comes as bytes even with text=True
        partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        out = partial + f"\n(timed out after {timeout_s:.0f} s)"
    counts = {k: int(m.group(1)) if (m := re.search(rf"(\d+) {k}", out)) else 0
              for k in ("passed", "failed", "skipped", "error")}
    result = {"passed": counts["passed"], "failed": counts["failed"], "skipped": counts["skipped"],
              "errors": counts["error"], "tail": out.strip().splitlines()[-15:]}
    if counts["failed"] or counts["error"] or "timed out" in out:
        result["failures"] = [f"pytest {' '.join(args)}: {counts['failed']} failed, {counts['error']} errors"]
    elif not counts["passed"]:
        result["failures"] = [f"pytest {' '.join(args)}: no test ran"]
    return result


# -- 2: the training step ---------------------------------------------------------------------
def step_case(cfg: ModelConfig, mode: str, ids: torch.Tensor, seq: int, device: torch.device) -> dict[str, Any]:
    """Compile the step of ``cfg`` with head schedule ``mode`` on the first ``seq + n_future``
    columns of ``ids``, check its loss against eager, time it."""
    torch.manual_seed(0)
    model = ByteMTP(cfg).to(device)
    eager = copy.deepcopy(model)
    compile_model(model, device.type == "cuda")
    batch = ids[:, : seq + cfg.n_future]
    with autocast(device):
        loss_eager = multihead_loss(eager, batch, mode).loss.item()
    del eager
    step = training_step(model, batch, mode, build_optimizer(model, TrainConfig(), device))
    with autocast(device):
        start = time.perf_counter()
        loss_compiled = multihead_loss(model, batch, mode).loss  # the first compiled call: compilation
        loss_compiled.backward()
        synchronize(device)
        compile_s = time.perf_counter() - start
    step()
    times = [timed(step, device) for _ in range(TIMED_STEPS)]
    peak = peak_step_bytes(step, device) if device.type == "cuda" else 0  # the CPU's profiler is slow
    step_s = sorted(times)[TIMED_STEPS // 2]
    rel = abs(loss_compiled.item() - loss_eager) / abs(loss_eager)
    return {"compile_s": round(compile_s, 1), "step_ms": step_s * 1e3, "loss_compiled": loss_compiled.item(),
            "loss_eager": loss_eager, "loss_rel_diff": rel, "peak_mib": peak / 2**20, "_step_s": step_s}


def train_step_report(cfg8: ModelConfig, batch: int, seq: int, device: torch.device) -> dict[str, Any]:
    """Section 2 for one model: n = 1 and n = 8 (sequential and stacked), compiled, bf16 (on CUDA)."""
    torch.compiler.reset()  # every model's graphs compiled afresh: no recompile limit carried over
    ids = torch.randint(0, 257, (batch, seq + 8), device=device, generator=torch.Generator(device).manual_seed(0))
    peak = peak_flops(device)
    out: dict[str, Any] = {"batch": batch, "seq_len": seq, "peak_tflops": peak and peak / 1e12,
                           "flops_per_byte": flops_per_byte(cfg8, seq), "cases": {}, "failures": []}
    with training_precision(device):
        for n, mode in ((1, "sequential"), (8, "sequential"), (8, "stacked")):
            cfg = ModelConfig(**{**cfg8.to_dict(), "n_future": n})
            case = step_case(cfg, mode, ids, seq, device)
            step_s = case.pop("_step_s")
            case["bytes_per_s"] = batch * seq / step_s
            case["mfu"] = flops_per_byte(cfg, seq) * case["bytes_per_s"] / peak if peak else None
            out["cases"][f"{n}/{mode}"] = case
            if case["loss_rel_diff"] > LOSS_TOLERANCE:
                out["failures"].append(f"{n}/{mode}: compiled loss {case['loss_rel_diff']:.1%} from eager")
    ms = {k: c["step_ms"] for k, c in out["cases"].items()}
    out["n8_vs_n1"] = min(ms["8/sequential"], ms["8/stacked"]) / ms["1/sequential"]
    out["stacked_vs_sequential"] = ms["8/stacked"] / ms["8/sequential"]
    return out


def train_step_section(device: torch.device) -> dict[str, Any]:
    """Section 2: ``small`` and ``base`` at their ``STEP_SHAPES``."""
    out: dict[str, Any] = {"failures": []}
    for name, (batch, seq) in STEP_SHAPES.items():
        out[name] = train_step_report(preset(name, max_seq_len=seq), batch, seq, device)
        out["failures"] += [f"{name} {f}" for f in out[name].pop("failures")]
    return out


# -- 3: a training run ------------------------------------------------------------------------
def prepare_data(out: Path) -> Path:
    """A small dataset (the standard library's ``email`` package) for the run and the decode prompts."""
    from bytemtp.data.prepare import PrepareConfig, prepare

    source = Path(sysconfig.get_paths()["stdlib"]) / "email"
    prepare([str(source)], out, PrepareConfig(val_fraction=0.05), progress=False)
    return out


def train_run_report(data: Path, run: Path, device: torch.device, model_cfg: ModelConfig, steps: int,
                     batch_size: int = 8) -> dict[str, Any]:
    """Section 3: ``steps`` through the real loop; graphs compiled and host syncs counted."""
    from bytemtp.train.loop import train

    cfg = TrainConfig(steps=steps, batch_size=batch_size, warmup_steps=min(20, steps), eval_every=steps // 2,
                      log_every=50, ckpt_every=0, device=str(device))
    torch.compiler.reset()
    counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            result = train(cfg, model_cfg, data, run, progress=False)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    return {"steps": result.step, "unique_graphs": counters["stats"]["unique_graphs"], "host_syncs": syncs,
            "host_syncs_per_step": syncs / max(result.step, 1), "bytes_per_s": last["bytes_per_s"],
            "mfu": last.get("mfu"), "final_loss": last["loss"], "final_val_bpb": last.get("val_bpb")}


# -- 4: decoding (the one place that calls the decode API) --------------------------------------
def decode_report(model: ByteMTP, prompts: list[bytes], compile: bool, max_bytes: int = 128,
                  batches: tuple[int, ...] = (1, 16)) -> dict[str, Any]:
    """Autoregressive vs self-speculative greedy decoding at each batch size, compiled (CUDA
    graphs on a GPU), through ``bytemtp bench``'s harness."""
    from bytemtp.decode.bench import BenchConfig, run_bench

    counters.clear()
    config = BenchConfig(prompts=len(prompts), max_bytes=max_bytes, batches=batches)
    report = run_bench(model, prompts, config, compile=compile).to_json()
    rows = [{k: r[k] for k in ("batch", "draft_heads", "bytes_per_s", "speedup", "bytes_per_forward", "identical")}
            for r in report["rows"]]
    skips = counters["inductor"]["cudagraph_skips"]
    identical = all(r["identical"] for r in rows if r["draft_heads"])
    failures = [f"{skips} cudagraph skips"] if skips else []
    failures += [] if identical else ["speculative greedy output differs from autoregressive"]
    return {"cudagraph_skips": skips, "greedy_identical": identical, "rows": rows, "failures": failures}


def decode_section(data: Path, run: Path, device: torch.device) -> dict[str, Any]:
    """Section 4 on the model section 3 trained (untrained weights if it did not finish)."""
    from bytemtp.decode.prompts import sample_prompts
    from bytemtp.train.checkpoint import load_model

    if (run / "checkpoints").is_dir():
        model, _ = load_model(run, device)
    else:
        torch.manual_seed(0)
        model = ByteMTP(preset("small")).to(device).eval()
    return decode_report(model, sample_prompts(data, 16, 64, seed=0), compile=True)


def sampling_section(timeout_s: float) -> dict[str, Any]:
    """Section 5: the Monte-Carlo test of speculative sampling, where it has a CUDA variant."""
    result = pytest_counts(["-m", "gpu", "-k", "sampling", "tests/test_generate.py"], timeout_s)
    if not (result["passed"] or result["failed"] or result["errors"]):
        return {"status": "skipped", "reason": "tests/test_generate.py has no gpu-marked sampling test"}
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    p.add_argument("--budget", type=float, default=330.0, help="seconds the whole check may take")
    args = p.parse_args(argv)
    report = Report(args.out, args.budget)
    device = torch.device("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        data, run = Path(tmp) / "data", Path(tmp) / "run"

        def train_run() -> dict[str, Any]:
            return train_run_report(prepare_data(data), run, device, preset("small"), RUN_STEPS)

        def decode() -> dict[str, Any]:
            return decode_section(data if data.is_dir() else prepare_data(data), run, device)

        report.section("gpu_tests", lambda: pytest_counts(["-m", "gpu", "tests"], min(150.0, report.left())), 30)
        report.section("train_step", lambda: train_step_section(device), 60)
        report.section("train_run", train_run, 45)
        report.section("decode", decode, 45)
        report.section("sampling_exactness", lambda: sampling_section(min(60.0, report.left())), 10)
    report.write(finished=True)
    return report.data


if __name__ == "__main__":
    main()
