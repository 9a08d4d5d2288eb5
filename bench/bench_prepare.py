"""Throughput of ``bytemtp prepare`` and ``merge``: MB/s by input format, merge time, parallel parts.

Usage: ``python bench/bench_prepare.py [--repeat 3] [--level 3] [--parts 8]``

Four measurements on the built-in corpus (the running Python's standard library):

1. ``prepare builtin:python-stdlib``: MB/s (wall and streaming), compression, peak RSS.
2. The same text as JSON Lines and as Parquet (one record / row per file, Parquet row
   groups of 1,000 rows), side by side: what the reader of each format costs.
3. ``merge`` of ``--parts`` part datasets of the corpus (links and sha256 checks only).
4. Whole-machine throughput: ``xargs -P 2`` over ``--part 0/2`` and ``1/2`` (one zstd
   thread each) against one process (one zstd thread, and every core), as separate
   CLI processes, wall time including interpreter start.

Each repetition writes into a fresh temporary directory; times are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bytemtp.data.merge import merge
from bytemtp.data.partition import Part
from bytemtp.data.prepare import PrepareConfig, PrepareSummary, prepare
from bytemtp.data.sources import BuiltinSource
from bytemtp_corpora import CORPORA

STDLIB = "builtin:python-stdlib"


def timed(repeat: int, run) -> tuple[float, object]:
    """Median wall seconds of ``run(tmp_dir)`` over ``repeat`` fresh directories, and its last result."""
    walls = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = run(Path(tmp))
            walls.append(time.perf_counter() - start)
    return statistics.median(walls), result


def stdlib_texts() -> list[str]:
    walk = BuiltinSource(CORPORA["python-stdlib"]()).walk
    return [path.read_bytes().decode("utf-8", "replace") for _, path in walk]


def bench_stdlib(args, config: PrepareConfig) -> None:
    streams = []

    def run(tmp: Path) -> PrepareSummary:
        summary = prepare([STDLIB], tmp / "ds", config, progress=False)
        streams.append(summary.seconds)
        return summary

    wall, summary = timed(args.repeat, run)
    mb = summary.n_bytes() / 1e6
    stream = statistics.median(streams)
    print(f"stdlib      {summary.n_docs():,} documents, {mb:.1f} MB, zstd level {config.level}, "
          f"threads {config.threads}")
    print(f"  wall      {wall:.2f} s -> {mb / wall:.1f} MB/s;  streaming {stream:.2f} s -> {mb / stream:.1f} MB/s")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"  ratio     {summary.compression_ratio:.2f}x;  peak RSS {peak_mib:.0f} MiB")


def bench_formats(args, config: PrepareConfig, work: Path) -> None:
    texts = stdlib_texts()
    jsonl, parquet = work / "stdlib.jsonl", work / "stdlib.parquet"
    with open(jsonl, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    pq.write_table(pa.table({"text": texts}), parquet, row_group_size=1000)
    print(f"formats     the same {len(texts):,} texts: JSON Lines {jsonl.stat().st_size / 1e6:.1f} MB, "
          f"Parquet {parquet.stat().st_size / 1e6:.1f} MB on disk")
    for name, path in (("JSON Lines", jsonl), ("Parquet", parquet)):
        wall, summary = timed(args.repeat, lambda tmp, p=path: prepare([str(p)], tmp / "ds", config, progress=False))
        mb = summary.n_bytes() / 1e6
        print(f"  {name:<12}{wall:.2f} s -> {mb / wall:.1f} MB/s ({summary.n_docs():,} documents)")


def bench_merge(args, config: PrepareConfig, work: Path) -> None:
    parts = [work / f"part-{i}" for i in range(args.parts)]
    for i, path in enumerate(parts):
        prepare([STDLIB], path, config, part=Part(i, args.parts), progress=False)
    wall, summary = timed(args.repeat, lambda tmp: merge(parts, tmp / "merged", progress=False))
    print(f"merge       {args.parts} parts of the stdlib corpus, {len(summary.shards)} shards, "
          f"{summary.n_bytes() / 1e6:.1f} MB: {wall:.3f} s")


def bench_parallel(args, work: Path) -> None:
    cli = [sys.executable, "-m", "bytemtp", "prepare", STDLIB, "--no-progress", "--level", str(args.level)]
    runs = {
        "1 process, 1 zstd thread": [*cli, "--threads", "1", "--out", "{out}/whole"],
        "1 process, all cores": [*cli, "--threads", "-1", "--out", "{out}/whole"],
    }
    parts = f"seq 0 1 | xargs -P 2 -I@ {' '.join(cli)} --threads 1 --part @/2 --out {{out}}/part-@"
    print(f"parallel    {os.cpu_count()} CPUs; wall time of whole CLI runs, stdlib corpus")
    for name, cmd in (*runs.items(), ("xargs -P 2, 2 parts", parts)):
        def run(tmp: Path, cmd=cmd) -> None:
            if isinstance(cmd, str):
                subprocess.run(cmd.format(out=tmp), shell=True, check=True, stdout=subprocess.DEVNULL)
            else:
                subprocess.run([c.format(out=tmp) for c in cmd], check=True, stdout=subprocess.DEVNULL)

        wall, _ = timed(args.repeat, run)
        print(f"  {name:<26}{wall:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--level", type=int, default=PrepareConfig.level)
    parser.add_argument("--threads", type=int, default=PrepareConfig.threads)
    parser.add_argument("--shard-bytes", type=int, default=PrepareConfig.shard_bytes)
    parser.add_argument("--parts", type=int, default=8)
    args = parser.parse_args()
    config = PrepareConfig(shard_bytes=args.shard_bytes, level=args.level, threads=args.threads)
    print(f"machine     {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.machine()}")
    bench_stdlib(args, config)
    with tempfile.TemporaryDirectory() as work:
        bench_formats(args, config, Path(work))
        bench_merge(args, config, Path(work))
        bench_parallel(args, Path(work))


if __name__ == "__main__":
    main()
