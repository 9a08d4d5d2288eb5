"""A coupling table fitted to the draft heads: the fit learns, decoding drafts greedy rows with it,
greedy output stays autoregressive decoding's, and checkpoints and the server carry it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import write_dataset
from fixtures_train import trained_model
from test_distill import corpus_prompts

from bytemtp.cli import main
from bytemtp.decode.coupling import FittedCoupling, draft_context
from bytemtp.decode.generate import Decoder, GenerationConfig, generate
from bytemtp.errors import BytemtpError
from bytemtp.model.decode_dtype import cast_for_decoding
from bytemtp.serve.engine_core import EngineSpec
from bytemtp.train.checkpoint import COUPLING, load_model, save_checkpoint
from bytemtp.train.couple import bits, corpus_ratios, fit_table
from bytemtp.train.distill import DistillConfig, distill

SMALL = {"prompts": 40, "text": 0, "prompt_bytes": 24, "new_bytes": 64, "batch_size": 16, "epochs": 0,
         "holdout": 8, "coupling_steps": 150}


@pytest.fixture(scope="module")
def coupled():
    """The trained model with a table fitted on its continuations (heads as they were), and the report."""
    model = copy.deepcopy(trained_model())
    result = distill(model, corpus_prompts(SMALL["prompts"], SMALL["prompt_bytes"]), DistillConfig(**SMALL))
    return model, result


def test_the_fit_predicts_held_out_continuations_better_than_the_corpus(coupled):
    model, result = coupled
    fit = result["coupling"]
    assert fit["fitted"] < fit["corpus"] - 0.1, fit
    assert fit["examples"] > 0 and result["flops"]["coupling"] > 0
    table = model.fitted_coupling
    base = draft_context(model.byte_trigrams, 1.0, model.cfg.vocab)
    assert torch.equal(table.index, base.index) and table.log_weights.shape == base.weights.shape


def test_fit_table_learns_what_the_rows_say():
    """Logits that know nothing, targets that follow the row: the fitted table puts them on top."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 16, (4000,), generator=gen)
    targets = (rows * 7) % 257
    logits = torch.randn(4000, 257, generator=gen).to(torch.bfloat16)
    table = fit_table((logits, rows, targets), torch.zeros(16, 257), 0.3, seed=0, steps=300)
    hits = ((logits.float() + table[rows]).argmax(-1) == targets).float().mean().item()
    assert hits > 0.95
    assert bits(logits, rows, targets, table) < 0.5 < bits(logits, rows, targets, torch.zeros(16, 257))


def test_greedy_rows_draft_with_the_table_and_output_stays_autoregressive(coupled):
    model, _ = coupled
    plain = trained_model()
    decoder = Decoder(model, GenerationConfig(max_new_bytes=8))
    weights = decoder.coupling(greedy=True)[0].weights
    torch.testing.assert_close(weights, model.fitted_coupling.log_weights.exp())
    sampled = decoder.coupling(greedy=False)[0].weights  # sampled rows keep the corpus's ratios
    torch.testing.assert_close(sampled, draft_context(model.byte_trigrams, 0.7, model.cfg.vocab).weights)
    half = Decoder(model, GenerationConfig(max_new_bytes=8, draft_coupling=0.5)).coupling(greedy=True)[0].weights
    torch.testing.assert_close(half, (0.5 * model.fitted_coupling.log_weights).exp())
    assert Decoder(model, GenerationConfig(max_new_bytes=8, draft_coupling=0)).coupling(greedy=True)[0] is None
    forwards = {}
    for prompt in [b"", *corpus_prompts(3, 30, seed=5)]:
        auto = generate(plain, GenerationConfig(prompt=prompt, max_new_bytes=120, speculative=False)).read()
        for name, m in (("corpus", plain), ("fitted", model)):
            for tree in (0, 15):
                cfg = GenerationConfig(prompt=prompt, max_new_bytes=120, context_mixing=0, lookup=False,
                                       tree_nodes=tree)
                g = generate(m, cfg)
                assert g.read() == auto, (name, tree, prompt)
                if not tree:
                    forwards[name] = forwards.get(name, 0) + g.stats.forwards
    assert forwards["fitted"] < forwards["corpus"], forwards


