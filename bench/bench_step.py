"""Training-step cost of n future-byte heads against the next-byte baseline.

Run from the repository root::

    .venv/bin/python bench/bench_step.py                   # small preset's width, CPU-sized batch
    .venv/bin/python bench/bench_step.py --batch 16 --seq 1024   # e.g. on a GPU
    .venv/bin/python bench/bench_step.py --preset tiny --batch 16 --tables optimizer \
        --optimizers adamw muon:bfloat16 muon:float32     # the demo's step, optimizer by optimizer

For linear and transformer heads it times one training step (forward + backward,
no optimizer) of the model with ``--n-future`` heads against the same trunk with
one head, on the same batch, steps of the models interleaved so that a change in
machine load hits both alike, the fastest step of each reported (the one least
disturbed by anything else running; ``--clock cpu --threads 1`` counts only this
process's CPU time, for a machine other jobs keep busy); and it measures the peak
memory a step allocates with the sequential head schedule, the stacked one (linear
heads) and the naive summed loss. The second table (``--tables optimizer``) times a whole
training step of the preset's model, forward + backward and the optimizer's update apart, for
each of ``--optimizers`` (``muon`` orthogonalising in the dtype ``bytemtp.train.muon`` picks for
the machine, ``muon:DTYPE`` in DTYPE), and gives the optimizer's share of the step. On CUDA the step
runs under bf16 autocast and, unless ``--no-compile``, with ``compile_model``; the
table then also gives MFU against the GPU's dense bf16 peak, with the FLOPs per
byte of ``bytemtp.train.flops`` (PaLM's definition: every matmul weight of trunk
and heads, and attention over the full T).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable

import pytest
import torch

from bytemtp import VOCAB
from bytemtp.compile import compile_model
from bytemtp.model.config import HEAD_KINDS, ModelConfig, preset
from bytemtp.model.transformer import ByteMTP
from bytemtp.train.config import TrainConfig
from bytemtp.train.flops import flops_per_byte, peak_flops
from bytemtp.train.objective import resolve_loss_mode
from bytemtp.train.optim import MuonAdamW, build_optimizer
from bytemtp.train.step_timing import peak_step_bytes, timed, training_step

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="model preset whose trunk and width are used")
    p.add_argument("--n-layers", type=int, help="override the preset's trunk depth")
    p.add_argument("--n-future", type=int, default=8, help="heads of the multi-byte model")
    p.add_argument("--head-kinds", nargs="+", default=list(HEAD_KINDS), choices=HEAD_KINDS)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256, help="positions trained per row (T)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model (the fastest is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time, steadier on a busy machine (use with --threads 1)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile_model (default: on CUDA only)")
    p.add_argument("--tables", nargs="+", choices=("heads", "optimizer"), default=["heads", "optimizer"],
                   help="heads: n future-byte heads vs one; optimizer: the optimizer's share of a step")
    p.add_argument("--optimizers", nargs="+", default=["adamw", "muon"], metavar="OPT",
                   help="optimizer table rows: adamw, muon (its dtype chosen for the machine), muon:bfloat16, "
                        "muon:float32")
    return p.parse_args()


@dataclasses.dataclass
class Case:
    head_kind: str
    n_future: int
    mode: str
    model: ByteMTP
    times: list[float] = dataclasses.field(default_factory=list)
    peak_bytes: int = 0


def step_fn(case: Case, ids: torch.Tensor, seq: int) -> Callable[[], None]:
    """One training step of ``case`` (no optimizer) on the first T + n columns of the shared batch."""
    return training_step(case.model, ids[:, : seq + case.n_future], case.mode)


def clock_of(args: argparse.Namespace) -> Callable[[], float]:
    return time.process_time if args.clock == "cpu" else time.perf_counter


def heads_table(args: argparse.Namespace, device: torch.device, base: ModelConfig) -> None:
    """Steps (forward + backward) of n heads against one, per head kind and schedule, and their memory."""

    cases: list[Case] = []
    for kind in args.head_kinds:
        stacked = ((args.n_future, "stacked"),) if kind == "linear" else ()  # transformer heads cannot stack
        for n, mode in ((1, "sequential"), (args.n_future, "sequential"), *stacked, (args.n_future, "naive")):
            torch.manual_seed(0)  # same seed, same construction order: the same trunk weights
            model = ByteMTP(dataclasses.replace(base, head_kind=kind, n_future=n)).to(device)
            compile_model(model, args.compile)
            cases.append(Case(kind, n, mode, model))
    ids = torch.randint(0, VOCAB, (args.batch, args.seq + args.n_future), device=device)
    steps = [step_fn(c, ids, args.seq) for c in cases]

    for step in steps:
        for _ in range(args.warmup):
            step()
    clock = clock_of(args)
    for _ in range(args.steps):
        for case, step in zip(cases, steps):
            case.times.append(timed(step, device, clock))
    for case, step in zip(cases, steps):
        case.model.zero_grad(set_to_none=True)  # the step frees nothing allocated before it
        case.peak_bytes = peak_step_bytes(step, device)

    tokens = args.batch * args.seq
    peak = peak_flops(device)
    print(
        f"device={device.type} threads={torch.get_num_threads()} compiled={cases[0].model.compiled} "
        f"preset={args.preset} d_model={base.d_model} n_layers={base.n_layers} "
        f"batch={args.batch} seq={args.seq} step=fwd+bwd, fastest of {args.steps}, {args.clock} clock"
    )
    header = f"{'heads':<12}{'n':>3} {'schedule':<11}{'step ms':>10}{'vs n=1':>8}{'bytes/s':>11}"
    header += f"{'TFLOP/s':>9}{'MFU':>7}{'peak MiB':>10}"
    print(header)
    print("-" * len(header))
    for case in cases:
        t = min(case.times)
        baseline = next(c for c in cases if c.head_kind == case.head_kind and c.n_future == 1)
        ratio = t / min(baseline.times)
        flops = flops_per_byte(case.model.cfg, args.seq) * tokens / t
        mfu = f"{flops / peak:7.1%}" if peak else f"{'-':>7}"
        print(
            f"{case.head_kind:<12}{case.n_future:>3} {case.mode:<11}{t * 1e3:>10.1f}{ratio:>7.3f}x"
            f"{tokens / t:>11,.0f}{flops / 1e12:>9.3f}{mfu}{case.peak_bytes / 2**20:>10.1f}"
        )


def optimizer_table(args: argparse.Namespace, device: torch.device, base: ModelConfig) -> None:
    """Whole training steps of the preset's model with each of ``args.optimizers``: forward +
    backward and the optimizer's update timed apart, rows interleaved, the fastest of each kept."""
    mode = resolve_loss_mode("auto", device)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq + base.n_future), device=device)
    rows = []
    for name in args.optimizers:
        optimizer_name, _, dtype = name.partition(":")
        torch.manual_seed(0)
        model = ByteMTP(base).to(device)
        compile_model(model, args.compile)
        optimizer = build_optimizer(model, TrainConfig(optimizer=optimizer_name, muon_dtype=dtype or "auto"), device)
        label = f"muon, {optimizer.muon.dtype_name}" if isinstance(optimizer, MuonAdamW) else name
        rows.append((label, training_step(model, ids, mode), optimizer, [], []))
    for _, forward_backward, optimizer, _, _ in rows:
        for _ in range(args.warmup):
            forward_backward()
            optimizer.step()
    clock = clock_of(args)
    for _ in range(args.steps):
        for _, forward_backward, optimizer, fb_times, opt_times in rows:
            fb_times.append(timed(forward_backward, device, clock))
            opt_times.append(timed(optimizer.step, device, clock))
    print(
        f"device={device.type} threads={torch.get_num_threads()} preset={args.preset} d_model={base.d_model} "
        f"n_layers={base.n_layers} heads={base.n_future} {base.head_kind} schedule={mode} batch={args.batch} "
        f"seq={args.seq}; fastest of {args.steps}, {args.clock} clock"
    )
    for label, _, optimizer, _, _ in rows:
        if isinstance(optimizer, MuonAdamW):
            print(f"  {label}: {optimizer.muon.describe()}")
    header = f"{'optimizer':<16}{'fwd+bwd ms':>12}{'optimizer ms':>14}{'step ms':>10}{'optimizer share':>17}{'vs first':>10}"
    print(header)
    print("-" * len(header))
    first = min(rows[0][3]) + min(rows[0][4])
    for label, _, _, fb_times, opt_times in rows:
        fb, opt = min(fb_times), min(opt_times)
        print(f"{label:<16}{fb * 1e3:>12.1f}{opt * 1e3:>14.1f}{(fb + opt) * 1e3:>10.1f}{opt / (fb + opt):>17.1%}"
              f"{(fb + opt) / first:>9.2f}x")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = {"n_layers": args.n_layers} if args.n_layers else {}
    base = preset(args.preset, max_seq_len=args.seq, **overrides)
    if "heads" in args.tables:
        heads_table(args, device, base)
    if "optimizer" in args.tables:
        optimizer_table(args, device, dataclasses.replace(base, n_future=args.n_future))


# -- the same comparison as a pytest-benchmark suite ---------------------------------------
# .venv/bin/python -m pytest bench/bench_step.py --benchmark-enable -p no:cacheprovider -s

_medians: dict[int, float] = {}


@pytest.mark.parametrize("n_future", [1, 8])
def test_step(benchmark, n_future: int) -> None:
    """One training step of the ``small`` width with linear heads; the trunk is the same for every n."""
    torch.manual_seed(0)
    model = ByteMTP(preset("small", n_future=n_future, max_seq_len=256))
    ids = torch.randint(0, VOCAB, (4, 256 + 8), generator=torch.Generator().manual_seed(0))
    step = step_fn(Case("linear", n_future, "sequential", model), ids, 256)
    benchmark.group = "training step: small width, linear heads, batch 4 x 256"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    _medians[n_future] = benchmark.stats.stats.median


def test_step_ratio() -> None:
    if set(_medians) != {1, 8}:
        pytest.skip("needs both step benchmarks")
    ratio = _medians[8] / _medians[1]
    sys.__stdout__.write(f"\n    n = 8 step time / n = 1 step time: {ratio:.3f}x (median of 5)\n")


if __name__ == "__main__":
    main()
