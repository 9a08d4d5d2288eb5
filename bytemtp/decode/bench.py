"""Decode benchmark harness: autoregressive vs self-speculative decoding, side by side.

Speed claims are ratios measured in one process on the same prompts: for each
prompt every decoder runs once, in an order rotated per prompt so slow drift
(thermal, other load) hits every decoder alike, after untimed warm-up runs (which
also absorb ``torch.compile``). ``bytemtp.decode.report`` turns the runs into the
report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bytemtp.compile import compile_by_default, compile_decode_step
from bytemtp.decode.context import generation_cache_length
from bytemtp.decode.drafting import measure_step_costs
from bytemtp.decode.generate import Decoder, GenerationConfig
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
    trees: tuple[int, ...] = ()  # a row per draft tree size (nodes verified per step, bytemtp.decode.tree)
    batches: tuple[int, ...] = (1,)  # batch sizes: every decoder at each, rows decoded together
    draft_temperature: float | None = None  # sampled drafts (GenerationConfig.draft_temperature); None: its default
    draft_coupling: float | None = None  # sampled drafts follow the bytes before them (GenerationConfig)
    workload: str = "text"  # which prompts (bytemtp.decode.prompts.WORKLOADS)
    context_mixing: float | None = None  # chain drafts follow the rows' own trigrams (GenerationConfig)
    lookup: bool | None = None  # chain rows draft from a lookup of their own text (GenerationConfig)
    compare_plain: bool = False  # add a chain row drafting from the heads and the corpus only

    def __post_init__(self) -> None:
        require_at_least_one(self, ("prompts", "prompt_bytes", "max_bytes"), flags=True)
        self.trees = tuple(self.trees)
        self.batches = tuple(self.batches) or (1,)
        if min(self.batches) < 1:
            raise BytemtpError(f"--batch: must be at least 1, got {min(self.batches)}")
        for n in self.trees:
            check_tree_request(n)


def draft_rows(n_future: int, sweep: bool) -> list[int]:
    """Draft-head counts to measure: all of them, or the paper's 2/4/8 heads used when sweeping."""
    most = n_future - 1
    if most < 1:
        raise BytemtpError(f"the model has no draft heads (n_future={n_future}): nothing to compare")
    return sorted({d for d in (1, 3, 7) if d < most} | {most}) if sweep else [most]


def run_bench(
    model: torch.nn.Module, prompts: list[bytes], config: BenchConfig, *, compile: bool | None = False, progress=None
) -> BenchReport:
    """Decode every prompt with every decoder, interleaved, at every batch size, and collect the numbers.

    At batch size B the prompts are decoded B at a time (the last group wraps around to the
    first prompts); a group's bytes/s is all its rows' bytes over its wall time.
    """
    cfg, device = model.cfg, next(model.parameters()).device
    compile = compile_by_default(device) if compile is None else compile
    costs = None
    with panels_enabled(config.panels):
        if config.adaptive:  # at the prompts' cache length, as the generations use it
            cache_len = generation_cache_length(cfg, prompts[0], config.max_bytes)
            forward = compile_decode_step(model.decode, device, compile)
            costs = measure_step_costs(model, cfg.n_future, cache_len, forward)
        most = cfg.n_future - 1
        kinds = [(0, False, 0, False)] + [(d, False, 0, False) for d in draft_rows(cfg.n_future, config.sweep)]
        kinds += [(most, False, 0, True)] if config.compare_plain else []
        kinds += [(most, True, 0, False)] if config.adaptive else []
        kinds += [(most, False, n, False) for n in config.trees]
        decoders = {kind: Decoder(model, decoder_config(config, *kind, costs), compile) for kind in kinds}
        rows = []
        for batch in config.batches:
            modes = [DecoderResult(*kind, batch=batch) for kind in kinds]
            starts = range(0, len(prompts), batch)
            groups = [[(i + j) % len(prompts) for j in range(batch)] for i in starts]  # prompt numbers
            seeds = [[config.seed + n for n in group] for group in groups]
            groups = [[prompts[n] for n in group] for group in groups]
            for _ in range(config.warmup):
                for mode in modes:
                    decoders[mode.kind].generate(groups[0], seeds[0]).read_all()
            for i, (group, group_seeds) in enumerate(zip(groups, seeds)):
                for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
                    start = time.perf_counter()
                    gen = decoders[mode.kind].generate(group, group_seeds)
                    outputs = gen.read_all()
                    mode.add(outputs, [row.stats for row in gen.rows], time.perf_counter() - start)
                if progress is not None:
                    progress.update(1)
            rows.append(modes)
    info = {
        "n_future": cfg.n_future,
        "head_kind": cfg.head_kind,
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "params": model.param_counts()["total"],
        "byte_trigrams": model.byte_trigrams is not None,
    }
    return BenchReport(config, describe_device(device, config.panels, compile), info, rows, costs)


def decoder_config(
    config: BenchConfig, draft_heads: int, adaptive: bool, tree: int, plain: bool, costs: tuple[float, ...] | None
) -> GenerationConfig:
    """The generation settings of one decoder of the benchmark (``plain``: drafts from the heads and
    the corpus only, as before drafts from the rows' own text)."""
    return GenerationConfig(
        max_new_bytes=config.max_bytes,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        speculative=draft_heads > 0,
        draft_heads=draft_heads or None,
        draft_costs=costs if adaptive else None,
        tree_nodes=tree,
        draft_temperature=config.draft_temperature,
        draft_coupling=config.draft_coupling,
        context_mixing=0.0 if plain else config.context_mixing,
        lookup=False if plain else config.lookup,
    )
