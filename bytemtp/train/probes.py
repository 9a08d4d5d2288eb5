"""The probes' metrics on any checkpoint: induction over invented names and polynomial arithmetic.

Each probe draws its evaluation examples from its generator (``bytemtp_corpora.induction``,
``bytemtp_corpora.arithmetic``) with ``EVAL_SEED``, not the training corpus's seed, so the
names and most expressions are new to the model; the examples are the same for every
checkpoint, so scores compare across runs.

- **induction**: head 1's greedy accuracy on the bytes of a repeated name after its first
  byte (the first byte is a guess; the rest can only come from the earlier mention), beside
  the same accuracy on first mentions (nothing to copy from: the letters are uniform, so
  ``CHANCE``).
- **arithmetic**: exact-match accuracy of the greedy answer after ``EXPR=``, in distribution
  (1 to ``TRAIN_MAX_OPS`` operations, what the corpus trains on) and out of distribution
  (up to ``EXTRA_OPS`` more).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from bytemtp import BOS
from bytemtp.decode.config import GenerationConfig
from bytemtp.decode.generate import generate
from bytemtp.errors import BytemtpError
from bytemtp.model.transformer import ByteMTP
from bytemtp_corpora import arithmetic, induction

PROBES = ("induction", "arithmetic")
EVAL_SEED = 1_000_003
DEFAULT_EXAMPLES = {"induction": 400, "arithmetic": 100}  # stories; problems per number of operations
EXTRA_OPS = 3
ANSWER_BYTES = 24  # longer than any canonical answer ("6x^4+6x^3+6x^2+6x+6" is 19)

# ids [B, T] -> head 1's predicted next id at every position [B, T]
Predictor = Callable[[torch.Tensor], torch.Tensor]


def span_accuracy(predict: Predictor, texts: Sequence[bytes], spans: Sequence[Sequence[tuple[int, int]]],
                  batch_size: int = 32) -> tuple[float, int]:
    """Greedy accuracy on every byte of ``spans`` after its first, and how many bytes that is.

    Row ``i`` is ``BOS + texts[i]``; text byte ``p`` is predicted at row position ``p`` (after
    BOS and ``texts[i][:p]``), so a span ``[s, e)`` scores positions ``s+1 .. e-1``.
    """
    correct = total = 0
    for start in range(0, len(texts), batch_size):
        rows = texts[start : start + batch_size]
        width = 1 + max(len(t) for t in rows)
        ids = torch.full((len(rows), width), BOS, dtype=torch.long)
        for i, t in enumerate(rows):
            ids[i, 1 : 1 + len(t)] = torch.tensor(list(t), dtype=torch.long)
        predicted = predict(ids)
        for i, t in enumerate(rows):
            for s, e in spans[start + i]:
                positions = torch.arange(s + 1, e)
                correct += int((predicted[i, positions] == ids[i, positions + 1]).sum())
                total += e - s - 1
    if not total:
        raise BytemtpError("induction probe: no repeated-name bytes to score")
    return correct / total, total


def head1_predictor(model: ByteMTP) -> Predictor:
    """Head 1's argmax at every position, in one forward per batch."""
    @torch.no_grad()
    def predict(ids: torch.Tensor) -> torch.Tensor:
        return model(ids.to(model.embed.weight.device), n_heads=1)[:, :, 0].argmax(-1).cpu()
    return predict


def induction_stories(count: int, max_bytes: int) -> list[induction.Story]:
    """The probe's ``count`` stories, those that do not fit ``max_bytes`` (the context, less BOS) left out."""
    return [s for s in induction.stories(EVAL_SEED, count) if len(s.text) <= max_bytes]


def induction_probe(model: ByteMTP, count: int) -> dict[str, Any]:
    stories = induction_stories(count, model.cfg.max_seq_len - 1)
    texts = [s.text for s in stories]
    predict = head1_predictor(model)
    repeat, n_repeat = span_accuracy(predict, texts, [s.repeats for s in stories])
    first, n_first = span_accuracy(predict, texts, [s.firsts for s in stories])
    return {"probe": "induction", "stories": len(stories), "repeat_accuracy": repeat, "repeat_bytes": n_repeat,
            "first_mention_accuracy": first, "first_mention_bytes": n_first, "chance": induction.CHANCE}


def arithmetic_probe(model: ByteMTP, per_ops: int, batch_size: int = 64) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers, per number of operations, in and out of distribution."""
    k = arithmetic.TRAIN_MAX_OPS
    by_ops = {}
    config = GenerationConfig(max_new_bytes=ANSWER_BYTES, stop=(b"\n",))  # greedy: head 1's answer
    for ops in range(1, k + EXTRA_OPS + 1):
        problems = list(arithmetic.problems(EVAL_SEED + ops, per_ops, ops, ops))
        answers = []
        for start in range(0, per_ops, batch_size):
            part = problems[start : start + batch_size]
            answers += generate(model, config, [p.expression + b"=" for p in part]).read_all()
        by_ops[ops] = sum(a == p.answer for a, p in zip(answers, problems)) / per_ops

    def mean(opss: range) -> float:
        return sum(by_ops[o] for o in opss) / len(opss)

    return {"probe": "arithmetic", "train_max_ops": k, "problems_per_ops": per_ops,
            "in_distribution": mean(range(1, k + 1)), "out_of_distribution": mean(range(k + 1, k + EXTRA_OPS + 1)),
            "by_ops": by_ops}


def run_probe(model: ByteMTP, probe: str, examples: int | None = None) -> dict[str, Any]:
    """The probe's scores of ``model`` on ``examples`` examples (default ``DEFAULT_EXAMPLES``)."""
    if probe not in PROBES:
        raise BytemtpError(f"--probe: {probe!r} is not one of {', '.join(PROBES)}")
    count = examples or DEFAULT_EXAMPLES[probe]
    return induction_probe(model, count) if probe == "induction" else arithmetic_probe(model, count)
