"""The eager engine's host-side chain decision equals the tensor code compiled steps run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bytemtp import VOCAB
from bytemtp.decode.coupling import UNCOUPLED, draft_context, host_arrays
from bytemtp.decode.host_chain import host_chain_decide
from bytemtp.decode.incontext import RowTexts
from bytemtp.decode.sampling import RowSampling, SamplingConfig, draw, probabilities
from bytemtp.decode.step import chain_decide
from bytemtp.decode.verify import ChainRule, Uniforms
from bytemtp.model.config import ModelConfig
from bytemtp.model.transformer import ByteMTP

SAMPLINGS = [
    {"temperature": 0.0},
    {"temperature": 1.0},
    {"temperature": 0.8},
    {"temperature": 0.7, "top_k": 5},
    {"temperature": 1.2, "top_p": 0.8},
]


def draft_model(n_future: int) -> ByteMTP:
    torch.manual_seed(0)
    model = ByteMTP(ModelConfig(d_model=32, n_layers=1, n_attn_heads=4, n_future=n_future, max_seq_len=32)).eval()
    model.setup_cache(1, 32)  # also stacks the draft heads' unembeddings
    return model


def chain_inputs(rule: ChainRule, n_rows: int, k: int, m: int, seed: int):
    """One step's decision inputs with drafts that head 1 often accepts: greedy, each row's drafts
    are head 1's choices up to a random point; sampling, they are drawn from draft distributions
    that are head 1's own plus noise of a per-row size. So every accepted-run length and both
    outcomes of a judgement occur."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_rows, k + 1, 256, generator=gen) * 3
    features = torch.randn(n_rows, k + 1, 1, 32, generator=gen)
    noise = torch.randn(n_rows, m, 256, generator=gen) * torch.rand(n_rows, 1, 1, generator=gen) * 6
    q = probabilities(torch.cat((logits[:, :k], logits[:, : m - k]), dim=1) + noise, rule.draft_sampling)
    if rule.sampling.greedy:
        right = torch.arange(k) < torch.randint(0, k + 1, (n_rows, 1), generator=gen)
        drafts = torch.where(right, logits[:, :k].argmax(-1), torch.randint(0, 256, (n_rows, k), generator=gen))
        u = None
    else:
        drafts = draw(q[:, :k], torch.rand(n_rows, k, generator=gen))
        u = Uniforms(*(torch.rand(n_rows, w, generator=gen) for w in (k, 1, m)))
        u.next = u.next[:, 0]
    n_valid = torch.randint(0, k + 1, (n_rows,), generator=gen)
    n_valid[: n_rows // 2] = k  # half the rows verify every draft
    fed = torch.cat((torch.randint(0, 256, (n_rows, 1), generator=gen), drafts), dim=1)  # the pending byte first
    return logits, features, fed, n_valid, q, u


def rows_texts(model, rule, m, args) -> tuple[RowTexts, torch.Tensor]:
    """Texts in which the pairs each row's drafts will follow (from the decision without them,
    returned too) were followed by other bytes, 1 to 3 times, so that the in-context factor
    changes drafts."""
    logits, features, fed, n_valid, q, u = args
    plain = chain_decide(model, rule, m, logits, features, fed, n_valid, q, u)[0]
    gen = torch.Generator().manual_seed(5)
    texts = RowTexts(len(fed), model.cfg.vocab)
    for r, row in enumerate(plain.tolist()):
        seq = [fed[r, row[0]].item(), *row[1:-1]]
        text = []
        for a, b in zip(seq, seq[1:]):
            text += [a, b, int(torch.randint(0, 256, (1,), generator=gen))] * (1 + r % 3)
        texts.begin(r, text)
    texts.active = np.zeros(len(fed), np.bool_)  # the host decision appends nothing: both read the same counts
    return texts, plain


@pytest.mark.parametrize("drafts", ["independent", "coupled", "coupled, in-context"])
@pytest.mark.parametrize("draft_scale", [1.0, 0.6])
@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("k", [0, 3, 7])
def test_host_decision_is_the_tensor_decision(sampling, k, draft_scale, drafts):
    """Same inputs, same uniforms: the same accepted runs, next bytes, drafts, flags and draft
    distributions, over many rows; also with drafts drawn at a lower temperature than head 1's,
    each drawn given the two bytes before it (draft coupling), and weighed by the rows' own
    counts (``bytemtp.decode.incontext``: a compiled step's ``InContext`` against the host's)."""
    coupled = drafts != "independent"
    m = 7
    model = draft_model(m + 1)
    cfg = SamplingConfig(**sampling)
    draft = SamplingConfig(cfg.temperature * draft_scale, cfg.top_k, cfg.top_p) if not cfg.greedy else None
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, VOCAB**3, (200_000,), generator=gen).unique()  # some pairs kept as contexts, some not
    trigrams = torch.stack((codes, torch.randint(1, 500, codes.shape, generator=gen)))
    context = draft_context(trigrams, 0.7, VOCAB) if coupled else None
    rule = ChainRule(cfg, draft=draft, context=context)
    accepted, draws, moved = [], 0, 0
    with torch.inference_mode():
        for seed in range(4):
            args = chain_inputs(rule, 64, k, m, seed)
            logits, features, fed, n_valid, q, u = args
            texts, counts, mixing = None, None, None
            if drafts == "coupled, in-context":
                (texts, plain), mixing = rows_texts(model, rule, m, args), np.full(len(fed), 0.6)
                counts = texts.tensors(mixing)
            want = chain_decide(model, rule, m, logits, features, fed, n_valid, q, u, counts)
            if counts is not None:  # the counts did move drafts
                assert (want[0][:, 2:-1] != plain[:, 2:-1]).any()
            got = host_chain_decide(
                model, rule, m, logits, features, fed, n_valid, q, u, context=host_arrays(context), texts=texts,
                mixing=mixing,
            )
            assert torch.equal(got[0][:, [0, -1]], want[0][:, [0, -1]])  # accepted runs, flags
            # Drawn bytes: the host sums cumulative distributions in float64, torch rounds them to
            # float32, so a uniform within rounding of a boundary may land on the neighbouring byte.
            draws, moved = draws + want[0][:, 1:-1].numel(), moved + (got[0] != want[0]).sum().item()
            same = (got[0] == want[0]).all(dim=1)  # coupled: a row's later drafts follow its earlier ones
            for a, b in zip(got[1:], want[1:]):
                # coupled distributions are normalised by sums taken in another order: equal to rounding
                assert (a is None and b is None) or torch.allclose(a[same], b[same], rtol=1e-5, atol=1e-8)
                assert coupled or a is None or torch.equal(a, b)
            accepted += want[0][:, 0].tolist()
    assert moved <= draws / 2000
    if k:  # the comparison covered short and long runs
        assert min(accepted) == 0 and max(accepted) == k


