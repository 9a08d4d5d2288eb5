"""Bits per byte of every head on a dataset's whole validation split.

One function serves ``bytemtp eval`` and the training loop's periodic eval, so the
figure a run logs and the figure its checkpoint gets later are the same number.

Each head's figure is its total cross-entropy over every target it has, divided
by the number of those targets (not a mean of per-batch means): the last batch is
padded with -1 past the end of the split (whole rows of it where the split runs
out of rows, so every batch has the same shape), and head k has fewer targets
there than head 1, so per-batch means would weight bytes unequally and depend on
the batch size. A split shorter than k bytes gives head k no target at all: its
figure is missing (None), not a perfect 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bytemtp.data.loader import iter_eval_batches
from bytemtp.data.shards import Dataset
from bytemtp.errors import BytemtpError
from bytemtp.train.checkpoint import load_model, resolve_checkpoint
from bytemtp.train.distributed import resolve_device
from bytemtp.train.objective import LN2, split_batch
from bytemtp.train.parallel import MTPObjective
from bytemtp.train.precision import autocast


@dataclass
class EvalResult:
    bpb_heads: list[float | None]  # head 1 (next byte) first; None: the split gave the head no target
    n_bytes: int  # targets scored by head 1

    @property
    def bpb(self) -> float:
        """Head 1's bits per byte: the model's figure as an ordinary next-byte model."""
        return self.bpb_heads[0]


@torch.no_grad()
def evaluate(
    objective: torch.nn.Module,
    data_dir: str | os.PathLike,
    *,
    n_future: int,
    batch_size: int,
    seq_len: int,
    device: torch.device,
    progress: bool = False,
) -> EvalResult:
    """Score ``objective`` (an ``MTPObjective``, possibly FSDP2-sharded) on the val split.

    Under FSDP2 every rank must call this (each forward all-gathers weights); all
    ranks then see the same batches and get the same result.
    """
    was_training = objective.training
    objective.eval()
    nll = torch.zeros(n_future, dtype=torch.float64, device=device)
    count = torch.zeros(n_future, dtype=torch.int64, device=device)
    total = _val_ids(data_dir) if progress else None
    with tqdm(total=total, unit="B", unit_scale=True, desc="eval", disable=not progress, leave=False) as bar:
        for ids in iter_eval_batches(data_dir, batch_size, seq_len, n_future, split="val", device=device):
            ids = _full_batch(ids, batch_size)
            with autocast(device):
                _, head_losses = objective(ids)
            c = (split_batch(ids, n_future)[1] >= 0).sum((0, 1))
            nll += head_losses.double() * c  # head_losses are per-target means
            count += c
            if progress:
                bar.update(int(c[0]))
    objective.train(was_training)
    counts = count.tolist()
    if counts[0] == 0:
        raise BytemtpError(f"{data_dir}: the val split has no bytes to evaluate")
    bpb = [s / c / LN2 if c else None for s, c in zip(nll.tolist(), counts)]
    return EvalResult(bpb, counts[0])


def _full_batch(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A short last batch padded with rows of -1 (no targets, so no loss): every batch then
    has one shape, and a compiled model runs the last one without compiling a second graph."""
    short = batch_size - ids.shape[0]
    return F.pad(ids, (0, 0, 0, short), value=-1) if short > 0 else ids


def _val_ids(data_dir: str | os.PathLike) -> int:
    """Ids in the val split (bytes plus one BOS per document): the progress bar's total."""
    ds = Dataset(data_dir)
    return ds.n_bytes("val") + ds.n_docs("val")


def evaluate_checkpoint(
    path: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> tuple[EvalResult, dict[str, Any]]:
    """Evaluate checkpoint (or run) ``path``; batch size and context length default to
    the ones it was trained with, which is what its logged val figures used."""
    ckpt = resolve_checkpoint(path)
    dev = resolve_device(device)
    model, meta = load_model(ckpt, dev)
    train = meta.get("train") or {}
    seq_len = seq_len or train.get("seq_len") or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise BytemtpError(f"--seq-len: {seq_len} exceeds the model's max_seq_len={model.cfg.max_seq_len}")
    batch_size = batch_size or train.get("batch_size") or 8
    require_split(data_dir, "val")
    result = evaluate(
        MTPObjective(model),
        data_dir,
        n_future=model.cfg.n_future,
        batch_size=batch_size,
        seq_len=seq_len,
        device=dev,
        progress=progress,
    )
    return result, {**meta, "checkpoint": str(ckpt), "seq_len": seq_len, "batch_size": batch_size}


def require_split(data_dir: str | os.PathLike, split: str, hint: str = "") -> None:
    """A one-line error for a dataset that is missing, unprepared, or has no ``split``."""
    if not Dataset(data_dir).shards(split):
        raise BytemtpError(f"{data_dir}: the dataset has no {split} split{hint}")
