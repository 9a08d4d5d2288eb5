"""``bytemtp demo``: prepare, train, sample and bench on the built-in corpus."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from bytemtp.cli.options import FiniteFloat, device_option


@click.command("demo")
@click.option("--minutes", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Train for this wall time instead of the fixed schedule (steps fitted to it, so the model "
                   "then depends on the machine's speed). Default: a fixed number of steps, 2 to 8 minutes "
                   "on a 2-core CPU, depending on the CPU.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the prepared corpus is cached. Default: ~/.cache/bytemtp/python-stdlib.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Run directory (a previous demo run there is replaced).")
@device_option
def command(minutes: float | None, data_dir: Path | None, out: Path, device) -> None:
    """Prepare the Python standard library's source, train the `tiny` preset with
    8 prediction heads for a fixed number of steps (the same model on every machine
    of a device type; only the time varies), fit its draft heads to head 1's own text
    (`bytemtp distill`, into OUT-distilled), sample a completion, and measure the
    self-speculative speedup over autoregressive decoding."""
    import torch

    from bytemtp.decode.bench import BenchConfig, run_bench
    from bytemtp.decode.generate import GenerationConfig, generate
    from bytemtp.decode.prompts import sample_prompts
    from bytemtp.demo import (CORPUS, DemoConfig, default_cache_dir, distill_demo, distilled_dir, ensure_dataset,
                              fresh_run_dir, plan_steps)
    from bytemtp.train.loop import train

    cfg = DemoConfig(minutes, data_dir or default_cache_dir(), out, device)

    click.secho(f"1/5 prepare {CORPUS} -> {cfg.data_dir}", bold=True, err=True)
    reused = ensure_dataset(cfg.data_dir)
    click.echo(f"    {'reused the cached dataset' if reused else 'prepared'}", err=True)

    model_cfg, train_cfg = plan_steps(cfg)
    length = f"~{minutes:g} min" if minutes is not None else "a fixed schedule"
    click.secho(f"2/5 train the tiny preset ({model_cfg.n_future} heads) for {length}: "
                f"{train_cfg.steps} steps of {train_cfg.batch_size}x{train_cfg.seq_len} bytes on {device}",
                bold=True, err=True)
    fresh_run_dir(cfg.out)
    fresh_run_dir(distilled_dir(cfg.out))
    result = train(train_cfg, model_cfg, cfg.data_dir, cfg.out)
    if result.val_bpb_heads:
        heads = " ".join("n/a" if b is None else f"{b:.2f}" for b in result.val_bpb_heads)
        click.echo(f"    stopped at step {result.step} ({result.stop_reason}); val bits/byte per head: {heads}",
                   err=True)

    click.secho(f"3/5 distill: fit the draft heads to head 1's distributions along {cfg.distill_prompts} of its own "
                f"continuations at T = {cfg.temperature}", bold=True, err=True)
    model, path, fit = distill_demo(cfg)
    accept = [" ".join(f"{x:.2f}" for x in fit[when]["sampled"]) for when in ("agreement_before", "agreement_after")]
    click.echo(f"    {path}: expected acceptance of sampled drafts, heads 2..{model.cfg.n_future}: "
               f"{accept[0]} -> {accept[1]}", err=True)

    torch.set_num_threads(1)  # decoding one sequence: more threads only add synchronisation
    click.secho(f"4/5 sample (temperature {cfg.temperature}, self-speculative) from {cfg.prompt!r}",
                bold=True, err=True)
    config = GenerationConfig(prompt=cfg.prompt, max_new_bytes=cfg.sample_bytes, temperature=cfg.temperature, seed=0)
    # Untimed: Numba compiles the host decision kernels on their first call in a fresh install
    # (seconds, once; cached on disk), which the sample's bytes/s should not report.
    generate(model, dataclasses.replace(config, max_new_bytes=8)).read()
    gen = generate(model, config)
    text = gen.read()
    click.echo(cfg.prompt.decode() + text.decode("utf-8", errors="replace"))
    click.echo(f"    {gen.stats.summary().splitlines()[0]}", err=True)

    click.secho(f"5/5 bench: {cfg.bench_prompts} held-out prompts, autoregressive vs self-speculative",
                bold=True, err=True)
    bench = BenchConfig(prompts=cfg.bench_prompts, max_bytes=cfg.bench_bytes, sweep=True, trees=(cfg.bench_tree,))
    prompts = sample_prompts(cfg.data_dir, bench.prompts, bench.prompt_bytes, bench.seed)
    report = run_bench(model, prompts, bench)
    click.echo(report.table())
    # Sampling at the sample's temperature, the chain alone: exact, so nothing to compare bytes with.
    sampled = run_bench(model, prompts, dataclasses.replace(bench, temperature=cfg.temperature, sweep=False, trees=()))
    click.echo(sampled.table())
    # The headlines: the paper's decoder, one chain through every draft head, and the draft tree,
    # greedy; then the chain sampling.
    chain = next(m for m in report.spec if not m.tree and m.draft_heads == model.cfg.n_future - 1)
    headlines = [(report, mode, "greedy", f"outputs identical: {report.identical(mode)}")
                 for mode in (chain, report.spec[-1])]
    headlines.append((sampled, sampled.spec[-1], f"T = {cfg.temperature}", "exactly head 1's distribution"))
    for rep, mode, how, output in headlines:
        click.secho(
            f"{mode.label}, {how}: {rep.speedup(mode):.2f}x the bytes/s of autoregressive decoding "
            f"({mode.bytes_per_forward:.2f} bytes per forward), {output}",
            bold=True,
        )
    run = distilled_dir(cfg.out)
    click.echo(f"run: {cfg.out} (distilled: {run})   try: bytemtp sample {run} --prompt 'def ' --stats", err=True)
