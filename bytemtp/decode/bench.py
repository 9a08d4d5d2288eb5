"""Decode benchmark harness: autoregressive vs self-speculative decoding, side by side.

Speed claims are ratios measured in one process on the same prompts: for each
prompt every decoder runs once, in an order rotated per prompt so slow drift
(thermal, other load) hits every decoder alike, after untimed warm-up runs (which
also absorb ``torch.compile``). ``bytemtp.decode.report`` turns the runs into the
report.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bytemtp.decode.drafting import measure_step_costs
from bytemtp.decode.generate import GenerationConfig, StepForward, generate, generation_cache_length
from bytemtp.decode.report import BenchReport, DecoderResult, describe_device
from bytemtp.decode.tree import check_tree_request
from bytemtp.errors import BytemtpError, require_at_least_one
from bytemtp.model.panels import panels_enabled


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


def draft_rows(n_future: int, sweep: bool) -> list[int]:
    """Draft-head counts to measure: all of them, or the paper's 2/4/8 heads used when sweeping."""
    most = n_future - 1
    if most < 1:
        raise BytemtpError(f"the model has no draft heads (n_future={n_future}): nothing to compare")
    return sorted({d for d in (1, 3, 7) if d < most} | {most}) if sweep else [most]


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
    modes = [DecoderResult(0)] + [DecoderResult(d) for d in draft_rows(cfg.n_future, config.sweep)]
    costs = None

    def run(mode: DecoderResult, prompt: bytes, seed: int):
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
            modes.append(DecoderResult(cfg.n_future - 1, adaptive=True))
        modes += [DecoderResult(cfg.n_future - 1, tree=n) for n in config.trees]
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


