"""Generation: autoregressive and self-speculative decoding, sampling, stop strings, the window."""

from __future__ import annotations

import functools
import itertools
import math
import zlib
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest
import torch

from fixtures_train import stdlib_corpus, trained_by_kind, trained_model

from bytemtp import BOS, VOCAB
from bytemtp.model.config import ModelConfig
from bytemtp.errors import BytemtpError
from bytemtp.decode.batch import STOP_REASONS, GenerationStats
from bytemtp.decode.config import GenerationConfig
from bytemtp.decode.coupling import DraftContext
from bytemtp.decode.context import cache_length, prompt_context, window_keep
from bytemtp.decode.generate import Decoder, generate
from bytemtp.model.transformer import ByteMTP
from bytemtp.decode.sampling import SamplingConfig, draw, probabilities
from bytemtp.decode.step import chain_step
from bytemtp.decode.stops import StopMatcher
from bytemtp.decode.verify import ChainRule, Uniforms


class Result(NamedTuple):
    output: bytes
    stats: GenerationStats


def run(model, **kw) -> Result:
    gen = generate(model, GenerationConfig(**kw))
    return Result(gen.read(), gen.stats)


def random_model(head_kind: str = "linear", n_future: int = 4, max_seq_len: int = 48, seed: int = 0) -> ByteMTP:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_layers=2, n_attn_heads=4, n_future=n_future, head_kind=head_kind,
                      max_seq_len=max_seq_len)
    return ByteMTP(cfg).eval()


# -- a fake model whose logits the test controls ---------------------------------------


class StubLM(torch.nn.Module):
    """Stands in for ``ByteMTP``: same decoding interface, logits from ``logits_fn(context, head)``.

    The context of a position is what its row's cache holds up to and including it, so
    (as in the real model) a stale or wrong cache entry changes the prediction.
    Every forward is recorded as ``(ids, positions, n_heads)`` of its first row.
    """

    def __init__(self, logits_fn: Callable[[tuple[int, ...], int], torch.Tensor], n_future: int = 4,
                 max_seq_len: int = 256):
        super().__init__()
        self.cfg = ModelConfig(d_model=8, n_layers=1, n_attn_heads=2, n_future=n_future, max_seq_len=max_seq_len)
        self.logits_fn = logits_fn
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the stub a device
        self.cache: list[list[int]] | None = None
        self.calls: list[tuple[list[int], list[int], int]] = []
        self.byte_trigrams = None  # no training data: sampled drafts go uncoupled
        self.fitted_coupling = None  # nor a coupling table fitted to the heads

    def setup_cache(self, batch_size: int, max_len: int, dtype=None) -> None:
        self.cache = [[-1] * max_len for _ in range(batch_size)]

    def clear_cache(self) -> None:
        self.cache = None

    def decode(self, ids: torch.Tensor, input_pos: torch.Tensor, n_heads: int, rope_pos=None, mask=None,
               kv_len: int | None = None, rows: list[int] | None = None, spread: bool = True):
        """``ByteMTP.decode``'s contract (chains); the stub's draft features are its draft logits.
        Rows not in ``rows`` are not computed: zeros, their cache untouched (``spread=False``: the
        computed rows' outputs only)."""
        rows = range(ids.shape[0]) if rows is None else rows
        assert kv_len is None or int(input_pos[rows].max()) < kv_len <= len(self.cache[0])  # positions see themselves
        self.calls.append((ids[rows[0]].tolist(), input_pos[rows[0]].tolist(), n_heads))
        logits = torch.zeros(*ids.shape, n_heads, VOCAB)
        for r in rows:
            cache, row_pos = self.cache[r], input_pos[r].tolist()
            for i, p in zip(ids[r].tolist(), row_pos):
                cache[p] = i
            logits[r] = torch.stack([torch.stack([self.logits_fn(tuple(cache[: p + 1]), k) for k in range(n_heads)])
                                     for p in row_pos])
        logits = logits if spread or rows == range(ids.shape[0]) else logits[list(rows)]
        return logits[:, :, 0], logits[:, :, 1:]

    def draft_logits(self, features: torch.Tensor, n_drafts: int, next_ids: torch.Tensor | None = None) -> torch.Tensor:
        return features[..., :n_drafts, :]  # the script's drafts do not read the decided byte


