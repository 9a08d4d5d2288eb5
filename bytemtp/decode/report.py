"""What a decode benchmark measured: each decoder's runs, and the report that sets them side by side.

The speedup is the ratio of median bytes/s. With greedy decoding the outputs of all
decoders must be byte-identical, and the report says whether they were.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from bytemtp.decode.config import GenerationConfig, GenerationStats

if TYPE_CHECKING:
    from bytemtp.decode.bench import BenchConfig


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
    draft_costs: tuple[float, ...] | None = None  # the measured cost curve of the adaptive row

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
        return c.coupling_strength if self.model.get("byte_trigrams", False) else 0.0

    def table(self) -> str:
        c = self.config
        coupled = f"coupled {self.draft_coupling:g}" if self.draft_coupling else ""
        if c.temperature:
            how = f"temperature {c.temperature} (drafts {self.draft_temperature:g}{', ' if coupled else ''}{coupled})"
        else:
            how = f"greedy (chain drafts {coupled})" if coupled else "greedy"
        lines = [
            f"{c.prompts} {c.workload} prompts x {c.max_bytes} bytes ({c.prompt_bytes}-byte prompts), {how}, "
            f"on {self.device}; "
            f"model: n_future={self.model['n_future']} {self.model['head_kind']} heads, "
            f"{self.model['params']:,} params",
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
        if self.draft_costs:
            lines.append("adaptive: forward cost by positions " + " ".join(f"{c:.2f}" for c in self.draft_costs))
        return "\n".join(lines)


def describe_device(device: torch.device, panels: bool, compiled: bool | None) -> str:
    how = ", compiled step" if compiled else ""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}{how})"
    return f"cpu ({torch.get_num_threads()} threads, {'prepacked' if panels else 'F.linear'} matmuls{how})"
