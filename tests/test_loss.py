"""The multi-byte objective: the sequential and stacked head schedules against the naive summed loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bytemtp import VOCAB
from bytemtp.model.config import HEAD_KINDS, ModelConfig
from bytemtp.model.transformer import ByteMTP
from bytemtp.train import objective
from bytemtp.train.cross_entropy import cross_entropy_fn, unembed_cross_entropy
from bytemtp.train.objective import LN2, multihead_loss, split_batch
from bytemtp.train.parallel import MTPObjective
from bytemtp.train.step_timing import peak_step_bytes
from train_support import gloo_group  # noqa: F401 (a fixture)


def make_model(head_kind: str, n_future: int, d_model: int = 32, **overrides) -> ByteMTP:
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=d_model, n_layers=2, n_attn_heads=4, n_future=n_future, head_kind=head_kind, max_seq_len=64,
        **overrides,
    )
    return ByteMTP(cfg)


def padded_batch(n_future: int, B: int = 3, T: int = 20, seed: int = 1) -> torch.Tensor:
    """[B, T+n] ids whose rows end in -1 padding of different lengths (as the packer writes)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T + n_future), generator=g)
    ids[1, -(n_future + 3) :] = -1
    ids[2, -1:] = -1
    return ids


# A head's loss is a mean of up to B * T = 60 float32 cross-entropies, which the schedules (and
# another CPU's SIMD width) sum in other orders: a sum of n positive terms is exact to (n - 1) eps
# relative in any order, and each term's logsumexp adds a few eps; 64 eps covers both.
LOSS_TOL = {"rtol": 64 * torch.finfo(torch.float32).eps, "atol": 0.0}


