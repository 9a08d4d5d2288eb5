"""``merge``: join the part datasets of ``prepare --part I/N`` into one dataset, without recompressing.

Shards are hard-linked into the new dataset (copied where the filesystem cannot link),
renamed into one ``train-NNNNN``/``val-NNNNN`` sequence in part order, and checked
against their manifest entries (size and sha256) on the way; the manifest is rebuilt
with the parts' statistics summed. The output is written like ``prepare`` writes it:
in a temporary sibling, manifest last, renamed into place.

The merged dataset holds exactly the documents a one-process ``prepare`` of the same
sources writes, with the same split for every one of them (the split is a hash of a
document's identity, not of the process that read it); only the order of documents
across shards differs. That holds only if the parts belong together, so ``merge``
refuses parts prepared from different inputs or settings, a part given twice and a
missing part.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from bytemtp.data.atomic import atomic_dir
from bytemtp.data.documents import ReadStats
from bytemtp.data.partition import MAX_PARTS
from bytemtp.data.prepare import PrepareSummary, check_out, refuse_out_inside
from bytemtp.data.shards import Dataset, ShardInfo, file_sha256, shard_name, write_manifest
from bytemtp.errors import BytemtpError

_LINK_FAILURES = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP)
_SHOWN = 5  # parts and ranges named in the message when some are missing


def merge(
    parts: Sequence[str | os.PathLike], out: str | os.PathLike, *, overwrite: bool = False, progress: bool = True
) -> PrepareSummary:
    """Merge the part datasets ``parts`` (any order) into the dataset directory ``out``."""
    out = Path(out)
    datasets = _check_parts([Path(p) for p in parts])
    check_out(out, overwrite)
    refuse_out_inside(out, [ds.root for ds in datasets], "part")
    start = time.perf_counter()
    stats = ReadStats()
    shards: list[ShardInfo] = []
    total = sum(s.compressed_bytes for ds in datasets for s in ds.shards())
    try:
        with atomic_dir(out, replace=True) as tmp:
            bar = tqdm(
                total=total, desc=f"merge {out.name}", unit="B", unit_scale=True, file=sys.stderr, disable=not progress
            )
            with bar:
                for ds in datasets:
                    stats.add(_stats(ds))
                    for info in ds.shards():
                        index = sum(s.split == info.split for s in shards)
                        shards.append(_place(ds.root / info.file, tmp / shard_name(info.split, index), info))
                        bar.update(info.compressed_bytes)
            first = datasets[0].manifest
            source = {
                "inputs": first["source"]["inputs"],
                "stats": {f.name: getattr(stats, f.name) for f in fields(stats)},
                "merged": {"parts": len(datasets), "units_sha256": first["source"]["part"]["units_sha256"]},
            }
            write_manifest(tmp, sorted(shards, key=lambda s: s.file), source=source, params=first.get("params", {}))
    except OSError as e:
        raise BytemtpError(f"{out}: cannot write the dataset ({e.strerror or e})") from None
    return PrepareSummary(out, shards, stats, time.perf_counter() - start)


def _check_parts(paths: list[Path]) -> list[Dataset]:
    """The parts as datasets in part order, once each checked to belong together."""
    if not paths:
        raise BytemtpError("PART: give the part datasets to merge")
    seen: dict[Path, Path] = {}
    for path in paths:
        if path.resolve() in seen:
            raise BytemtpError(f"{path}: given twice (also as {seen[path.resolve()]})")
        seen[path.resolve()] = path
    datasets = [Dataset(path) for path in paths]
    records = [_part_record(ds) for ds in datasets]
    first, first_record = datasets[0], records[0]
    by_index: dict[int, Dataset] = {}
    for ds, record in zip(datasets, records):
        if record["count"] != first_record["count"]:
            raise BytemtpError(
                f"{ds.root}: a part of {record['count']}, but {first.root} is a part of {first_record['count']}"
            )
        mine, theirs = ds.manifest.get("params", {}), first.manifest.get("params", {})
        if mine != theirs:
            differ = ", ".join(sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)))
            raise BytemtpError(f"{ds.root}: prepared with other settings than {first.root} ({differ})")
        if ds.manifest["source"].get("inputs") != first.manifest["source"].get("inputs"):
            raise BytemtpError(f"{ds.root}: prepared from other inputs than {first.root}")
        if record["units_sha256"] != first_record["units_sha256"]:
            raise BytemtpError(f"{ds.root}: the input files differ from those {first.root} was prepared from")
        if record["index"] in by_index:
            other = by_index[record["index"]].root
            raise BytemtpError(f"{ds.root}: part {record['index']}/{record['count']} again (also {other})")
        by_index[record["index"]] = ds
    if len(by_index) < first_record["count"]:
        given = sorted(by_index.items())
        raise BytemtpError(
            f"PART: part {_missing_ranges(sorted(by_index), first_record['count'])} of {first_record['count']} "
            f"missing (given: {', '.join(f'{i} in {ds.root}' for i, ds in given[:_SHOWN])}"
            f"{f' and {len(given) - _SHOWN} more' if len(given) > _SHOWN else ''})"
        )
    return [by_index[i] for i in sorted(by_index)]


def _missing_ranges(given: list[int], count: int) -> str:
    """The part indices in 0..count-1 not in ``given`` (sorted), as ranges: ``1, 4-9``, at most
    ``_SHOWN`` of them; the work is that of the parts given, whatever ``count`` is."""
    ranges, start = [], 0
    for i in [*given, count]:
        if i > start:
            ranges.append(str(start) if i == start + 1 else f"{start}-{i - 1}")
        start = i + 1
    return ", ".join(ranges[:_SHOWN]) + (f" and {len(ranges) - _SHOWN} more ranges" if len(ranges) > _SHOWN else "")


def _part_record(ds: Dataset) -> dict:
    record = ds.manifest.get("source", {}).get("part")
    ok = isinstance(record, dict) and all(type(record.get(k)) is int for k in ("index", "count"))
    if not ok or not isinstance(record.get("units_sha256"), str) or not 0 <= record["index"] < record["count"]:
        raise BytemtpError(f"{ds.root}: not a part dataset (prepare it with --part I/N)")
    if record["count"] > MAX_PARTS:
        raise BytemtpError(f"{ds.root}: a part of {record['count']:,}, more than the {MAX_PARTS:,} parts allowed")
    return record


def _stats(ds: Dataset) -> ReadStats:
    counts = ds.manifest["source"].get("stats", {})
    if not isinstance(counts, dict):
        counts = {}
    return ReadStats(**{f.name: counts[f.name] for f in fields(ReadStats) if type(counts.get(f.name)) is int})


def _place(src: Path, dst: Path, info: ShardInfo) -> ShardInfo:
    """Hard-link (else copy) a shard to ``dst`` and check its size and sha256 against ``info``."""
    try:
        size = src.stat().st_size
    except FileNotFoundError:
        raise BytemtpError(f"{src}: shard file is missing") from None
    if size != info.compressed_bytes:
        raise BytemtpError(f"{src}: {size} bytes, but its manifest says {info.compressed_bytes}")
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in _LINK_FAILURES:
            raise
        shutil.copyfile(src, dst)
    if file_sha256(dst) != info.sha256:
        raise BytemtpError(f"{src}: sha256 mismatch (file corrupt or modified)")
    return replace(info, file=dst.name)
