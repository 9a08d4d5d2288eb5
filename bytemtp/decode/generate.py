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
from bytemtp.decode.batch import Batch, Row
from bytemtp.decode.chain import ChainDrafts
from bytemtp.decode.config import GenerationConfig, GenerationStats
from bytemtp.decode.context import generation_cache_length, prompt_context
from bytemtp.decode.coupling import UNCOUPLED, draft_context, host_arrays
from bytemtp.decode.engine import DraftStrategy, Engine
from bytemtp.decode.sampled_tree import SampledTreeDrafts
from bytemtp.decode.step import chain_step, sampled_tree_step, tree_step
from bytemtp.decode.stops import StopMatcher
from bytemtp.decode.tree import TreeDrafts, check_tree_size
from bytemtp.decode.verify import ChainRule
from bytemtp.errors import BytemtpError
from bytemtp.model.decode_dtype import cast_for_decoding


class Decoder:
    """``model`` decoding as ``config`` says (its prompt and seed aside); ``compile``: the step
    compiled (None: as ``bytemtp.compile.compile_by_default`` decides for the device)."""

    def __init__(self, model: torch.nn.Module, config: GenerationConfig, compile: bool | None = False):
        # bfloat16 weights and cache on CUDA (a step's time there is memory traffic), float32 elsewhere
        self.model = model = cast_for_decoding(model)
        self.config = config
        self.device = next(model.parameters()).device
        self.n_drafts = config.n_drafts(model.cfg.n_future)
        self.tree_nodes = config.tree_nodes if self.n_drafts else 0
        # drafts coupled to the bytes before them (bytemtp.decode.coupling): the tensors for the steps'
        # tensor code, the host arrays for the eager steps' kernels
        self.context, self.host_context = None, UNCOUPLED
        if config.coupling_strength > 0 and model.byte_trigrams is not None and self.n_drafts:
            context = draft_context(model.byte_trigrams.cpu(), config.coupling_strength, model.cfg.vocab)
            self.context, self.host_context = context.to(self.device), host_arrays(context)
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
            confidence = config.draft_costs is not None
            self.rule = ChainRule(config.sampling, confidence, config.draft_sampling, self.context)
            step = functools.partial(chain_step, model, self.rule, self.n_drafts)
        self.step = compile_decode_step(step, self.device, compile)

    def strategy(self, n_rows: int) -> DraftStrategy:
        """Fresh drafting state for a generation of ``n_rows`` rows."""
        if self.tree_nodes and self.config.sampling.greedy:
            return TreeDrafts(self.model, self.tree_nodes, self.n_drafts, self.step)
        if self.tree_nodes:
            return SampledTreeDrafts(
                self.model, self.config.sampling, self.tree_nodes, self.n_drafts, self.step,
                self.config.draft_sampling, self.host_context,
            )
        policy = self.config.draft_policy(self.n_drafts, self.device)
        return ChainDrafts(
            self.model, self.rule, self.n_drafts, policy, self.step, self.host_context, self.config.context_drafting
        )

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
        window, cfg = self.model.cfg.max_seq_len, self.config
        rows = []
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            context = prompt_context(prompt, window)
            stats = GenerationStats(self.n_drafts, prompt_bytes_dropped=max(0, len(prompt) - len(context)))
            generator = None
            if not cfg.sampling.greedy:
                generator = torch.Generator()
                stats.seed = generator.seed() if seed is None else seed
                generator.manual_seed(stats.seed)
            rows.append(Row(i, context, StopMatcher(cfg.stop), stats, generator))
        cache_len = max(generation_cache_length(self.model.cfg, p, cfg.max_new_bytes, self.tree_nodes) for p in prompts)
        batch = Batch(rows, cache_len, self.device, eager=self.step is None)
        engine = Engine(self.model, self.strategy(len(rows)), batch, cfg.max_new_bytes, cfg.stop_at_bos)
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
        self._events = engine.run()
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
