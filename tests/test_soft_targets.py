"""The soft-target fit of the draft heads judges each draft by the very distribution decoding
draws it from: checked position by position against decoding's own functions."""

from __future__ import annotations

import pytest
import torch
from fixtures_train import trained_by_kind

from bytemtp.decode.config import GenerationConfig
from bytemtp.decode.coupling import couple, draft_context
from bytemtp.decode.sampling import probabilities
from bytemtp.train.distill import continuations, trunk_and_choices
from bytemtp.train.soft_targets import DraftLaw, Targets, acceptance, soft_loss

T_ROW = 0.8


def reference(model, seqs: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per draft head: KL(p || q) and sum min(p, q) at every position with a target, [B, T-k] each,
    ``p`` head 1's distribution at ``T_ROW`` (``probabilities``, as verification takes it) and ``q``
    the draft's, from the head's logits at decoding's draft temperature, coupled after the two
    bytes before the target by ``couple``, as a sampled chain draws it."""
    config = GenerationConfig(temperature=T_ROW)
    context = draft_context(model.byte_trigrams, config.coupling_strength, model.cfg.vocab)
    with torch.no_grad():
        z = model.trunk(seqs)
        p_all = probabilities(model.head_logits(z, 0), config.sampling)
        kls, accepts = [], []
        T = seqs.shape[1]
        for k in range(1, model.cfg.n_future):
            kl, acc = torch.zeros(len(seqs), T - k), torch.zeros(len(seqs), T - k)
            for t in range(T - k):
                logits = model.head_logits(z[:, : t + 1], k, next_ids=seqs[:, 1 : t + 2])[:, t]
                q = couple(probabilities(logits, config.draft_sampling), context, seqs[:, t + k - 1], seqs[:, t + k])
                p = p_all[:, t + k]
                kl[:, t] = (p * (p.log() - q.log())).sum(-1)
                acc[:, t] = torch.minimum(p, q).sum(-1)
            kls.append(kl)
            accepts.append(acc)
    return kls, accepts


@pytest.mark.parametrize("kind", ["linear", "next_byte", "transformer"])
def test_soft_loss_and_acceptance_are_decodings_draft_law(kind):
    model = trained_by_kind(kind)
    seqs = continuations(model, [b"def f(x):\n    ", b"import os\nimpo"], 10, batch_size=2, temperature=T_ROW)
    law = DraftLaw.of(model, T_ROW)
    z, _, log_p = trunk_and_choices(model, seqs, 1, T_ROW)
    targets = Targets(seqs, z, log_p)
    kls, accepts = reference(model, seqs)
    with torch.no_grad():
        got = soft_loss(model, targets, law)
    # head 1's log-probabilities are kept in bfloat16 (targets): 3 significant digits
    torch.testing.assert_close(got, torch.stack([kl.mean() for kl in kls]), rtol=2e-2, atol=2e-3)
    want = [a.mean().item() for a in accepts]
    assert acceptance(model, targets, law, batch_size=1) == pytest.approx(want, rel=2e-2, abs=2e-3)
    assert all(0 < a < 1 for a in want)


def test_sampled_continuations_repeat_with_their_seeds_and_differ_across_them():
    model = trained_by_kind("linear")
    prompts = [b"class A:\n", b"class B:\n", b"class C:\n"]
    one = continuations(model, prompts, 24, batch_size=2, temperature=T_ROW, seed=5)
    assert torch.equal(one, continuations(model, prompts, 24, batch_size=3, temperature=T_ROW, seed=5))
    assert not torch.equal(one, continuations(model, prompts, 24, batch_size=2, temperature=T_ROW, seed=6))
