"""``bytemtp info DIR [--verify]``: what a prepared dataset holds, and whether it is intact."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from tqdm import tqdm

from bytemtp.errors import BytemtpError
from bytemtp.data.shards import SPLITS, Dataset, ShardInfo


def format_dataset(ds: Dataset) -> str:
    """The manifest as a short report: sources, settings, and docs/bytes/shards per split.

    The shard list is validated by ``Dataset``; sources, settings and counts are free-form
    records, so whatever of them does not have the expected shape is shown as JSON.
    """
    m = ds.manifest
    lines = [f"dataset  {ds.root}  ({m['format']} v{m['version']}, {m.get('created_by', 'unknown writer')})"]
    source = m.get("source", {})
    inputs = source.get("inputs")
    if not isinstance(inputs, list):
        lines.append(f"source   {json.dumps(source)}")
    for i, item in enumerate(inputs if isinstance(inputs, list) else []):
        lines.append(f"{'source' if i == 0 else '':<8} {_describe_input(item)}")
    lines += _part_lines(source)
    params = m.get("params", {})
    if "val_fraction" in params:
        lines.append(f"params   {_describe_params(params)}")
    lines.append(f"{'split':<8} {'shards':>6} {'docs':>10} {'bytes':>12} {'compressed':>12} {'ratio':>7}")
    for name in (*SPLITS, "total"):
        shards = ds.shards() if name == "total" else ds.shards(name)
        lines.append(_row(name, shards))
    stats = source.get("stats")
    notes = {
        "bad_lines": "bad JSON Lines records skipped (--skip-bad-lines)",
        "cut_docs": "documents longer than the limit cut into pieces",
        "empty_docs": "empty documents dropped",
        "null_values": "null values (Parquet/Arrow rows without text) skipped",
    }
    counts = {k: v for k, v in stats.items() if type(v) is int and v > 0} if isinstance(stats, dict) else {}
    lines += [f"note     {counts[key]:,} {text}" for key, text in notes.items() if key in counts]
    if params.get("val_fraction") and not ds.shards("val"):
        lines.append("note     the val split is empty: too few documents for --val-fraction")
    return "\n".join(lines)


def verify_dataset(ds: Dataset, *, progress: bool = True) -> None:
    """Decompress every shard and check its sha256, sizes and zstd checksum.

    Every shard is checked even after a failure, so one run names all bad files.
    """
    shards = ds.shards()
    bad: list[str] = []
    total = sum(s.n_bytes for s in shards)
    with tqdm(total=total, desc="verify", unit="B", unit_scale=True, file=sys.stderr, disable=not progress) as bar:
        for info in shards:
            try:
                ds.verify(info)
            except BytemtpError as e:
                bad.append(str(e))
            bar.update(info.n_bytes)
    if bad:
        raise BytemtpError(f"{len(bad)} of {len(shards)} shards failed verification: " + "; ".join(bad))


def _describe_input(item: object) -> str:
    try:
        kind = item.get("kind")
        if kind == "builtin":
            return (
                f"builtin:{item['name']} (Python {item.get('python', '?')}, {item['files']:,} files, "
                f"{_size(item['bytes'])}, content sha256 {item['content_sha256'][:16]})"
            )
        if kind == "dir":
            globs = [f"include {g}" for g in item.get("include", [])]
            globs += [f"exclude {g}" for g in item.get("exclude", [])]
            return f"{item['path']}/" + (f" ({', '.join(globs)})" if globs else "")
        if kind == "file":
            return str(item["path"])
        if kind == "stdin":
            return "<stdin>"
    except (AttributeError, KeyError, TypeError, ValueError):  # not the shape prepare writes
        pass
    return json.dumps(item)


def _part_lines(source: dict) -> list[str]:
    """Whether the dataset is one part of a ``prepare --part`` run, or the merge of such parts."""
    part, merged = source.get("part"), source.get("merged")
    if isinstance(part, dict) and {"index", "count"} <= part.keys():
        return [f"part     {part['index']} of {part['count']} (join the parts with `bytemtp merge`)"]
    if isinstance(merged, dict) and "parts" in merged:
        return [f"merged   from {merged['parts']} parts"]
    return []


def _describe_params(params: dict) -> str:
    try:
        return (
            f"val fraction {params['val_fraction']}, shards of {_size(params['shard_bytes'])}, "
            f"zstd level {params['level']}, documents cut at {_size(params['max_doc_bytes'])}"
        )
    except (KeyError, TypeError):  # not the shape prepare writes
        return json.dumps(params)


def _row(name: str, shards: list[ShardInfo]) -> str:
    n_bytes = sum(s.n_bytes for s in shards)
    compressed = sum(s.compressed_bytes for s in shards)
    ratio = f"{n_bytes / compressed:.2f}x" if compressed else "-"
    docs = sum(s.n_docs for s in shards)
    return f"{name:<8} {len(shards):>6} {docs:>10,} {_size(n_bytes):>12} {_size(compressed):>12} {ratio:>7}"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@click.command(help="Summarise a prepared dataset DIR; with --verify, check every shard.")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option(
    "--verify", is_flag=True, help="Decompress every shard, check sizes and sha256; exit 1 naming any bad file."
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def command(directory: Path, verify: bool, progress: bool) -> None:
    ds = Dataset(directory)
    click.echo(format_dataset(ds))
    if verify:
        verify_dataset(ds, progress=progress)
        click.echo(f"verified {len(ds.shards())} shards: all intact")