def grads_of(model: ByteMTP, ids: torch.Tensor, mode: str, scale: float = 1.0, draft_loss_weight: float = 1.0):
    model.zero_grad(set_to_none=True)
    out = multihead_loss(model, ids, mode, draft_loss_weight)
    (out.loss * scale).backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_grads_close(got: dict, want: dict, rtol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        err, size = (got[name] - want[name]).norm(), want[name].norm()
        assert err <= rtol * size, f"{name}: error {err:.2e}, gradient norm {size:.2e}"


def assert_objective_is(model: ByteMTP, ids: torch.Tensor, mode: str, w: float, logits, **loss_kw) -> dict:
    """``multihead_loss(model, ids, mode, w, **loss_kw)``'s loss and gradients equal autograd through
    (CE_1 + w * the draft heads' CEs) / (1 + w (n - 1)), head k's logits ``logits(h, k)`` from the
    shared features h; returns the gradients."""
    n = model.cfg.n_future
    inputs, targets = split_batch(ids, n)
    model.zero_grad(set_to_none=True)
    h = model.head_features(model.trunk(inputs), 0)
    ce = [F.cross_entropy(logits(h, k).flatten(0, 1), targets[..., k].flatten(), ignore_index=-1) for k in range(n)]
    reference = (ce[0] + w * sum(ce[1:])) / (1 + w * (n - 1))
    reference.backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out = multihead_loss(model, ids, mode, w, **loss_kw)
    out.loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch.testing.assert_close(out.loss, reference.detach(), **LOSS_TOL)
    assert_grads_close(got, want, rtol=1e-5)
    return got


@pytest.mark.parametrize("mode", ["sequential", "stacked"])
@pytest.mark.parametrize("head_kind", HEAD_KINDS)
@pytest.mark.parametrize("n_future", [1, 2, 8])
def test_sequential_gradients_equal_naive(head_kind, n_future, mode):
    model = make_model(head_kind, n_future)
    ids = padded_batch(n_future)
    naive, want = grads_of(model, ids, "naive")
    seq, got = grads_of(model, ids, mode)
    assert_grads_close(got, want, rtol=1e-5)
    torch.testing.assert_close(seq.head_losses, naive.head_losses, **LOSS_TOL)
    torch.testing.assert_close(seq.loss, naive.loss, **LOSS_TOL)
    assert seq.head_losses.shape == (n_future,) and not seq.head_losses.requires_grad


@pytest.mark.parametrize("mode", ["naive", "sequential", "stacked"])
@pytest.mark.parametrize("head_kind", HEAD_KINDS)
def test_weighted_draft_losses_match_the_reference_objective(head_kind, mode):
    """With draft heads weighted w, the objective is (L1 + w * sum of the draft heads' L) / (1 + w (n-1)):
    every schedule's loss and gradients equal autograd through that formula, written out here."""
    w, n = 0.3, 8
    model = make_model(head_kind, n)
    ids = padded_batch(n)
    inputs, targets = split_batch(ids, n)
    model.zero_grad(set_to_none=True)
    z = model.trunk(inputs)
    ce = [F.cross_entropy(model.head_logits(z, k).flatten(0, 1), targets[..., k].flatten(), ignore_index=-1)
          for k in range(n)]
    reference = (ce[0] + w * sum(ce[1:])) / (1 + w * (n - 1))
    reference.backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    out, got = grads_of(model, ids, mode, draft_loss_weight=w)
    torch.testing.assert_close(out.loss, reference.detach(), **LOSS_TOL)
    assert_grads_close(got, want, rtol=1e-5)
    plain = multihead_loss(model, ids, mode)
    assert (plain.loss - out.loss).abs() > 1e-4  # the weights change the objective, not the head losses
    torch.testing.assert_close(plain.head_losses.detach(), out.head_losses, **LOSS_TOL)


@pytest.mark.parametrize("mode", ["naive", "sequential", "stacked"])
def test_detached_draft_heads_leave_the_trunk_to_head_one(mode):
    """``draft_detach``: the objective's value is the weighted one, but the trunk and the shared norm
    get head 1's gradient alone (as a next-byte model with the same trunk would, scaled by head 1's
    weight), and each draft head's unembedding the gradient of its loss on features cut off from
    them: autograd through that formula, written out here."""
    w, n = 0.3, 8
    model = make_model("linear", n)
    ids = padded_batch(n)
    got = assert_objective_is(model, ids, mode, w, lambda h, k: model.features_logits(h if k == 0 else h.detach(), k),
                              draft_detach=True)
    _, shared = grads_of(model, ids, mode, draft_loss_weight=w)
    # the detached trunk's gradients really are others than the shared objective's
    assert (shared["blocks.0.attn.wqkv.weight"] - got["blocks.0.attn.wqkv.weight"]).norm() > 1e-3 * got[
        "blocks.0.attn.wqkv.weight"].norm()


@pytest.mark.parametrize("detach, next_byte", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("mode", ["naive", "sequential", "stacked"])
@pytest.mark.parametrize("ffn", ["swiglu", "relu2"])
def test_draft_mlp_heads_match_the_written_out_objective(mode, detach, next_byte, ffn):
    """``draft_mlp``: draft head k's logits are its unembedding of u + w_out(act(w_in u)), u = h the
    shared features (cut off from the trunk when detached), plus with ``draft_next_byte`` its
    embedding of the text's byte after the position; head 1's those of h alone. Every schedule's
    loss and gradients (MLPs, embeddings, unembeddings, norm, trunk) equal autograd through that
    formula, written out here, with MLP weights large enough to matter."""
    w, n = 0.3, 4
    model = make_model("linear", n, draft_mlp=24, ffn=ffn, draft_next_byte=next_byte)
    with torch.no_grad():
        for p in model.draft_mlps.parameters():
            p.normal_(0, 0.3)
    ids = padded_batch(n)
    following = split_batch(ids, n)[1][..., 0].clamp_min(0)  # the byte after each position (padding: any)

    def act(x):
        if ffn == "relu2":
            return F.relu(x).square()
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def logits(h, k):
        if k:
            mlp = model.draft_mlps.mlps[k - 1]
            h = (h.detach() if detach else h)
            if next_byte:
                h = h + model.draft_mlps.next_bytes[k - 1].weight[following]
            h = h + act(h @ mlp.w_in.weight.t()) @ mlp.w_out.weight.t()
        return (h @ model.unembedding(k).t())[..., :VOCAB]

    got = assert_objective_is(model, ids, mode, w, logits, draft_detach=detach)
    assert got["draft_mlps.mlps.0.w_in.weight"].norm() > 0  # the MLPs train
    assert not next_byte or got["draft_mlps.next_bytes.0.weight"].norm() > 0  # and so do the embeddings
    # a head of weight 0 is not run: its MLP gets a zero gradient
    model.zero_grad(set_to_none=True)
    multihead_loss(model, ids, mode, [0.3, 0.0, 0.3], draft_detach=detach).loss.backward()
    assert not model.draft_mlps.mlps[1].w_in.weight.grad.any() and model.draft_mlps.mlps[0].w_in.weight.grad.any()


def test_detached_draft_heads_need_linear_heads():
    with pytest.raises(ValueError, match="linear heads"):
        multihead_loss(make_model("transformer", 4), padded_batch(4), "sequential", 0.3, draft_detach=True)


@pytest.mark.parametrize("mode", ["sequential", "stacked"])
def test_draft_loss_weight_zero_trains_head_one_alone(mode):
    """Weight 0: the trunk's gradients are head 1's alone, as in a next-byte model with the same
    trunk, and the draft heads' unembeddings get none."""
    model = make_model("linear", 4)
    ids = padded_batch(4)
    _, got = grads_of(model, ids, mode, draft_loss_weight=0.0)
    inputs, targets = split_batch(ids, 4)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model.head_logits(model.trunk(inputs), 0).flatten(0, 1), targets[..., 0].flatten(),
                    ignore_index=-1).backward()
    for name, p in model.named_parameters():
        want = torch.zeros_like(got[name]) if p.grad is None else p.grad
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-7, msg=name)
    assert all(got[f"heads.{k}.weight"].abs().max() == 0 for k in (1, 2, 3))


