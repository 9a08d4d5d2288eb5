"""Load benchmark of ``bytemtp serve``: the plain and the speculative server side by side, in one run.

Run from the repository root::

    .venv/bin/python bench/bench_serve.py CKPT --data ~/.cache/bytemtp/python-stdlib

Starts three servers on 127.0.0.1 (``--no-speculative``; speculative as served by default,
drafting and verifying the drafts worth their cost at the step's row count; ``--no-adaptive``,
every draft every step), then for each temperature (greedy, 0.8) and concurrency (1, 4, 8, 16)
drives closed-loop clients, each sending streamed requests with held-out prompts (the val
split of ``--data``) one after another on one kept-alive connection (``http.client``: see
``connect``), at each server in turn. A level sends ``--requests``
requests, and at least four per client; every level is bounded in time. Reports aggregate
bytes/s, the speculative server's speedup, p50/p99 time to first byte and request latency, and
bytes per forward. The times to first byte and latencies leave out each client's first
request: all clients start at once, and that burst of prompts encoded together is a start-up
no steady load has. ``--rounds R`` runs each level R times, the servers interleaved within
each round (so a slow spell of the machine hits them all), and reports each server's median
bytes/s and the pooled times.

``--server NAME=FLAGS`` adds a server started with other ``serve`` flags beside the three.
At concurrency 1 the servers take turns request by request (each request goes to every
server before the next one is sent), so the machine's slow spells, which last seconds, fall on
all of them alike. ``--engine`` adds, at concurrency 1, the same requests decoded in this process
by the decode engine alone, in the same turns (``bytemtp bench``'s speculative decoder, one
prompt at a time): what the HTTP layer and the scheduler cost a lone request.

``--soak N`` instead sends N mixed requests at the default (speculative) server from
``--concurrency``'s first value of clients: streamed and not, greedy and sampled, a tenth
of them disconnecting after their first chunk, one in twenty with a malformed body. It
checks that no request got a 5xx, that every well-formed one completed (a malformed one
got a 4xx), that every greedy answer is the one the prompt gets alone, that no row is left
occupied at the end, and that the server's RSS grew less than 10% from the 100th request
to the last; it exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import random
import re
import statistics
import threading
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from bytemtp.decode.generate import Decoder, GenerationConfig
from bytemtp.decode.prompts import sample_prompts
from bytemtp.train.checkpoint import load_model


@dataclass
class Level:
    """One (server, temperature, concurrency) run, or its rounds pooled (``add``)."""

    bytes: int = 0
    forwards: int = 0
    wall_s: float = 0.0
    ttfb: list[float] = field(default_factory=list)  # steady requests only (not a client's first)
    latency: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)  # bytes/s of each round

    def add(self, other: "Level") -> None:
        self.bytes, self.forwards = self.bytes + other.bytes, self.forwards + other.forwards
        self.ttfb += other.ttfb
        self.latency += other.latency
        self.rates.append(other.bytes / other.wall_s)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    def pct(self, xs: list[float], q: float) -> float:
        return statistics.quantiles(xs, n=100)[int(q) - 1] if len(xs) > 1 else (xs[0] if xs else 0.0)


SERVERS = {"plain": ["--no-speculative"], "speculative": [], "all-drafts": ["--no-adaptive"]}


def start_server(ckpt: str, flags: list[str], max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "bytemtp", "serve", ckpt, "--port", "0", "--max-batch", str(max_batch),
           "--max-queue", "256", "--threads", str(threads), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    url = line.rsplit(" ", 1)[-1].strip()
    with connect(url) as http:  # its first steps of each kind pay one-time costs (kernels, JIT)
        for temperature in (0.0, 0.8):
            one_request(http, "def main():", 64, temperature, seed=0)
    return proc, url


@contextlib.contextmanager
def connect(url: str) -> Iterator[http.client.HTTPConnection]:
    """One kept-alive connection to ``url``, as load generators hold them. The load loops use the
    standard library's client: httpx costs about 1.4 ms more per request on this CPU (a 1-byte
    completion: 8.5 ms against 7.1 ms), which is the client's time, not the server's."""
    host, port = urllib.parse.urlsplit(url).netloc.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    try:
        yield conn
    finally:
        conn.close()


def one_request(conn: http.client.HTTPConnection, prompt: str, max_tokens: int, temperature: float,
                seed: int) -> tuple[float, float, int, int]:
    """A streamed completion on kept-alive ``conn`` -> (time to first byte, latency, bytes generated,
    forwards), the last two from the final chunk's ``bytemtp`` extension."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
                       "stream": True})
    start, first, n, forwards = time.perf_counter(), None, 0, 0
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise SystemExit(f"the server answered {r.status}: {r.read()[:200]!r}")
    for line in r:  # to the end of the body, so that the connection can take the next request
        if not line.startswith(b"data: {"):
            continue
        choice = json.loads(line[6:])["choices"][0]
        if choice["text"] and first is None:
            first = time.perf_counter()
        if choice["finish_reason"]:
            n, forwards = choice["bytemtp"]["bytes"], choice["bytemtp"]["forwards"]
    end = time.perf_counter()
    return (first or end) - start, end - start, n, forwards


