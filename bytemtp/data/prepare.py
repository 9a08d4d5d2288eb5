"""``prepare``: stream raw corpora into a sharded dataset (see ``bytemtp.data.shards``).

Three properties matter more than speed:

- **Bounded memory.** Documents are read in pieces of at most ``max_doc_bytes`` and
  collected into at most about one shard (``shard_bytes``) before it is compressed
  and written, whatever the size of the input.
- **Stable splits.** A document goes to ``val`` when a hash of its source identity
  falls below ``val_fraction``; adding data never moves existing documents.
- **Atomic output.** The dataset is built in a temporary sibling directory with the
  manifest written last, then renamed into place; an interrupted or failed run leaves
  the previous dataset (if any) untouched and nothing half-written under its name.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Sequence

import zstandard
from tqdm import tqdm

from bytemtp.data.atomic import atomic_dir
from bytemtp.data.documents import ReadOptions, ReadStats
from bytemtp.data.partition import Part, plan_parts, read_part
from bytemtp.data.shards import (
    MANIFEST,
    SPLITS,
    Dataset,
    ShardBuffer,
    ShardInfo,
    is_dataset_dir,
    load_manifest,
    shard_name,
    write_manifest,
)
from bytemtp.data.sources import BUILTIN_PREFIX, read_documents, resolve_sources
from bytemtp.errors import BytemtpError

SPLIT_RULE = "val iff blake2b-64(identity) < val_fraction * 2**64"
_BAR_STEP = 1 << 20  # bytes between two progress bar updates


@dataclass
class PrepareConfig:
    """Settings of one ``prepare`` run; ``threads`` only changes speed, the rest the content."""

    shard_bytes: int = 64 << 20
    val_fraction: float = 0.01
    level: int = 3
    threads: int = -1  # zstd workers; -1: one per core
    read: ReadOptions = field(default_factory=ReadOptions)

    def __post_init__(self) -> None:
        if self.shard_bytes < 1:
            raise BytemtpError(f"--shard-bytes: must be at least 1, got {self.shard_bytes}")
        if not 0.0 <= self.val_fraction <= 1.0:
            raise BytemtpError(f"--val-fraction: must be between 0 and 1, got {self.val_fraction}")
        if not 1 <= self.level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise BytemtpError(f"--level: must be 1..{zstandard.MAX_COMPRESSION_LEVEL}, got {self.level}")
        if self.threads < -1:
            raise BytemtpError(f"--threads: must be -1 (all cores), 0 or more, got {self.threads}")

    def params(self) -> dict:
        """The manifest's record of every setting that shapes the dataset, as plain JSON values."""
        params = {
            "shard_bytes": self.shard_bytes,
            "val_fraction": self.val_fraction,
            "split": SPLIT_RULE,
            "level": self.level,
            **asdict(self.read),
        }
        return json.loads(json.dumps(params))


@dataclass
class PrepareSummary:
    """What a ``prepare`` run wrote, with the reading statistics and its wall time."""

    out: Path
    shards: list[ShardInfo]
    stats: ReadStats
    seconds: float

    def n_docs(self, split: str | None = None) -> int:
        return sum(s.n_docs for s in self.shards if split is None or s.split == split)

    def n_bytes(self, split: str | None = None) -> int:
        return sum(s.n_bytes for s in self.shards if split is None or s.split == split)

    @property
    def compression_ratio(self) -> float:
        return self.n_bytes() / max(1, sum(s.compressed_bytes for s in self.shards))

    @property
    def mb_per_s(self) -> float:
        return self.n_bytes() / 1e6 / max(self.seconds, 1e-9)


