"""``RUN/metrics.jsonl``: the training log, one JSON object per logged step, and the progress
bar's summary of one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from bytemtp.data.atomic import atomic_write_bytes

METRICS = "metrics.jsonl"


class MetricsLog:
    """One JSON object per logged step, flushed as it is written.

    A new run starts it empty. A resumed run first cuts it back to the resumed
    step (dropping a line half-written by a killed process), so the file reads like
    one uninterrupted run.
    """

    def __init__(self, path: Path, keep_upto: int | None):
        kept = []
        if keep_upto is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= keep_upto:
                    kept.append(line + "\n")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, "".join(kept).encode())
        self._file: TextIO = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def progress_text(record: dict[str, Any]) -> str:
    """The progress bar's summary of a logged step. Its bits per byte are head 1's training
    loss, the figure that compares with ``val`` (head 1's on held-out data): the mean over
    heads that the objective minimises mixes in the draft heads' far higher losses."""
    text = f"head 1 {record['bpb_heads'][0]:.3f} bpb, {record['bytes_per_s'] / 1e3:.1f} kB/s"
    if "mfu" in record:
        text += f", MFU {record['mfu']:.1%}"
    if "val_bpb" in record:
        text += f", val {record['val_bpb']:.3f}"
    return text
