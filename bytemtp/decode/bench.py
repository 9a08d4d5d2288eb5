"""Decode benchmark harness: autoregressive vs self-speculative decoding, side by side.

Speed claims are ratios measured in one process on the same prompts: for each
prompt every decoder runs once, in an order rotated per prompt so slow drift
(thermal, other load) hits every decoder alike, after untimed warm-up runs (which
also absorb ``torch.compile``). ``BenchReport`` sets the runs side by side: the speedup is
the ratio of median bytes/s, and with greedy decoding the outputs of all decoders must be
byte-identical, and the report says whether they were.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from bytemtp.compile import compile_by_default
from bytemtp.decode.context import generation_cache_length
from bytemtp.decode.drafting import CostTable
from bytemtp.decode.step_costs import adaptive_decoder
from bytemtp.decode.generate import Decoder, GenerationConfig
from bytemtp.decode.batch import GenerationStats
from bytemtp.decode.tree import check_tree_request
from bytemtp.errors import BytemtpError, require_at_least_one
from bytemtp.model.decode_dtype import cast_for_decoding
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
        # rows beyond the prompts would only repeat them, and take memory: a batch is at most the prompts
        self.batches = tuple(dict.fromkeys(min(b, self.prompts) for b in self.batches))
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
    model = cast_for_decoding(model)  # once for every decoder (bfloat16 on CUDA), and timed as they run it
    costs = None
    with panels_enabled(config.panels):
        most = cfg.n_future - 1
        kinds = [(0, False, 0, False)] + [(d, False, 0, False) for d in draft_rows(cfg.n_future, config.sweep)]
        kinds += [(most, False, 0, True)] if config.compare_plain else []
        kinds += [(most, False, n, False) for n in config.trees]
        decoders = {kind: Decoder(model, decoder_config(config, kind), compile) for kind in kinds}
        if config.adaptive:  # priced at the prompts' cache length and the batch sizes, as the generations run
            cache_len = generation_cache_length(cfg, prompts[0], config.max_bytes)
            kind = (most, True, 0, False)
            decoders[kind] = adaptive_decoder(model, decoder_config(config, kind), compile, cache_len, config.batches)
            costs = decoders[kind].config.draft_costs
            kinds.insert(len(kinds) - len(config.trees), kind)
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
        "draft_mlp": cfg.draft_mlp,
        "draft_next_byte": cfg.draft_next_byte,
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "params": model.param_counts()["total"],
        "byte_trigrams": model.byte_trigrams is not None,
        "fitted_coupling": model.fitted_coupling is not None,
    }
    return BenchReport(config, describe_device(device, config.panels, compile), info, rows, costs)


def decoder_config(config: BenchConfig, kind: tuple[int, bool, int, bool]) -> GenerationConfig:
    """The generation settings of one decoder of the benchmark, of ``kind`` (draft heads, adaptive,
    tree, plain: drafts from the heads and the corpus only, as before drafts from the rows' own
    text); an adaptive one's costs are measured with its own steps (``adaptive_decoder``)."""
    draft_heads, _, tree, plain = kind
    return GenerationConfig(
        max_new_bytes=config.max_bytes,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        speculative=draft_heads > 0,
        draft_heads=draft_heads or None,
        tree_nodes=tree,
        draft_temperature=config.draft_temperature if draft_heads else None,  # the autoregressive row drafts nothing
        draft_coupling=config.draft_coupling if draft_heads else None,
        context_mixing=None if not draft_heads else 0.0 if plain else config.context_mixing,
        lookup=None if not draft_heads else False if plain else config.lookup,
    )


@dataclass
class DecoderResult:
    """All runs of one decoder at one batch size; ``draft_heads == 0`` is autoregressive."""

    draft_heads: int
    adaptive: bool = False
    tree: int = 0  # nodes of the draft tree verified per step (0: a chain)
    plain: bool = False  # drafts from the heads and the corpus only, not from the rows' own text
    batch: int = 1  # rows decoded together
    bytes_per_s: list[float] = field(default_factory=list)  # per run: all its rows' bytes over its wall time
    outputs: list[bytes] = field(default_factory=list)  # every row of every run, in order
    total: GenerationStats = field(init=False)  # counts summed over the runs

    def __post_init__(self) -> None:
        self.total = GenerationStats(self.draft_heads)

    @property
    def kind(self) -> tuple[int, bool, int, bool]:
        return self.draft_heads, self.adaptive, self.tree, self.plain

    @property
    def label(self) -> str:
        if not self.draft_heads:
            return "autoregressive"
        how = ", adaptive" if self.adaptive else f", tree of {self.tree}" if self.tree else ""
        return f"speculative ({self.draft_heads} drafts{how}{', plain' if self.plain else ''})"

    @property
    def median_bytes_per_s(self) -> float:
        return statistics.median(self.bytes_per_s)

    @property
    def bytes_per_forward(self) -> float:
        return self.total.bytes_per_forward

    @property
    def acceptance(self) -> list[float]:
        return self.total.acceptance

    def add(self, outputs: list[bytes], stats: list[GenerationStats], wall_s: float) -> None:
        """One run: its rows' outputs and statistics, and its wall time."""
        self.outputs += outputs
        for row in stats:
            self.total.absorb(row)
        self.bytes_per_s.append(sum(row.bytes for row in stats) / wall_s)