def one_hot(i: int) -> torch.Tensor:
    return torch.zeros(VOCAB).index_fill_(0, torch.tensor([i]), 20.0)


POISON = 0  # what the script stub predicts from a context that went wrong


def script_stub(expected: list[int], draft_ok: Callable[[int, int], bool] = lambda t, k: True, **kw) -> StubLM:
    """Head 1 continues ``expected`` (BOS + prompt + the script) if the context agrees with it.

    Head k+1 at position t predicts ``expected[t + k + 1]`` when ``draft_ok(t, k)``
    and a wrong byte otherwise.
    """

    def logits(ctx: tuple[int, ...], k: int) -> torch.Tensor:
        t = len(ctx) - 1
        on_script = ctx == tuple(expected[: t + 1]) and t + k + 1 < len(expected)
        target = expected[t + k + 1] if on_script else POISON
        if k and not draft_ok(t, k):
            target = (target + 1) % VOCAB
        return one_hot(target)

    return StubLM(logits, **kw)


def scripted(prompt: bytes, script: bytes | list[int], **kw) -> StubLM:
    return script_stub([BOS, *prompt, *script], **kw)


SCRIPT = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs."


# -- speculative greedy == autoregressive greedy ---------------------------------------


def assert_same_greedy(model, prompt: bytes, n: int, draft_heads: int | None = None) -> tuple[Result, Result]:
    ar = run(model, prompt=prompt, max_new_bytes=n, speculative=False)
    sp = run(model, prompt=prompt, max_new_bytes=n, speculative=True, draft_heads=draft_heads)
    assert sp.output == ar.output, (prompt, draft_heads)
    assert sp.stats.bytes == ar.stats.bytes and sp.stats.stop_reason == ar.stats.stop_reason in STOP_REASONS
    # One forward per byte (and one for a generated BOS, which ends the document).
    assert ar.stats.forwards == ar.stats.bytes + (ar.stats.stop_reason == "end_of_document")
    return ar, sp


@pytest.mark.parametrize("head_kind", ["linear", "transformer"])
def test_speculative_greedy_matches_autoregressive_random_weights(head_kind):
    model = random_model(head_kind, n_future=4, max_seq_len=24)
    prompts = [b"", bytes(range(200, 230)), b"x" * 23, b"\xff\xfe import os\n"]
    for prompt, n, draft_heads in itertools.product(prompts, (5, 50), (1, 3)):
        assert_same_greedy(model, prompt, n, draft_heads)


def test_speculative_greedy_matches_autoregressive_on_the_panel_kernel():
    """At d = 512 as at every width, the CPU decode matmuls run on ``bytemtp_native.panels``."""
    torch.manual_seed(0)
    model = ByteMTP(ModelConfig(d_model=512, n_layers=1, n_attn_heads=8, n_future=8, max_seq_len=96)).eval()
    for prompt, draft_heads in itertools.product([b"", b"def main():\n    return"], (3, 7)):
        assert_same_greedy(model, prompt, 60, draft_heads)
    assert isinstance(model.blocks[0].mlp.w_in._panels.value, np.ndarray)


@pytest.mark.parametrize("tree_nodes", [0, 8])
@pytest.mark.parametrize("temperature, top_k", [(0.0, 0), (1.0, 1)])
def test_draft_heads_read_the_byte_head_one_decided(monkeypatch, tree_nodes, temperature, top_k):
    """``draft_next_byte``: chains and trees, greedy and sampled (top-k 1: a sampling path whose draws
    are head 1's top byte), hand the draft heads the byte head 1 decided at the position they draft
    from: its top byte there, recomputed here from the features the heads read."""
    model = trained_by_kind("next_byte")
    seen, draft_logits = [], model.draft_logits

    def recording(features, n_drafts, next_ids=None):
        seen.append((features[..., 0, :].clone(), next_ids.clone()))
        return draft_logits(features, n_drafts, next_ids)

    monkeypatch.setattr(model, "draft_logits", recording)
    run(model, prompt=b"    def __init__(self", max_new_bytes=60, speculative=True, temperature=temperature,
        top_k=top_k, tree_nodes=tree_nodes, seed=0)
    assert len(seen) >= 5
    for features, next_ids in seen:
        with torch.inference_mode():
            head_one = model.features_logits(features, 0)
        assert (head_one.gather(-1, next_ids[..., None])[..., 0] >= head_one.amax(-1) - 1e-4).all()