@pytest.mark.parametrize("mode", ["sequential", "stacked"])
@pytest.mark.parametrize("head_kind", HEAD_KINDS)
def test_heads_of_weight_zero_are_not_computed(head_kind, mode, monkeypatch):
    """A schedule training the first 3 of 8 heads: the gradients are those of the weighted objective
    over every head (weight 0 adds nothing), the 5 others' parameters get exact zeros, their
    losses are reported as 0, and their logits are never computed."""
    n, drafts = 8, [0.5, 0.25, 0, 0, 0, 0, 0]
    model = make_model(head_kind, n)
    ids = padded_batch(n)
    inputs, targets = split_batch(ids, n)
    model.zero_grad(set_to_none=True)
    z = model.trunk(inputs)
    weights = torch.tensor([1.0, *drafts])
    ce = torch.stack([F.cross_entropy(model.head_logits(z, k).flatten(0, 1), targets[..., k].flatten(),
                                      ignore_index=-1) for k in range(n)])
    ((weights * ce).sum() / weights.sum()).backward()
    want = {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    unembedded: list[int] = []  # heads whose logits each cross-entropy computed
    fn = objective.cross_entropy_fn

    def counting(model):
        ce_fn = fn(model)
        return lambda x, w, *a: (unembedded.append(w.shape[0] // model.cfg.vocab_padded), ce_fn(x, w, *a))[1]

    monkeypatch.setattr(objective, "cross_entropy_fn", counting)
    out, got = grads_of(model, ids, mode, draft_loss_weight=drafts)
    assert_grads_close(got, want, rtol=1e-5)
    assert (out.head_losses[3:] == 0).all() and (out.head_losses[:3] > 0).all()
    torch.testing.assert_close(out.head_losses[:3], ce[:3].detach(), **LOSS_TOL)
    untrained = [name for name in got if any(name.startswith(f"heads.{k}.") for k in range(3, n))]
    assert untrained and all(got[name].abs().max() == 0 for name in untrained)
    # three heads' logits: one product each, or the three stacked in every chunk of rows
    assert unembedded == [1, 1, 1] or set(unembedded) == {3}


@pytest.mark.parametrize("mode", ["sequential", "stacked"])
@pytest.mark.parametrize("head_kind", HEAD_KINDS)
def test_soft_capped_gradients_equal_naive(head_kind, mode):
    """The hand-written cross-entropy's soft-cap and its slope against autograd through
    ``head_logits``; a cap small enough to bend random-init logits, so it changes the loss."""
    model = make_model(head_kind, 8, logit_cap=0.1)
    ids = padded_batch(8)
    naive, want = grads_of(model, ids, "naive")
    capped, got = grads_of(model, ids, mode)
    assert_grads_close(got, want, rtol=1e-5)
    torch.testing.assert_close(capped.head_losses, naive.head_losses, **LOSS_TOL)
    uncapped = multihead_loss(make_model(head_kind, 8), ids, mode)
    assert (uncapped.head_losses - capped.head_losses.detach()).abs().max() > 1e-3
    with torch.no_grad():
        assert model.head_logits(model.trunk(ids.clamp_min(0)), 0).abs().max() < 0.1


@pytest.mark.parametrize("head_kind", HEAD_KINDS)
def test_incoming_gradient_scales_and_accumulates(head_kind):
    """loss * c backward (gradient accumulation, loss scaling) reaches the heads scaled by c."""
    model = make_model(head_kind, 3)
    ids = padded_batch(3)
    _, want = grads_of(model, ids, "naive", scale=0.25)
    _, got = grads_of(model, ids, "sequential", scale=0.25)
    assert_grads_close(got, want, rtol=1e-5)
    multihead_loss(model, ids).loss.mul(0.75).backward()  # accumulates onto the 0.25 pass
    _, full = grads_of(model, ids, "naive")
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, full, rtol=1e-5)


def test_next_byte_baseline_is_plain_cross_entropy():
    """n_future = 1 is the ordinary next-byte loss, computed from ``forward``'s logits."""
    for kind in HEAD_KINDS:
        model = make_model(kind, 1)
        ids = padded_batch(1)
        inputs, targets = ids[:, :-1].clamp_min(0), ids[:, 1:]
        want = F.cross_entropy(model(inputs)[:, :, 0].flatten(0, 1), targets.flatten(), ignore_index=-1)
        out = multihead_loss(model, ids)
        torch.testing.assert_close(out.loss, want, **LOSS_TOL)
        assert (out.head_losses / LN2).tolist() == pytest.approx([want.item() / LN2], rel=LOSS_TOL["rtol"])


def test_split_batch_aligns_head_k_with_byte_t_plus_k():
    ids = torch.arange(2 * 13).view(2, 13)
    inputs, targets = split_batch(ids, 3)
    assert inputs.shape == (2, 10) and targets.shape == (2, 10, 3)
    for k in range(3):
        assert torch.equal(targets[..., k], ids[:, k + 1 : k + 11])
    padded = padded_batch(3)
    assert split_batch(padded, 3)[0].min() >= 0  # padding is embeddable as an input


@pytest.mark.parametrize("head_kind", HEAD_KINDS)
def test_head_without_targets_contributes_zero(head_kind):
    """A batch whose last heads see only padding must not turn the loss into NaN."""
    model = make_model(head_kind, 4)
    ids = torch.randint(0, VOCAB, (2, 6))
    ids[:, 3:] = -1  # T = 2: head 3 and 4 only ever see padding
    naive, want = grads_of(model, ids, "naive")
    seq, got = grads_of(model, ids, "sequential")
    assert torch.equal(seq.head_losses[2:], torch.zeros(2)) and seq.loss.isfinite()
    torch.testing.assert_close(seq.head_losses, naive.head_losses)
    assert_grads_close(got, want, rtol=1e-5)


@pytest.mark.parametrize("mode", ["sequential", "stacked"])
@pytest.mark.parametrize("head_kind", HEAD_KINDS)
def test_bf16_autocast_matches_naive(head_kind, mode):
    """Under autocast the hand-written head step casts as autograd would: same result, bf16 tolerance."""
    model = make_model(head_kind, 3, d_model=64)
    ids = padded_batch(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive, want = grads_of(model, ids, "naive")
        seq, got = grads_of(model, ids, mode)
    assert all(g.dtype == torch.float32 for g in got.values())
    torch.testing.assert_close(seq.head_losses, naive.head_losses, rtol=2e-2, atol=2e-2)
    assert_grads_close(got, want, rtol=2e-2)


@pytest.mark.parametrize("chunk_rows", [1, 7, 60])
def test_stacked_chunks_give_the_sequential_gradients(monkeypatch, chunk_rows):
    """Rows split into chunks of 1, 7 (the last one short) or all 60 at once: the same gradients."""
    model = make_model("linear", 4)
    ids = padded_batch(4)  # 3 rows x 20 positions
    seq, want = grads_of(model, ids, "sequential")
    monkeypatch.setattr(objective, "STACKED_LOGITS", chunk_rows * 4 * model.cfg.vocab_padded)
    stacked, got = grads_of(model, ids, "stacked")
    assert_grads_close(got, want, rtol=1e-5)
    torch.testing.assert_close(stacked.head_losses, seq.head_losses, **LOSS_TOL)


def test_evaluation_needs_no_graph():
    model = make_model("transformer", 3)
    ids = padded_batch(3)
    with torch.no_grad():
        out = multihead_loss(model, ids)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.head_losses, multihead_loss(model, ids, "naive").head_losses, **LOSS_TOL)


def test_second_backward_is_refused():
    model = make_model("linear", 2)
    out = multihead_loss(model, padded_batch(2))
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        out.loss.backward()


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="mode"):
        multihead_loss(make_model("linear", 2), padded_batch(2), "parallel")


def test_cross_entropy_is_compiled_with_the_blocks():
    """The compile policy decides for the cross-entropy too: eager for an eager model, one
    compiled wrapper (built once, graphs reused) once the model's blocks are compiled."""
    model = make_model("linear", 2)
    assert cross_entropy_fn(model) is unembed_cross_entropy
    model.compiled = True  # what compile_model sets; nothing runs, so nothing is compiled here
    compiled = cross_entropy_fn(model)
    assert compiled is not unembed_cross_entropy and callable(compiled)
    other = make_model("linear", 3)
    other.compiled = True
    assert cross_entropy_fn(other) is compiled


def test_sequential_keeps_one_head_alive():
    """Transformer heads: the sequential step's peak memory is well below the naive one's."""
    model = make_model("transformer", 8, d_model=64)
    ids = torch.randint(0, VOCAB, (4, 64 + 8))

    def step(mode):
        model.zero_grad(set_to_none=True)
        multihead_loss(model, ids, mode).loss.backward()

    naive = peak_step_bytes(lambda: step("naive"), torch.device("cpu"))
    seq = peak_step_bytes(lambda: step("sequential"), torch.device("cpu"))
    assert seq < 0.6 * naive


# -- DDP ---------------------------------------------------------------------------


@pytest.mark.parametrize("head_kind", HEAD_KINDS)
def test_ddp_gives_the_same_gradients(gloo_group, head_kind):
    model = make_model(head_kind, 4)
    ids = padded_batch(4)
    _, want = grads_of(model, ids, "sequential")
    model.zero_grad(set_to_none=True)
    ddp = torch.nn.parallel.DistributedDataParallel(MTPObjective(model))
    loss, head_losses = ddp(ids)
    loss.backward()
    assert head_losses.shape == (4,)
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, want, rtol=1e-6)
