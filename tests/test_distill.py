"""Draft-head self-distillation: only the draft heads change, they agree with head 1 more
often, and decoding outputs stay what they were."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import write_dataset
from fixtures_train import stdlib_corpus, trained_by_kind, trained_model

from bytemtp import BOS
from bytemtp.train.checkpoint import load_model, save_checkpoint
from bytemtp.cli import main
from bytemtp.model.config import PRESETS, ModelConfig
from bytemtp.train.distill import DistillConfig, distill, draft_loss, continuations, trunk_and_choices
from bytemtp.errors import BytemtpError
from bytemtp.decode.generate import GenerationConfig, generate
from bytemtp.model.transformer import ByteMTP


def corpus_prompts(n: int, length: int, seed: int = 0) -> list[bytes]:
    corpus = stdlib_corpus()
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(1, len(corpus) - length, (n,), generator=gen).tolist()
    return [bytes(corpus[s : s + length].tolist()) for s in starts]


def distilled(model: ByteMTP, **kw) -> tuple[ByteMTP, dict]:
    copy_ = copy.deepcopy(model)
    cfg = DistillConfig(**{"prompts": 48, "text": 24, "prompt_bytes": 24, "new_bytes": 64, "batch_size": 16,
                           "epochs": 4, "lr": 3e-3, "holdout": 8, "fit_rows": 8, "coupling_steps": 20, **kw})
    text = corpus_prompts(cfg.text, cfg.prompt_bytes + cfg.new_bytes, seed=9)
    return copy_, distill(copy_, corpus_prompts(cfg.prompts, cfg.prompt_bytes), cfg, text)


# every kind of draft head fitted to head 1's choices (temperature 0), and to its distributions
@pytest.fixture(scope="module", params=[(kind, 0.0) for kind in ("linear", "transformer", "mlp", "next_byte")]
                + [("linear", 0.8), ("transformer", 0.8), ("next_byte", 0.8)], ids=str)
def pair(request) -> tuple[ByteMTP, ByteMTP, dict, float]:
    kind, temperature = request.param
    model = trained_by_kind(kind)
    return (model, *distilled(model, temperature=temperature), temperature)


def test_only_draft_heads_change(pair):
    before, after, _, _ = pair
    drafts = {name for name, _ in after.named_parameters()
              if (name.startswith("heads.") and name[6:8] != "0.") or name.startswith("draft_mlps.")}
    assert drafts
    for (name, p), (_, q) in zip(before.named_parameters(), after.named_parameters()):
        if name in drafts:
            continue
        assert torch.equal(p, q), name  # trunk, final norm, head 1 (and a shared unembedding): bit for bit
    assert any(not torch.equal(p, q) for (n, p), (_, q) in zip(before.named_parameters(), after.named_parameters())
               if n in drafts)
    assert all(p.requires_grad for p in after.parameters())  # the fit's freezing is undone


def test_held_out_agreement_with_head_one_rises(pair):
    """Fitted to head 1's choices, the heads agree with them more often; fitted to its distributions,
    their sampled drafts would be accepted more often."""
    _, _, result, temperature = pair
    sampling = temperature > 0
    parts = {"greedy", "text", "sampled"} if sampling else {"greedy", "text"}
    assert set(result["agreement_before"]) == set(result["agreement_after"]) == parts
    part = "sampled" if sampling else "greedy"
    before, after = result["agreement_before"][part], result["agreement_after"][part]
    assert len(before) == len(after) == len(pair[0].heads) - 1
    assert all(a > b for a, b in zip(after, before)), (before, after)
    assert sum(after) / len(after) > sum(before) / len(before) + 0.02, (before, after)


def test_the_reported_flops_count_every_product(pair):
    """The cost ``distill`` reports, recounted from the model's own weight matrices: a forward
    position (generation, encoding) multiplies by the trunk's and head 1's, 2 FLOPs per weight, plus
    4 d T per attention layer; the fit pays a draft head's products 6 per weight, but 4 for the
    first product of features that are frozen (and for a transformer head's frozen shared
    unembedding); the agreement, before and after, its forward. Sampling, every prompt is continued
    twice (greedy, for the coupling table and the agreement, then sampled), the sampled
    continuations are encoded too (head 1's distributions on them and on the text windows come from
    the same forwards), the fit runs on them, and the held-out sampled continuations are measured
    too."""
    model, _, result, temperature = pair
    d, n = model.cfg.d_model, model.cfg.n_future
    T, held, fitted = 1 + 24 + 64, 8 + 8, (48 - 8) + (24 - 8)  # the settings of ``distilled``
    continued, encoded = 48, 48 + 24
    if temperature:
        continued, encoded, held = 2 * continued, encoded + 48, held + 8
    matrices = {name: p.numel() for name, p in model.named_parameters() if p.dim() == 2 and name != "embed.weight"}

    def weights(prefix: str) -> int:
        return sum(v for name, v in matrices.items() if name.startswith(prefix))

    transformer = model.cfg.head_kind == "transformer"
    unembed = matrices["unembed.weight" if transformer else "heads.0.weight"]
    head_layers = model.cfg.head_layers if transformer else 0
    forward = 2 * (weights("blocks.") + weights("heads.0.") + transformer * unembed) \
        + 4 * d * T * (model.cfg.n_layers + head_layers)
    fit = agreement = 0
    for k in range(1, n):
        mine = weights(f"heads.{k}.") + weights(f"draft_mlps.mlps.{k - 1}.")
        if transformer:
            per_position = 6 * (mine + 2 * d * T * head_layers) + 4 * unembed
            forward_k = 2 * (mine + 2 * d * T * head_layers + unembed)
        else:
            first = matrices.get(f"draft_mlps.mlps.{k - 1}.w_in.weight", matrices[f"heads.{k}.weight"])
            per_position, forward_k = 6 * mine - 2 * first, 2 * mine
        fit += 4 * fitted * (T - k) * per_position
        agreement += 2 * held * (T - k) * forward_k
    # the coupling's fit: a draft head's logits per example (its forward, the same for every head, as
    # the agreement counts it), then 20 steps of 4096 rows at 10 FLOPs per vocabulary entry
    per_example = agreement / (2 * held * sum(T - k for k in range(1, n)))
    coupling = result["coupling"]["examples"] * per_example + 20 * 4096 * 10 * model.cfg.vocab
    want = {"generation": continued * 64 * forward, "encoding": encoded * T * forward, "fit": fit, "agreement": agreement,
            "coupling": coupling}
    assert result["flops"] == pytest.approx({**want, "total": sum(want.values())}, rel=1e-12)
    assert result["fit_bytes"] == fitted * T


def test_decoding_output_is_unchanged_and_speculation_stays_exact(pair):
    before, after, _, _ = pair
    for prompt in [b"", *corpus_prompts(2, 30, seed=5)]:
        outputs = []
        for model, speculative in ((before, False), (after, False), (after, True)):
            g = generate(model, GenerationConfig(prompt=prompt, max_new_bytes=80, speculative=speculative))
            outputs.append(g.read())
        assert outputs[0] == outputs[1] == outputs[2], prompt


def test_continuations_are_autoregressive_decoding():
    model = trained_model()
    prompts = corpus_prompts(5, 20, seed=3)
    seqs = continuations(model, prompts, 40, batch_size=2)
    assert seqs.shape == (5, 1 + 20 + 40)
    for prompt, seq in zip(prompts, seqs.tolist()):
        assert bytes(seq[1:21]) == prompt
        g = generate(model, GenerationConfig(prompt=prompt, max_new_bytes=40, speculative=False))
        out = g.read()
        assert bytes(seq[21 : 21 + len(out)]) == out  # up to a generated BOS, where decoding stops
    # and on through any BOS: each continuation id is head 1's choice given all ids before it
    with torch.no_grad():
        choice = model.head_logits(model.trunk(seqs), 0).argmax(-1)
    assert torch.equal(seqs[:, 21:], choice[:, 20:-1])


def test_continuations_run_on_through_a_generated_bos():
    model = copy.deepcopy(trained_model())
    decode = model.decode

    def decode_ending_every_document(*args, **kw):  # head 1 now always ends the document
        logits, features = decode(*args, **kw)
        return logits.index_fill(-1, torch.tensor([BOS]), 1e4), features

    model.decode = decode_ending_every_document
    seqs = continuations(model, corpus_prompts(3, 8, seed=4), 12, batch_size=2)
    assert seqs.shape == (3, 1 + 8 + 12)
    assert (seqs[:, 9:] == BOS).all()


def test_draft_loss_matches_a_per_position_reference():
    model = trained_model()
    seqs = continuations(model, corpus_prompts(2, 10), 14, batch_size=2)
    z, choice, _ = trunk_and_choices(model, seqs, batch_size=2)
    T, terms = z.shape[1], []
    for k in range(1, model.cfg.n_future):
        logits = model.head_logits(z, k)
        ce = [F.cross_entropy(logits[b, t], choice[b, t + k]) for b in range(2) for t in range(T - k)]
        terms.append(torch.stack(ce).mean())
    torch.testing.assert_close(draft_loss(model, z, choice), torch.stack(terms).mean())


def test_distill_rejects_bad_settings():
    with pytest.raises(BytemtpError, match="--lr"):
        DistillConfig(lr=0)
    with pytest.raises(BytemtpError, match="--holdout"):
        DistillConfig(prompts=4, holdout=4)
    with pytest.raises(BytemtpError, match="--holdout"):
        DistillConfig(text=2, holdout=2)
    with pytest.raises(BytemtpError, match="n_future=1"):
        distilled(ByteMTP(ModelConfig(d_model=32, n_layers=1, n_attn_heads=2, n_future=1, max_seq_len=64)))
    with pytest.raises(BytemtpError, match="BOS and 200 bytes need 201 positions, more than the model's max_seq_len"):
        distilled(trained_model(), prompt_bytes=100, new_bytes=100)


def test_default_continuations_fit_the_tiny_preset():
    """``bytemtp distill runs/tiny`` with no flags must not ask for more positions than tiny has."""
    cfg = DistillConfig()
    assert 1 + cfg.prompt_bytes + cfg.new_bytes == PRESETS["tiny"].max_seq_len


def test_cli_writes_a_distilled_checkpoint(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, 200, trained_model())
    data = write_dataset(tmp_path / "data", {"train": [corpus_prompts(8, 200)], "val": [[b"x" * 64]]})
    result = CliRunner().invoke(main, [
        "distill", str(run), "--data", str(data), "--out", str(tmp_path / "out"), "--prompts", "12",
        "--text", "6", "--prompt-bytes", "16", "--new-bytes", "24", "--batch-size", "6", "--epochs", "1",
        "--holdout", "4",
        "--json", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fit_bytes"] == (8 + 2) * (1 + 16 + 24)  # held-out continuations and windows aside
    assert {part: len(a) for part, a in report["agreement_after"].items()} == {"greedy": 7, "text": 7, "sampled": 7}
    model, meta = load_model(tmp_path / "out")
    assert meta["step"] == 200 and meta["distill"]["prompts"] == 12 and meta["distill"]["from"] == str(run)
    assert torch.equal(model.heads[0].weight, trained_model().heads[0].weight)
    bad = CliRunner().invoke(main, ["distill", str(run), "--data", str(data), "--out", str(tmp_path / "o2"),
                                    "--lr", "2"])
    assert bad.exit_code == 1 and "--lr: must be in (0, 1)" in bad.output
    for value in ("-0.5", "nan", "inf"):
        cold = CliRunner().invoke(main, ["distill", str(run), "--data", str(data), "--out", str(tmp_path / "o3"),
                                         "--temperature", value])
        assert cold.exit_code != 0 and "--temperature" in cold.output and "Traceback" not in cold.output, value
        assert not (tmp_path / "o3").exists()
    before = (run / "checkpoints" / "step-0000200" / "model.safetensors").read_bytes()
    onto_itself = CliRunner().invoke(main, ["distill", str(run), "--data", str(data), "--out", str(run)])
    assert onto_itself.exit_code == 1 and "already holds checkpoints" in onto_itself.output
    assert (run / "checkpoints" / "step-0000200" / "model.safetensors").read_bytes() == before
