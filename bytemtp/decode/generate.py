"""Generation: ``generate(model, config, prompts)`` decodes a list of prompts together.

Autoregressive decoding runs head 1 alone, one position per row and forward.
Self-speculative decoding lets heads 2..(1 + draft_heads) draft the bytes after head 1's
choice; the next forward verifies the drafts with head 1 and drafts the next block, so
there is one forward per step either way, and the output is the same as autoregressive
decoding's: byte for byte when greedy, in distribution when sampling. Every row draws
its random numbers from its own generator, seeded by its own seed, so a row's output
does not depend on what else is in the batch. ``bytemtp.decode.engine`` runs the batch.

A ``Decoder`` is a model with its decoding settings and (with ``compile``) its compiled
step, kept for many generations: a compiled step is compiled once per (rows, positions).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import torch

from bytemtp.compile import compile_decode_step
from bytemtp.decode.batch import GenerationStats, Row
from bytemtp.decode.chain import ChainDrafts
from bytemtp.decode.config import GenerationConfig
from bytemtp.decode.context import generation_cache_length
from bytemtp.decode.coupling import (
    UNCOUPLED, DraftContext, HostContext, draft_context, fitted_context, host_arrays, placed,
)
from bytemtp.decode.engine import DraftStrategy, Engine
from bytemtp.decode.sampled_tree import SampledTreeDrafts
from bytemtp.decode.sampling import RowSampling, SamplingConfig, draft_sampling
from bytemtp.decode.step import chain_step, sampled_tree_step, tree_step
from bytemtp.decode.tree import TreeDrafts, check_tree_size
from bytemtp.decode.verify import ChainRule
from bytemtp.errors import BytemtpError
from bytemtp.model.decode_dtype import cast_for_decoding


class Decoder:
    """``model`` decoding as ``config`` says (its prompt and seed aside); ``compile``: the step
    compiled (None: as ``bytemtp.compile.compile_by_default`` decides for the device); ``dtype``:
    of weights and cache (None: ``decoding_dtype``; ``bench/gpu_check.py`` decodes in float32 on a
    GPU, where greedy identity is exact, besides bfloat16, where it holds up to near-ties)."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: GenerationConfig,
        compile: bool | None = False,
        dtype: torch.dtype | None = None,
    ):
        # bfloat16 weights and cache on CUDA (a step's time there is memory traffic), float32 elsewhere
        self.model = model = cast_for_decoding(model, dtype)
        self.config = config
        self.device = next(model.parameters()).device
        self.n_drafts = config.n_drafts(model.cfg.n_future)
        self.tree_nodes = config.tree_nodes if self.n_drafts else 0
        self._rules: dict[SamplingConfig, tuple[ChainRule, HostContext]] = {}
        # the latest rule of rows sampled differently: a batch keeps its mix for many steps
        self._mixed: tuple[tuple[SamplingConfig, ...], tuple[ChainRule, HostContext]] | None = None
        self.context, self.host_context = self.coupling(config.sampling.greedy)
        if self.tree_nodes:
            check_tree_size(self.tree_nodes, self.n_drafts, model.cfg.max_seq_len)
            if config.sampling.greedy:
                step = functools.partial(tree_step, model, self.n_drafts)
            else:
                max_path = min(self.tree_nodes, self.n_drafts)
                step = functools.partial(
                    sampled_tree_step, model, config.sampling, self.n_drafts, max_path,
                    draft_sampling=config.draft_sampling, context=self.context,
                )
        else:
            self.rule = ChainRule(config.sampling, config.draft_sampling, self.context)
            step = functools.partial(chain_step, model, self.rule, self.n_drafts)
        self.step = compile_decode_step(step, self.device, compile)

    def coupling(self, greedy: bool) -> tuple[DraftContext | None, HostContext]:
        """Drafts coupled to the bytes before them (``bytemtp.decode.coupling``) for greedy or sampled
        rows: the tensors for the steps' tensor code, the host arrays for the eager steps' kernels."""
        fitted = self.model.fitted_coupling if greedy else None  # fitted for greedy rows only
        strength, trigrams = self.config.coupling_for(greedy, fitted is not None), self.model.byte_trigrams
        if strength == 0 or (trigrams is None and fitted is None) or not self.n_drafts:
            return None, UNCOUPLED
        if fitted is not None:
            context = fitted_context(fitted, strength)
        else:
            context = draft_context(trigrams.cpu(), strength, self.model.cfg.vocab)
        return placed(context, self.device), host_arrays(context)

    def chain_rule(self, sampling: SamplingConfig | list[SamplingConfig]) -> tuple[ChainRule, HostContext]:
        """The chain rule for rows sampled as ``sampling``, or each row as listed (``RowSampling``),
        with the draft coupling for them (a mixed batch's greedy rows draft point masses, which
        coupling leaves as they are), and its context's host arrays."""
        dt = self.config.draft_temperature
        if isinstance(sampling, list):
            key = tuple(sampling)
            if self._mixed is None or self._mixed[0] != key:
                draft = RowSampling.of([draft_sampling(s, dt) for s in sampling], self.device)
                context, host = self.coupling(greedy=False)
                self._mixed = key, (ChainRule(RowSampling.of(sampling, self.device), draft, context), host)
            return self._mixed[1]
        if sampling not in self._rules:
            context, host = self.coupling(sampling.greedy)
            self._rules[sampling] = ChainRule(sampling, draft_sampling(sampling, dt), context), host
        return self._rules[sampling]

    def strategy(self, n_rows: int) -> DraftStrategy:
        """Fresh drafting state for a generation of ``n_rows`` rows."""
        if self.tree_nodes and self.config.sampling.greedy:
            return TreeDrafts(self.model, self.tree_nodes, self.n_drafts, self.step)
        if self.tree_nodes:
            return SampledTreeDrafts(
                self.model, self.config.sampling, self.tree_nodes, self.n_drafts, self.step,
                self.config.draft_sampling, self.host_context,
            )
        policy = self.config.draft_policy(self.n_drafts)
        return ChainDrafts(
            self.model, self.rule, self.n_drafts, policy, self.step, self.host_context, self.chain_rule,
            self.config.context_drafting,
        )

    def engine(self, n_slots: int, cache_len: int) -> Engine:
        """An engine of ``n_slots`` rows with caches of ``cache_len`` positions, decoding as configured;
        its rows bring their own sampling settings, stop strings, seeds and budgets."""
        strategy = self.strategy(n_slots)
        return Engine(self.model, strategy, n_slots, cache_len, eager=self.step is None, stop_at_bos=self.config.stop_at_bos)

    def generate(
        self, prompts: Sequence[bytes] | None = None, seeds: Sequence[int | None] | None = None
    ) -> "Generation":
        """Start decoding ``prompts`` (default: the config's one), row i sampling with ``seeds[i]``
        (default: the config's seed plus i, or fresh seeds). Nothing runs until it is iterated."""
        prompts = [self.config.prompt] if prompts is None else [bytes(p) for p in prompts]
        if not prompts:
            raise BytemtpError("generate: no prompts")
        if seeds is None:
            seeds = [None if self.config.seed is None else self.config.seed + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise BytemtpError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
        cfg = self.config
        cache_len = max(generation_cache_length(self.model.cfg, p, cfg.max_new_bytes, self.tree_nodes) for p in prompts)
        engine = self.engine(len(prompts), cache_len)
        rows = [engine.row(p, cfg.row_params(seed), i) for i, (p, seed) in enumerate(zip(prompts, seeds))]
        return Generation(engine, rows)


def generate(
    model: torch.nn.Module,
    config: GenerationConfig,
    prompts: Sequence[bytes] | None = None,
    seeds: Sequence[int | None] | None = None,
    *,
    compile: bool | None = False,
) -> "Generation":
    """Decode ``prompts`` (default: ``config.prompt``) together; see ``Decoder.generate``."""
    return Decoder(model, config, compile).generate(prompts, seeds)


class Generation:
    """A running generation. ``stream()`` yields ``(row, bytes)`` as bytes are decided; for a
    single prompt, iterating yields its byte chunks. Statistics are complete at the end.

    Drive it to the end (or ``close()`` it): the model's KV cache is allocated for the
    generation and released when it finishes.
    """

    def __init__(self, engine: Engine, rows: list[Row]):
        self.rows = rows
        self._events = engine.run(rows)
        self._chunks = (chunk for _, chunk in self._events)

    @property
    def stats(self) -> GenerationStats:
        """The first row's statistics (the only row's, for one prompt)."""
        return self.rows[0].stats

    def stream(self) -> Iterator[tuple[int, bytes]]:
        return self._events

    def __iter__(self) -> Iterator[bytes]:
        if len(self.rows) != 1:
            raise BytemtpError("a generation of several prompts streams (row, bytes) pairs: use stream()")
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        self._events.close()

    def read(self) -> bytes:
        """All remaining output of a single-prompt generation at once."""
        return b"".join(self)

    def read_all(self) -> list[bytes]:
        """All remaining output, one bytes object per prompt."""
        out = [bytearray() for _ in self.rows]
        for r, chunk in self._events:
            out[r] += chunk
        return [bytes(o) for o in out]
