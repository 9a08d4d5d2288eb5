"""``bytemtp distill CKPT --data DIR --out RUN``: draft heads fitted to head 1's own continuations."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bytemtp.cli.options import FiniteFloat, SEED, device_option


@click.command("distill")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Prepared dataset whose train split the prompts come from.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Run directory for the distilled checkpoint (same step as CKPT).")
@click.option("--prompts", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Continuations to fit on (each prompt's greedy one too, for the coupling table).")
@click.option("--temperature", default=0.8, show_default=True, type=FiniteFloat(min=0),
              help="Fit the heads to head 1's distributions along continuations sampled at this temperature "
                   "(0: to head 1's choices along greedy ones: greedy drafts gain more, sampled drafts lose).")
@click.option("--text", default=1024, show_default=True, type=click.IntRange(min=0),
              help="Train-split text windows (--prompt-bytes + --new-bytes long) fitted alongside the "
                   "continuations, so the heads keep agreeing with head 1 on ordinary text (0: none).")
@click.option("--prompt-bytes", default=64, show_default=True, type=click.IntRange(min=1), help="Bytes per prompt.")
@click.option("--new-bytes", default=191, show_default=True, type=click.IntRange(min=1),
              help="Bytes generated per prompt.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Sequences generated (and encoded) together.")
@click.option("--epochs", default=3, show_default=True, type=click.IntRange(min=0),
              help="Passes of the draft heads' fit (0: the heads stay as they are; the coupling is still fitted).")
@click.option("--lr", default=1e-3, show_default=True, type=FiniteFloat(min=0, min_open=True),
              help="Adam learning rate of the fit.")
@click.option("--holdout", default=64, show_default=True, type=click.IntRange(min=0),
              help="Continuations (and text windows) kept out of the fit to report the draft heads' "
                   "agreement with head 1.")
@click.option("--coupling/--no-coupling", default=True, show_default=True,
              help="Then fit greedy drafts' coupling table to the heads, on the continuations (sampled "
                   "drafts keep the corpus's ratios).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed for the prompts and the fit's order.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch (default: torch's).")
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a summary.")
@click.option("--progress/--no-progress", default=True, help="Show the progress bars.")
def command(ckpt, data_dir, out_dir, prompts, temperature, text, prompt_bytes, new_bytes, batch_size, epochs, lr, holdout,
            coupling, seed, threads, device, as_json, progress) -> None:
    """Fit the draft heads (2..n) of CKPT to head 1's own continuations of --data's train
    prompts (its distributions along sampled ones, by default), trunk and head 1 frozen, then
    greedy drafts' coupling table to them: decoding outputs stay identical, drafts are
    accepted more often. Writes a new checkpoint under --out."""
    import torch

    from bytemtp.train.checkpoint import check_out_dir, list_checkpoints, load_model, save_checkpoint
    from bytemtp.train.distill import DistillConfig, distill, training_prompts
    from bytemtp.errors import BytemtpError

    if list_checkpoints(out_dir):  # never overwrite a checkpoint, least of all the one being distilled
        raise BytemtpError(f"--out: {out_dir} already holds checkpoints; give a new run directory")
    check_out_dir(out_dir, source=ckpt)

    if threads is not None:
        torch.set_num_threads(threads)
    cfg = DistillConfig(prompts, text, prompt_bytes, new_bytes, batch_size, epochs, lr, holdout, seed,
                        coupling=coupling, temperature=temperature)
    model, meta = load_model(ckpt, device)
    prompt_list, windows = training_prompts(data_dir, cfg)
    result = distill(model, prompt_list, cfg, windows, progress=progress and not as_json)
    info = {"from": str(ckpt), **vars(cfg), **result}
    path = save_checkpoint(out_dir, meta.get("step") or 0, model, train_config=meta.get("train"), distill=info)
    if as_json:
        click.echo(json.dumps({"checkpoint": str(path), **result}))
        return
    flops = result["flops"]
    heads = f"draft heads fitted on {result['fit_bytes']:,} bytes" if epochs else "draft heads unchanged"
    click.echo(f"{path}: {heads}, {flops['total']:.3g} FLOPs ("
               + ", ".join(f"{part} {value:.2g}" for part, value in flops.items() if part != "total") + ")")
    fit = result.get("coupling", {})
    if "skipped" in fit:
        click.echo(f"greedy drafts' coupling not fitted: {fit['skipped']}")
    if "fitted" in fit:
        click.echo(f"greedy drafts' coupling fitted: held-out draft bits per byte {fit['corpus']:.3f} with the "
                   f"corpus's ratios -> {fit['fitted']:.3f}")
    for part, before in result["agreement_before"].items():
        after = result["agreement_after"][part]
        what = (f"expected acceptance of sampled drafts at T = {temperature:g}" if part == "sampled"
                else "agreement with head 1")
        click.echo(f"{what}, heads 2..{model.cfg.n_future}, held-out {part}: "
                   f"{' '.join(f'{x:.2f}' for x in before)} -> {' '.join(f'{x:.2f}' for x in after)}")
