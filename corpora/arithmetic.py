"""``builtin:arithmetic``: polynomial expressions over F7[X]/(X^5) and their values.

The probe of the paper's Section 4.2 (algorithmic reasoning): training sees expressions of
1 to ``TRAIN_MAX_OPS`` operations; a model generalises if it also gets longer ones right.
An expression is a random binary tree of ``+``, ``-`` and ``*`` over monomials ``ax^i``
(a in 1..6, i in 0..4), every inner operation but the outermost in parentheses; its value
is reduced modulo 7 and modulo x^5 and written in canonical form, highest degree first::

    (3x^2*(x+4))-6x^4=4x^4+3x^3+5x^2

A document is ``LINES`` such lines. A polynomial is a tuple of its 5 coefficients, x^0
first.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from bytemtp_corpora.corpus import GeneratedCorpus

P, DEGREE = 7, 5  # the field F7 and the ideal (x^5)
SEED = 0  # the training corpus; the probe's metric draws its problems from other seeds
DOCUMENTS = 4_000
LINES = 16
TRAIN_MAX_OPS = 3
OPS = "+-*"

Poly = tuple[int, ...]


@dataclass(frozen=True)
class Problem:
    expression: bytes  # without the "="
    answer: bytes
    ops: int

    @property
    def line(self) -> bytes:
        return self.expression + b"=" + self.answer + b"\n"


def apply(op: str, a: Poly, b: Poly) -> Poly:
    if op == "+":
        return tuple((x + y) % P for x, y in zip(a, b))
    if op == "-":
        return tuple((x - y) % P for x, y in zip(a, b))
    out = [0] * DEGREE
    for i, x in enumerate(a):
        for j, y in enumerate(b[: DEGREE - i]):
            out[i + j] = (out[i + j] + x * y) % P
    return tuple(out)


def monomial(coefficient: int, degree: int) -> Poly:
    return tuple(coefficient if d == degree else 0 for d in range(DEGREE))


def term(coefficient: int, degree: int) -> str:
    power = "" if degree == 0 else "x" if degree == 1 else f"x^{degree}"
    return str(coefficient) if degree == 0 else (power if coefficient == 1 else f"{coefficient}{power}")


def canonical(p: Poly) -> str:
    """``p`` as text: its nonzero terms, highest degree first; ``0`` for zero."""
    terms = [term(c, d) for d, c in reversed(list(enumerate(p))) if c]
    return "+".join(terms) or "0"


def expression(rng: random.Random, ops: int, outer: bool = True) -> tuple[str, Poly]:
    """A random expression of exactly ``ops`` operations and its value."""
    if ops == 0:
        c, d = rng.randint(1, P - 1), rng.randrange(DEGREE)
        return term(c, d), monomial(c, d)
    left = rng.randrange(ops)
    op = rng.choice(OPS)
    (ltext, lval), (rtext, rval) = expression(rng, left, False), expression(rng, ops - 1 - left, False)
    text = f"{ltext}{op}{rtext}"
    return (text if outer else f"({text})"), apply(op, lval, rval)


def problem(rng: random.Random, ops: int) -> Problem:
    text, value = expression(rng, ops)
    return Problem(text.encode(), canonical(value).encode(), ops)


def problems(seed: int, count: int, min_ops: int, max_ops: int) -> Iterator[Problem]:
    """``count`` problems of ``min_ops`` to ``max_ops`` operations (uniformly), the same for the same ``seed``."""
    rng = random.Random(seed)
    for _ in range(count):
        yield problem(rng, rng.randint(min_ops, max_ops))


def documents() -> Iterator[tuple[str, bytes]]:
    lines = problems(SEED, DOCUMENTS * LINES, 1, TRAIN_MAX_OPS)
    for i in range(DOCUMENTS):
        yield f"problems-{i:06d}", b"".join(next(lines).line for _ in range(LINES))


def corpus() -> GeneratedCorpus:
    return GeneratedCorpus(name="arithmetic", documents=documents,
                           meta={"seed": str(SEED), "lines": str(LINES),
                                 "train_max_ops": str(TRAIN_MAX_OPS)})
