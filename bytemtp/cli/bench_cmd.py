"""``bytemtp bench CKPT --data DIR``: the decode speedup on your own model and data."""

from __future__ import annotations

import json

import click

from bytemtp.cli.options import (
    FiniteFloat,
    SEED,
    context_drafting_options,
    decode_threads_option,
    device_option,
)


@click.command("bench")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Prepared dataset whose val split the prompts come from.")
@click.option("--prompts", default=8, show_default=True, type=click.IntRange(min=1), help="Number of prompts.")
@click.option("--prompt-bytes", default=64, show_default=True, type=click.IntRange(min=1), help="Bytes per prompt.")
@click.option("--max-bytes", default=256, show_default=True, type=click.IntRange(min=1),
              help="Bytes generated per prompt and mode.")
@click.option("--temperature", default=0.0, show_default=True, type=FiniteFloat(min=0),
              help="0 benchmarks greedy decoding (outputs must be identical); >0 benchmarks sampling.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0),
              help="Top-k when sampling (0 = off).")
@click.option("--top-p", default=1.0, show_default=True, type=FiniteFloat(0, 1, min_open=True),
              help="Top-p when sampling.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed for prompt choice and sampling.")
@click.option("--sweep", is_flag=True, help="One row per number of draft heads (1, 3, 7 for n = 8).")
@click.option("--adaptive", is_flag=True,
              help="Add a row drafting and verifying only the drafts worth their cost here (cost curve measured first).")
@click.option("--draft-temperature", default=None, type=FiniteFloat(min=0),
              help="Temperature drafts are drawn at when sampling [default: 0.8 x --temperature].")
@click.option("--draft-coupling", default=None, type=FiniteFloat(min=0),
              help="How strongly chain drafts and sampled tree nodes follow the two bytes before each, by the "
                   "training data's byte trigrams (0 = off; needs a checkpoint with byte_trigrams.safetensors) "
                   "[default: 0.7 sampling, 0.3 greedy].")
@context_drafting_options
@click.option("--workload", default="text", show_default=True, type=click.Choice(["text", "copy"]),
              help="text: 64-byte windows of val documents; copy: a val document's first --prompt-bytes, a "
                   "newline and its first 8 bytes again, so the continuation repeats the context.")
@click.option("--compare-plain", is_flag=True,
              help="Add a chain row whose drafts come from the heads and the corpus only (no --context-mixing, "
                   "no --lookup): the decoder before drafts from the rows' own text.")
@click.option("--tree", "trees", multiple=True, type=click.IntRange(min=1),
              help="Add a row verifying a tree of this many draft bytes per step instead of a chain "
                   "(any temperature; repeatable).")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1),
              help="Decode this many prompts together; every decoder runs at each batch size given, and the "
                   "table shows aggregate bytes/s side by side (repeatable; default 1).")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0), help="Untimed warm-up rounds.")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="Compile the decode step, autoregressive and speculative alike (CUDA graphs on a GPU). "
                   "Default: on for CUDA, off for CPU.")
@click.option("--panels/--no-panels", default=True, show_default=True,
              help="CPU decoding steps multiply by weights kept in decoding layouts: panels for big weights, "
                   "transposed copies for small ones (--no-panels: F.linear, as torch does).")
@device_option
@decode_threads_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def command(ckpt, data_dir, prompts, prompt_bytes, max_bytes, temperature, top_k, top_p, seed, sweep, adaptive,
            draft_temperature, draft_coupling, context_mixing, lookup, workload, compare_plain, trees, batches, warmup,
            compile_, panels, device, as_json) -> None:
    """Decode the same prompts autoregressively and self-speculatively, side by side.

    Prompts are drawn (seeded) from the val split of --data. Prints bytes/s of each
    mode, the speedup (ratio of medians), bytes per forward, each draft head's
    acceptance, and whether greedy outputs were identical for every prompt.
    """
    from tqdm import tqdm

    from bytemtp.decode.bench import BenchConfig, run_bench
    from bytemtp.decode.prompts import sample_prompts
    from bytemtp.train.checkpoint import load_model

    cfg = BenchConfig(
        prompts, prompt_bytes, max_bytes, temperature, top_k, top_p, seed, sweep, warmup, adaptive, panels, trees,
        batches, draft_temperature, draft_coupling, workload, context_mixing, lookup, compare_plain,
    )
    model, _ = load_model(ckpt, device)
    chosen = sample_prompts(data_dir, prompts, prompt_bytes, seed, workload=workload)
    runs = sum(-(-prompts // b) for b in cfg.batches)
    with tqdm(total=runs, desc="bench", unit="batch", disable=as_json, leave=False) as bar:
        report = run_bench(model, chosen, cfg, compile=compile_, progress=bar)
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.table())
