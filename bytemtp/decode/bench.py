"""Decode benchmark: autoregressive vs self-speculative decoding, side by side.

Speed claims are ratios measured in one process on the same prompts: for each
prompt every mode runs once, in an order rotated per prompt so slow drift (thermal,
other load) hits every mode alike, after untimed warm-up runs (which also absorb
``torch.compile``). The speedup is the ratio of median bytes/s. With greedy
decoding the outputs of all modes must be byte-identical, and the report says
whether they were.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bytemtp.decode.drafting import measure_step_costs
from bytemtp.errors import BytemtpError, require_at_least_one
from bytemtp.decode.generate import GenerationConfig, GenerationStats, StepForward, generate, generation_cache_length
from bytemtp.model.panels import panels_enabled
from bytemtp.data.shards import Dataset
from bytemtp.decode.tree import check_tree_request


@dataclass
class BenchConfig:
    prompts: int = 8
    prompt_bytes: int = 64
    max_bytes: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    sweep: bool = False  # one row per number of draft heads (1, 3, 7 for n = 8: heads used 2, 4, 8)
    warmup: int = 1
    adaptive: bool = False  # add a row that verifies only the drafts worth their cost (bytemtp.decode.drafting)
    panels: bool = True  # CPU steps multiply on bytemtp_native.panels, not BLAS (bytemtp.model.panels)
    trees: tuple[int, ...] = ()  # add a row per draft tree size (nodes verified per step, bytemtp.decode.tree); greedy only

    def __post_init__(self) -> None:
        require_at_least_one(self, ("prompts", "prompt_bytes", "max_bytes"), flags=True)
        self.trees = tuple(self.trees)
        for n in self.trees:
            check_tree_request(n, self.temperature)


def sample_prompts(data_dir: str | Path, n: int, prompt_bytes: int, seed: int, split: str = "val") -> list[bytes]:
    """``n`` seeded prompts: a random document of ``split``, a random offset, ``prompt_bytes`` long.

    Only the shards that the draws land on are read, so this stays cheap on large datasets.
    """
    ds = Dataset(data_dir)
    shards = ds.shards(split)
    if not shards:
        raise BytemtpError(f"{data_dir}: no {split} split to take prompts from")
    rng = random.Random(seed)
    cache: dict[int, list[bytes]] = {}
    prompts: list[bytes] = []
    for _ in range(100 * n):
        if len(prompts) == n:
            return prompts
        i = rng.randrange(len(shards))
        if i not in cache:
            cache[i] = [d for d in ds.read(shards[i]).docs() if len(d) >= prompt_bytes]
        if cache[i]:
            doc = rng.choice(cache[i])
            start = rng.randrange(len(doc) - prompt_bytes + 1)
            prompts.append(doc[start : start + prompt_bytes])
    raise BytemtpError(f"{data_dir}: too few {split} documents of at least {prompt_bytes} bytes for {n} prompts")


@dataclass
class ModeResult:
    """All runs of one decoding mode; ``draft_heads == 0`` is autoregressive."""

    draft_heads: int
    adaptive: bool = False
    tree: int = 0  # nodes of the draft tree verified per step (0: a chain)
    bytes_per_s: list[float] = field(default_factory=list)
    outputs: list[bytes] = field(default_factory=list)
    total: GenerationStats = field(init=False)  # counts summed over the runs

    def __post_init__(self) -> None:
        self.total = GenerationStats(self.draft_heads)

    @property
    def label(self) -> str:
        if not self.draft_heads:
            return "autoregressive"
        how = ", adaptive" if self.adaptive else f", tree of {self.tree}" if self.tree else ""
        return f"speculative ({self.draft_heads} drafts{how})"

    @property
    def median_bytes_per_s(self) -> float:
        return statistics.median(self.bytes_per_s)

    @property
    def bytes_per_forward(self) -> float:
        return self.total.bytes_per_forward

    @property
    def acceptance(self) -> list[float]:
        return self.total.acceptance

    def add(self, output: bytes, stats: GenerationStats) -> None:
        self.outputs.append(output)
        self.bytes_per_s.append(stats.bytes_per_s)
        self.total.absorb(stats)


@dataclass
class BenchReport:
    config: BenchConfig
    device: str
    model: dict[str, Any]
    ar: ModeResult
    spec: list[ModeResult]  # the last one uses every draft head (adaptively or as a tree, when asked)
    draft_costs: tuple[float, ...] | None = None  # the measured cost curve of the adaptive row

    def identical(self, mode: ModeResult) -> bool | None:
        """Greedy outputs equal to autoregressive for every prompt (None when sampling)."""
        return mode.outputs == self.ar.outputs if self.config.temperature == 0 else None

    def speedup(self, mode: ModeResult) -> float:
        return mode.median_bytes_per_s / self.ar.median_bytes_per_s

    def to_json(self) -> dict[str, Any]:
        main = self.spec[-1]
        row = lambda m: {  # noqa: E731
            "draft_heads": m.draft_heads,
            "adaptive": m.adaptive,
            "tree": m.tree,
            "bytes_per_s": m.median_bytes_per_s,
            "speedup": self.speedup(m),
            "bytes_per_forward": m.bytes_per_forward,
            "head_acceptance": m.acceptance,
            "identical": self.identical(m),
        }
        return {
            "device": self.device,
            "model": self.model,
            "prompts": self.config.prompts,
            "prompt_bytes": self.config.prompt_bytes,
            "max_bytes": self.config.max_bytes,
            "temperature": self.config.temperature,
            "ar_bytes_per_s": self.ar.median_bytes_per_s,
            "spec_bytes_per_s": main.median_bytes_per_s,
            "speedup": self.speedup(main),
            "bytes_per_forward": main.bytes_per_forward,
            "identical": self.identical(main),
            "head_acceptance": main.acceptance,
            "draft_costs": self.draft_costs,
            "rows": [row(self.ar)] + [row(m) for m in self.spec],
        }

    def table(self) -> str:
        c = self.config
        how = "greedy" if c.temperature == 0 else f"temperature {c.temperature}"
        lines = [
            f"{c.prompts} prompts x {c.max_bytes} bytes ({c.prompt_bytes}-byte prompts), {how}, on {self.device}; "
            f"model: n_future={self.model['n_future']} {self.model['head_kind']} heads, {self.model['params']:,} params",
            f"{'mode':<34}{'bytes/s':>10}{'speedup':>9}{'bytes/fwd':>11}{'identical':>11}  acceptance (h2, h3, ...)",
        ]
        for m in [self.ar, *self.spec]:
            same = self.identical(m) if m.draft_heads else None
            lines.append(
                f"{m.label:<34}{m.median_bytes_per_s:>10.1f}{self.speedup(m):>8.2f}x{m.bytes_per_forward:>11.2f}"
                f"{'-' if same is None else ('yes' if same else 'NO'):>11}  " + " ".join(f"{a:.2f}" for a in m.acceptance)
            )
        if self.draft_costs:
            lines.append("adaptive: forward cost by positions " + " ".join(f"{c:.2f}" for c in self.draft_costs))
        return "\n".join(lines)


def draft_rows(n_future: int, sweep: bool) -> list[int]:
    """Draft-head counts to measure: all of them, or the paper's 2/4/8 heads used when sweeping."""
    most = n_future - 1
    if most < 1:
        raise BytemtpError(f"the model has no draft heads (n_future={n_future}): nothing to compare")
    return sorted({d for d in (1, 3, 7) if d < most} | {most}) if sweep else [most]