@pytest.mark.parametrize("head_kind", ["linear", "transformer", "mlp", "next_byte"])
def test_speculative_greedy_matches_autoregressive_trained(head_kind):
    model = trained_by_kind(head_kind)
    n_drafts = model.cfg.n_future - 1
    corpus = stdlib_corpus()
    starts = torch.randint(0, len(corpus) - 100, (2,), generator=torch.Generator().manual_seed(1)).tolist()
    prompts = [b"", b"    '"] + [bytes(corpus[s : s + n].tolist()) for s, n in zip(starts, (17, 100))]
    accepted = rejected = 0
    for prompt, draft_heads in itertools.product(prompts, sorted({1, 3, n_drafts})):
        _, sp = assert_same_greedy(model, prompt, 100 if draft_heads == n_drafts else 40, draft_heads)
        accepted += sum(sp.stats.accepted)
        rejected += sum(sp.stats.attempted) - sum(sp.stats.accepted)
    assert accepted > 80 and rejected > 30  # the drafts were right often, and wrong often enough


def test_cache_is_sized_to_the_generation():
    """Attention reads the whole cache: a short generation must not pay for the full window."""
    assert cache_length(10, 20, 3, 1024) == 64
    assert cache_length(65, 256, 7, 1024) == 384
    assert cache_length(900, 256, 7, 1024) == 1024  # longer than the window: the window, cut as usual


def test_window_cut_keeps_speculative_identical():
    window, keep = 16, window_keep(16)
    assert keep == 8
    ar, sp = assert_same_greedy(random_model(max_seq_len=window), b"abc", 100)
    # The window fills when it holds 16 ids and the next byte needs a position: the
    # newest 8 ids (that byte included) are then re-encoded.
    held, cuts = 4, 0
    for _ in range(99):  # every generated byte but the last is fed back
        held, cuts = (keep, cuts + 1) if held == window else (held + 1, cuts)
    assert ar.stats.window_cuts == sp.stats.window_cuts == cuts > 0
    assert ar.stats.forwards == 100 and sp.stats.forwards <= ar.stats.forwards


def test_window_cut_feeds_the_newest_ids():
    # The script stub answers POISON as soon as the context is not the script from
    # position 0, so the byte after the first cut shows that the cut happened.
    window, keep = 8, window_keep(8)
    stub = scripted(b"", SCRIPT, max_seq_len=window)
    gen = run(stub, max_new_bytes=12, speculative=False)
    assert gen.output[:window] == SCRIPT[:window] and gen.output[window] == POISON
    cut = [(ids, pos) for ids, pos, _ in stub.calls if pos[0] == 0][1]
    assert cut == ([BOS, *SCRIPT[:window]][-keep:], list(range(keep)))


# -- accept logic and forward counts on scripted stubs -----------------------------------

def forwards_expected(n_bytes: int, n_drafts: int, draft_ok, first_pos: int) -> int:
    """Forwards blockwise decoding needs: the prompt's, then one per block of accepted drafts + 1."""
    done, forwards, pos = 1, 1, first_pos
    while done < n_bytes:
        accepted = 0
        while accepted < n_drafts and draft_ok(pos, accepted + 1):
            accepted += 1
        done, forwards, pos = done + accepted + 1, forwards + 1, pos + accepted + 1
    return forwards


