"""``prepare --part I/N``: a deterministic 1/N of the inputs, for N workers of any scheduler.

The inputs are cut into *units*: a whole file (or stdin), except a Parquet file, which
is one unit per row group, so a single huge file still spreads over the parts. Every
unit weighs what reading it costs (a file's size, a row group's compressed text
column). In the sources' order, the units are cut into N contiguous runs of about equal
weight: a unit goes to the part its weight's midpoint falls in. Each part reads a
contiguous stretch of files and row groups, every unit belongs to exactly one part, and
the assignment is a pure function of the inputs and N, so N independent processes agree
on it without talking to each other.

A part records a fingerprint of the whole unit list; ``merge`` refuses parts whose
fingerprints differ (a file added or changed between the parts' runs would otherwise
lose or duplicate documents). A file's entry in it is its identity, size and
modification time in nanoseconds: the ``stat`` that gives the size gives the time for
free, and it changes on an edit that keeps the size. A hash of the content would
instead make every one of the N parts read every input file, N times the work of
preparing. So the parts must read the same files (one shared filesystem), not copies
whose times differ.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

from bytemtp.data.columnar import parquet_row_groups
from bytemtp.data.documents import Document, ReadOptions, ReadStats
from bytemtp.data.sources import Entry, Source, StdinSource, entry_documents
from bytemtp.errors import BytemtpError


# Each part is a process of its own and ``merge`` is given every one: far more parts than any
# scheduler runs (Slurm's largest array is about 4 million tasks) can only be a typo.
MAX_PARTS = 1 << 20


@dataclass(frozen=True)
class Part:
    """Part ``index`` (from 0) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise BytemtpError(f"--part: {self.index}/{self.count} is not I/N with 0 <= I < N")
        if self.count > MAX_PARTS:
            raise BytemtpError(f"--part: {self.index}/{self.count}: at most {MAX_PARTS:,} parts")

    @classmethod
    def parse(cls, text: str) -> Part:
        """``I/N``, as a Slurm array passes ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise BytemtpError(f"--part: {text!r} is not I/N (part I of N, I from 0 to N-1)")
        return cls(int(match[1]), int(match[2]))


@dataclass(frozen=True)
class _Unit:
    entry: Entry
    row_group: int | None  # None: the whole entry
    weight: int
    stamp: str  # the entry's size and mtime_ns: changes when the file is edited

    def key(self) -> bytes:
        text = f"{self.entry.identity}\0{self.row_group}\0{self.weight}\0{self.stamp}\n"
        return text.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class PartPlan:
    """Which part reads each unit, and the fingerprint of the unit list the parts must share."""

    part: Part
    owners: list[int]
    fingerprint: str

    def manifest_record(self) -> dict:
        return {"index": self.part.index, "count": self.part.count, "units_sha256": self.fingerprint}


def plan_parts(sources: Sequence[Source], options: ReadOptions, part: Part) -> PartPlan:
    """List every unit once (weights and fingerprint) and give each to its part."""
    if part.count > 1 and any(isinstance(s, StdinSource) for s in sources):
        raise BytemtpError("SOURCE '-': stdin cannot be split between parts; prepare it with --part 0/1")
    h = hashlib.sha256()
    weights: list[int] = []
    for unit in _units(sources, options):
        h.update(unit.key())
        weights.append(unit.weight)
    return PartPlan(part, _owners(weights, part.count), h.hexdigest())


def read_part(sources: Sequence[Source], options: ReadOptions, stats: ReadStats, plan: PartPlan) -> Iterator[Document]:
    """The documents of the units ``plan`` gives to its part, in the sources' order."""
    owners = iter(plan.owners)
    for unit in _units(sources, options):
        owner = next(owners, None)
        if owner is None:
            raise BytemtpError(f"{unit.entry.name}: the inputs changed while this part was being prepared")
        if owner == plan.part.index:
            groups = None if unit.row_group is None else [unit.row_group]
            yield from entry_documents(unit.entry, options, stats, groups)


def _units(sources: Sequence[Source], options: ReadOptions) -> Iterator[_Unit]:
    for source in sources:
        for entry in source.entries():
            size, mtime_ns = _stat(entry)
            stamp = f"{size}:{mtime_ns}"
            if entry.format == "parquet":
                for group, weight in enumerate(parquet_row_groups(entry.path, entry.name, options.text_field)):
                    yield _Unit(entry, group, weight, stamp)
            else:
                yield _Unit(entry, None, size, stamp)


def _stat(entry: Entry) -> tuple[int, int]:
    """Size and modification time (ns) of the entry's file; stdin has neither."""
    if entry.path is None:
        return 0, 0
    try:
        st = entry.path.stat()
    except OSError as e:
        raise BytemtpError(f"{entry.name}: cannot read ({e.strerror})") from None
    return st.st_size, st.st_mtime_ns


def _owners(weights: list[int], count: int) -> list[int]:
    """Part of each unit: the one whose stretch of the total weight holds the unit's midpoint."""
    total = sum(weights)
    owners, start = [], 0
    for w in weights:
        # midpoint (start + w/2) in part floor(midpoint * count / total), in integers
        owners.append(min(count - 1, (2 * start + w) * count // (2 * total)) if total else 0)
        start += w
    return owners
