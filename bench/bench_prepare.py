"""Throughput of ``bytemtp prepare`` on the built-in corpus: MB/s, compression ratio, peak RSS.

Usage: ``python bench/bench_prepare.py [--source builtin:python-stdlib] [--repeat 3] [--level 3]``

Each repetition prepares into a fresh temporary directory. Wall time covers the
whole call, including the content hash of a built-in corpus; "streaming" time is
the read-split-compress-write part alone. Peak RSS is this process's high-water
mark (interpreter and imports included), which the shard buffer should dominate
only for shards far larger than the corpus here.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

from bytemtp.data.prepare import PrepareConfig, prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="builtin:python-stdlib")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--level", type=int, default=PrepareConfig.level)
    parser.add_argument("--threads", type=int, default=PrepareConfig.threads)
    parser.add_argument("--shard-bytes", type=int, default=PrepareConfig.shard_bytes)
    args = parser.parse_args()
    config = PrepareConfig(shard_bytes=args.shard_bytes, level=args.level, threads=args.threads)

    walls, streams = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            summary = prepare([args.source], Path(tmp) / "ds", config, progress=False)
            walls.append(time.perf_counter() - start)
            streams.append(summary.seconds)
    mb = summary.n_bytes() / 1e6
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    print(f"machine     {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.machine()}")
    print(f"source      {args.source}: {summary.n_docs():,} documents, {mb:.1f} MB")
    print(f"settings    zstd level {config.level}, threads {config.threads}, shard {config.shard_bytes:,} B")
    wall, stream = statistics.median(walls), statistics.median(streams)
    print(f"wall        {wall:.2f} s (median of {args.repeat}) -> {mb / wall:.1f} MB/s")
    print(f"streaming   {stream:.2f} s -> {mb / stream:.1f} MB/s")
    print(f"compression {summary.compression_ratio:.2f}x")
    print(f"peak RSS    {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