@pytest.mark.parametrize(
    "name, draft_ok",
    [
        ("always", lambda t, k: True),
        ("never", lambda t, k: False),
        ("sometimes", lambda t, k: k <= t % 4),
        ("head 3 only", lambda t, k: k != 2),
    ],
)
@pytest.mark.parametrize("n_drafts", [1, 3])
def test_accept_logic_on_scripted_drafts(name, draft_ok, n_drafts):
    prompt, n = b"Q: ", 60
    stub = scripted(prompt, SCRIPT, draft_ok=draft_ok)
    gen = run(stub, prompt=prompt, max_new_bytes=n, draft_heads=n_drafts)
    assert gen.output == SCRIPT[:n]
    assert gen.stats.forwards == forwards_expected(n, n_drafts, draft_ok, len(prompt))
    assert gen.stats.bytes_per_forward == n / gen.stats.forwards
    # Every step feeds the pending byte plus the drafts and asks for 1 + n_drafts heads.
    assert all(len(ids) == 1 + n_drafts and nh == 1 + n_drafts for ids, _, nh in stub.calls[1:])
    if name == "always":
        assert gen.stats.forwards == 1 + math.ceil((n - 1) / (n_drafts + 1))
        assert gen.stats.acceptance == [1.0] * n_drafts
    if name == "never":
        assert gen.stats.forwards == n
        assert gen.stats.acceptance[0] == 0 and gen.stats.attempted[1:] == [0] * (n_drafts - 1)


def test_acceptance_counts_per_head():
    # Head 2 always right, head 3 right on even positions, head 4 never.
    stub = scripted(b"", SCRIPT, draft_ok=lambda t, k: k == 1 or (k == 2 and t % 2 == 0))
    stats = run(stub, max_new_bytes=40, draft_heads=3).stats
    assert stats.attempted[0] == stats.forwards - 1 == stats.accepted[0]
    assert stats.attempted[1] == stats.forwards - 1 and 0 < stats.accepted[1] < stats.attempted[1]
    assert stats.attempted[2] == stats.accepted[1] and stats.accepted[2] == 0


def test_autoregressive_runs_head_one_on_one_position():
    prompt = b"abc"
    stub = scripted(prompt, SCRIPT)
    gen = run(stub, prompt=prompt, max_new_bytes=10, speculative=False)
    assert gen.output == SCRIPT[:10] and gen.stats.mode == "autoregressive"
    first, *steps = stub.calls
    assert first == ([BOS, *prompt], [0, 1, 2, 3], 1)
    assert steps == [([b], [4 + i], 1) for i, b in enumerate(SCRIPT[:9])]


def test_default_is_speculative_with_all_draft_heads():
    stub = scripted(b"", SCRIPT, n_future=5)
    gen = run(stub, max_new_bytes=11)
    assert gen.stats.mode == "speculative" and gen.stats.draft_heads == 4
    assert gen.stats.forwards == 3 and stub.calls[1][2] == 5


def test_rejected_drafts_leave_no_trace_in_the_context():
    # The script stub answers POISON to any context that is not exactly the script, so
    # the output would go wrong if a rejected draft stayed visible in the cache.
    stub = scripted(b"", SCRIPT, draft_ok=lambda t, k: k == 1 or t % 3)
    assert run(stub, max_new_bytes=len(SCRIPT), draft_heads=3).output == SCRIPT


def test_generated_bos_ends_the_document_in_both_modes():
    script = [*b"one two", BOS, *b"three"]
    for speculative in (False, True):
        gen = run(scripted(b"", script), max_new_bytes=50, speculative=speculative)
        assert gen.output == b"one two" and gen.stats.stop_reason == "end_of_document"
        assert gen.stats.bytes == 7


def test_max_bytes_cuts_inside_a_block():
    gen = run(scripted(b"", SCRIPT), max_new_bytes=6, draft_heads=3)
    assert gen.output == SCRIPT[:6] and gen.stats.stop_reason == "max_bytes"
    assert gen.stats.forwards == 3  # 1 + 4 bytes + the 6th of the next block


def test_zero_bytes_runs_nothing():
    stub = scripted(b"", SCRIPT)
    gen = run(stub, prompt=b"hi", max_new_bytes=0)
    assert gen.output == b"" and gen.stats.forwards == 0 and gen.stats.stop_reason == "max_bytes"
    assert stub.calls == []


def test_empty_prompt_is_just_bos():
    stub = scripted(b"", SCRIPT)
    assert run(stub, max_new_bytes=5).output == SCRIPT[:5]
    assert stub.calls[0][0] == [BOS]