def split_of(identity: str, val_fraction: float) -> str:
    """``"val"`` for a stable pseudo-random ``val_fraction`` of identities, else ``"train"``.

    A cryptographic hash rather than Python's ``hash()``: the same identity lands
    in the same split on every machine, run and Python version.
    """
    digest = hashlib.blake2b(identity.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") < val_fraction * 2**64 else "train"


class _ShardSink:
    """Routes documents into per-split shards, holding at most about one shard in memory.

    Train and val fill separate buffers; when together they reach ``shard_bytes`` the
    fuller one is written. Memory stays near one shard however the split falls, at the
    price of shards somewhat below the target size while val is filling.
    """

    def __init__(self, root: Path, config: PrepareConfig):
        self.root = root
        self.config = config
        self.buffers = {split: ShardBuffer() for split in SPLITS}
        self.shards: list[ShardInfo] = []
        self.pending = 0  # bytes in the buffers: kept, not summed per document

    def add(self, split: str, data: bytes) -> None:
        self.buffers[split].add(data)
        self.pending += len(data)
        if self.pending >= self.config.shard_bytes:
            self._flush(max(SPLITS, key=lambda s: self.buffers[s].n_bytes))

    def close(self) -> list[ShardInfo]:
        for split in SPLITS:
            if self.buffers[split].n_docs:
                self._flush(split)
        return sorted(self.shards, key=lambda s: s.file)

    def _flush(self, split: str) -> None:
        path = self.root / shard_name(split, sum(s.split == split for s in self.shards))
        self.pending -= self.buffers[split].n_bytes
        try:
            self.shards.append(self.buffers[split].write(path, level=self.config.level, threads=self.config.threads))
        except OSError as e:
            raise BytemtpError(f"{path}: cannot write shard ({e.strerror or e})") from None


def prepare(
    sources: Sequence[str],
    out: str | Path,
    config: PrepareConfig | None = None,
    *,
    part: Part | None = None,
    overwrite: bool = False,
    progress: bool = True,
    stdin: BinaryIO | None = None,
) -> PrepareSummary:
    """Prepare ``sources`` (paths, ``-``, ``builtin:NAME``) into the dataset directory ``out``.

    ``out`` must be absent or empty, or with ``overwrite`` hold exactly a prepared
    dataset, which is replaced only once the new one is complete; it may not lie inside
    an input. ``part`` prepares only that part of the inputs (``bytemtp.data.partition``),
    a complete dataset of its own for ``merge``, possibly empty. ``progress`` shows a tqdm
    bar on stderr; ``stdin`` is what ``-`` reads (default: the process's stdin).
    """
    config = config or PrepareConfig()
    out = Path(out)
    readers = resolve_sources(sources, config.read, stdin)
    check_out(out, overwrite)
    refuse_out_inside(out, [path for r in readers for path in r.paths()], "input")
    plan = plan_parts(readers, config.read, part) if part is not None else None
    inputs = [r.describe() for r in readers]
    stats = ReadStats()
    docs = read_part(readers, config.read, stats, plan) if plan else read_documents(readers, config.read, stats)
    start = time.perf_counter()
    try:
        with atomic_dir(out, replace=True) as tmp:
            sink = _ShardSink(tmp, config)
            bar = tqdm(desc=f"prepare {out.name}", unit="B", unit_scale=True, file=sys.stderr, disable=not progress)
            with bar:
                unshown = 0  # bytes not yet counted on the bar: one update per document cost 7% of tiny rows
                for doc in docs:
                    sink.add(split_of(doc.identity, config.val_fraction), doc.data)
                    unshown += len(doc.data)
                    if unshown >= _BAR_STEP:
                        bar.update(unshown)
                        unshown = 0
                bar.update(unshown)
                shards = sink.close()
            if not shards and plan is None:
                raise BytemtpError(f"{' '.join(sources)}: no documents to prepare (the input is empty)")
            source = {"inputs": inputs, "stats": asdict(stats)}
            if plan is not None:
                source["part"] = plan.manifest_record()
            write_manifest(tmp, shards, source=source, params=config.params())
    except OSError as e:
        raise BytemtpError(f"{out}: cannot write the dataset ({e.strerror or e})") from None
    return PrepareSummary(out, shards, stats, time.perf_counter() - start)


def is_up_to_date(out: str | Path, sources: Sequence[str], config: PrepareConfig | None = None) -> bool:
    """Whether ``out`` already holds what ``prepare(sources, out, config)`` would write.

    Decided by content: only built-in corpora carry a content hash to compare, so any
    other source answers ``False``. Shard files are checked for presence and size; a
    full check is ``bytemtp info --verify``.
    """
    config = config or PrepareConfig()
    if not sources or not all(s.startswith(BUILTIN_PREFIX) for s in sources):
        return False
    try:
        ds = Dataset(out)
    except BytemtpError:
        return False
    expected = [r.describe() for r in resolve_sources(sources, config.read)]
    if ds.manifest.get("params") != config.params() or ds.manifest.get("source", {}).get("inputs") != expected:
        return False
    for info in ds.shards():
        path = ds.root / info.file
        if not path.is_file() or path.stat().st_size != info.compressed_bytes:
            return False
    return True


def check_out(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse an output directory that is not free to write: ``prepare`` and ``merge`` write
    into an absent or empty directory, and with ``overwrite`` replace one that holds
    exactly a dataset (a manifest and the shards it lists), never anything else."""
    if out.exists() and not out.is_dir():
        raise BytemtpError(f"{flag} {out}: exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise BytemtpError(f"{flag} {out}: directory is not empty (pass --overwrite to replace it)")
    if not is_dataset_dir(out):
        raise BytemtpError(f"{flag} {out}: not a prepared dataset; refusing to replace it even with --overwrite")
    _, shards = load_manifest(out)
    ours = {MANIFEST, *(s.file for s in shards)}
    others = sorted(p.name + "/" if p.is_dir() else p.name for p in out.iterdir() if p.name not in ours)
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise BytemtpError(
            f"{flag} {out}: holds {shown} besides the dataset; refusing to replace it even with --overwrite"
        )


def refuse_out_inside(out: Path, roots: list[Path], what: str) -> None:
    """Refuse an output equal to or inside one of ``roots``: inside an input it would be read
    back as input by a later run, and replacing a part (or its parent) would delete it."""
    resolved = out.resolve()
    for root in roots:
        if root.resolve() == resolved or root.resolve() in resolved.parents:
            raise BytemtpError(f"--out {out}: lies inside the {what} {root}; write the dataset elsewhere")