def compiled_step(model: torch.nn.Module, enabled: bool | None = None) -> StepForward | None:
    """The per-step forward compiled with static shapes (CUDA graphs on a GPU), or None for eager.

    ``enabled=None`` decides as ``compile_model`` does: compile on CUDA, stay eager on the CPU.
    """
    cuda = next(model.parameters()).is_cuda
    if not (cuda if enabled is None else enabled):
        return None
    # One graph per shape met: (positions, heads) per draft row, times the cache lengths.
    # Dynamo's default of 8 would silently send the rest to eager once a sweep or the
    # adaptive row (1..n positions) exceeds it.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(model.decode, dynamic=False, mode="reduce-overhead" if cuda else None)


def run_bench(
    model: torch.nn.Module,
    prompts: list[bytes],
    config: BenchConfig,
    *,
    step_forward: StepForward | None = None,
    progress=None,
) -> BenchReport:
    """Decode every prompt in every mode, interleaved, and collect the numbers."""
    cfg = model.cfg
    modes = [ModeResult(0)] + [ModeResult(d) for d in draft_rows(cfg.n_future, config.sweep)]
    costs = None

    def run(mode: ModeResult, prompt: bytes, seed: int):
        gen = generate(
            model,
            GenerationConfig(
                prompt=prompt,
                max_new_bytes=config.max_bytes,
                temperature=config.temperature,
                top_k=config.top_k,
                top_p=config.top_p,
                seed=seed,
                speculative=mode.draft_heads > 0,
                draft_heads=mode.draft_heads or None,
                draft_costs=costs if mode.adaptive else None,
                tree_nodes=mode.tree,
            ),
            step_forward=step_forward,
        )
        return gen.read(), gen.stats

    with panels_enabled(config.panels):
        if config.adaptive:  # at the prompts' cache length: the compiled step's graphs then serve the generations too
            cache_len = generation_cache_length(cfg, prompts[0], config.max_bytes)
            costs = measure_step_costs(model, cfg.n_future, cache_len, step_forward)
            modes.append(ModeResult(cfg.n_future - 1, adaptive=True))
        modes += [ModeResult(cfg.n_future - 1, tree=n) for n in config.trees]
        for _ in range(config.warmup):
            for mode in modes:
                run(mode, prompts[0], config.seed)
        for i, prompt in enumerate(prompts):
            for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
                mode.add(*run(mode, prompt, config.seed + i))
            if progress is not None:
                progress.update(1)
    info = {
        "n_future": cfg.n_future,
        "head_kind": cfg.head_kind,
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "params": model.param_counts()["total"],
    }
    device = describe_device(next(model.parameters()).device, config.panels)
    return BenchReport(config, device, info, modes[0], modes[1:], costs)


def describe_device(device: torch.device, panels: bool) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, {'panel' if panels else 'BLAS'} matmuls)"