def test_long_prompt_keeps_the_newest_bytes():
    prompt = bytes(range(100))
    window = 32
    ctx = prompt_context(prompt, window)
    assert ctx == list(prompt[-window_keep(window) :])
    assert prompt_context(prompt[:31], window) == [BOS, *prompt[:31]]
    stub = script_stub([*ctx, *SCRIPT], max_seq_len=window)
    gen = run(stub, prompt=prompt, max_new_bytes=5)
    assert stub.calls[0][0] == ctx and gen.output == SCRIPT[:5]
    assert gen.stats.prompt_bytes_dropped == 100 - window_keep(window)


def test_step_function_runs_every_step():
    stub = scripted(b"", SCRIPT)
    seen = []
    decoder = Decoder(stub, GenerationConfig(max_new_bytes=20, draft_heads=3))

    def step(ids, *args, **kwargs):
        seen.append(ids.shape[1])
        return chain_step(stub, decoder.rule, 3, ids, *args, **kwargs)

    decoder.step = step  # what a compiled step replaces
    gen = decoder.generate()
    assert gen.read() == SCRIPT[:20]
    assert len(seen) == gen.stats.forwards - 1 and set(seen) == {4}


def test_cache_is_released_even_when_abandoned():
    stub = scripted(b"", SCRIPT)
    gen = generate(stub, GenerationConfig(max_new_bytes=30, draft_heads=1))
    next(gen)
    assert stub.cache is not None
    gen.close()
    assert stub.cache is None


# -- stop strings -------------------------------------------------------------------------


def test_stop_matcher_holds_back_possible_starts():
    m = StopMatcher([b"<end>", b"\n\n"])
    assert m.push(b"ab<e") == b"ab"
    assert m.push(b"x") == b"<ex"
    assert m.push(b"\n") == b""
    assert m.push(b"<en") == b"\n"
    assert m.push(b"d>tail") == b"" and m.hit


def test_stop_matcher_ends_at_the_first_completed_stop():
    # However the bytes are chunked: "cd" is complete before "bcde" is.
    for chunks in ([b"abcdef"], [b"a", b"b", b"c", b"d", b"e"], [b"abc", b"def"]):
        m = StopMatcher([b"bcde", b"cd"])
        assert b"".join(m.push(c) for c in chunks) == b"ab" and m.hit
    m = StopMatcher([b"aab"])
    assert m.push(b"a") == b"" and m.push(b"a") == b"" and m.push(b"a") == b"a"
    assert m.flush() == b"aa"


def test_stop_string_spanning_a_block_boundary():
    # Three drafts, all accepted: the prompt's forward decides byte 0, then blocks of 4
    # bytes: 1-4, 5-8, ... The stop string "ick b" covers bytes 6-10, across blocks.
    assert SCRIPT[6:11] == b"ick b"
    gen = generate(scripted(b"", SCRIPT), GenerationConfig(max_new_bytes=50, draft_heads=3, stop=(b"ick b",)))
    chunks = list(gen)
    assert b"".join(chunks) == SCRIPT[:6] and gen.stats.stop_reason == "stop_string"
    # "i" (byte 6) could start the stop string, so it is held back when its block ends.
    assert chunks == [SCRIPT[:1], SCRIPT[1:5], SCRIPT[5:6]]
    assert gen.stats.bytes == 11 and gen.stats.forwards == 4


def test_stop_string_in_both_modes_and_flush_at_max_bytes():
    for speculative in (False, True):
        gen = run(scripted(b"", SCRIPT), max_new_bytes=80, speculative=speculative, stop=(b"lazy", b"zzz"))
        assert gen.output == SCRIPT[: SCRIPT.index(b"lazy")]
        # Ending on a byte that might have begun a stop string still shows it.
        gen = run(scripted(b"", SCRIPT), max_new_bytes=5, speculative=speculative, stop=(b"qx",))
        assert gen.output == SCRIPT[:5] and gen.stats.stop_reason == "max_bytes"


def test_non_utf8_bytes_stream_unchanged():
    script = bytes([0xFF, 0xC3, 0x28, 0x00, 0xE2, 0x82, 0x80, 0xC3, 0xA9, 0xFE])
    for speculative in (False, True):
        gen = generate(scripted(b"\x80", script), GenerationConfig(prompt=b"\x80", max_new_bytes=10,
                                                                   speculative=speculative))
        chunks = list(gen)
        assert b"".join(chunks) == script and all(isinstance(c, bytes) for c in chunks)


