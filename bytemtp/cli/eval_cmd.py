"""``bytemtp eval CKPT --data DIR``: bits per byte of every head on the whole val split.

CKPT is a checkpoint directory or a run directory (its latest checkpoint). Batch
size and context length default to the ones the checkpoint was trained with, so
the figures match the run's last logged val figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from bytemtp.cli.options import device_option


@click.command(help="Bits per byte of every head on the validation split (head 1 first).")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="A prepared dataset.")
@click.option("--batch-size", type=int, default=None, help="Rows per batch (default: the training batch size).")
@click.option("--seq-len", type=int, default=None, help="Context length (default: the training seq_len).")
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
def command(ckpt: Path, data_dir: Path, batch_size: int | None, seq_len: int | None, device,
            as_json: bool, progress: bool) -> None:
    from bytemtp.errors import BytemtpError
    from bytemtp.train.evaluate import evaluate_checkpoint

    for flag, value in (("--batch-size", batch_size), ("--seq-len", seq_len)):
        if value is not None and value < 1:
            raise BytemtpError(f"{flag}: must be at least 1, got {value}")
    result, meta = evaluate_checkpoint(
        ckpt, data_dir, batch_size=batch_size, seq_len=seq_len, device=device, progress=progress
    )
    if as_json:
        click.echo(json.dumps({
            "checkpoint": meta["checkpoint"],
            "step": meta.get("step"),
            "val_bpb": result.bpb,
            "val_bpb_heads": result.bpb_heads,
            "val_bytes": result.n_bytes,
            "seq_len": meta["seq_len"],
            "batch_size": meta["batch_size"],
        }))
        return
    click.echo(f"{meta['checkpoint']} (step {meta.get('step')}) on {data_dir} val: "
               f"{result.n_bytes:,} bytes, context {meta['seq_len']}")
    for k, bpb in enumerate(result.bpb_heads, start=1):
        if bpb is None:
            click.echo(f"head {k:>2}  n/a      (no targets: the val split is too short for a byte {k} ahead)")
        else:
            click.echo(f"head {k:>2}  {bpb:.4f} bpb" + ("  (next byte)" if k == 1 else ""))