def run_level(url: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int, temperature: float,
              time_limit: float) -> Level:
    """``concurrency`` closed-loop clients sharing ``requests`` requests (at least four each), stopping
    early at ``time_limit``."""
    level, start = Level(), time.perf_counter()
    todo = iter(range(max(requests, 4 * concurrency)))

    def client() -> list[tuple[float, float, int, int]]:
        done = []
        with connect(url) as http:
            for i in todo:
                if time.perf_counter() - start > time_limit:
                    break
                done.append(one_request(http, prompts[i % len(prompts)], max_tokens, temperature, seed=i))
        return done

    with ThreadPoolExecutor(concurrency) as pool:
        per_client = list(pool.map(lambda _: client(), range(concurrency)))
    level.wall_s = time.perf_counter() - start
    for results in per_client:
        for k, (ttfb, latency, n, forwards) in enumerate(results):
            if k:  # a client's first request is part of the start-up burst
                level.ttfb.append(ttfb)
                level.latency.append(latency)
            level.bytes += n
            level.forwards += forwards
    return level


def lone_levels(urls: dict[str, str], model: torch.nn.Module | None, prompts: list[str], requests: int,
                max_tokens: int, temperature: float, time_limit: float) -> dict[str, Level]:
    """Concurrency 1: one client, each request sent to every server in turn (and, with ``model``, decoded
    by the engine in this process, ``"engine"``: after one untimed warm-up, as ``bytemtp bench`` does,
    with the seed the servers got), so that a slow spell of the machine, which lasts seconds here,
    falls on all of them alike. A level's wall time is the sum of its requests' latencies; the turns
    stop early at ``time_limit``."""
    levels = {name: Level() for name in [*urls, *(["engine"] if model is not None else [])]}
    decoder = None
    if model is not None:
        decoder = Decoder(model, GenerationConfig(max_new_bytes=max_tokens, temperature=temperature))
        decoder.generate([prompts[0].encode()], [0]).read()
    with contextlib.ExitStack() as stack:
        clients = {name: stack.enter_context(connect(url)) for name, url in urls.items()}
        lone_turns(clients, levels, decoder, prompts, requests, max_tokens, temperature, time_limit)
    return levels


def lone_turns(clients: dict[str, http.client.HTTPConnection], levels: dict[str, Level], decoder: Decoder | None,
               prompts: list[str], requests: int, max_tokens: int, temperature: float, time_limit: float) -> None:
    """``lone_levels``' turns: each request to every server on its connection, then to ``decoder``."""
    start = time.perf_counter()
    for i in range(max(requests, 4)):
        if time.perf_counter() - start > time_limit:
            break
        prompt = prompts[i % len(prompts)]
        for name, conn in clients.items():
            ttfb, latency, n, forwards = one_request(conn, prompt, max_tokens, temperature, seed=i)
            level = levels[name]
            if i:  # the first request of a connection, as in ``run_level``
                level.ttfb.append(ttfb)
                level.latency.append(latency)
            level.wall_s, level.bytes, level.forwards = level.wall_s + latency, level.bytes + n, level.forwards + forwards
        if decoder is not None:
            began = time.perf_counter()
            gen = decoder.generate([prompt.encode()], [i])
            gen.read()
            level = levels["engine"]
            level.wall_s += time.perf_counter() - began
            level.bytes, level.forwards = level.bytes + gen.stats.bytes, level.forwards + gen.stats.forwards


