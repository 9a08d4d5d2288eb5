"""compile_model: compiled training steps agree with eager ones."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from bytemtp import VOCAB
from bytemtp.compile import compile_model
from bytemtp.model.config import HEAD_KINDS, preset
from bytemtp.train.objective import multihead_loss
from bytemtp.model.transformer import ByteMTP


def train_step(model: ByteMTP, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = multihead_loss(model, ids)
    out.loss.backward()
    return out.head_losses, {name: p.grad.clone() for name, p in model.named_parameters()}


def compare_compiled_with_eager(head_kind: str, device: str, dtype: torch.dtype, rtol: float, **model_kw) -> None:
    torch.manual_seed(0)
    model = ByteMTP(preset("tiny", head_kind=head_kind, n_future=4, max_seq_len=64, **model_kw)).to(device)
    ids = torch.randint(0, VOCAB, (2, 64 + 4), device=device)
    ids[1, -9:] = -1
    keys = model.state_dict().keys()
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        want_losses, want = train_step(model, ids)
        torch.compiler.reset()
        counters.clear()
        assert compile_model(model, enabled=True) and model.compiled
        got_losses, got = train_step(model, ids)
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert model.state_dict().keys() == keys  # in place: checkpoints see the eager names
    torch.testing.assert_close(got_losses, want_losses, rtol=rtol, atol=rtol)
    for name in want:
        err, size = (got[name] - want[name]).norm(), want[name].norm()
        assert err <= rtol * size, f"{name}: error {err:.2e}, gradient norm {size:.2e}"


def test_cpu_stays_eager_by_default():
    model = ByteMTP(preset("tiny", n_future=2))
    assert compile_model(model) is False
    assert not model.compiled
    assert compile_model(model, enabled=False) is False


@pytest.mark.slow  # inductor builds C++ kernels: ~15 s warm, minutes with a cold cache on 2 cores
@pytest.mark.parametrize("head_kind", HEAD_KINDS)
def test_compiled_matches_eager_on_cpu(head_kind):
    compare_compiled_with_eager(head_kind, "cpu", torch.float32, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("head_kind, model_kw", [(kind, {}) for kind in HEAD_KINDS]
                         + [("linear", {"draft_mlp": 64, "draft_next_byte": True})])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
def test_compiled_matches_eager_on_cuda(head_kind, model_kw, dtype, rtol):
    compare_compiled_with_eager(head_kind, "cuda", dtype, rtol, **model_kw)


@pytest.mark.gpu
def test_cuda_compiles_by_default():
    model = ByteMTP(preset("tiny", n_future=2)).cuda()
    assert compile_model(model) is True and model.compiled


def test_batched_decode_step_traces_into_one_graph():
    """The decode forward a batched engine compiles: one whole graph (no breaks), reused as every
    row's slots, RoPE positions and mask change between steps, writing the cache in place."""
    torch.manual_seed(0)
    model = ByteMTP(preset("tiny", head_kind="transformer", n_future=4, max_seq_len=64)).eval()
    cache = model.setup_cache(2, 64)
    torch.compiler.reset()
    counters.clear()
    step = torch.compile(model.decode, backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        model.decode(torch.randint(0, VOCAB, (2, 8)), torch.arange(8), 4)
        for start in ([8, 3], [10, 4], [11, 9]):
            slots = torch.tensor(start)[:, None] + torch.arange(3)
            ids, mask = torch.randint(0, VOCAB, (2, 3)), cache.causal[slots]
            want = model.decode(ids, slots, 4, slots, mask)
            got = step(ids, slots, 4, slots, mask)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("next_byte", [False, True])
def test_draft_mlp_logits_trace_into_one_graph(next_byte):
    """Draft heads with MLPs (``draft_mlp``, and reading the next byte with ``draft_next_byte``) draft
    inside a compiled step: their batched logits trace whole, read the stacked weights
    ``setup_cache`` refreshes in place, and equal the eager ones."""
    torch.manual_seed(0)
    model = ByteMTP(preset("tiny", n_future=4, max_seq_len=64, draft_mlp=32, draft_next_byte=next_byte)).eval()
    model.setup_cache(2, 64)
    torch.compiler.reset()
    counters.clear()
    drafts = torch.compile(model.draft_logits, backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        for _ in range(2):
            features, next_ids = torch.randn(2, 1, 128), torch.randint(0, 257, (2,))
            torch.testing.assert_close(drafts(features, 3, next_ids), model.draft_logits(features, 3, next_ids),
                                       rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            for p in model.draft_mlps.parameters():
                p.mul_(1.5).add_(0.01)  # the embeddings, which start at zero, change too
        model.setup_cache(2, 64)
        torch.testing.assert_close(drafts(features, 3, next_ids), model.draft_logits(features, 3, next_ids),
                                   rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
