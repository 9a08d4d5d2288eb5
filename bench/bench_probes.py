"""Does multi-byte training help a small model induct or generalise? The paper's probes
(Sections 4.1 and 4.2) as one command.

For every probe (``bytemtp.train.probes``), model size (``SIZES``) and seed, trains
next-byte (n = 1) and multi-byte (n = 2, 4, 8 heads) models on the probe's built-in
corpus (``builtin:induction``, ``builtin:arithmetic``, prepared under ``--out``) and scores
each with the probe. Two comparisons, as the paper makes them:

- **equal steps**: every n trains ``--steps`` steps (the paper's comparison: the same
  data, the extra heads' compute on top);
- **equal FLOPs**: n < 8 trains ``--steps`` times the 8-head model's training FLOPs per
  byte over its own (``bytemtp.train.flops``), so every model costs the same; the 8-head
  run is shared by both tables.

Each cell is the mean and sample standard deviation over the seeds (each seed changes the
initial weights and the data order). The objective is the paper's plain mean over heads
unless ``--common`` overrides it (e.g. ``'{"draft_loss_weight": 0.25}'``).

    OMP_NUM_THREADS=2 nice -n 19 python bench/bench_probes.py --out runs/probes --json runs/probes.json
    python bench/bench_probes.py --smoke --out /tmp/probes-smoke   # seconds: the plumbing only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bytemtp.data.prepare import is_up_to_date, prepare
from bytemtp.model.config import ModelConfig
from bytemtp.train.checkpoint import list_checkpoints, load_model
from bytemtp.train.config import TrainConfig
from bytemtp.train.flops import flops_per_byte
from bytemtp.train.loop import train
from bytemtp.train.probes import PROBES, run_probe

# Sizes a 2-core CPU trains in well under a minute per run at the default steps.
SIZES = {
    "d64": ModelConfig(d_model=64, n_layers=2, n_attn_heads=2, max_seq_len=256, ffn="relu2", qk_norm=True,
                       zero_init_out=True),
    "d128": ModelConfig(d_model=128, n_layers=3, n_attn_heads=4, max_seq_len=256, ffn="relu2", qk_norm=True,
                        zero_init_out=True),
}
SMOKE_SIZE = ModelConfig(d_model=32, n_layers=1, n_attn_heads=2, max_seq_len=256)
COMPARISONS = ("equal steps", "equal FLOPs")
# The score of each probe that the tables show.
SCORES = {"induction": ("repeat_accuracy",), "arithmetic": ("in_distribution", "out_of_distribution")}


@dataclass(frozen=True)
class Setting:
    """One trained model: which probe's data, size, heads, seed, how many steps, and the
    comparisons ("equal steps", "equal FLOPs") it takes part in."""

    probe: str
    size: str
    n: int
    seed: int
    steps: int
    comparisons: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.probe}-{self.size}-n{self.n}-s{self.seed}-{self.steps}"


def plan(probes: list[str], sizes: dict[str, ModelConfig], heads: list[int], seeds: list[int], steps: int,
         seq_len: int) -> list[Setting]:
    """Every model to train: each n at ``steps`` (equal steps) and, for n below the largest, at
    the steps that spend the largest n's training FLOPs (equal FLOPs)."""
    top = max(heads)
    settings = []
    for probe in probes:
        for size, cfg in sizes.items():
            ref = flops_per_byte(replace(cfg, n_future=top), seq_len)
            for seed in seeds:
                for n in heads:
                    equal = round(steps * ref / flops_per_byte(replace(cfg, n_future=n), seq_len))
                    if equal == steps:
                        settings.append(Setting(probe, size, n, seed, steps, COMPARISONS))
                    else:
                        settings += [Setting(probe, size, n, seed, steps, COMPARISONS[:1]),
                                     Setting(probe, size, n, seed, equal, COMPARISONS[1:])]
    return settings


def dataset(probe: str, root: Path) -> Path:
    """The probe's built-in corpus, prepared under ``root`` (reused when still current)."""
    out, source = root / f"data-{probe}", [f"builtin:{probe}"]
    if not is_up_to_date(out, source):
        prepare(source, out, overwrite=True, progress=False)
    return out


