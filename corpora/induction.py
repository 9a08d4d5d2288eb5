"""``builtin:induction``: short stories in which invented names are introduced and mentioned again.

The probe of the paper's Section 4.1 (induction): once a name has been read, the rest of
a later mention of it can be copied from the earlier one, and nothing else predicts it.
Names are random letter strings (an initial capital and 2 to 5 lowercase letters drawn
uniformly), so no training set holds them and a model that does not look back guesses
each letter after the first with probability 1/26 (``CHANCE``).

Two things make "copy the earlier mention" always right, so that an oracle scores 100 %:
the names of one story have distinct initials, and no word of the templates starts with
one of the initials names use (``INITIALS``). Stories fit in ``MAX_BYTES`` bytes, so a
tiny model's 256-byte context holds each one whole.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from bytemtp_corpora.corpus import GeneratedCorpus

SEED = 0  # the training corpus; the probe's metric draws its stories from other seeds
STORIES = 10_000
MAX_BYTES = 240
INITIALS = "BDFGJKMNPRVWZ"  # no template word starts with these capitals
LOWER = "abcdefghijklmnopqrstuvwxyz"
CHANCE = 1 / len(LOWER)

# A name's first mention: {A} is the new character, {B} one met before (if any).
INTRODUCTIONS = (
    "There was a child called {A}.",
    "Once, a traveller named {A} came to the village.",
    "One day {A} met {B} by the river.",
    "{A} lived in a small house near the hill.",
    "In the garden, {B} found a friend named {A}.",
)
# Later sentences: any introduced characters.
MENTIONS = (
    "{A} gave {B} a red ball.",
    "{B} laughed and ran after {A}.",
    "Later, {A} found a shiny stone.",
    "{A} said, \"Look, {B}!\"",
    "The next morning {A} was happy.",
    "{B} and {A} ate apples under a tree.",
    "{A} told a long story about a cat.",
    "After lunch, {B} helped {A} carry the water.",
)
FILLERS = (
    "The sun was warm.",
    "It was a quiet day.",
    "The wind moved the grass.",
    "A bird sang on the roof.",
)


@dataclass(frozen=True)
class Story:
    """A story, the byte spans ``[start, end)`` of every mention of a name after its first
    (``repeats``), and of every name's first mention (``firsts``: the same bytes unseen)."""

    text: bytes
    repeats: tuple[tuple[int, int], ...]
    firsts: tuple[tuple[int, int], ...]


def invent_name(rng: random.Random, initial: str) -> str:
    return initial + "".join(rng.choice(LOWER) for _ in range(rng.randint(2, 5)))


def _fill(template: str, a: str, b: str | None, text: str, spans: list[tuple[int, str]]) -> str:
    """``template`` with {A}/{B} filled, appended to ``text``; records each name's offset."""
    start = len(text) + (1 if text else 0)
    out, i = [], 0
    while i < len(template):
        if template.startswith("{A}", i) or template.startswith("{B}", i):
            name = a if template[i + 1] == "A" else b
            spans.append((start + sum(map(len, out)), name))
            out.append(name)
            i += 3
        else:
            out.append(template[i])
            i += 1
    return (text + " " if text else "") + "".join(out)


def story(rng: random.Random) -> Story:
    """One story: two or three characters introduced in turn, then sentences mentioning them,
    as long as the story stays within ``MAX_BYTES`` (three introductions and the longest
    mention always fit, so every story repeats a name)."""
    initials = rng.sample(INITIALS, rng.randint(2, 3))
    names = [invent_name(rng, c) for c in initials]
    text, spans = "", []
    for k, name in enumerate(names):
        choices = INTRODUCTIONS if k else [t for t in INTRODUCTIONS if "{B}" not in t]
        text = _fill(rng.choice(choices), name, rng.choice(names[:k]) if k else None, text, spans)
    introduced = len(spans)
    while True:
        if len(spans) > introduced and rng.random() < 0.25:  # a mention first: every story has a repeat
            template, a, b = rng.choice(FILLERS), names[0], None
        else:
            template = rng.choice(MENTIONS)
            a, b = rng.sample(names, 2)
        trial = list(spans)
        longer = _fill(template, a, b, text, trial)
        if len(longer) > MAX_BYTES:
            break
        text, spans = longer, trial
    seen, repeats, firsts = set(), [], []
    for offset, name in spans:
        (repeats if name in seen else firsts).append((offset, offset + len(name)))
        seen.add(name)
    return Story(text.encode(), tuple(repeats), tuple(firsts))


def stories(seed: int, count: int) -> Iterator[Story]:
    """``count`` stories, the same for the same ``seed`` (Python's seeded Mersenne Twister)."""
    rng = random.Random(seed)
    for _ in range(count):
        yield story(rng)


def documents() -> Iterator[tuple[str, bytes]]:
    for i, s in enumerate(stories(SEED, STORIES)):
        yield f"story-{i:06d}", s.text


def corpus() -> GeneratedCorpus:
    return GeneratedCorpus(name="induction", documents=documents,
                           meta={"seed": str(SEED), "stories": str(STORIES), "max_bytes": str(MAX_BYTES)})
