"""``bytemtp serve CKPT``: an OpenAI-compatible completions server over the decode engine."""

from __future__ import annotations

import signal
from pathlib import Path

import click

from bytemtp.cli.options import FiniteFloat, decode_threads_option, device_option


@click.command(help="Serve a checkpoint over OpenAI's completions API, with continuous batching.")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free one; the URL printed says which).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1), help="Rows decoded together.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=1),
              help="Prompts waiting for a row; past it, requests get 429 with Retry-After.")
@click.option("--model-name", default=None, help="The model's name in the API [default: the checkpoint's directory name].")
@click.option("--speculative/--no-speculative", default=None,
              help="Self-speculative decoding with the draft heads [default: on if the model has them].")
@click.option("--draft-heads", type=click.IntRange(min=1), default=None, help="Draft heads to use [default: all].")
@click.option("--tree", type=click.IntRange(min=0), default=0, show_default=True,
              help="Verify a greedy tree of this many draft bytes per step instead of a chain (greedy requests only).")
@click.option("--adaptive/--no-adaptive", default=None,
              help="Draft and verify only the drafts worth their cost at the step's row count, priced by the engine "
                   "process's own steps at startup (a few seconds) [default: on for a chain of drafts; "
                   "--no-adaptive: every draft, every step].")
@click.option("--draft-coupling", default=None, type=FiniteFloat(min=0),
              help="How strongly drafts follow the two bytes before each (0 = off) [default: 0.7 sampling, 0.3 greedy].")
@click.option("--grace", default=30.0, show_default=True, type=FiniteFloat(min=0),
              help="Seconds running requests may take to finish after SIGINT/SIGTERM.")
@click.option("--max-body", default=4 << 20, show_default=True, type=click.IntRange(min=1024),
              help="Largest request body in bytes (larger: 413).")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="Compile the decode step [default: on for CUDA, off for the CPU].")
@device_option
@decode_threads_option
def command(ckpt: Path, host: str, port: int, max_batch: int, max_queue: int, model_name: str | None,
            speculative: bool | None, draft_heads: int | None, tree: int, adaptive: bool | None,
            draft_coupling: float | None, grace: float, max_body: int, compile_: bool | None, device) -> None:
    from bytemtp.decode.generate import GenerationConfig
    from bytemtp.errors import BytemtpError
    from bytemtp.serve.engine_core import EngineSpec
    from bytemtp.serve.server import build_server, listen
    from bytemtp.train.checkpoint import load_model

    signal.signal(signal.SIGTERM, _stop_starting)  # until it serves, where uvicorn's handler drains it
    # the decoder's own setting is greedy; every request brings its own (sampled drafts at 0.8 x its temperature)
    config = GenerationConfig(temperature=0.0, speculative=speculative, draft_heads=draft_heads, tree_nodes=tree,
                              draft_coupling=draft_coupling)
    model, _ = load_model(ckpt)  # on the CPU: the engine process moves its copy to --device
    n_drafts = config.n_drafts(model.cfg.n_future)
    if adaptive and not n_drafts:
        raise BytemtpError("--adaptive: there are no drafts to choose among (--no-speculative, or n_future=1)")
    if adaptive and tree:
        raise BytemtpError("--tree: a draft tree has a fixed size; it does not combine with --adaptive")
    adaptive = bool(n_drafts and not tree) if adaptive is None else adaptive
    spec = EngineSpec.of(model, config, max_batch, compile_, adaptive, device)
    del model  # the engine process loads its own copy
    name = model_name or ckpt.resolve().name
    if name.startswith("step-") or name == "latest":  # a checkpoint inside a run: name the run
        name = ckpt.resolve().parent.parent.name
    try:
        sock = listen(host, port)
    except OSError as e:
        raise click.ClickException(f"--host/--port: cannot listen on {host}:{port}: {e.strerror or e}") from None
    mode = f"speculative, {n_drafts} draft heads" if n_drafts else "autoregressive"
    mode += ", adaptive" if adaptive else ""

    def ready(url: str) -> None:
        click.echo(f"bytemtp serve: {name} ({mode}, {max_batch} rows) on {url}", err=False)

    with sock:
        server = build_server(spec, name, host, port, max_queue, max_body, grace, on_ready=ready)
        server.run(sockets=[sock])


def _stop_starting(signum: int, frame) -> None:
    """SIGTERM before the server serves: there is nothing to drain, so a plain exit, status 0 (the
    engine process, if started, ends with it)."""
    raise SystemExit(0)
