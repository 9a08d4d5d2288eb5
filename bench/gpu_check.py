"""The GPU check: a verdict on the CUDA paths in five minutes, cold compile caches included.

Run from the repository root on a machine with one GPU::

    .venv/bin/python bench/gpu_check.py --out gpu_check.json

Four sections, most important first, each in a process of its own under its own time limit
(``LIMITS``, 300 s together): ``environment`` (torch, CUDA, the device, bf16), ``training``
(a short compiled bf16 run of ``tiny`` with Muon), ``decoding`` (compiled, CUDA graphs: greedy
and sampled chains and trees against autoregressive decoding) and ``gpu_tests`` (``pytest -m
gpu``). A section that runs over its limit is killed and reported as ``"timeout"`` with what it
had finished; the next one still runs. The report is rewritten after every section, so a run
cut short keeps everything it finished; each section's output is kept beside it
(``OUT-logs/NAME.log``). Without CUDA the check finishes in seconds: every section after the
environment is skipped, with the reason. The sections themselves are in ``gpu_sections.py``;
the report's fields, and what to do about each failure, in bench/RESULTS.md's GPU section.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bytemtp.data.atomic import atomic_write_bytes

ROOT = Path(__file__).resolve().parent.parent
# Seconds per section, each including its own process start; together at most 300.
LIMITS = {"environment": 20, "training": 90, "decoding": 130, "gpu_tests": 60}


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically: a reader (or a run cut short) sees the old or the new."""
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


class Report:
    """The JSON report at ``path``, rewritten when a section starts and when it ends; each
    section's output goes to ``logs/NAME.log``."""

    def __init__(self, path: Path, logs: Path):
        self.path, self.logs, self.start = path, logs, time.monotonic()
        logs.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {
            "format": 2,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "finished": None,
            "limits_s": LIMITS,
            "elapsed_s": 0.0,
            "sections": {},
        }

    def section(self, name: str, argv: list[str], limit_s: float) -> dict[str, Any]:
        """Run ``argv --result FILE`` under ``limit_s`` seconds and record what it wrote to FILE (JSON,
        possibly rewritten as it goes): killed with its children when over the limit."""
        self.record(name, {"status": "running", "limit_s": limit_s})
        result_file = self.logs / f"{name}.json"
        result_file.unlink(missing_ok=True)
        log = self.logs / f"{name}.log"
        start = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen([*argv, "--result", str(result_file)], cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=limit_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the section and anything it started (pytest)
                proc.wait()
                code = None
        try:
            result = json.loads(result_file.read_text())
        except (OSError, ValueError):
            result = {}
        if code is None:
            result.update(status="timeout", reason=f"cut after its limit of {limit_s:.0f} s")
        elif code != 0 or "status" not in result:
            tail = log.read_text(errors="replace").strip().splitlines()[-12:]
            result.update(status="error", error=f"the section's process exited with status {code}", trace=tail)
        result.update(seconds=round(time.monotonic() - start, 1), limit_s=limit_s, log=str(log))
        return self.record(name, result)

    def record(self, name: str, result: dict[str, Any]) -> dict[str, Any]:
        self.data["sections"][name] = result
        self.write()
        return result

    def write(self, finished: bool = False) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
        if finished:
            self.data["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_json(self.path, self.data)


def run_section(name: str, work: Path, result_file: Path, limit_s: float) -> None:
    """In the section's own process: run it, writing its result (and its partial results, as it
    goes) to ``result_file``; an exception is the section's result, not a crash."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_sections

    deadline = time.monotonic() + limit_s - 3.0  # the process started a moment ago; leave time to write

    def emit(partial: dict[str, Any]) -> None:
        atomic_write_json(result_file, partial)

    try:
        result = gpu_sections.SECTIONS[name](work, emit, deadline)
        result.setdefault("status", "failed" if result.get("failures") else "ok")
    except Exception as e:  # reported as the section's error; the check goes on with the next
        result = {"status": "error", "error": f"{type(e).__name__}: {e}",
                  "trace": traceback.format_exc().splitlines()[-12:]}
    emit(result)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    p.add_argument("--section", choices=list(LIMITS), help=argparse.SUPPRESS)  # run one section (internal)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.section:
        run_section(args.section, args.work, args.result, LIMITS[args.section])
        return {}
    out = args.out.resolve()
    report = Report(out, out.with_name(out.stem + "-logs"))
    with tempfile.TemporaryDirectory() as work:
        skip = None
        for name, limit in LIMITS.items():
            if skip:
                report.record(name, {"status": "skipped", "reason": skip, "seconds": 0.0})
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--work", work]
            result = report.section(name, cmd, limit)
            if name == "environment" and not result.get("cuda_available"):
                skip = result.get("reason") or "the environment section found no usable CUDA device"
    report.write(finished=True)
    return report.data


if __name__ == "__main__":
    main()
