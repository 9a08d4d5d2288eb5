"""``bytemtp serve`` as a process: it prints its URL, and SIGTERM drains it to a clean exit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_generate import random_model

from bytemtp.train.checkpoint import save_checkpoint

BYTEMTP = [sys.executable, "-m", "bytemtp"]


def test_sigterm_lets_running_requests_finish_then_fails_the_rest_and_exits_0(tmp_path: Path):
    save_checkpoint(tmp_path / "run", 1, random_model(max_seq_len=128))
    proc = subprocess.Popen(
        [*BYTEMTP, "serve", str(tmp_path / "run"), "--port", "0", "--grace", "1", "--max-batch", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()  # the process prints its URL once it listens
        assert " on http://127.0.0.1:" in line, line + proc.stderr.read()
        assert "speculative" in line and "adaptive" in line  # drafts priced by their cost by default
        url = line.rsplit(" ", 1)[-1].strip()
        events: list = []

        def endless() -> None:  # greedy on random weights: a loop that never ends by itself in 60,000 bytes
            body = {"prompt": "def ", "max_tokens": 60_000, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                events.extend(json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {"))

        streaming = threading.Thread(target=endless)
        streaming.start()
        deadline = time.monotonic() + 60
        while not events:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        short = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 5, "temperature": 0})
        assert short.status_code == 200
        proc.send_signal(signal.SIGTERM)
        streaming.join(60)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert "shutting down" in events[-1]["error"]["message"]  # a clear error once the grace period ran out
    assert all("choices" in e for e in events[:-1])


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path: Path):
    result = subprocess.run([*BYTEMTP, "serve", str(tmp_path / "none"), "--port", "0"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("Error: ") and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, message", [(["--no-speculative"], "--adaptive: there are no drafts"),
                                            (["--tree", "4"], "--tree: a draft tree has a fixed size")])
def test_adaptive_without_a_chain_of_drafts_is_a_one_line_error(tmp_path: Path, flags, message):
    save_checkpoint(tmp_path / "run", 1, random_model(max_seq_len=128))
    result = subprocess.run([*BYTEMTP, "serve", str(tmp_path / "run"), "--port", "0", "--adaptive", *flags],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith(f"Error: {message}"), result.stderr
    assert "Traceback" not in result.stderr


def test_a_setting_the_engine_refuses_at_start_is_a_one_line_error(tmp_path: Path):
    """The engine is built in its own process: what it refuses still ends ``serve`` with one line."""
    save_checkpoint(tmp_path / "run", 1, random_model(max_seq_len=64))
    result = subprocess.run([*BYTEMTP, "serve", str(tmp_path / "run"), "--port", "0", "--tree", "100"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("Error: --tree: ") and result.stderr.count("\n") == 1, result.stderr


def engine_processes() -> set[int]:
    """Pids of the engine processes alive on this machine (spawned by any server)."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"spawn_main" in (proc / "cmdline").read_bytes():
                found.add(int(proc.name))
        except OSError:  # it ended meanwhile
            pass
    return found


@pytest.mark.parametrize("delay", [0.0, 0.5])
def test_sigterm_while_the_engine_starts_exits_0_and_leaves_no_engine(tmp_path: Path, delay: float):
    """Before it serves there is nothing to drain: SIGTERM ends ``serve`` at once, status 0, no
    traceback from either process, and no engine process is left behind. The signal comes
    ``delay`` seconds after the engine process appears (taking its weights, or measuring its
    step costs for ``--adaptive``)."""
    save_checkpoint(tmp_path / "run", 1, random_model(max_seq_len=128))
    before = engine_processes()
    proc = subprocess.Popen([*BYTEMTP, "serve", str(tmp_path / "run"), "--port", "0", "--adaptive"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not engine_processes() - before:
        assert proc.poll() is None and time.monotonic() < deadline, "no engine process started"
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err
    deadline = time.monotonic() + 30
    while engine_processes() - before:
        assert time.monotonic() < deadline, "an engine process outlived its server"
        time.sleep(0.1)
