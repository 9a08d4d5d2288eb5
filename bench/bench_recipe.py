"""Training recipes side by side at equal compute: val bits per byte of every head and the
greedy bytes per forward of the model each trains.

Every variant is a set of ModelConfig/TrainConfig overrides on a preset. All train on the
same dataset with the same seed for the same number of steps; a variant must not change
the FLOPs per byte of a run (``bytemtp.train.flops.mean_flops_per_byte``, checked: a ReLU²
MLP of 4 d has 0.9x a SwiGLU's weights and is allowed within ``--flops-tolerance``), so
equal steps is equal compute, and val bits per byte at equal steps does not depend on how
busy the machine is. With ``--equal-flops`` variants may differ in FLOPs per byte (n = 1 vs
n = 8 heads, or a schedule that trains fewer heads early): each then trains ``--steps``
scaled by the first variant's FLOPs per byte over its own, both averaged over a run of
``--steps`` (its schedule planned for the scaled steps), so every variant spends about the
same training FLOPs.
The runs are interleaved in ``--segments`` pieces (each resumed from its checkpoint, the
schedule planned for the whole run), so wall-clock drift of a shared machine falls on
every variant alike.

Evaluation reads the first ``--eval-batches`` batches of the val split (all of it with
0); bytes per forward is greedy self-speculative decoding (every draft head, chain) of
``--prompts`` held-out prompts of the dataset (``bytemtp.decode.prompts``).

    OMP_NUM_THREADS=1 nice -n 19 python bench/bench_recipe.py --data data/stdlib --steps 80 \\
        --variant adamw='{"optimizer": "adamw"}' --variant muon= --json runs/recipe.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from bytemtp.data.loader import iter_eval_batches
from bytemtp.decode.config import GenerationConfig
from bytemtp.decode.generate import generate
from bytemtp.decode.prompts import sample_prompts
from bytemtp.train.checkpoint import load_model
from bytemtp.train.config import build_configs
from bytemtp.train.flops import mean_flops_per_byte
from bytemtp.train.loop import train
from bytemtp.train.objective import LN2, split_batch
from bytemtp.train.parallel import MTPObjective


def parse_variant(text: str) -> tuple[str, dict]:
    """``name=JSON`` (an empty JSON means no overrides) -> (name, overrides)."""
    name, _, overrides = text.partition("=")
    return name, json.loads(overrides) if overrides.strip() else {}


@torch.no_grad()
def val_bpb(model: torch.nn.Module, data: Path, batch_size: int, seq_len: int, max_batches: int) -> list[float]:
    """Bits per byte of every head over the first ``max_batches`` val batches (0: all)."""
    n = model.cfg.n_future
    objective = MTPObjective(model, "sequential").eval()
    nll, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.int64)
    for i, ids in enumerate(iter_eval_batches(data, batch_size, seq_len, n, split="val")):
        if max_batches and i == max_batches:
            break
        _, head_losses = objective(ids)
        c = (split_batch(ids, n)[1] >= 0).sum((0, 1))
        nll += head_losses.double() * c
        count += c
    return [x / LN2 for x in (nll / count.clamp(min=1)).tolist()]


def bytes_per_forward(model: torch.nn.Module, prompts: list[bytes], max_bytes: int) -> float:
    """Greedy self-speculative decoding through every draft head (1.0 for a next-byte model)."""
    if model.cfg.n_future == 1:
        return 1.0
    gen = generate(model, GenerationConfig(max_new_bytes=max_bytes, speculative=True), prompts)
    gen.read_all()
    return gen.stats.bytes_per_forward


def _flops(preset: str, overrides: dict, steps: int) -> float:
    """A variant's training FLOPs per byte over a run of ``steps`` (a head schedule's average)."""
    model_cfg, train_cfg = build_configs(preset=preset, overrides={**overrides, "steps": steps})
    return mean_flops_per_byte(model_cfg, train_cfg.resolved(model_cfg))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--segments", type=int, default=1, help="interleave the variants' runs in this many pieces")
    ap.add_argument("--variant", action="append", required=True, help="name=JSON overrides (name= for none)")
    ap.add_argument("--common", default="{}", help="JSON overrides applied to every variant first")
    ap.add_argument("--eval-batches", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-bytes", type=int, default=128)
    ap.add_argument("--flops-tolerance", type=float, default=0.1)
    ap.add_argument("--equal-flops", action="store_true", help="scale each variant's steps to equal FLOPs")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    common = json.loads(args.common)
    variants = [parse_variant(v) for v in args.variant]
    overrides = {name: {**common, **fields} for name, fields in variants}
    flops = {name: _flops(args.preset, fields, args.steps) for name, fields in overrides.items()}
    ref = next(iter(flops.values()))
    configs, steps = {}, {}
    for name, f in flops.items():
        if not args.equal_flops and abs(f / ref - 1) > args.flops_tolerance:
            sys.exit(f"{name}: {f / ref:.2f}x the FLOPs per byte of the first variant; not an equal-compute comparison")
        steps[name] = round(args.steps * ref / f) if args.equal_flops else args.steps
        run = {"steps": steps[name], "eval_every": 0, "log_every": 50, "decay_steps": steps[name],
               "ckpt_every": steps[name]}
        model_cfg, train_cfg = build_configs(preset=args.preset, overrides={**overrides[name], **run})
        configs[name] = model_cfg, train_cfg.resolved(model_cfg)  # schedules planned for the whole run

    root = Path(args.out or tempfile.mkdtemp(prefix="bench_recipe-"))
    seconds = dict.fromkeys(configs, 0.0)
    for seg in range(1, args.segments + 1):
        for name, (model_cfg, train_cfg) in configs.items():
            upto = math.ceil(steps[name] * seg / args.segments)
            start = time.monotonic()
            train_cfg.steps = upto
            train(train_cfg, model_cfg if seg == 1 else None, args.data, root / name, resume=seg > 1, progress=False)
            seconds[name] += time.monotonic() - start
            print(f"[{name}] step {upto}/{steps[name]}", file=sys.stderr, flush=True)

    torch.set_num_threads(1)
    rows = []
    for name, (model_cfg, train_cfg) in configs.items():
        model, _ = load_model(root / name, torch.device("cpu"))
        torch.set_num_threads(2)
        bpb = val_bpb(model, args.data, train_cfg.batch_size, train_cfg.resolved(model_cfg).seq_len, args.eval_batches)
        torch.set_num_threads(1)
        prompts = sample_prompts(args.data, args.prompts, 64, seed=0)
        rows.append({"variant": name, "overrides": dict(variants)[name], "steps": steps[name],
                     "flops_per_byte": flops[name], "train_s": round(seconds[name], 1), "val_bpb_heads": bpb,
                     "bytes_per_forward": bytes_per_forward(model, prompts, args.max_bytes)})
        r = rows[-1]
        heads = " ".join(f"{b:.3f}" for b in bpb)
        print(f"{name:>14}  head1 {bpb[0]:.3f}  bytes/fwd {r['bytes_per_forward']:.2f}  heads {heads}  "
              f"({r['train_s']:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "common": common, "eval_batches": args.eval_batches,
                                         "runs": str(root), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
