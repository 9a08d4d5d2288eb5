"""The probes: their generators make what they claim, deterministically, and their metrics
score an oracle perfectly and a model that cannot look back at chance."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from numpy.polynomial import Polynomial

from bytemtp.cli import main
from bytemtp.data.prepare import prepare
from bytemtp.data.shards import Dataset
from bytemtp.model.config import ModelConfig
from bytemtp.model.transformer import ByteMTP
from bytemtp.train import probes
from bytemtp.train.checkpoint import save_checkpoint
from bytemtp_corpora import arithmetic, induction

NAME = re.compile(rb"[A-Z][a-z]{2,5}")
STORIES = list(induction.stories(7, 400))


# -- induction ---------------------------------------------------------------------------------

def test_induction_generator_is_deterministic_and_seeded():
    assert list(induction.stories(7, 400)) == STORIES
    assert list(induction.stories(8, 50)) != STORIES[:50]
    assert list(induction.documents())[:20] == list(induction.documents())[:20]


def test_every_repeated_name_occurs_earlier_in_its_story():
    for story in STORIES:
        text = story.text
        assert len(text) <= induction.MAX_BYTES and story.repeats
        names = [text[s:e] for s, e in story.firsts]
        assert len({n[:1] for n in names}) == len(names)  # distinct initials
        for s, e in story.firsts:
            assert text.find(text[s:e]) == s  # a first mention is the first occurrence
        for s, e in story.repeats:
            name = text[s:e]
            assert NAME.fullmatch(name) and name in names
            assert text.find(name) < s  # introduced before
            assert not text[s - 1 : s].isalpha() and not text[e : e + 1].isalpha()  # a whole word
        # no other word starts with a name's capital, so the earlier mention alone predicts the rest
        words = re.findall(rb"[A-Z][a-z]*", text)
        assert all(w in names or w[:1] not in induction.INITIALS.encode() for w in words)


def copy_oracle(ids: torch.Tensor) -> torch.Tensor:
    """Induction by hand, from each prefix alone: inside a capitalised word, predict the byte
    that followed the same word start at its earliest earlier occurrence."""
    out = torch.zeros_like(ids)
    for i, row in enumerate(ids.tolist()):
        text = bytes(b if b < 256 else 0 for b in row)
        for p in range(len(text)):
            start = p
            while start > 0 and chr(text[start]).isalpha():
                start -= 1
            word = text[start + 1 : p + 1]
            if word[:1].isupper():
                hits = (m.start() for m in re.finditer(re.escape(word), text[: start + 1]))
                hit = next((h for h in hits if not chr(text[h - 1]).isalpha()), None)
                if hit is not None:
                    out[i, p] = text[hit + len(word)]
    return out


def bigram_guesser(corpus: list[bytes]) -> probes.Predictor:
    """A model that cannot look back: after each byte, the byte that most often followed it in ``corpus``."""
    counts = [Counter() for _ in range(257)]
    for text in corpus:
        for a, b in zip(text, text[1:]):
            counts[a][b] += 1
    best = torch.tensor([c.most_common(1)[0][0] if c else 0 for c in counts])
    return lambda ids: best[ids]


def test_induction_metric_scores_an_oracle_perfectly_and_a_bigram_guesser_at_chance():
    texts = [s.text for s in STORIES]
    oracle, n = probes.span_accuracy(copy_oracle, texts, [s.repeats for s in STORIES])
    assert oracle == 1.0 and n > 5000
    training = induction.stories(induction.SEED, 2000)
    guesser = bigram_guesser([s.text[a:b] for s in training for a, b in s.firsts + s.repeats])
    for spans in ([s.repeats for s in STORIES], [s.firsts for s in STORIES]):
        acc, n = probes.span_accuracy(guesser, texts, spans)
        # letters after a name's first are uniform: any guess is right with probability 1/26
        assert abs(acc - induction.CHANCE) < 5 * math.sqrt(induction.CHANCE * (1 - induction.CHANCE) / n)
    shifted, _ = probes.span_accuracy(lambda ids: torch.roll(copy_oracle(ids), 1, 1), texts,
                                      [s.repeats for s in STORIES])
    assert shifted < 0.5  # the metric compares each prediction with the byte it predicts, not a neighbour


# -- arithmetic --------------------------------------------------------------------------------

def independent_value(expression: bytes) -> tuple[int, ...]:
    """The expression's value by a different route: Python's own parser over numpy's integer
    polynomials in Z[x], reduced modulo 7 and x^5 only at the end (a ring homomorphism)."""
    source = re.sub(rb"(\d*)x(?:\^(\d))?", lambda m: b"(%s*X**%s)" % (m[1] or b"1", m[2] or b"1"), expression)
    value = eval(source.decode(), {"X": Polynomial([0, 1])})  # noqa: S307 - our own generated text
    value = Polynomial([value]) if not isinstance(value, Polynomial) else value
    coef = np.rint(value.coef).astype(np.int64)
    return tuple(int(coef[d]) % 7 if d < len(coef) else 0 for d in range(5))


def parse_answer(answer: bytes) -> tuple[int, ...]:
    coef = [0] * 5
    if answer != b"0":
        for term in answer.split(b"+"):
            m = re.fullmatch(rb"(\d?)(x(?:\^(\d))?)?", term)
            degree = 0 if not m[2] else int(m[3] or 1)
            assert coef[degree] == 0 and 1 <= int(m[1] or 1) <= 6
            coef[degree] = int(m[1] or 1)
    return tuple(coef)


@pytest.mark.parametrize("ops", [1, 2, 3, 6])
def test_every_arithmetic_answer_matches_an_independent_evaluator(ops):
    problems = list(arithmetic.problems(11, 300, ops, ops))
    assert problems == list(arithmetic.problems(11, 300, ops, ops))
    for p in problems:
        assert p.ops == ops and p.expression.count(b"(") == ops - 1
        assert sum(p.expression.count(op) for op in (b"+", b"-", b"*")) == ops
        assert parse_answer(p.answer) == independent_value(p.expression), p.line


def test_arithmetic_corpus_trains_on_at_most_k_operations():
    docs = list(arithmetic.documents())
    assert len(docs) == arithmetic.DOCUMENTS and docs[:5] == list(arithmetic.documents())[:5]
    lines = [line for _, d in docs[:50] for line in d.splitlines()]
    assert len(lines) == 50 * arithmetic.LINES
    ops = Counter(sum(line.split(b"=")[0].count(op) for op in (b"+", b"-", b"*")) for line in lines)
    assert set(ops) == set(range(1, arithmetic.TRAIN_MAX_OPS + 1))


def test_arithmetic_metric_separates_in_and_out_of_distribution(monkeypatch):
    """Exact match of each greedy answer: a decoder right on up to k operations only scores 1 / 0."""
    class Answers:
        def __init__(self, prompts):
            self.prompts = prompts

        def read_all(self):
            def answer(prompt: bytes) -> bytes:
                value = arithmetic.canonical(independent_value(prompt[:-1])).encode()
                return value if prompt.count(b"(") < arithmetic.TRAIN_MAX_OPS else value + b"+1"
            return [answer(p) for p in self.prompts]

    monkeypatch.setattr(probes, "generate", lambda model, config, prompts: Answers(prompts))
    scores = probes.arithmetic_probe(None, per_ops=20)
    assert scores["in_distribution"] == 1.0 and scores["out_of_distribution"] == 0.0
    assert list(scores["by_ops"]) == list(range(1, arithmetic.TRAIN_MAX_OPS + probes.EXTRA_OPS + 1))


# -- as built-in sources and as a command -----------------------------------------------------

@pytest.mark.parametrize("name", ["induction", "arithmetic"])
def test_prepare_builtin_probe_is_deterministic(tmp_path, name):
    a = prepare([f"builtin:{name}"], tmp_path / "a", progress=False)
    b = prepare([f"builtin:{name}"], tmp_path / "b", progress=False)
    inputs = [Dataset(p.out).manifest["source"]["inputs"] for p in (a, b)]
    assert inputs[0] == inputs[1] and inputs[0][0]["name"] == name
    expected = induction.STORIES if name == "induction" else arithmetic.DOCUMENTS
    assert inputs[0][0]["documents"] == expected == sum(s.n_docs for s in Dataset(a.out).shards())


def test_eval_probe_command_on_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = ByteMTP(ModelConfig(d_model=32, n_layers=1, n_attn_heads=2, n_future=2, max_seq_len=256))
    save_checkpoint(tmp_path, 1, model)
    for probe, examples in (("induction", "20"), ("arithmetic", "4")):
        result = CliRunner().invoke(main, ["eval", str(tmp_path), "--probe", probe, "--examples", examples,
                                           "--json", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        scores = json.loads(result.stdout)
        assert scores["probe"] == probe and scores["step"] == 1
        values = [scores["repeat_accuracy"]] if probe == "induction" else list(scores["by_ops"].values())
        assert all(0 <= v <= 1 for v in values)
    result = CliRunner().invoke(main, ["eval", str(tmp_path)])
    assert result.exit_code == 1 and "--data/--probe: give exactly one" in result.stderr
