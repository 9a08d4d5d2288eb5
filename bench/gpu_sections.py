"""The sections of ``bench/gpu_check.py``, each run in a process of its own.

``SECTIONS[name](work, emit, deadline)`` returns the section's result, a JSON object whose
``failures`` (sentences) make it ``failed``; ``emit`` writes a partial result as the section goes,
so a section cut at its limit still reports what it finished; ``deadline`` (``time.monotonic``)
is when it should stop starting new work. ``work`` is shared by the sections of one check: the
training section leaves its data and checkpoint there for the decoding section.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import re
import subprocess
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bytemtp import BOS
from bytemtp.model.config import preset
from bytemtp.train.flops import peak_flops
from bytemtp.train.step_timing import synchronize

if TYPE_CHECKING:
    from bytemtp.decode.generate import Decoder

Emit = Callable[[dict[str, Any]], None]
ROOT = Path(__file__).resolve().parent.parent
DEVICE = torch.device("cuda")  # the tests run the sections' pieces on the CPU: eager there, nothing compiled
BF16_MATMUL_TOLERANCE = 1e-2  # relative error of a bf16 product of random 512x512 matrices: ~3e-3
TRAIN_STEPS = 200
TRAIN_BPB = 3.5  # head 1's train bits per byte after TRAIN_STEPS: 200 CPU steps of tiny reach ~2.2
GRAD_TOLERANCE = 3e-2  # stacked vs sequential, each parameter's gradient, relative to its norm, in bf16
NEAR_TIE_ULPS = 4  # bf16 greedy may differ from autoregressive only where head 1's top two are this close
PROMPTS, PROMPT_BYTES, MAX_BYTES = 16, 64, 64
CASE_S = 12  # a decoding case is not started with less left than this
CASES = (  # name, GenerationConfig fields, batch, dtype: most important first
    ("greedy chain, batch 1", {}, 1, torch.bfloat16),
    ("greedy chain, batch 16", {}, 16, torch.bfloat16),
    ("greedy chain, batch 16, float32", {}, 16, torch.float32),
    ("sampled chain T=0.8, batch 1", {"temperature": 0.8}, 1, torch.bfloat16),
    ("greedy tree of 15, batch 1", {"tree_nodes": 15}, 1, torch.bfloat16),
    ("sampled tree of 15 T=0.8, batch 1", {"temperature": 0.8, "tree_nodes": 15}, 1, torch.bfloat16),
)


def environment(work: Path, emit: Emit, deadline: float) -> dict[str, Any]:
    """torch, CUDA, the device; fails without bf16 or when a bf16 product is off."""
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if not info["cuda_available"]:
        return {**info, "status": "skipped", "reason": "no CUDA device"}
    device = torch.device("cuda")
    props, peak = torch.cuda.get_device_properties(device), peak_flops(device)
    info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported(),
                peak_tflops=peak and peak / 1e12)
    a, b = torch.randn(2, 512, 512, device=device, generator=torch.Generator(device).manual_seed(0))
    exact = a.double() @ b.double()
    info["bf16_matmul_rel_error"] = ((a.bfloat16() @ b.bfloat16()).double() - exact).norm().item() / exact.norm().item()
    failures = [] if info["bf16"] else ["no bf16 support: training and decoding run in bf16 on CUDA"]
    if not info["bf16_matmul_rel_error"] <= BF16_MATMUL_TOLERANCE:
        failures.append(f"a bf16 matmul is {info['bf16_matmul_rel_error']:.1e} from float64 "
                        f"(> {BF16_MATMUL_TOLERANCE})")
    return {**info, "failures": failures}


def prepare_data(out: Path) -> Path:
    """A small dataset (the standard library's ``email`` package), made once per check."""
    from bytemtp.data.prepare import PrepareConfig, prepare

    if not (out / "manifest.json").is_file():
        prepare([str(Path(sysconfig.get_paths()["stdlib"]) / "email")], out, PrepareConfig(val_fraction=0.05),
                progress=False)
    return out


def training(work: Path, emit: Emit, deadline: float) -> dict[str, Any]:
    """``tiny`` with Muon, compiled, bf16, through the training loop: the loss falls, no host syncs
    between the loop's checks; then stacked and sequential head schedules' gradients agree."""
    from bytemtp.train import loop
    from bytemtp.train.config import TRAIN_PRESETS, TrainConfig

    cfg = TrainConfig(**{**TRAIN_PRESETS["tiny"], "steps": TRAIN_STEPS, "warmup_steps": 20, "eval_every": 0,
                         "log_every": 50, "ckpt_every": 0, "device": str(DEVICE), "compile": DEVICE.type == "cuda"})
    data, run = prepare_data(work / "data"), work / "run"
    with host_syncs_by_step(loop._Run) as syncs:
        start = time.monotonic()
        result = loop.train(cfg, preset("tiny"), data, run, progress=False)
        seconds = time.monotonic() - start
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    must_read = {1, result.step} | {s for s in syncs if s % loop.CHECK_EVERY == 0 or s % cfg.log_every == 0}
    out: dict[str, Any] = {
        "steps": result.step, "seconds": round(seconds, 1), "loss_first": records[0]["loss"],
        "loss_final": records[-1]["loss"], "head1_bpb_final": records[-1]["bpb_heads"][0],
        "bytes_per_s": records[-1]["bytes_per_s"], "mfu": records[-1].get("mfu"),
        "host_syncs": sum(syncs.values()),
        "host_syncs_between_checks": sum(n for s, n in syncs.items() if s not in must_read),
    }
    out["failures"] = [f"steps {sorted(s for s in syncs if s not in must_read)}: host syncs between checks"] if (
        out["host_syncs_between_checks"]) else []
    if not out["head1_bpb_final"] < TRAIN_BPB:
        out["failures"].append(f"head 1 at {out['head1_bpb_final']:.2f} bits per byte after {result.step} steps "
                               f"(want < {TRAIN_BPB})")
    emit({**out, "status": "running"})
    out.update(schedules_agree(run))
    if out["schedule_worst_rel_error"] > GRAD_TOLERANCE:
        out["failures"].append(f"stacked and sequential gradients of {out['schedule_worst_param']} differ by "
                               f"{out['schedule_worst_rel_error']:.1e} of its norm (> {GRAD_TOLERANCE})")
    return out


@contextlib.contextmanager
def host_syncs_by_step(run_class: type) -> Iterator[dict[int, int]]:
    """Synchronising CUDA calls (``set_sync_debug_mode("warn")``) counted per training step: those
    after step s begins and before step s+1 does count for s (its checks and logging included)."""
    syncs: dict[int, int] = {}
    real_step = run_class._step

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def step(self) -> None:
            if self.step:
                syncs[self.step] = sum("synchroniz" in str(w.message) for w in caught)
            caught.clear()
            real_step(self)

        run_class._step = step
        cuda = DEVICE.type == "cuda"
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
            run_class._step = real_step
        syncs[max(syncs, default=0) + 1] = sum("synchroniz" in str(w.message) for w in caught)  # the last step's


def schedules_agree(run: Path) -> dict[str, Any]:
    """The trained model's gradients on one batch under the stacked and the sequential head
    schedules, compiled, bf16: the worst parameter's difference relative to its gradient's norm."""
    from bytemtp.compile import compile_model
    from bytemtp.train.checkpoint import load_model
    from bytemtp.train.objective import multihead_loss
    from bytemtp.train.precision import autocast, training_precision

    device = DEVICE
    model, _ = load_model(run, device)
    compile_model(model.train())
    ids = torch.randint(0, 257, (8, model.cfg.max_seq_len + model.cfg.n_future), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    grads = {}
    with training_precision(device), autocast(device):
        for mode in ("sequential", "stacked"):
            model.zero_grad(set_to_none=True)
            multihead_loss(model, ids, mode).loss.backward()
            grads[mode] = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    errors = {n: ((g - grads["stacked"][n]).norm() / g.norm().clamp_min(1e-30)).item()
              for n, g in grads["sequential"].items()}
    worst = max(errors, key=errors.get)
    return {"schedule_worst_param": worst, "schedule_worst_rel_error": errors[worst]}


def decoding(work: Path, emit: Emit, deadline: float) -> dict[str, Any]:
    """Each case of ``CASES`` against compiled greedy autoregressive decoding at its batch and
    dtype, on the model the training section trained (random weights if it saved none)."""
    from bytemtp.decode.prompts import sample_prompts
    from bytemtp.model.decode_dtype import cast_for_decoding
    from bytemtp.model.transformer import ByteMTP
    from bytemtp.train.checkpoint import load_model

    device = DEVICE
    run = work / "run"
    if (run / "checkpoints" / "latest").exists():  # not just the directory: a run cut early leaves it empty
        model, _ = load_model(run, device)
        source = "trained by the training section"
    else:
        torch.manual_seed(0)
        model, source = ByteMTP(preset("tiny")).to(device).eval(), "random weights: the training section saved none"
    models = {dtype: cast_for_decoding(model, dtype) for dtype in (torch.bfloat16, torch.float32)}  # one copy each
    prompts = sample_prompts(prepare_data(work / "data"), PROMPTS, PROMPT_BYTES, seed=0)
    out: dict[str, Any] = {"model": source, "prompts": len(prompts), "max_bytes": MAX_BYTES, "baselines": {},
                           "cases": {}, "not_reached": [], "failures": []}
    baselines: dict[tuple, tuple] = {}
    for name, fields, batch, dtype in CASES:
        if time.monotonic() > deadline - CASE_S:
            out["not_reached"].append(name)
            continue
        key = (batch, dtype)
        if key not in baselines:
            baselines[key] = run_decoder(models[dtype], {"speculative": False}, prompts, batch, dtype)
            out["baselines"][f"autoregressive, batch {batch}, {str(dtype)[6:]}"] = baselines[key][0]
        base, base_outputs = baselines[key]
        case, outputs = run_decoder(models[dtype], fields, prompts, batch, dtype)
        case["speedup"] = case["bytes_per_s"] / base["bytes_per_s"]
        failures = [f"{n} cudagraph skips" for n in [case["cudagraph_skips"]] if n]
        failures += [f"graph breaks: {case['graph_breaks']}"] if case["graph_breaks"] else []
        if not fields.get("temperature"):
            case["differences"] = differences(models[dtype], prompts, base_outputs, outputs)
            tie = 0 if dtype == torch.float32 else NEAR_TIE_ULPS
            failures += [f"prompt {d['prompt']} differs from autoregressive at byte {d['at_byte']}, where head 1's "
                         f"top two logits are {d['margin_ulps']:.1f} bf16 ulps apart (> {tie})"
                         for d in case["differences"] if d["margin_ulps"] > tie]
        out["cases"][name] = case
        out["failures"] += [f"{name}: {f}" for f in failures]
        emit({**out, "status": "running"})
    if out["not_reached"] and not out["failures"]:
        out["status"] = "partial"
    return out


def run_decoder(
    model: torch.nn.Module, fields: dict, prompts: list[bytes], batch: int, dtype: torch.dtype
) -> tuple[dict, list]:
    """Decode ``prompts`` ``batch`` at a time with a decoder of ``fields`` (compiled on CUDA), twice:
    the first pass compiles and records, the second is timed -> (its figures, its outputs)."""
    from bytemtp.decode.generate import Decoder, GenerationConfig

    with compile_events() as events:
        config = GenerationConfig(max_new_bytes=MAX_BYTES, seed=0, **fields)
        decoder = Decoder(model, config, compile=DEVICE.type == "cuda", dtype=dtype)
        first_s = decode_all(decoder, prompts, batch)[2]
        outputs, stats, seconds = decode_all(decoder, prompts, batch)
    n_bytes, forwards = sum(s.bytes for s in stats), sum(s.forwards for s in stats)
    return {"bytes_per_s": n_bytes / seconds, "bytes_per_forward": n_bytes / forwards, "bytes": n_bytes,
            "seconds": round(seconds, 2), "first_pass_s": round(first_s, 2),
            "compile_s": round(max(0.0, first_s - seconds), 1), **events}, outputs


def decode_all(decoder: Decoder, prompts: list[bytes], batch: int) -> tuple[list[bytes], list, float]:
    """Every prompt, ``batch`` rows a generation (row i seeded i) -> (outputs, row statistics, seconds)."""
    outputs, stats, start = [], [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        gen = decoder.generate(prompts[i : i + batch], seeds=list(range(i, i + len(prompts[i : i + batch]))))
        outputs += gen.read_all()
        stats += [row.stats for row in gen.rows]
    synchronize(decoder.device)
    return outputs, stats, time.perf_counter() - start


@contextlib.contextmanager
def compile_events() -> Iterator[dict[str, Any]]:
    """What compiling and capturing did within the block: graphs dynamo compiled, graph breaks by
    reason, CUDA graphs recorded, cudagraph skips and their reasons (inductor's messages)."""
    import torch._inductor.compile_fx  # noqa: F401 (the modules that report skips, loaded before patching)
    import torch._inductor.cudagraph_trees as trees
    import torch._inductor.output_code  # noqa: F401
    from torch._dynamo.utils import counters

    events: dict[str, Any] = {"graphs_compiled": 0, "graph_breaks": {}, "graphs_recorded": 0,
                              "cudagraph_skips": 0, "cudagraph_skip_reasons": []}
    graphs, breaks, skips = (counters["stats"]["unique_graphs"], dict(counters["graph_break"]),
                             counters["inductor"]["cudagraph_skips"])
    patched = [(m, m.log_cudagraph_skip_and_bump_counter) for name, m in list(sys.modules.items())
               if name.startswith("torch._inductor") and hasattr(m, "log_cudagraph_skip_and_bump_counter")]
    for module, real in patched:
        module.log_cudagraph_skip_and_bump_counter = lambda msg, _real=real: (
            events["cudagraph_skip_reasons"].append(msg), _real(msg))[1]
    real_record = trees.CUDAGraphNode._record

    def record(self, *args, **kwargs):
        events["graphs_recorded"] += 1
        return real_record(self, *args, **kwargs)

    trees.CUDAGraphNode._record = record
    try:
        yield events
    finally:
        trees.CUDAGraphNode._record = real_record
        for module, real in patched:
            module.log_cudagraph_skip_and_bump_counter = real
        events["graphs_compiled"] = counters["stats"]["unique_graphs"] - graphs
        events["graph_breaks"] = {k: n - breaks.get(k, 0) for k, n in counters["graph_break"].items()
                                  if n > breaks.get(k, 0)}
        events["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips


def differences(model: torch.nn.Module, prompts: list[bytes], want: list[bytes], got: list[bytes]) -> list[dict]:
    """Per prompt whose output differs from autoregressive decoding's: the first byte that differs
    and head 1's top-two logit margin there (``model`` as decoded, one plain forward), in bf16
    ulps of the top logit: a near-tie that rounding can flip is a few."""
    from bytemtp.decode.context import prompt_context

    out = []
    for i, (a, b) in enumerate(zip(want, got)):
        if a == b:
            continue
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        context = [*prompt_context(prompts[i], model.cfg.max_seq_len), *a[:k]]
        ids = torch.tensor([context], device=model.embed.weight.device)
        with torch.inference_mode():
            top = model(ids, n_heads=1)[0, -1, 0].float().topk(2).values.tolist()
        ulp = 2.0 ** (math.floor(math.log2(max(abs(top[0]), 1e-30))) - 7)
        out.append({"prompt": i, "at_byte": k, "margin": top[0] - top[1], "margin_ulps": (top[0] - top[1]) / ulp})
    return out


def gpu_tests(work: Path, emit: Emit, deadline: float) -> dict[str, Any]:
    """``pytest -m gpu tests`` (its output in this section's log), stopped at the deadline."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "tests"]
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    failed: list[str] = []
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with contextlib.suppress(ValueError):  # the pipe closed under the loop: pytest was stopped
        for line in proc.stdout:
            sys.stdout.write(line)
            if m := re.search(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", line):
                counts[m.group(2).lower()] += 1
                failed += [m.group(1)] if m.group(2) in ("FAILED", "ERROR") else []
                emit({**counts, "failed_tests": failed, "status": "running"})
            if time.monotonic() > deadline:
                proc.kill()
                break
    timed_out = proc.wait() != 0 and time.monotonic() > deadline
    failures = [f"{len(failed)} GPU tests failed or errored"] if failed else []
    failures += [f"stopped at the section's limit after {sum(counts.values())} tests"] if timed_out else []
    failures += [] if counts["passed"] or timed_out else ["no GPU test passed"]
    return {**counts, "failed_tests": failed, "failures": failures}


SECTIONS: dict[str, Callable[[Path, Emit, float], dict[str, Any]]] = {
    "environment": environment, "training": training, "decoding": decoding, "gpu_tests": gpu_tests,
}
