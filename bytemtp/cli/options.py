"""Options shared by several subcommands, defined once."""

from __future__ import annotations

import click

from bytemtp import MAX_SEED


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
    help="CPU threads for torch. A tiny model's one-sequence steps gain little from more (2 threads on "
    "an idle 2-core CPU: 1.09x the bytes/s autoregressive, 1.13x speculative; nothing on a slower one), "
    "and extra threads stall badly on a busy machine; a small model's matmuls gain more (2 threads: "
    "1.9x the bytes/s of 1 on a 2-core CPU).",
)


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN and infinities: NaN passes every range check
    (all its comparisons are false), and a NaN temperature or learning rate would otherwise
    travel on until it silently corrupts a run."""

    name = "finite float"

    def convert(self, value, param, ctx):
        import math

        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


# Seeds go to torch.Generator.manual_seed, which takes a 64-bit integer: a larger one would
# fail deep inside torch with an overflow, so the flag refuses it.
SEED = click.IntRange(0, MAX_SEED)


def context_drafting_options(command):
    """``--context-mixing`` and ``--lookup/--no-lookup`` (``bytemtp.decode.incontext``), shared by
    ``sample`` and ``bench``; the values reach the command as ``context_mixing`` and ``lookup``."""
    command = click.option(
        "--lookup/--no-lookup", default=None,
        help="A chain row whose last bytes occurred before in its text drafts the bytes that followed them "
             "there (judged by point masses when sampling; the output stays exactly head 1's) "
             "[default: on greedy, off sampling].",
    )(command)
    return click.option(
        "--context-mixing", default=None, type=FiniteFloat(min=0),
        help="How strongly chain drafts follow each row's own byte trigrams, beside the corpus's "
             "(0 = off; not in compiled GPU steps) [default: 0.3 greedy, 0 sampling].",
    )(command)
