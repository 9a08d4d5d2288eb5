"""Load benchmark of ``bytemtp serve``: the plain and the speculative server side by side, in one run.

Run from the repository root::

    .venv/bin/python bench/bench_serve.py CKPT --data ~/.cache/bytemtp/python-stdlib

Starts two servers on 127.0.0.1 (``--no-speculative`` and speculative), then for each
temperature (greedy, 0.8) and concurrency (1, 4, 8, 16) drives closed-loop clients, each
sending streamed requests with held-out prompts (the val split of ``--data``) one after
another, first at the plain server, then at the speculative one. Every level is bounded in
requests and in time. Reports aggregate bytes/s, the speculative server's speedup, p50/p99
time to first byte and request latency, and bytes per forward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from bytemtp.decode.prompts import sample_prompts


@dataclass
class Level:
    """One (server, temperature, concurrency) run."""

    bytes: int = 0
    forwards: int = 0
    wall_s: float = 0.0
    ttfb: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)

    def pct(self, xs: list[float], q: float) -> float:
        return statistics.quantiles(xs, n=100)[int(q) - 1] if len(xs) > 1 else (xs[0] if xs else 0.0)


def start_server(ckpt: str, speculative: bool, max_batch: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "bytemtp", "serve", ckpt, "--port", "0", "--max-batch", str(max_batch),
           "--max-queue", "256", "--speculative" if speculative else "--no-speculative"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[-1].strip()


def one_request(url: str, prompt: str, max_tokens: int, temperature: float, seed: int) -> tuple[float, float, int, int]:
    """A streamed completion -> (time to first byte, latency, bytes, forwards)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "seed": seed, "stream": True}
    start, first, n, forwards = time.perf_counter(), None, 0, 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["text"] and first is None:
                first = time.perf_counter()
            n += len(choice["text"].encode())
            forwards = choice.get("bytemtp", {}).get("forwards", forwards)
    end = time.perf_counter()
    return (first or end) - start, end - start, n, forwards


def run_level(url: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int, temperature: float,
              time_limit: float) -> Level:
    """``concurrency`` closed-loop clients sharing ``requests`` requests, stopping early at ``time_limit``."""
    level, start = Level(), time.perf_counter()
    todo = iter(range(requests))

    def client() -> list[tuple[float, float, int, int]]:
        done = []
        for i in todo:
            if time.perf_counter() - start > time_limit:
                break
            done.append(one_request(url, prompts[i % len(prompts)], max_tokens, temperature, seed=i))
        return done

    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for rs in pool.map(lambda _: client(), range(concurrency)) for r in rs]
    level.wall_s = time.perf_counter() - start
    for ttfb, latency, n, forwards in results:
        level.ttfb.append(ttfb)
        level.latency.append(latency)
        level.bytes += n
        level.forwards += forwards
    return level


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--data", required=True, help="prepared dataset whose val split supplies the prompts")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    p.add_argument("--requests", type=int, default=32, help="requests per level (bounded)")
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--prompt-bytes", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per level at most")
    args = p.parse_args()
    prompts = [x.decode("utf-8", "replace") for x in sample_prompts(args.data, 64, args.prompt_bytes, seed=1234)]
    servers = {name: start_server(args.ckpt, name == "speculative", args.max_batch) for name in ("plain", "speculative")}
    try:
        print(f"{args.ckpt}: {args.requests} requests x {args.max_tokens} bytes per level, max batch {args.max_batch}")
        print(f"{'T':>4} {'conc':>4}  {'server':<12}{'bytes/s':>9}{'speedup':>9}{'ttfb p50':>10}{'p99':>8}"
              f"{'latency p50':>13}{'p99':>8}{'bytes/fwd':>11}")
        for t in args.temperatures:
            for c in args.concurrency:
                rate = {}
                for name, (_, url) in servers.items():
                    lv = run_level(url, prompts, c, args.requests, args.max_tokens, t, args.time_limit)
                    rate[name] = lv.bytes / lv.wall_s
                    fwd = lv.bytes / lv.forwards if lv.forwards else 0.0
                    print(f"{t:>4} {c:>4}  {name:<12}{rate[name]:>9.1f}{rate[name] / rate['plain']:>8.2f}x"
                          f"{lv.pct(lv.ttfb, 50) * 1e3:>8.0f}ms{lv.pct(lv.ttfb, 99) * 1e3:>6.0f}ms"
                          f"{lv.pct(lv.latency, 50):>12.2f}s{lv.pct(lv.latency, 99):>7.2f}s{fwd:>11.2f}", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
