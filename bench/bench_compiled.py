"""Eager vs compiled decoding steps on the CPU, side by side in one process.

``bytemtp bench --compile`` compiles every decoder it compares, so its ratios are compiled
against compiled; this script puts the eager and compiled autoregressive and chain
decoders in one run, interleaved per prompt after a warm-up (which also pays the
compilation), so the best baseline on a machine can be read off directly. Speedups are
ratios of total bytes over total seconds, against the fastest autoregressive decoder.

    .venv/bin/python bench/bench_compiled.py runs/tiny2000-dlw --data D --prompts 24 --temperature 0.8
"""

from __future__ import annotations

import argparse
import time

import torch

from bytemtp.decode.generate import Decoder, GenerationConfig
from bytemtp.decode.prompts import sample_prompts
from bytemtp.train.checkpoint import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--data", required=True)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-bytes", type=int, default=192)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.ckpt)
    prompts = sample_prompts(args.data, args.prompts, 64, 0, "val")
    decoders = {}
    for compiled in (False, True):
        for name, kw in (("autoregressive", {"speculative": False}), ("chain of 7", {})):
            cfg = GenerationConfig(max_new_bytes=args.max_bytes, temperature=args.temperature, **kw)
            decoders[f"{name}, {'compiled' if compiled else 'eager'}"] = Decoder(model, cfg, compile=compiled)
    totals = {name: [0.0, 0, 0] for name in decoders}  # seconds, bytes, forwards
    for i, prompt in enumerate([prompts[0], *prompts]):  # the first pass warms up and compiles
        names = list(decoders)
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            generation = decoders[name].generate([prompt], [i])
            generation.read_all()
            if i:
                t = totals[name]
                t[0] += time.perf_counter() - start
                t[1] += generation.rows[0].stats.bytes
                t[2] += generation.rows[0].stats.forwards
    best = max(b / s for name, (s, b, _) in totals.items() if name.startswith("autoregressive"))
    print(f"{args.prompts} prompts x {args.max_bytes} bytes, T = {args.temperature}, {args.threads} thread(s)")
    print("| decoder | bytes/s | vs the fastest autoregressive | bytes/forward |")
    print("|---|---|---|---|")
    for name, (seconds, nbytes, forwards) in totals.items():
        print(f"| {name} | {nbytes / seconds:,.0f} | {nbytes / seconds / best:.2f}x | {nbytes / forwards:.2f} |")


if __name__ == "__main__":
    main()