# -- sampling -------------------------------------------------------------------------------


def test_probabilities_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])  # probabilities ~ .23 .09 .03 .01 .64
    full = logits.softmax(-1)
    p = probabilities(logits, SamplingConfig(temperature=1.0))
    assert torch.allclose(p, full)
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_k=2))
    assert torch.allclose(p[0], torch.tensor([full[0, 0], 0, 0, 0, full[0, 4]]) / (full[0, 0] + full[0, 4]))
    # Top-p: the smallest set of likeliest bytes with mass >= top_p.
    top2 = float(full[0, 0] + full[0, 4])
    assert (probabilities(logits, SamplingConfig(1.0, top_p=top2 - 1e-4))[0] > 0).tolist() == [1, 0, 0, 0, 1]
    assert (probabilities(logits, SamplingConfig(1.0, top_p=0.01))[0] > 0).tolist() == [0, 0, 0, 0, 1]
    hot = probabilities(logits, SamplingConfig(temperature=0.5))
    assert torch.allclose(hot, (logits * 2).softmax(-1))


def test_draw_follows_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    gen = torch.Generator().manual_seed(0)
    samples = draw(probs.expand(20_000, 4), torch.rand(20_000, generator=gen))
    freq = torch.bincount(samples, minlength=4) / 20_000
    assert freq[1] == 0 and torch.allclose(freq, probs, atol=0.02)


