"""``bytemtp eval CKPT --data DIR``: bits per byte of every head on the whole val split;
``bytemtp eval CKPT --probe induction|arithmetic``: a probe's scores (``bytemtp.train.probes``).

CKPT is a checkpoint directory or a run directory (its latest checkpoint). Batch
size and context length default to the ones the checkpoint was trained with, so
the figures match the run's last logged val figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from bytemtp.cli.options import device_option


PROBE_CHOICES = ("induction", "arithmetic")  # bytemtp.train.probes.PROBES, without importing torch


@click.command(help="Bits per byte of every head on the validation split (head 1 first), or with --probe "
               "a probe's scores: induction (head 1's accuracy on the letters of a repeated invented name "
               "after its first) or arithmetic (exact greedy answers over F7[X]/(X^5), in and out of "
               "the training distribution's number of operations).")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--data", "data_dir", type=click.Path(path_type=Path), help="A prepared dataset (not with --probe).")
@click.option("--probe", type=click.Choice(PROBE_CHOICES), default=None, help="Score a probe instead.")
@click.option("--examples", type=click.IntRange(min=1), default=None,
              help="With --probe: stories (induction, default 400) or problems per number of operations "
                   "(arithmetic, default 100).")
@click.option("--batch-size", type=int, default=None, help="Rows per batch (default: the training batch size).")
@click.option("--seq-len", type=int, default=None, help="Context length (default: the training seq_len).")
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
def command(ckpt: Path, data_dir: Path | None, probe: str | None, examples: int | None, batch_size: int | None,
            seq_len: int | None, device, as_json: bool, progress: bool) -> None:
    from bytemtp.errors import BytemtpError
    from bytemtp.train.evaluate import evaluate_checkpoint

    if (data_dir is None) == (probe is None):
        raise BytemtpError("--data/--probe: give exactly one (val bits per byte of a dataset, or a probe)")
    if probe is not None:
        _probe(ckpt, probe, examples, device, as_json)
        return

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


def _probe(ckpt: Path, probe: str, examples: int | None, device, as_json: bool) -> None:
    from bytemtp.train.checkpoint import load_model, resolve_checkpoint
    from bytemtp.train.probes import run_probe

    path = resolve_checkpoint(ckpt)
    model, meta = load_model(path, device)
    scores = run_probe(model, probe, examples)
    if as_json:
        click.echo(json.dumps({"checkpoint": str(path), "step": meta.get("step"), **scores}))
    elif probe == "induction":
        click.echo(f"{path} (step {meta.get('step')}), induction over {scores['stories']} stories: head 1 "
                   f"{scores['repeat_accuracy']:.1%} of {scores['repeat_bytes']} repeated-name bytes after the "
                   f"first (first mentions {scores['first_mention_accuracy']:.1%}; chance {scores['chance']:.1%})")
    else:
        by_ops = "  ".join(f"{ops}: {acc:.1%}" for ops, acc in scores["by_ops"].items())
        click.echo(f"{path} (step {meta.get('step')}), arithmetic exact match, trained on <= "
                   f"{scores['train_max_ops']} ops: in distribution {scores['in_distribution']:.1%}, out of "
                   f"distribution {scores['out_of_distribution']:.1%}  (by ops {by_ops})")