@dataclass
class BenchReport:
    config: BenchConfig
    device: str
    model: dict[str, Any]
    batches: list[list[DecoderResult]]  # per batch size: autoregressive first, then the speculative decoders
    draft_costs: CostTable | None = None  # the adaptive row's measured costs, a curve per rows in a step

    @property
    def ar(self) -> DecoderResult:
        """Autoregressive decoding at the first batch size."""
        return self.batches[0][0]

    @property
    def spec(self) -> list[DecoderResult]:
        """The speculative decoders at the first batch size; the last uses every draft head
        (adaptively or as a tree, when asked)."""
        return self.batches[0][1:]

    def baseline(self, mode: DecoderResult) -> DecoderResult:
        """Autoregressive decoding at ``mode``'s batch size."""
        return next(rows[0] for rows in self.batches if rows[0].batch == mode.batch)

    def identical(self, mode: DecoderResult) -> bool | None:
        """Greedy outputs equal to autoregressive for every prompt (None when sampling)."""
        return mode.outputs == self.baseline(mode).outputs if self.config.temperature == 0 else None

    def speedup(self, mode: DecoderResult) -> float:
        return mode.median_bytes_per_s / self.baseline(mode).median_bytes_per_s

    def to_json(self) -> dict[str, Any]:
        main = self.spec[-1]
        row = lambda m: {  # noqa: E731
            "batch": m.batch,
            "draft_heads": m.draft_heads,
            "adaptive": m.adaptive,
            "tree": m.tree,
            "plain_drafts": m.plain,
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
            "workload": self.config.workload,
            "max_bytes": self.config.max_bytes,
            "temperature": self.config.temperature,
            "draft_temperature": self.draft_temperature,
            "draft_coupling": self.draft_coupling,
            "ar_bytes_per_s": self.ar.median_bytes_per_s,
            "spec_bytes_per_s": main.median_bytes_per_s,
            "speedup": self.speedup(main),
            "bytes_per_forward": main.bytes_per_forward,
            "identical": self.identical(main),
            "head_acceptance": main.acceptance,
            "draft_costs": self.draft_costs,
            "rows": [row(m) for rows in self.batches for m in rows],
        }

    @property
    def draft_temperature(self) -> float | None:
        """The temperature the drafts were drawn at (None: greedy)."""
        if self.config.temperature == 0:
            return None
        c = GenerationConfig(temperature=self.config.temperature, draft_temperature=self.config.draft_temperature)
        return c.draft_sampling.temperature

    @property
    def draft_coupling(self) -> float:
        """The strength of the drafts' coupling to the bytes before them in effect (0: none)."""
        c = GenerationConfig(temperature=self.config.temperature, draft_coupling=self.config.draft_coupling)
        fitted = self.fitted_coupling
        return c.coupling_for(c.sampling.greedy, fitted) if fitted or self.model.get("byte_trigrams", False) else 0.0

    @property
    def fitted_coupling(self) -> bool:
        """Whether the drafts followed a coupling table fitted to the model (greedy rows only)."""
        return self.config.temperature == 0 and self.model.get("fitted_coupling", False)

    def table(self) -> str:
        c = self.config
        fitted = "fitted, " if self.fitted_coupling else ""
        coupled = f"coupled {fitted}{self.draft_coupling:g}" if self.draft_coupling else ""
        if c.temperature:
            how = f"temperature {c.temperature} (drafts {self.draft_temperature:g}{', ' if coupled else ''}{coupled})"
        else:
            how = f"greedy (chain drafts {coupled})" if coupled else "greedy"
        lines = [
            f"{c.prompts} {c.workload} prompts x {c.max_bytes} bytes ({c.prompt_bytes}-byte prompts), {how}, "
            f"on {self.device}; "
            f"model: n_future={self.model['n_future']} {self.model['head_kind']} heads"
            f"{_draft_mlps(self.model)}, {self.model['params']:,} params",
            f"{'batch':>5}  {'mode':<34}{'bytes/s':>10}{'speedup':>9}{'bytes/fwd':>11}{'identical':>11}"
            "  acceptance (h2, h3, ...)",
        ]
        for m in (m for rows in self.batches for m in rows):
            same = self.identical(m) if m.draft_heads else None
            lines.append(
                f"{m.batch:>5}  {m.label:<34}{m.median_bytes_per_s:>10.1f}{self.speedup(m):>8.2f}x"
                f"{m.bytes_per_forward:>11.2f}{'-' if same is None else ('yes' if same else 'NO'):>11}  "
                + " ".join(f"{a:.2f}" for a in m.acceptance)
            )
        for batch in sorted(set(self.config.batches)) if self.draft_costs else ():
            curve = self.draft_costs[batch - 1]
            lines.append(f"adaptive: forward cost by positions at batch {batch}: " + " ".join(f"{c:.2f}" for c in curve))
        return "\n".join(lines)


def describe_device(device: torch.device, panels: bool, compiled: bool | None) -> str:
    how = ", compiled step" if compiled else ""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}{how})"
    return f"cpu ({torch.get_num_threads()} threads, {'prepacked' if panels else 'F.linear'} matmuls{how})"


def _draft_mlps(model: dict) -> str:
    """How a model's draft heads read their features, when not directly (``draft_mlp``)."""
    if not model.get("draft_mlp"):
        return ""
    reading = " that read the next byte" if model.get("draft_next_byte") else ""
    return f" (draft heads through {model['draft_mlp']}-wide MLPs{reading})"