def train_and_score(s: Setting, model_cfg: ModelConfig, train_cfg: TrainConfig, data: Path, root: Path,
                    examples: int | None) -> dict:
    run = root / s.name
    resume = bool(list_checkpoints(run))  # a bench run again picks up (or reuses) what it trained before
    result = train(replace(train_cfg, steps=s.steps, seed=s.seed), None if resume else replace(model_cfg, n_future=s.n),
                   data, run, resume=resume, progress=False)
    if result.signal:  # interrupted: stop the bench, not just this run
        sys.exit(result.exit_code)
    model, _ = load_model(run, torch.device("cpu"))
    return run_probe(model, s.probe, examples)


def cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = f" ± {statistics.stdev(values):.1%}" if len(values) > 1 else ""
    return f"{mean:.1%}{spread}"


def tables(rows: list[dict], heads: list[int], steps: int) -> str:
    """Markdown tables: one per comparison, a row per (probe, size, score), a column per n."""
    out = []
    for title in COMPARISONS:
        out += [f"\n{title} ({steps} steps for n = {max(heads)}; mean ± sd over seeds)\n",
                "| probe | size | score | " + " | ".join(f"n = {n}" for n in heads) + " |",
                "|---|---|---|" + "---|" * len(heads)]
        for probe, size in dict.fromkeys((r["probe"], r["size"]) for r in rows):
            for score in SCORES[probe]:
                cells = []
                for n in heads:
                    mine = [r[score] for r in rows
                            if (r["probe"], r["size"], r["n"]) == (probe, size, n) and title in r["comparisons"]]
                    cells.append(cell(mine) if mine else "")
                out.append(f"| {probe} | {size} | {score} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", action="append", choices=PROBES, help="default: both")
    ap.add_argument("--size", action="append", choices=list(SIZES), help="default: all")
    ap.add_argument("--heads", default="1,2,4,8")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=200, help="steps of the model with the most heads")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--examples", type=int, default=None, help="probe examples (default: the probe's)")
    ap.add_argument("--common", default="{}", help="JSON TrainConfig overrides for every run")
    ap.add_argument("--smoke", action="store_true", help="a micro model, 2 heads, 1 seed, 6 steps: plumbing only")
    ap.add_argument("--out", type=Path, default=None, help="datasets and runs (default: a temporary directory)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    probes = args.probe or list(PROBES)
    sizes = {name: SIZES[name] for name in (args.size or SIZES)}
    heads, seeds, steps = [int(x) for x in args.heads.split(",")], [int(x) for x in args.seeds.split(",")], args.steps
    if args.smoke:
        sizes, heads, seeds, steps, args.examples = {"smoke": SMOKE_SIZE}, [1, 2], [0], 6, args.examples or 4
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_probes-"))
    train_cfg = TrainConfig(**{"batch_size": args.batch_size, "seq_len": 256, "warmup_steps": max(1, steps // 10),
                               "eval_every": 0, "log_every": 50, "ckpt_every": 0, "keep": 1,
                               "optimizer": "muon", **json.loads(args.common)})
    settings = plan(probes, sizes, heads, seeds, steps, train_cfg.seq_len)
    data = {probe: dataset(probe, root) for probe in probes}
    rows, start = [], time.monotonic()
    for i, s in enumerate(settings, 1):
        scores = train_and_score(s, sizes[s.size], train_cfg, data[s.probe], root, args.examples)
        rows.append({**s.__dict__, **{k: scores[k] for k in SCORES[s.probe]}})
        print(f"[{i}/{len(settings)} {time.monotonic() - start:.0f} s] {s.name}: "
              + ", ".join(f"{k} {scores[k]:.1%}" for k in SCORES[s.probe]), file=sys.stderr, flush=True)
        if args.json:  # after every run, so a long bench stopped early keeps what it measured
            args.json.write_text(json.dumps({"steps": steps, "heads": heads, "common": json.loads(args.common),
                                             "runs": str(root), "rows": rows}, indent=1))
    print(tables(rows, heads, steps))


if __name__ == "__main__":
    main()
