"""The ``bytemtp`` command line: one click group, one module per subcommand.

Subcommands are imported only when invoked, so ``bytemtp --help`` and
``bytemtp prepare`` never pay for importing torch. Every ``BytemtpError`` becomes a
one-line ``Error: ...`` with exit status 1 instead of a traceback.
"""

from __future__ import annotations

import importlib

import click

from bytemtp import __version__
from bytemtp.errors import BytemtpError

COMMANDS = {
    "prepare": "Stream raw corpora into zstd shards.",
    "info": "Summarise (and --verify) a prepared dataset.",
    "train": "Train a model with multi-byte prediction.",
    "eval": "Bits per byte of every head on the validation split.",
    "sample": "Generate bytes (self-speculative by default).",
    "distill": "Fit the draft heads to head 1's greedy continuations.",
    "bench": "Autoregressive vs self-speculative decoding, side by side.",
    "demo": "Prepare, train, sample and bench on the built-in corpus.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"bytemtp.cli.{name}_cmd")
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl(list(COMMANDS.items()))

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BytemtpError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bytemtp")
def main() -> None:
    """Tokenizer-free byte-level language models with multi-byte prediction."""


__all__ = ["main"]
