"""Training and evaluation batches from a prepared dataset, packed by the Numba kernels.

The row stream
--------------
Epoch ``e`` visits the split's shards in ``permutation(n_shards, seed, e)`` order.
Shard ``i`` (its index among the split's shards in the manifest) has its documents
in ``permutation(n_docs, seed, e, i, DOC_ORDER)`` order, packed into rows of
``T + n`` ids by ``bytemtp_native.plan_rows``, and the rows are then taken in
``permutation(n_rows, seed, e, i, ROW_ORDER)`` order. Shuffling rows matters in
both modes: best-fit rows come out longest-documents-first, and consecutive
concat rows are consecutive pieces of one document (a 4 KiB batch of 256-byte rows
would be a single file, and the loss would swing from batch to batch). Every
shard's rows of every epoch, one after the other, make one infinite row stream.

Rows never straddle two shards: a shard's concat stream ends in one row padded
with -1. That costs one partial row per shard (1 in 30,000 rows at 64 MiB shards
and T = 2048) and buys a resume state that is a position, not a carried-over
buffer of ids.

Ranks
-----
Global batch ``g`` is rows ``[g*W*B, (g+1)*W*B)`` of the stream and rank ``r`` takes
``[g*W*B + r*B, g*W*B + (r+1)*B)``. Ranks see disjoint rows and the same number of
batches, and together exactly what a single process with batch ``W*B`` sees, so a
multi-process run is comparable to a single-process one. Each rank reads every
shard (decompression is cheap next to a training step) and fills only its rows.

Resume
------
The state is the position of the next global row, ``(epoch, shard, row)``: a few
integers, the same on every rank and independent of what the background thread
has prefetched (a prefetched shard is a pure function of its position). It does
not depend on ``W`` or ``B`` either, so a run may resume on a different number of
ranks, and it carries a fingerprint of the dataset so a resume onto different
data fails loudly instead of drifting.

Host memory
-----------
The background thread decompresses the next shard (zstd releases the GIL) and
plans its rows (Numba, ``nogil``) while the current one is consumed; a shard
costs its own bytes plus a few integers per document. Batches are filled as int16
into a staging tensor, pinned when the device is CUDA so the copy can be
asynchronous, and widened to int64 on the device.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator

import numpy as np
import torch

from bytemtp.errors import BytemtpError, require_at_least_one
from bytemtp.data.shards import SPLITS, Dataset, Shard, ShardInfo
from bytemtp_native import PACKING_MODES, PackPlan, concat_stream, fill_rows, permutation, plan_rows

DOC_ORDER, ROW_ORDER = 0, 1  # last key part of the per-shard permutations
STATE_VERSION = 2
_STATE_FIELDS = ("version", "dataset", "split", "mode", "seq_len", "n_future", "seed", "epoch", "shard", "row")


@dataclass
class LoaderConfig:
    """How batches are cut; everything that changes the row stream except the data and ``W``."""

    batch_size: int  # rows per batch on this rank
    seq_len: int  # T
    n_future: int  # n; rows are T + n ids
    mode: str = "concat"  # or "best-fit"
    seed: int = 0

    def __post_init__(self) -> None:
        require_at_least_one(self, ("batch_size", "seq_len", "n_future"))
        if self.mode not in PACKING_MODES:
            raise BytemtpError(f"mode: {self.mode!r} is not one of {', '.join(PACKING_MODES)}")

    @property
    def row_len(self) -> int:
        return self.seq_len + self.n_future


class _Prefetcher:
    """Computes ``load(key)`` for the key the caller will want next, in a background thread.

    Results are looked up by key, so how far the thread got never changes what the
    caller receives; a stale guess is simply dropped.
    """

    def __init__(self, load: Callable[[Hashable], Any]):
        self._load = load
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bytemtp-prefetch")
        self._pending: dict[Hashable, Future] = {}
        weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)

    def get(self, key: Hashable, next_key: Hashable | None = None) -> Any:
        future = self._pending.pop(key, None)
        for stale in self._pending.values():
            stale.cancel()
        self._pending = {}
        if next_key is not None:
            self._pending[next_key] = self._pool.submit(self._load, next_key)
        return future.result() if future is not None else self._load(key)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _split_shards(ds: Dataset, split: str) -> list[ShardInfo]:
    if split not in SPLITS:
        raise BytemtpError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    shards = ds.shards(split)
    if not shards or ds.n_bytes(split) == 0:
        raise BytemtpError(f"{ds.root}: the {split!r} split is empty (no document bytes to read)")
    return shards


def _fingerprint(shards: list[ShardInfo]) -> str:
    return hashlib.sha256("".join(s.sha256 for s in shards).encode()).hexdigest()[:16]


def _host_buffer(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """int16 staging rows; page-locked for a GPU so ``_to_device`` can copy asynchronously."""
    return torch.empty((rows, cols), dtype=torch.int16, pin_memory=device.type == "cuda")


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    # The caching host allocator keeps a pinned block alive until its copy has run.
    return host.to(device, non_blocking=True).long()


@dataclass
class _PackedShard:
    """One shard packed for one epoch: its bytes, its row plan and the order rows are taken in."""

    shard: Shard
    plan: PackPlan
    row_order: np.ndarray

    def fill(self, start: int, count: int, out: np.ndarray) -> None:
        rows = self.row_order[start : start + count]
        fill_rows(self.shard.data, self.shard.offsets, self.plan, rows, out)


class BatchLoader:
    """Infinite ``[batch_size, seq_len + n_future]`` int64 batches of this rank's rows; see the module doc."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        cfg: LoaderConfig,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ):
        if world_size < 1:
            raise BytemtpError(f"world_size: must be at least 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise BytemtpError(f"rank: must be in [0, {world_size}), got {rank}")
        self.cfg, self.split, self.rank, self.world_size = cfg, split, rank, world_size
        self.device = torch.device(device)
        self._ds = Dataset(data_dir)
        self._shards = _split_shards(self._ds, split)
        self._fingerprint = _fingerprint(self._shards)
        self._prefetch = _Prefetcher(self._load)
        self._position = (0, 0, 0)  # epoch, index into the epoch's shard order, row
        self._current: tuple[tuple[int, int], _PackedShard] | None = None

    @property
    def epoch(self) -> int:
        return self._position[0]

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> torch.Tensor:
        B = self.cfg.batch_size
        host = _host_buffer(B, self.cfg.row_len, self.device)
        self._advance(self.rank * B)
        self._advance(B, host.numpy())
        self._advance((self.world_size - 1 - self.rank) * B)
        return _to_device(host, self.device)

    def state_dict(self) -> dict:
        epoch, shard, row = self._position
        return {
            "version": STATE_VERSION,
            "dataset": self._fingerprint,
            "split": self.split,
            "mode": self.cfg.mode,
            "seq_len": self.cfg.seq_len,
            "n_future": self.cfg.n_future,
            "seed": self.cfg.seed,
            "epoch": epoch,
            "shard": shard,
            "row": row,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in _STATE_FIELDS if k not in state]
        if missing:
            raise BytemtpError(f"loader state: missing field {missing[0]!r}")
        mine = self.state_dict()
        for key in ("version", "split", "mode", "seq_len", "n_future", "seed"):
            if state[key] != mine[key]:
                raise BytemtpError(f"loader state: {key} is {state[key]!r} in the saved state but {mine[key]!r} now")
        if state["dataset"] != mine["dataset"]:
            raise BytemtpError(f"loader state: saved for different {self.split!r} shards than {self._ds.root} has")
        position = tuple(state[k] for k in ("epoch", "shard", "row"))
        if not all(isinstance(v, int) and v >= 0 for v in position) or position[1] >= len(self._shards):
            raise BytemtpError(f"loader state: invalid position (epoch, shard, row) = {position}")
        self._position = position

    def _load(self, key: tuple[int, int]) -> _PackedShard:
        """Decompress and plan the shard at ``key`` = (epoch, place in the epoch's order)."""
        epoch, place = key
        index = int(permutation(len(self._shards), self.cfg.seed, epoch)[place])
        shard = self._ds.read(self._shards[index])
        doc_order = permutation(shard.n_docs, self.cfg.seed, epoch, index, DOC_ORDER)
        plan = plan_rows(shard.offsets, doc_order, self.cfg.seq_len, self.cfg.n_future, self.cfg.mode)
        return _PackedShard(shard, plan, permutation(plan.n_rows, self.cfg.seed, epoch, index, ROW_ORDER))

    def _next_key(self, epoch: int, place: int) -> tuple[int, int]:
        return (epoch, place + 1) if place + 1 < len(self._shards) else (epoch + 1, 0)

    def _packed(self) -> _PackedShard:
        epoch, place, _ = self._position
        if self._current is None or self._current[0] != (epoch, place):
            packed = self._prefetch.get((epoch, place), self._next_key(epoch, place))
            if self._position[2] > packed.plan.n_rows:
                raise BytemtpError(f"loader state: row {self._position[2]} is past the end of its shard")
            self._current = ((epoch, place), packed)
        return self._current[1]

    def _advance(self, count: int, out: np.ndarray | None = None) -> None:
        """Move ``count`` rows along the stream, writing them into ``out`` if given."""
        done = 0
        while done < count:
            packed = self._packed()
            epoch, place, row = self._position
            k = min(count - done, packed.plan.n_rows - row)
            if out is not None:
                packed.fill(row, k, out[done : done + k])
            done += k
            row += k
            self._position = (*self._next_key(epoch, place), 0) if row == packed.plan.n_rows else (epoch, place, row)


def _eval_rows(ds: Dataset, shards: list[ShardInfo], seq_len: int, n_future: int) -> Iterator[np.ndarray]:
    """Rows ``stream[r*T : r*T + T + n]`` of the whole split's stream, -1 past its end, shard by shard."""
    T, C = seq_len, seq_len + n_future

    def load(i: int) -> np.ndarray:
        shard = ds.read(shards[i])
        return concat_stream(shard.data, shard.offsets)

    prefetch = _Prefetcher(load)
    pending = np.zeros(0, np.int16)  # the stream from the next row's start on
    try:
        for i in range(len(shards)):
            stream = np.concatenate((pending, prefetch.get(i, i + 1 if i + 1 < len(shards) else None)))
            n_full = (len(stream) - C) // T + 1 if len(stream) >= C else 0
            if n_full:
                yield np.lib.stride_tricks.sliding_window_view(stream, C)[::T]
            pending = stream[n_full * T :]
    finally:
        prefetch.close()
    if len(pending) >= 2:
        n_last = (len(pending) - 2) // T + 1
        tail = np.full((n_last - 1) * T + C, -1, np.int16)
        tail[: len(pending)] = pending
        yield np.lib.stride_tricks.sliding_window_view(tail, C)[::T]


def _batches(
    row_chunks: Iterator[np.ndarray], batch_size: int, row_len: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """Regroup chunks of rows into batches of ``batch_size`` rows (the last one may be smaller)."""
    host, filled = None, 0
    for rows in row_chunks:
        taken = 0
        while taken < len(rows):
            if host is None:
                host, filled = _host_buffer(batch_size, row_len, device), 0
            k = min(batch_size - filled, len(rows) - taken)
            host.numpy()[filled : filled + k] = rows[taken : taken + k]
            filled, taken = filled + k, taken + k
            if filled == batch_size:
                yield _to_device(host, device)
                host = None
    if host is not None:
        yield _to_device(host[:filled], device)


def iter_eval_batches(
    data_dir: str | os.PathLike,
    batch_size: int,
    seq_len: int,
    n_future: int,
    split: str = "val",
    device: str | torch.device = "cpu",
) -> Iterator[torch.Tensor]:
    """The split's documents as one BOS+document stream in manifest order, in rows of
    ``T + n`` with stride ``T`` (-1 past the end): every byte is a head-1 target exactly
    once, which is what bits per byte needs. Deterministic and finite; the last batch
    may have fewer rows. Bad arguments and an empty split fail here, not at the first batch.
    """
    cfg = LoaderConfig(batch_size, seq_len, n_future)
    ds = Dataset(data_dir)
    shards = _split_shards(ds, split)
    rows = _eval_rows(ds, shards, cfg.seq_len, cfg.n_future)
    return _batches(rows, cfg.batch_size, cfg.row_len, torch.device(device))
