"""``bytemtp train --data DIR --out RUN``: train a model, or continue one with ``--resume``.

Every flag defaults to "not given", so only what the user typed overrides the
preset (new run) or the checkpoint's saved configs (``--resume``); see
``bytemtp.train.config`` for the precedence and what a resume may change.
Under ``torchrun --nproc-per-node N -m bytemtp train ...`` every rank runs this
command; rank 0 alone prints, logs and writes checkpoints.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from bytemtp.cli.options import SEED, FiniteFloat

from bytemtp.model.config import HEAD_KINDS, PRESETS
from bytemtp.train.config import LOADER_MODES, MUON_DTYPES

@click.command(help="Train a model with multi-byte prediction (n future-byte heads).")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="A prepared dataset.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="The run directory.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None, help="Model preset (default tiny).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="JSON object of ModelConfig/TrainConfig fields.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--steps", type=int, default=None, help="Total optimizer steps of the run.")
@click.option("--batch-size", type=int, default=None, help="Rows per micro-batch per process.")
@click.option("--seq-len", type=int, default=None, help="Bytes per row (default: the model's max_seq_len).")
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per optimizer step.")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=None, help="Peak learning rate.")
@click.option("--warmup-steps", type=int, default=None, help="Linear warmup steps.")
@click.option("--decay-steps", type=int, default=None,
              help="Step where the cosine reaches its floor (default: --steps).")
@click.option("--n-future", type=int, default=None, help="Number of future-byte heads (1: next-byte baseline).")
@click.option("--head-kind", type=click.Choice(HEAD_KINDS), default=None,
              help="linear: one unembedding per head; transformer: a block per head.")
@click.option("--seed", type=SEED, default=None, help="Seeds the initial weights and the data order.")
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile (default: on for CUDA only).")
@click.option("--eval-every", type=int, default=None, help="Steps between val evals (0: none).")
@click.option("--log-every", type=int, default=None, help="Steps between metrics.jsonl lines.")
@click.option("--ckpt-every", type=int, default=None, help="Steps between checkpoints (0: only at the end).")
@click.option("--keep", type=int, default=None, help="Checkpoints kept (0: all).")
@click.option("--time-budget", type=FiniteFloat(min=0, min_open=True), default=None, metavar="MINUTES",
              help="Stop cleanly, with a checkpoint, after this many minutes.")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N.")
@click.option("--loader-mode", type=click.Choice(LOADER_MODES), default=None,
              help="concat: documents back to back; best-fit: short documents kept whole.")
@click.option("--fsdp/--ddp", default=None, help="Under torchrun: FSDP2 sharding instead of DDP.")
@click.option("--peak-tflops", type=FiniteFloat(min=0, min_open=True), default=None,
              help="The GPU's dense bf16 peak for the MFU figure (default: known H100/H200/A100 values).")
@click.option("--muon-dtype", type=click.Choice(MUON_DTYPES), default=None,
              help="Muon's orthogonalisation: bf16 where the device multiplies it natively, else float32 (auto).")
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
def command(data_dir: Path, out_dir: Path, preset: str | None, config_file: Path | None, resume: bool,
            progress: bool, **flags) -> None:
    from bytemtp.train.checkpoint import latest_checkpoint, read_config
    from bytemtp.errors import BytemtpError
    from bytemtp.train.loop import train
    from bytemtp.train.config import build_configs, saved_configs

    overrides = {k.rstrip("_"): v for k, v in flags.items() if v is not None}  # compile_ -> compile
    saved = None
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            raise BytemtpError(f"--resume: {out_dir} has no checkpoint to resume from")
        saved = saved_configs(read_config(ckpt), ckpt)
    model_cfg, train_cfg = build_configs(preset=preset, config_file=config_file, overrides=overrides, saved=saved)
    result = train(train_cfg, model_cfg, data_dir, out_dir, resume=resume, progress=progress)
    if os.environ.get("RANK", "0") == "0":
        summary = f"step {result.step} ({result.stop_reason})"
        if result.val_bpb_heads:
            summary += f": val bpb head 1 {result.val_bpb_heads[0]:.4f}"
        click.echo(f"{summary}; checkpoint {result.checkpoint}")
    if result.exit_code:
        sys.exit(result.exit_code)