MALFORMED = [b"{not json", b"", b'{"prompt": 7}', b'{"prompt": "x", "max_tokens": -1}', b'["prompt"]']


def soak_request(client: httpx.Client, url: str, job: dict) -> tuple[int, str | None]:
    """One soak job -> (HTTP status, the completion's text; None when malformed or disconnected)."""
    if job["kind"] == "malformed":
        r = client.post(f"{url}/v1/completions", content=job["body"], headers={"content-type": "application/json"})
        return r.status_code, None
    body = {"prompt": job["prompt"], "max_tokens": job["max_tokens"], "temperature": job["temperature"],
            "seed": job["seed"], "stream": job["stream"]}
    if not job["stream"]:
        r = client.post(f"{url}/v1/completions", json=body)
        return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else None
    text = []
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    return 500, None
                text.append(event["choices"][0]["text"])
                if job["kind"] == "disconnect":  # leave mid-stream: the connection closes here
                    return r.status_code, None
        return r.status_code, "".join(text)


def soak_jobs(n: int, prompts: list[str], max_tokens: int) -> list[dict]:
    """``n`` jobs drawn from a fixed seed: 5% malformed, 10% disconnecting, the rest streamed or not,
    greedy or sampled at 0.8, each from one of ``prompts``."""
    rng = random.Random(1234)
    jobs = []
    for i in range(n):
        u = rng.random()
        kind = "malformed" if u < 0.05 else "disconnect" if u < 0.15 else "complete"
        jobs.append({"kind": kind, "body": rng.choice(MALFORMED), "prompt": rng.choice(prompts), "seed": i,
                     "stream": kind == "disconnect" or rng.random() < 0.5, "max_tokens": max_tokens,
                     "temperature": rng.choice((0.0, 0.8))})
    return jobs


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid`` and its children (the server's engine process)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    own = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
    return own + sum(rss_kib(int(child)) for child in children)


def soak(args: argparse.Namespace, prompts: list[str]) -> bool:
    """The soak run (see the module's docstring) -> whether every check passed."""
    proc, url = start_server(args.ckpt, SERVERS["speculative"], args.max_batch, args.threads)
    pool, concurrency = prompts[:16], args.concurrency[0]
    jobs = soak_jobs(args.soak, pool, args.max_tokens)
    lock, finished, rss = threading.Lock(), [0], {}
    start = time.perf_counter()

    def run(job: dict) -> tuple[int, str | None] | None:
        if time.perf_counter() - start > args.time_limit:
            return None
        out = soak_request(client, url, job)
        with lock:
            finished[0] += 1
            if finished[0] == min(100, len(jobs)):
                rss["first"] = rss_kib(proc.pid)
        return out

    try:
        with httpx.Client(timeout=300) as client:
            alone = {p: soak_request(client, url, {"kind": "complete", "prompt": p, "max_tokens": args.max_tokens,
                                                   "temperature": 0.0, "seed": 0, "stream": False})[1] for p in pool}
            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as ex:
                results = list(ex.map(run, jobs))
            wall = time.perf_counter() - start
            rss["last"] = rss_kib(proc.pid)
            for _ in range(100):  # rows whose clients left are retired at the next step
                m = client.get(f"{url}/metrics").text
                rows = float(re.search(r"^bytemtp_running_rows (\S+)", m, re.M).group(1))
                queue = float(re.search(r"^bytemtp_queue_depth (\S+)", m, re.M).group(1))
                if rows == queue == 0:
                    break
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(60)
    ran = [(job, r) for job, r in zip(jobs, results) if r is not None]
    statuses = Counter(status for _, (status, _) in ran)
    kinds = Counter(job["kind"] for job, _ in ran)
    greedy = [(job, text) for job, (status, text) in ran if job["kind"] == "complete" and job["temperature"] == 0]
    checks = {
        "no 5xx": not any(status >= 500 for status in statuses),
        "malformed bodies get a 4xx": all(400 <= s < 500 for job, (s, _) in ran if job["kind"] == "malformed"),
        "well-formed requests complete": all(s == 200 for job, (s, _) in ran if job["kind"] != "malformed"),
        "greedy answers as alone": all(text == alone[job["prompt"]] for job, text in greedy),
        "no row left occupied": rows == queue == 0,
        "RSS growth < 10% from request 100": rss["last"] < 1.1 * rss.get("first", rss["last"]),
    }
    print(f"soak: {len(ran)} of {len(jobs)} requests in {wall:.1f}s at concurrency {concurrency} "
          f"({dict(kinds)}; {len(greedy)} greedy compared), statuses {dict(statuses)}")
    print(f"soak: RSS {rss.get('first', 0) / 1024:.1f} MiB at request 100, {rss['last'] / 1024:.1f} MiB at the end; "
          f"running rows {rows:.0f}, queue {queue:.0f} at the end")
    for name, ok in checks.items():
        print(f"soak: {'ok  ' if ok else 'FAIL'} {name}")
    return all(checks.values())


def report(t: float, c: int, levels: dict[str, Level]) -> None:
    """One table row per server (and the engine alone): median bytes/s over the rounds, pooled times."""
    plain = levels["plain"].rate
    for name, lv in levels.items():
        fwd = lv.bytes / lv.forwards if lv.forwards else 0.0
        times = (f"{lv.pct(lv.ttfb, 50) * 1e3:>8.1f}ms{lv.pct(lv.ttfb, 99) * 1e3:>6.0f}ms"
                 f"{lv.pct(lv.latency, 50):>12.2f}s{lv.pct(lv.latency, 99):>7.2f}s" if lv.latency else f"{'':>37}")
        print(f"{t:>4} {c:>4}  {name:<12}{lv.rate:>9.1f}{lv.rate / plain:>8.2f}x{times}{fwd:>11.2f}", flush=True)
    if "engine" in levels:
        alone = levels["engine"].rate
        print(f"{t:>4} {c:>4}  server / engine: speculative {levels['speculative'].rate / alone:.2f}x, "
              f"all-drafts {levels['all-drafts'].rate / alone:.2f}x", flush=True)


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
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per level (the soak: in all) at most")
    p.add_argument("--engine", action="store_true", help="at concurrency 1, also the decode engine alone, in-process")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server's engine and of --engine's")
    p.add_argument("--rounds", type=int, default=1, help="runs of each level, the servers interleaved")
    p.add_argument("--server", action="append", default=[], metavar="NAME=FLAGS",
                   help="one more server beside the three, started with these serve flags (e.g. heads3='--draft-heads 3')")
    p.add_argument("--soak", type=int, default=0, help="instead: a soak run of this many mixed requests")
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # --engine decodes as a server's engine does
    prompts = [x.decode("utf-8", "replace") for x in sample_prompts(args.data, 64, args.prompt_bytes, seed=1234)]
    if args.soak:
        raise SystemExit(0 if soak(args, prompts) else 1)
    variants = {**SERVERS, **{name: flags.split() for name, flags in (s.split("=", 1) for s in args.server)}}
    servers = {name: start_server(args.ckpt, flags, args.max_batch, args.threads) for name, flags in variants.items()}
    engine_model = load_model(args.ckpt)[0] if args.engine else None
    try:
        print(f"{args.ckpt}: {args.requests} requests (at least 4 per client) x {args.max_tokens} bytes per level, "
              f"{args.rounds} round(s), max batch {args.max_batch}, {args.threads} thread(s)")
        print(f"{'T':>4} {'conc':>4}  {'server':<12}{'bytes/s':>9}{'speedup':>9}{'ttfb p50':>10}{'p99':>8}"
              f"{'latency p50':>13}{'p99':>8}{'bytes/fwd':>11}")
        for t in args.temperatures:
            for c in args.concurrency:
                levels = {name: Level() for name in [*servers, *(["engine"] if args.engine and c == 1 else [])]}
                urls = {name: url for name, (_, url) in servers.items()}
                for _ in range(args.rounds):
                    if c == 1:
                        for name, level in lone_levels(urls, engine_model, prompts, args.requests, args.max_tokens,
                                                       t, args.time_limit).items():
                            levels[name].add(level)
                        continue
                    for name, url in urls.items():
                        levels[name].add(run_level(url, prompts, c, args.requests, args.max_tokens, t, args.time_limit))
                report(t, c, levels)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