def test_host_decision_flags_non_finite_logits():
    model = draft_model(4)
    rule = ChainRule(SamplingConfig(temperature=0.8))
    with torch.inference_mode():
        logits, features, fed, n_valid, q, u = chain_inputs(rule, 3, 3, 3, seed=0)
        logits[0, 1] = float("-inf")  # a position with no byte left
        logits[1, 2, 7] = float("nan")
        features[2] = float("inf")  # the draft heads' logits come out non-finite
        want = chain_decide(model, rule, 3, logits, features, fed, n_valid, q, u)[0][:, -1]
        got = host_chain_decide(model, rule, 3, logits, features, fed, n_valid, q, u, context=UNCOUPLED)[0][:, -1]
    assert got.tolist() == want.tolist() == [1, 1, 1]


def test_a_decision_over_the_first_rows_is_theirs_alone():
    """``n_rows``: an eager step computed only its first rows (the rest parked); the decision over
    them, greedy and sampled rows side by side, coupled and weighed by their texts, equals the
    decision of a batch of just those rows, byte for byte, texts included, and has their rows only."""
    m, k, n, slots = 7, 3, 5, 8
    model = draft_model(m + 1)
    configs = [SamplingConfig(0.0), SamplingConfig(0.8), SamplingConfig(1.0, top_k=5), SamplingConfig(0.0),
               SamplingConfig(1.2, top_p=0.8), SamplingConfig(0.9), SamplingConfig(0.0), SamplingConfig(0.7)]
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, VOCAB**3, (200_000,), generator=gen).unique()
    context = draft_context(torch.stack((codes, torch.randint(1, 500, codes.shape, generator=gen))), 0.7, VOCAB)

    def rule_of(rows: list[SamplingConfig]) -> ChainRule:
        return ChainRule(RowSampling.of(rows, torch.device("cpu")), context=context)

    def texts_of(count: int) -> RowTexts:
        texts = RowTexts(count, model.cfg.vocab)
        for r in range(count):
            texts.begin(r, torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(r)).tolist())
        texts.active = np.array([r % 2 == 0 for r in range(count)])
        return texts

    with torch.inference_mode():
        logits, features, fed, n_valid, q, u = chain_inputs(ChainRule(SamplingConfig(0.8)), slots, k, m, seed=3)
        mixing = np.linspace(0.2, 0.9, slots)
        parked = texts_of(slots)
        got = host_chain_decide(model, rule_of(configs), m, logits[:n], features[:n], fed, n_valid, q, u,
                                context=host_arrays(context), texts=parked, mixing=mixing, n_rows=n)
        alone = texts_of(n)
        u_n = Uniforms(u.accept[:n], u.next[:n], u.drafts[:n])
        want = host_chain_decide(model, rule_of(configs[:n]), m, logits[:n], features[:n], fed[:n], n_valid[:n],
                                 q[:n], u_n, context=host_arrays(context), texts=alone, mixing=mixing[:n])
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # the n rows' results alone
    assert len({tuple(row) for row in got[0][:n, 2:-1].tolist()}) > 1  # real drafts, not a constant
    for a, b in zip(parked.arrays, alone.arrays):
        assert np.array_equal(a[:n], b)  # the texts grew as a batch of n rows' do
