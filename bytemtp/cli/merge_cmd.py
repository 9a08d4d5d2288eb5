"""``bytemtp merge PART... --out DIR``: join the part datasets of ``prepare --part`` into one."""

from __future__ import annotations

from pathlib import Path

import click

from bytemtp.cli.info_cmd import format_dataset
from bytemtp.data.atomic import sigterm_as_error
from bytemtp.data.merge import merge
from bytemtp.data.shards import Dataset

HELP = """Join the part datasets of `bytemtp prepare --part I/N` into one dataset DIR.

Every part 0..N-1 must be given once, prepared from the same inputs with the same
settings. Shards are hard-linked (copied across filesystems), never recompressed,
and checked against their manifests on the way; the result holds the same documents,
in the same splits, as one `prepare` of all the inputs. DIR appears only when complete.
"""


@click.command(help=HELP)
@click.argument("parts", nargs=-1, required=True, metavar="PART...", type=click.Path(path_type=Path))
@click.option(
    "--out", "-o", required=True, type=click.Path(path_type=Path), metavar="DIR", help="Dataset directory to create."
)
@click.option("--overwrite", is_flag=True, help="Replace DIR if it holds a prepared dataset and nothing else.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def command(parts: tuple[Path, ...], out: Path, overwrite: bool, progress: bool) -> None:
    with sigterm_as_error(out):
        summary = merge(parts, out, overwrite=overwrite, progress=progress)
    click.echo(f"merged {len(parts)} parts: {len(summary.shards)} shards in {summary.seconds:.2f} s")
    click.echo(format_dataset(Dataset(out)))