@pytest.mark.parametrize(
    "kw, flag",
    [
        ({"temperature": -0.1}, "--temperature"),
        ({"temperature": float("nan")}, "--temperature"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_p": 1.5}, "--top-p"),
        ({"top_k": -1}, "--top-k"),
        ({"max_new_bytes": -1}, "--max-bytes"),
        ({"draft_heads": 0}, "--draft-heads"),
        ({"stop": (b"",)}, "--stop"),
        ({"draft_temperature": 0.0}, "--draft-temperature"),
        ({"draft_temperature": float("inf")}, "--draft-temperature"),
    ],
)
def test_bad_generation_config_names_the_flag(kw, flag):
    with pytest.raises(BytemtpError, match=flag):
        GenerationConfig(**kw)


def test_draft_heads_must_exist():
    with pytest.raises(BytemtpError, match="--draft-heads: the model has 3 draft heads"):
        generate(scripted(b"", SCRIPT), GenerationConfig(draft_heads=4))
    with pytest.raises(BytemtpError, match="--speculative: the model has no draft heads"):
        generate(scripted(b"", SCRIPT, n_future=1), GenerationConfig(speculative=True))
    assert generate(scripted(b"", SCRIPT, n_future=1), GenerationConfig()).stats.mode == "autoregressive"


def test_sampling_is_reproducible_by_seed():
    model = random_model()
    outs = [run(model, prompt=b"seed", max_new_bytes=30, temperature=1.0, seed=s).output for s in (3, 3, 4)]
    assert outs[0] == outs[1] != outs[2]
    gen = run(model, max_new_bytes=5, temperature=1.0)
    assert gen.stats.seed is not None
    assert run(model, max_new_bytes=5, temperature=1.0, seed=gen.stats.seed).output == gen.output


ALPHABET = b"abc"


def random_logits_stub(n_future: int = 4) -> StubLM:
    """Every head's logits: a fixed pseudo-random function of (context, head) over ``ALPHABET``."""

    @functools.lru_cache(maxsize=None)
    def logits(ctx: tuple[int, ...], k: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(bytes(f"{ctx}/{k}", "ascii")))
        out = torch.full((VOCAB,), float("-inf"))
        out[list(ALPHABET)] = torch.randn(len(ALPHABET), generator=gen) * 1.5
        return out

    return StubLM(logits, n_future=n_future)


def exact_distribution(next_probs: Callable[[tuple[int, ...]], torch.Tensor], ctx: tuple[int, ...], n: int,
                       alphabet: bytes) -> dict[bytes, float]:
    """P(first n bytes) by enumeration: the product of head 1's conditionals."""
    out = {}
    for seq in itertools.product(alphabet, repeat=n):
        p, c = 1.0, ctx
        for b in seq:
            p *= float(next_probs(c)[b])
            c = (*c, b)
        out[bytes(seq)] = p
    return out


def chi_squared(counts: Counter, expected: dict[bytes, float], n: int) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; cells expecting < 5 are pooled."""
    assert set(counts) <= set(expected)
    big = [s for s, p in expected.items() if p * n >= 5]
    small_p = sum(p for s, p in expected.items() if s not in big)
    stat = sum((counts[s] - n * expected[s]) ** 2 / (n * expected[s]) for s in big)
    if small_p * n >= 1:
        small_count = sum(c for s, c in counts.items() if s not in big)
        stat += (small_count - n * small_p) ** 2 / (n * small_p)
    return stat, len(big) - (small_p * n < 1)


def chi_squared_bound(dof: int) -> float:
    """About the 1e-5 upper quantile of chi-squared(dof) (Wilson-Hilferty, z = 4.3)."""
    return dof * (1 - 2 / (9 * dof) + 4.3 * math.sqrt(2 / (9 * dof))) ** 3


def sampling_matches_head_one(stub: StubLM, sampling: dict, **kw) -> None:
    """Speculative sampling of 3 bytes with 3 drafts, against the exact distribution by enumeration."""
    cfg = SamplingConfig(**sampling)
    prompt = b"ab"
    ctx = (BOS, *prompt)
    exact = exact_distribution(lambda c: probabilities(stub.logits_fn(c, 0), cfg), ctx, 3, ALPHABET)
    # What accepting every draft would give: byte 1 from head 1, bytes 2 and 3 from heads 2 and 3.
    naive = {}
    for seq in exact:
        p = [probabilities(stub.logits_fn(ctx, k), cfg)[seq[k]] for k in range(3)]
        naive[seq] = float(p[0] * p[1] * p[2])
    n = 1500
    counts = Counter()
    accepted = attempted = 0
    for seed in range(n):
        gen = run(stub, prompt=prompt, max_new_bytes=3, seed=seed, draft_heads=3, **sampling, **kw)
        counts[gen.output] += 1
        accepted, attempted = accepted + sum(gen.stats.accepted), attempted + sum(gen.stats.attempted)
    stat, dof = chi_squared(counts, exact, n)
    assert stat < chi_squared_bound(dof), (stat, dof)
    assert 0.2 < accepted / attempted < 0.9  # both acceptance and rejection were exercised
    # The test can tell: the draft heads' own distribution is far off.
    naive_stat = sum((n * naive[s] - n * p) ** 2 / (n * p) for s, p in exact.items() if p * n >= 5)
    assert naive_stat > 10 * chi_squared_bound(dof)


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1.0},
        {"temperature": 0.7, "top_p": 0.8},
        {"temperature": 1.0, "draft_temperature": 1.0},  # the default draws drafts at 0.8 x the temperature
        {"temperature": 1.0, "draft_temperature": 0.3},
    ],
)
def test_speculative_sampling_is_exactly_head_one(sampling):
    """Whatever temperature the drafts are drawn at, the output is head 1's at ``temperature``."""
    draft = {k: sampling.pop(k) for k in ("draft_temperature",) if k in sampling}
    sampling_matches_head_one(random_logits_stub(), sampling, **draft)


def test_drafts_are_drawn_at_the_draft_temperature():
    """A sampling chain's drafts come from the draft heads at ``draft_temperature`` (default: 0.8 x
    the temperature), and are judged by those same distributions."""
    logits = torch.randn(2, 3, VOCAB)
    u = Uniforms(torch.zeros(2, 0), torch.zeros(2), torch.rand(2, 3))
    for kw, want in (({}, 0.8), ({"draft_temperature": 0.5}, 0.5), ({"draft_temperature": 2.0}, 2.0)):
        rule = Decoder(random_logits_stub(), GenerationConfig(temperature=1.0, **kw)).rule
        drafts, q = rule.propose(logits, u, *torch.zeros(2, logits.shape[0], dtype=torch.long))
        assert torch.equal(q, probabilities(logits, SamplingConfig(temperature=want)))
        assert torch.equal(drafts, draw(q, u.drafts))


def test_coupled_drafts_are_drawn_given_the_two_bytes_before():
    """With a draft context, draft j is drawn from its head's distribution times the weights after
    the two bytes before it (the accepted run's last byte and the decided next byte for the first),
    renormalised, and judged by that; greedy, it is the likeliest byte of that product."""
    gen = torch.Generator().manual_seed(0)  # fixed data: the "moved some draws" checks below hold for it
    logits = torch.randn(3, 4, VOCAB, generator=gen)
    u = Uniforms(torch.zeros(3, 0), torch.zeros(3), torch.rand(3, 4, generator=gen))
    index = torch.randint(0, 50, (VOCAB, VOCAB), generator=gen)
    context = DraftContext(index, torch.rand(50, VOCAB, generator=gen) + 0.01)
    before, after = torch.tensor([7, 9, 256]), torch.tensor([5, 200, 256])
    rule = ChainRule(SamplingConfig(temperature=1.0), context=context)
    drafts, q = rule.propose(logits, u, before, after)
    base = probabilities(logits, SamplingConfig(temperature=1.0))
    history = torch.cat((before[:, None], after[:, None], drafts), dim=1)
    want = base * context.weights[index[history[:, :-2], history[:, 1:-1]]]
    # normalised by sums of VOCAB positive float32 terms, maybe in another order: (VOCAB - 1) eps each
    rtol = 2 * VOCAB * torch.finfo(torch.float32).eps
    assert torch.allclose(q, want / want.sum(-1, keepdim=True), rtol=rtol, atol=0)
    assert torch.equal(drafts, draw(q, u.drafts))
    assert not torch.equal(drafts, draw(base, u.drafts))  # the coupling moved some draws
    # greedy: the argmax of the logits plus the log-weights after the two bytes before
    drafts, q = ChainRule(SamplingConfig(), context=context).propose(logits, None, before, after)
    history = torch.cat((before[:, None], after[:, None], drafts), dim=1)
    weights = context.weights[index[history[:, :-2], history[:, 1:-1]]]
    assert q is None and torch.equal(drafts, (logits + weights.log()).argmax(-1))
    assert not torch.equal(drafts, logits.argmax(-1))


@pytest.mark.parametrize(
    "decoder", [{"draft_heads": 1}, {"tree_nodes": 5, "draft_temperature": 0.3}], ids=["chain", "tree-drafts-at-0.3"]
)
def test_speculative_sampling_matches_autoregressive_on_a_model(decoder):
    """First two bytes from the trained model, both modes, against the exact distribution; the
    tree draws its drafts far colder than head 1 samples."""
    model = trained_model()
    sampling = {"temperature": 1.0, "top_k": 3}
    cfg = SamplingConfig(**sampling)
    ctx = (BOS, *b"    'ap")

    @functools.lru_cache(maxsize=None)
    @torch.no_grad()
    def next_probs(c: tuple[int, ...]) -> torch.Tensor:
        return probabilities(model(torch.tensor([c]), n_heads=1)[0, -1, 0], cfg)

    def support(c: tuple[int, ...]) -> list[int]:
        return next_probs(c).nonzero().flatten().tolist()

    alphabet = bytes(sorted({b for a in support(ctx) for b in (a, *support((*ctx, a)))}))
    exact = {s: p for s, p in exact_distribution(next_probs, ctx, 2, alphabet).items() if p > 0}
    n = 500
    counts = {}
    for speculative in (False, True):
        counts[speculative] = Counter()
        accepted = 0
        for seed in range(n):
            gen = run(model, prompt=bytes(ctx[1:]), max_new_bytes=2, seed=seed, speculative=speculative,
                      **(decoder if speculative else {}), **sampling)
            counts[speculative][gen.output] += 1
            accepted += sum(gen.stats.accepted)
        stat, dof = chi_squared(counts[speculative], exact, n)
        assert stat < chi_squared_bound(dof), (speculative, stat, dof)
        if speculative:
            assert 0.3 * n < accepted < 0.9 * n  # the draft was often right, and often wrong
    tv = sum(abs(counts[True][s] - counts[False][s]) for s in exact) / (2 * n)
    assert tv < 0.1
