"""Options shared by several subcommands, defined once."""

from __future__ import annotations

import click


def _device(ctx: click.Context, param: click.Parameter, value: str):
    from bytemtp.train.distributed import resolve_device

    return resolve_device(value)


device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    callback=_device,
    help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N.",
)


def _threads(ctx: click.Context, param: click.Parameter, value: int) -> int:
    import torch

    torch.set_num_threads(value)
    return value


decode_threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    expose_value=False,
    callback=_threads,
    help="CPU threads for torch. A tiny model's one-sequence matmuls gain nothing from more (extra "
    "threads only add synchronisation, and stall badly on a busy machine); a small model's do "
    "(2 threads: 1.9x the bytes/s of 1 on a 2-core CPU).",
)
