"""``bytemtp prepare SOURCE... --out DIR``: stream raw corpora into a sharded dataset."""

from __future__ import annotations

import re
from pathlib import Path

import click

from bytemtp.cli.info_cmd import format_dataset
from bytemtp.data.atomic import sigterm_as_error
from bytemtp.data.documents import FORMATS, ReadOptions
from bytemtp.data.partition import Part
from bytemtp.data.prepare import PrepareConfig, prepare
from bytemtp.data.shards import Dataset

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ByteSize(click.ParamType):
    """A byte count: ``65536``, ``64MiB``, ``64M``, ``1.5G``; K/M/G/T are powers of 1024."""

    name = "SIZE"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*(?:([KMGT])(?:i?B)?|B)?", str(value).strip(), re.IGNORECASE)
        if not match:
            self.fail(f"{value!r} is not a size (examples: 65536, 64MiB, 1G)", param, ctx)
        return int(float(match[1]) * _UNITS[(match[2] or "").upper()])


def _default_size(n: int) -> str:
    unit = next(u for u in ("T", "G", "M", "K", "") if n % _UNITS[u] == 0)
    return f"{n // _UNITS[unit]}{unit}iB" if unit else str(n)


HELP = """Stream raw corpora into zstd shards under DIR.

SOURCE is a file, a directory (read recursively, in sorted path order), '-' for
stdin, or builtin:NAME (builtin:python-stdlib: this Python's standard library).
.gz, .zst, .xz and .bz2 inputs are decompressed; .jsonl / .ndjson files (also
compressed) give one document per record, the string in --text-field; .parquet
and .arrow files (and saved Hugging Face dataset directories) one per row, the
string or binary column --text-field.

Each file or record is one document; documents longer than --max-doc-bytes are
cut into consecutive pieces, so memory stays near one shard (--shard-bytes)
whatever the input. A document goes to the val split by a stable hash of its
identity (its path, path:LINE or path:ROW), so adding data never moves existing
ones. DIR appears only when complete; a failed run leaves nothing behind.

--part I/N prepares part I (0..N-1) of the inputs, split by file and Parquet row
group; `bytemtp merge` joins the N part datasets into the one a single run writes.
"""


@click.command(help=HELP)
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@click.option(
    "--out", "-o", required=True, type=click.Path(path_type=Path), metavar="DIR", help="Dataset directory to create."
)
@click.option(
    "--shard-bytes",
    type=ByteSize(),
    default=_default_size(PrepareConfig.shard_bytes),
    show_default=True,
    help="Target uncompressed size of a shard; about this much is held in memory.",
)
@click.option(
    "--val-fraction",
    type=float,
    default=PrepareConfig.val_fraction,
    show_default=True,
    help="Share of documents in the val split.",
)
@click.option("--level", type=int, default=PrepareConfig.level, show_default=True, help="zstd compression level.")
@click.option(
    "--threads",
    type=int,
    default=PrepareConfig.threads,
    show_default=True,
    help="zstd compression threads (-1: one per core).",
)
@click.option(
    "--max-doc-bytes",
    type=ByteSize(),
    default=_default_size(ReadOptions.max_doc_bytes),
    show_default=True,
    help="Cut longer documents into pieces of this size.",
)
@click.option(
    "--text-field",
    default=ReadOptions.text_field,
    show_default=True,
    help="JSON Lines: the field holding a record's text; Parquet/Arrow: the text column.",
)
@click.option(
    "--format",
    "format_",
    type=click.Choice(FORMATS),
    default=ReadOptions.format,
    show_default=True,
    help="auto: by extension (.jsonl, .parquet, .arrow; anything else is text), stdin as text; "
    "or force one for every file (text, jsonl also for stdin).",
)
@click.option(
    "--include",
    multiple=True,
    metavar="GLOB",
    help="Directories: read only matching files (repeatable). A GLOB with '/' matches the relative path, "
    "else the file name.",
)
@click.option("--exclude", multiple=True, metavar="GLOB", help="Directories: skip matching files and sub-directories.")
@click.option("--skip-bad-lines", is_flag=True, help="JSON Lines: skip and count bad records instead of failing.")
@click.option(
    "--part",
    metavar="I/N",
    default=None,
    help="Prepare only part I (from 0) of N of the inputs, for `bytemtp merge` (e.g. a Slurm array task).",
)
@click.option("--overwrite", is_flag=True, help="Replace DIR if it holds a prepared dataset and nothing else.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def command(
    sources: tuple[str, ...],
    out: Path,
    shard_bytes: int,
    val_fraction: float,
    level: int,
    threads: int,
    max_doc_bytes: int,
    text_field: str,
    format_: str,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    skip_bad_lines: bool,
    part: str | None,
    overwrite: bool,
    progress: bool,
) -> None:
    read = ReadOptions(max_doc_bytes, text_field, format_, include, exclude, skip_bad_lines)
    config = PrepareConfig(shard_bytes, val_fraction, level, threads, read)
    part_ = None if part is None else Part.parse(part)
    with sigterm_as_error(out):
        summary = prepare(sources, out, config, part=part_, overwrite=overwrite, progress=progress)
    click.echo(f"prepared {summary.n_bytes():,} bytes in {summary.seconds:.1f} s ({summary.mb_per_s:.1f} MB/s)")
    click.echo(format_dataset(Dataset(out)))
