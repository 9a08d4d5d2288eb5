"""The ``bytemtp`` command line: one click group, one module per subcommand.

Subcommands are imported only when invoked, so ``bytemtp --help`` and
``bytemtp prepare`` never pay for importing torch.

One convention for every failure a user can cause: a one-line ``Error: ...`` on
stderr and exit status 1, never a traceback. That covers a ``BytemtpError``, a
value click's own types reject (click would print a usage block and exit 2; the
message already names the flag, and a script should not have to tell the two
kinds of bad input apart), and an output that cannot be written (stdout closed,
full, or a pipe whose reader left).
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

import click

from bytemtp import __version__
from bytemtp.errors import BytemtpError

COMMANDS = {
    "prepare": "Stream raw corpora into zstd shards.",
    "merge": "Join the part datasets of prepare --part into one.",
    "info": "Summarise (and --verify) a prepared dataset.",
    "train": "Train a model with multi-byte prediction.",
    "eval": "Bits per byte of every head on the validation split.",
    "sample": "Generate bytes (self-speculative by default).",
    "distill": "Fit the draft heads to head 1's greedy continuations.",
    "bench": "Autoregressive vs self-speculative decoding, side by side.",
    "serve": "Serve a checkpoint over OpenAI's completions API.",
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

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        reopen_closed_streams()
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # plain ``bytemtp``: the help, as --help
            click.echo(e.format_message())
            code = 0
        except click.ClickException as e:
            fail(e.format_message())
        except click.Abort:
            fail("aborted")
        except OSError as e:
            fail(describe_os_error(e))
        sys.exit(code if isinstance(code, int) else 0)


def reopen_closed_streams() -> None:
    """Put /dev/null on a standard stream the caller closed (``bytemtp sample >&-``).

    Not only so that writing to it is quietly discarded: a closed descriptor 1 or 2 would
    be handed out by the next ``open``, and a progress bar or a print would then write
    into a shard or a checkpoint.
    """
    for fd, name in ((1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, "w", closefd=False))


def describe_os_error(e: OSError) -> str:
    """One line for an I/O failure no module turned into a ``BytemtpError``: the file when
    the error names one, else standard output (the only unnamed stream we write to)."""
    reason = e.strerror or str(e)
    if e.filename:
        return f"{e.filename}: {reason}"
    if e.errno == errno.EPIPE:
        return "standard output: the reading end of the pipe closed"
    return f"standard output: {reason}"


def fail(message: str) -> None:
    """Print ``Error: message`` and exit 1. Standard output is pointed at /dev/null first:
    when it is what failed, the interpreter's final flush would fail again, noisily."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):  # stdout closed or replaced: nothing to flush
        pass
    try:
        click.echo(f"Error: {message}", err=True)
    except OSError:  # stderr is gone as well: the exit status is all that is left
        pass
    sys.exit(1)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bytemtp")
def main() -> None:
    """Tokenizer-free byte-level language models with multi-byte prediction."""


__all__ = ["main"]
