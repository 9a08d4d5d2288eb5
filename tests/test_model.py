"""ModelConfig, presets, and the model's incremental (KV-cached) forward."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from bytemtp import VOCAB
from bytemtp.errors import BytemtpError
from bytemtp.model.config import HEAD_KINDS, ModelConfig, preset
from bytemtp.model.decode_dtype import cast_for_decoding, decoding_dtype
from bytemtp.model.layers import RMSNorm, soft_cap
from bytemtp.model.transformer import ByteMTP
from bytemtp.train.objective import multihead_loss


def small_model(head_kind: str, n_future: int = 3, **overrides) -> ByteMTP:
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=32, n_layers=2, n_attn_heads=4, n_future=n_future, head_kind=head_kind, max_seq_len=64, **overrides
    )
    return ByteMTP(cfg).eval()


# -- config ------------------------------------------------------------------------


def test_config_json_round_trip():
    cfg = ModelConfig(d_model=64, n_layers=3, n_attn_heads=2, n_future=5, head_kind="transformer", head_layers=2,
                      ffn="gelu", d_ff=96, max_seq_len=77, rope_theta=5e5, norm_eps=1e-6)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.ffn_dim == 96 and again.head_dim == 32


@pytest.mark.parametrize(
    "field, value",
    [
        ("head_kind", "mlp"),
        ("ffn", "relu"),
        ("d_model", 0),
        ("n_layers", 0),
        ("n_future", 0),
        ("max_seq_len", -3),
        ("d_model", 100),  # 100 / 4 heads = 25: odd head size, no RoPE
        ("vocab", 256),
    ],
)
def test_bad_config_field_is_named(field, value):
    with pytest.raises(BytemtpError, match=field):
        ModelConfig(**{"n_attn_heads": 4, field: value})


def test_transformer_heads_need_a_layer():
    with pytest.raises(BytemtpError, match="head_layers"):
        ModelConfig(head_kind="transformer", head_layers=0)


def test_unknown_field_is_named():
    d = ModelConfig().to_dict() | {"n_head": 4}
    with pytest.raises(BytemtpError, match="'n_head'"):
        ModelConfig.from_dict(d)


def test_unknown_preset_is_an_error():
    with pytest.raises(BytemtpError, match="huge"):
        preset("huge")


@pytest.mark.parametrize("name, low, high", [("small", 20e6, 30e6), ("base", 100e6, 135e6)])
def test_preset_sizes(name, low, high):
    with torch.device("meta"):  # counts without allocating (or initialising) the weights
        counts = ByteMTP(preset(name)).param_counts()
    assert low <= counts["total"] <= high
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_param_counts_cover_every_parameter():
    for kind in HEAD_KINDS:
        model = small_model(kind)
        assert model.param_counts()["total"] == sum(p.numel() for p in model.parameters())
        one_head = small_model(kind, n_future=1).param_counts()["heads"]
        assert model.param_counts()["heads"] == 3 * one_head


def test_tiny_preset_trains_on_cpu():
    """A few steps of AdamW on one batch of the tiny preset must bring its loss well down."""
    torch.manual_seed(0)
    model = ByteMTP(preset("tiny", max_seq_len=64))
    text = b"def f(x):\n    return x + 1\n" * 4
    ids = torch.tensor([list(text[:72])] * 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        out = multihead_loss(model, ids)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]


# -- forward -----------------------------------------------------------------------


@pytest.mark.parametrize("head_kind", HEAD_KINDS)
def test_forward_stacks_head_logits_over_real_vocab(head_kind):
    model = small_model(head_kind)
    ids = torch.randint(0, VOCAB, (2, 10))
    logits = model(ids)
    assert logits.shape == (2, 10, 3, VOCAB)
    z = model.trunk(ids)
    for k in range(3):
        torch.testing.assert_close(logits[:, :, k], model.head_logits(z, k))
    torch.testing.assert_close(model(ids, n_heads=2), logits[:, :, :2])


def test_heads_are_independent():
    """Each head has its own parameters: different heads give different predictions."""
    for kind in HEAD_KINDS:
        logits = small_model(kind)(torch.randint(0, VOCAB, (1, 8)))
        assert not torch.allclose(logits[:, :, 0], logits[:, :, 1])


def test_forward_is_causal():
    model = small_model("transformer")
    ids = torch.randint(0, VOCAB, (1, 12))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % VOCAB
    torch.testing.assert_close(model(ids)[:, :7], model(changed)[:, :7])
    assert not torch.allclose(model(ids)[:, 7:], model(changed)[:, 7:])


def test_too_long_is_an_error():
    model = small_model("linear")
    with pytest.raises(BytemtpError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(BytemtpError, match="max_seq_len"):
        model.setup_cache(1, 65)


# -- KV cache ----------------------------------------------------------------------


def run_chunks(model: ByteMTP, ids: torch.Tensor, start: int, sizes: list[int]) -> torch.Tensor:
    """Feed ids[:, start:] through the cache in chunks of ``sizes``; logits of all of them."""
    out, p = [], start
    for size in sizes:
        chunk = ids[:, p : p + size]
        out.append(model(chunk, input_pos=torch.arange(p, p + chunk.shape[1])))
        p += chunk.shape[1]
    assert p == ids.shape[1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("head_kind", HEAD_KINDS)
@pytest.mark.parametrize("sizes", [[7, 1, 1, 3, 5, 2, 5], [1] * 24, [24], [16, 8]])
def test_cached_logits_equal_full_logits(head_kind, sizes):
    model = small_model(head_kind)
    ids = torch.randint(0, VOCAB, (2, 24))
    full = model(ids)
    model.setup_cache(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(run_chunks(model, ids, 0, sizes), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_kind", HEAD_KINDS)
def test_cache_rolls_back(head_kind):
    """Speculative rejection: garbage written past the accepted prefix is simply overwritten."""
    model = small_model(head_kind, n_future=4)
    ids = torch.randint(0, VOCAB, (1, 30))
    full = model(ids)
    model.setup_cache(1, 40)
    with torch.no_grad():
        run_chunks(model, ids[:, :20], 0, [12, 8])
        garbage = torch.randint(0, VOCAB, (1, 12))
        model(garbage, input_pos=torch.arange(14, 26))  # positions 14..25 now hold junk keys/values
        model(garbage[:, :3], input_pos=torch.arange(26, 29))
        rerun = run_chunks(model, ids, 14, [4, 1, 6, 5])  # accepted prefix ends at 14
    torch.testing.assert_close(rerun, full[:, 14:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("logit_cap", [0.0, 0.1])
@pytest.mark.parametrize("head_kind, draft_mlp, next_byte",
                         [(kind, 0, False) for kind in HEAD_KINDS] + [("linear", 24, False), ("linear", 24, True)])
@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_decode_and_draft_logits_equal_forward(head_kind, draft_mlp, next_byte, n_heads, logit_cap):
    """Decoding's split forward: head 1 at every position, draft heads at any one position
    (soft-capped as in training when the model has a cap; through their MLPs, batched over heads,
    with ``draft_mlp``, whose weights ``setup_cache`` restacks after they change; with
    ``draft_next_byte``, given the byte head 1 chose there, as ``forward``'s draft heads are)."""
    model = small_model(head_kind, n_future=4, logit_cap=logit_cap, draft_mlp=draft_mlp, draft_next_byte=next_byte)
    ids = torch.randint(0, VOCAB, (1, 20))
    if draft_mlp:
        model.setup_cache(1, 24)  # stacks the MLPs' weights as they are now, changed below
        with torch.no_grad():
            for p in model.draft_mlps.parameters():
                p.normal_(0, 0.3)
    full = model(ids)
    model.setup_cache(1, 24)
    with torch.no_grad():
        first, _ = model.decode(ids[:, :12], torch.arange(12), n_heads)
        logits, features = model.decode(ids[:, 12:], torch.arange(12, 20), n_heads)
        torch.testing.assert_close(torch.cat((first, logits), dim=1), full[:, :, 0], rtol=1e-5, atol=1e-5)
        for j in range(8):
            drafts = model.draft_logits(features[0, j], n_heads - 1, logits[0, j].argmax())
            torch.testing.assert_close(drafts, full[0, 12 + j, 1:n_heads], rtol=1e-5, atol=1e-5)
            if next_byte and n_heads > 1:  # another byte, other drafts
                other = model.draft_logits(features[0, j], n_heads - 1, (logits[0, j].argmax() + 1) % VOCAB)
                assert (other - drafts).abs().max() > 1e-3


def test_draft_mlp_needs_linear_heads():
    with pytest.raises(BytemtpError, match="draft_mlp: needs linear heads"):
        small_model("transformer", draft_mlp=8)
    with pytest.raises(BytemtpError, match="draft_mlp: must be >= 0"):
        small_model("linear", draft_mlp=-1)
    assert ModelConfig.from_dict({"d_model": 32}).draft_mlp == 0  # a config saved before it: plain linear heads
    assert small_model("linear").draft_mlps is None


def test_draft_mlps_leave_the_rest_of_the_initialisation_as_it_was():
    """Seed for seed, a model with draft MLPs starts from the weights a model without them has
    (the MLPs are drawn last), so the two train as a paired comparison."""
    plain, mlp = small_model("linear").state_dict(), small_model("linear", draft_mlp=16).state_dict()
    assert all(torch.equal(plain[name], mlp[name]) for name in plain)
    assert {name for name in mlp if name not in plain} == {
        f"draft_mlps.mlps.{k}.{w}.weight" for k in range(2) for w in ("w_in", "w_out")}


def test_draft_heads_reading_the_next_byte_start_as_those_that_do_not():
    """``draft_next_byte``: the next-byte embeddings (one per draft head) are drawn after everything
    else and start at zero, so the model computes what the one without them does, seed for seed; the
    flag needs draft MLPs, and a config saved before it means off."""
    mlp, reading = small_model("linear", draft_mlp=16), small_model("linear", draft_mlp=16, draft_next_byte=True)
    plain, extra = mlp.state_dict(), reading.state_dict()
    assert all(torch.equal(plain[name], extra[name]) for name in plain)
    assert {name for name in extra if name not in plain} == {f"draft_mlps.next_bytes.{k}.weight" for k in range(2)}
    assert not any(extra[f"draft_mlps.next_bytes.{k}.weight"].any() for k in range(2))
    ids = torch.randint(0, VOCAB, (2, 10))
    torch.testing.assert_close(reading(ids), mlp(ids), rtol=0, atol=0)
    assert {id(p) for p in reading.draft_mlps.next_bytes.parameters()} <= {id(p) for p in reading.draft_parameters()}
    with pytest.raises(BytemtpError, match="draft_next_byte: needs draft_mlp"):
        small_model("linear", draft_next_byte=True)
    assert ModelConfig.from_dict({"d_model": 32, "draft_mlp": 8}).draft_next_byte is False
    with pytest.raises(ValueError, match="pass next_ids"):
        reading.features_logits(torch.zeros(1, 2, 32), 1)


def test_cache_needs_setup_and_clears():
    model = small_model("transformer")
    ids = torch.randint(0, VOCAB, (1, 4))
    with pytest.raises(RuntimeError, match="setup_cache"):
        model(ids, input_pos=torch.arange(4))
    cache = model.setup_cache(1, 8)
    assert model.kv_cache is cache
    assert len(model.attention_layers()) == len(cache.k) == len(cache.v) == 2 + 3  # trunk layers + one per head
    model(ids, input_pos=torch.arange(4))
    model.clear_cache()
    with pytest.raises(RuntimeError, match="setup_cache"):
        model(ids, input_pos=torch.arange(4))


def test_cache_is_reused_for_the_same_shape():
    """Compiled decode steps bind to the cache tensors: a second generation of the
    same shape must get the same ones, a different shape fresh ones."""
    model = small_model("transformer")
    first = model.setup_cache(1, 8)
    buffers, mask = [*first.k, *first.v], first.causal
    model.clear_cache()
    again = model.setup_cache(1, 8)
    assert all(a is b for a, b in zip(buffers, [*again.k, *again.v], strict=True)) and again.causal is mask
    bigger = model.setup_cache(1, 16)
    assert bigger.k[0].shape[2] == 16 and bigger.causal.shape == (16, 16)


# -- decoding precision ------------------------------------------------------------


def test_decoding_dtype_is_bfloat16_on_cuda_only():
    assert decoding_dtype(torch.device("cuda")) == torch.bfloat16
    assert decoding_dtype(torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("head_kind", HEAD_KINDS)
def test_cast_for_decoding_decodes_in_bfloat16(head_kind):
    model = small_model(head_kind, n_future=4)
    weights = {name: p.clone() for name, p in model.named_parameters()}
    assert cast_for_decoding(model) is model  # float32 on the CPU: nothing to do
    cast = cast_for_decoding(model, torch.bfloat16)
    for name, p in model.named_parameters():  # the original keeps its float32 weights
        assert p.dtype == torch.float32 and torch.equal(p, weights[name])
    for name, p in cast.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, weights[name].to(torch.bfloat16))
    assert cast.rope_cos.dtype == torch.float32 and torch.equal(cast.rope_cos, model.rope_cos)
    assert torch.equal(cast.rope_sin, model.rope_sin)
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.inference_mode():
        cache = cast.setup_cache(2, 32)
        logits, features = cast.decode(ids, torch.arange(20), 4)
        drafts = cast.draft_logits(features[:, -1], 3)
        want = model(ids)
    assert all(t.dtype == torch.bfloat16 for t in cache.k + cache.v) and cast.draft_weight.dtype == torch.bfloat16
    assert logits.dtype == drafts.dtype == torch.bfloat16
    for got, ref in ((logits, want[:, :, 0]), (drafts, want[:, -1, 1:])):
        assert (got.float() - ref).norm() <= 2e-2 * ref.norm()  # bfloat16 keeps 8 bits of mantissa


@pytest.mark.parametrize("head_kind", HEAD_KINDS)
def test_draft_weight_stays_at_its_address_and_follows_the_weights(head_kind):
    """A captured decode step reads the stacked draft unembeddings at their address: every
    generation's ``setup_cache`` refreshes them in place (a new tensor would re-record the graph),
    in or out of inference mode, and they follow weights changed since (training, then sampling)."""
    model = small_model(head_kind, n_future=4)
    with torch.inference_mode():
        first = model.setup_cache(1, 16) and model.draft_weight
        address = first.data_ptr()
    model.clear_cache()
    with torch.no_grad():
        model.unembedding(2).add_(1.0)
    model.setup_cache(1, 16)
    assert model.draft_weight.data_ptr() == address
    want = torch.cat([model.unembedding(k)[:VOCAB] for k in (1, 2, 3)]) if head_kind == "linear" else None
    assert torch.equal(model.draft_weight, model.unembed.weight[:VOCAB] if want is None else want)
    if want is not None:  # the eager step's panels follow them too
        features = torch.randn(1, 1, model.cfg.d_model)
        with torch.no_grad():
            got = model.draft_logits(features, 3)
        torch.testing.assert_close(got, soft_cap(F.linear(features, want), model.cfg.logit_cap).view(1, 3, VOCAB))
    panels = model._draft_panels
    model.clear_cache()
    model.setup_cache(1, 16)
    assert model._draft_panels is panels  # weights unchanged since: nothing stacked or packed again


@pytest.mark.parametrize("shape, view", [((1, 8, 128), False), ((3, 5, 64), False), ((1, 24, 4, 32), True)])
def test_decoding_rms_norm_is_torchs_and_each_rows_own(shape, view):
    """Eager inference normalises in one Numba call (``bytemtp_native.norms``): within float32 rounding
    of torch's, on contiguous and strided inputs (attention's q and k are a view), each row's bits
    its own whatever else is in the call; with autograd it is torch's own."""
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(shape) * 3
    if view:
        x = x.transpose(1, 2)
    with torch.inference_mode():
        y = norm(x)
        torch.testing.assert_close(y, torch.rms_norm(x, (shape[-1],), norm.weight, 1e-5), rtol=1e-5, atol=1e-6)
        rows = x.reshape(-1, shape[-1])
        assert torch.equal(norm(rows[:1]), y.reshape(-1, shape[-1])[:1])
    x.requires_grad_(True)
    norm(x).sum().backward()  # the torch path: gradients reach the input and the weight
    assert x.grad is not None and norm.weight.grad is not None
    with torch.inference_mode():  # a model built for inference only: its weight keeps no version
        frozen = RMSNorm(shape[-1], eps=1e-5)
        torch.testing.assert_close(frozen(x.detach()), torch.rms_norm(x.detach(), (shape[-1],), frozen.weight, 1e-5))