def test_batches_and_sampling_stay_exact_with_the_table(coupled):
    model, _ = coupled
    prompts = corpus_prompts(4, 20, seed=6)
    batch = Decoder(model, GenerationConfig(max_new_bytes=60)).generate(prompts).read_all()
    alone = [generate(trained_model(), GenerationConfig(prompt=p, max_new_bytes=60, speculative=False)).read()
             for p in prompts]
    assert batch == alone
    sampled = [generate(m, GenerationConfig(prompt=prompts[0], max_new_bytes=60, temperature=0.8, seed=3)).read()
               for m in (model, trained_model())]
    assert sampled[0] == sampled[1]  # the sampled rows' drafts are the corpus's: the same draws, the same bytes


def test_checkpoints_the_decoding_copy_and_the_server_carry_the_table(coupled, tmp_path):
    model, _ = coupled
    path = save_checkpoint(tmp_path / "run", 5, model)
    loaded = load_model(tmp_path / "run")[0]
    for a, b in zip(loaded.fitted_coupling, model.fitted_coupling):
        assert torch.equal(a, b)
    assert load_model(save_checkpoint(tmp_path / "plain", 5, trained_model()))[0].fitted_coupling is None
    assert cast_for_decoding(model, torch.bfloat16).fitted_coupling is model.fitted_coupling
    served = EngineSpec.of(model, GenerationConfig(), max_batch=2).decoder().model
    assert torch.equal(served.fitted_coupling.log_weights, model.fitted_coupling.log_weights)
    (path / COUPLING).write_bytes(b"not safetensors")
    with pytest.raises(BytemtpError, match=f"{COUPLING}: unreadable coupling table"):
        load_model(path)
    from safetensors.torch import save_file

    bad = model.fitted_coupling.log_weights.clone()
    bad[0, 0] = math.nan
    save_file({"index": model.fitted_coupling.index, "log_weights": bad}, str(path / COUPLING))
    with pytest.raises(BytemtpError, match="finite float32 'log_weights'"):
        load_model(path)


def test_a_checkpoint_without_byte_trigrams_is_distilled_without_a_table():
    model = copy.deepcopy(trained_model())
    model.byte_trigrams = None
    result = distill(model, corpus_prompts(12, 24), DistillConfig(**{**SMALL, "prompts": 12, "holdout": 2}))
    assert "no byte_trigrams.safetensors" in result["coupling"]["skipped"] and model.fitted_coupling is None
    with pytest.raises(BytemtpError, match="no byte_trigrams.safetensors to fit the coupling from"):
        corpus_ratios(model)
    with pytest.raises(BytemtpError, match="--epochs: must be >= 1, or 0 with the coupling fit"):
        DistillConfig(epochs=0, coupling=False)


def test_cli_fits_the_table_alone_or_not_at_all(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, 200, trained_model())
    data = write_dataset(tmp_path / "data", {"train": [corpus_prompts(8, 200)], "val": [[b"x" * 64]]})
    common = ["--data", str(data), "--prompts", "12", "--text", "0", "--prompt-bytes", "16", "--new-bytes", "24",
              "--batch-size", "6", "--holdout", "4", "--no-progress"]
    alone = CliRunner().invoke(main, ["distill", str(run), "--out", str(tmp_path / "a"), "--epochs", "0", *common])
    assert alone.exit_code == 0, alone.output
    assert "draft heads unchanged" in alone.output and "greedy drafts' coupling fitted" in alone.output
    model = load_model(tmp_path / "a")[0]
    assert torch.equal(model.heads[1].weight, trained_model().heads[1].weight)
    assert model.fitted_coupling is not None
    heads = CliRunner().invoke(main, ["distill", str(run), "--out", str(tmp_path / "b"), "--epochs", "1",
                                      "--no-coupling", *common])
    assert heads.exit_code == 0, heads.output
    assert load_model(tmp_path / "b")[0].fitted_coupling is None
    assert not any((tmp_path / "b").rglob(COUPLING))
