"""Where a decoding step's time goes: the forward vs everything around it, per decoder.

Speedup is bytes per forward divided by the *step cost ratio* (a speculative step's time
over an autoregressive step's). This splits each decoder's step into the model's forward
(``ByteMTP.decode``, timed by wrapping it) and the rest (verification, drafting, the
host's bookkeeping, the cache moves of a tree), so a ratio above 1 can be read as extra
positions in the forward or as work around it. The decoders take turns on each batch of
prompts, ``--rounds`` times after a warm-up; the figures are totals over the timed rounds.
With ``--batch`` above 1, bytes per forward is the batch's bytes per forward over the rows,
lower than a row's own once some rows have stopped. "Plain drafts": from the heads and the
corpus only, not from the rows' own text (``bytemtp.decode.incontext``); a lookup draft may
make a step wider than the heads' 8 positions, so its forward costs more.

    .venv/bin/python bench/bench_step_cost.py runs/demo --data D --prompts 4 --batch 1
"""

from __future__ import annotations

import argparse
import time

import torch

from bytemtp.decode.generate import Decoder, GenerationConfig
from bytemtp.decode.prompts import sample_prompts
from bytemtp.train.checkpoint import load_model

DECODERS = {
    "autoregressive": {"speculative": False},
    "chain of 7, greedy": {},
    "chain of 7, greedy, plain drafts": {"context_mixing": 0.0, "lookup": False},
    "tree of 15, greedy": {"tree_nodes": 15},
    "chain of 7, T = 0.8": {"temperature": 0.8, "seed": 0},
    "tree of 15, T = 0.8": {"temperature": 0.8, "seed": 0, "tree_nodes": 15},
}


class TimedForward:
    """Wraps ``model.decode``, adding up the seconds it takes and the calls."""

    def __init__(self, model: torch.nn.Module):
        self.inner, self.seconds, self.calls = model.decode, 0.0, 0
        model.decode = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--data", required=True)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-bytes", type=int, default=192)
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workload", default="text", choices=["text", "copy"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model(args.ckpt)
    forward = TimedForward(model)
    size = 112 if args.workload == "copy" else 64  # a copy prompt: 112 bytes, a newline, 8 again
    prompts = sample_prompts(args.data, args.prompts, size, 0, "val", args.workload)
    batches = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    decoders = {
        name: Decoder(model, GenerationConfig(max_new_bytes=args.max_bytes, **kw)) for name, kw in DECODERS.items()
    }
    totals = {name: [0.0, 0.0, 0, 0] for name in decoders}  # wall s, forward s, forwards, bytes
    for rnd in range(args.rounds + 1):
        for batch in batches:  # the decoders take turns on each batch: a slow spell falls on them all
            for name, decoder in decoders.items():
                forward.seconds, forward.calls = 0.0, 0
                start = time.perf_counter()
                out = decoder.generate(batch).read_all()
                wall = time.perf_counter() - start
                if rnd:  # round 0 warms up
                    t = totals[name]
                    t[0] += wall
                    t[1] += forward.seconds
                    t[2] += forward.calls
                    t[3] += sum(map(len, out))
    ar_wall, _, ar_steps, ar_bytes = totals["autoregressive"]
    print(f"{args.prompts} {args.workload} prompts x {args.max_bytes} bytes, batch {args.batch}, 1 thread, eager")
    print("| decoder | step ms | forward ms | rest ms | step cost ratio | bytes/forward | speedup |")
    print("|---|---|---|---|---|---|---|")
    for name, (wall, fwd, steps, nbytes) in totals.items():
        step, per_row = wall / steps, nbytes / steps / args.batch
        print(
            f"| {name} | {1e3 * step:.2f} | {1e3 * fwd / steps:.2f} | {1e3 * (wall - fwd) / steps:.2f} "
            f"| {step / (ar_wall / ar_steps):.2f} | {per_row:.2f} | {(nbytes / wall) / (ar_bytes / ar_wall):.2f}x |"
        )


if __name__ == "__main__":
    main()
