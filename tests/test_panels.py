"""The panel kernel for few-row CPU products, and the ``PanelLinear`` layer that routes to it."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bytemtp.model.config import ModelConfig
from bytemtp.model.panels import COPY_MAX_WEIGHT, MAX_ROWS, PanelLinear, panels_enabled
from bytemtp.model.transformer import ByteMTP
from bytemtp.train.parallel import MTPObjective, shard
from bytemtp_native.panels import PANEL, pack_panels, panel_matmul
from train_support import gloo_group  # noqa: F401 (a fixture)


def matmul(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    panels = pack_panels(weight)
    out = np.full((x.shape[0], panels.shape[0] * PANEL), np.nan, dtype=np.float32)
    panel_matmul(x, panels, out)
    return out[:, : weight.shape[0]]


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, MAX_ROWS),
    n=st.integers(1, 3 * PANEL + 5),
    k=st.integers(1, 67),
    seed=st.integers(0, 2**31 - 1),
)
def test_panel_matmul_matches_a_float64_product(m, n, k, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(matmul(x, w), ref, rtol=1e-4, atol=1e-4 * np.sqrt(k))


@settings(max_examples=15, deadline=None)
@given(m=st.integers(2, MAX_ROWS), seed=st.integers(0, 2**31 - 1))
def test_a_row_gets_the_same_bits_alone_or_among_others(m, seed):
    """Why decoding uses it: verifying 8 positions computes what 8 single steps would."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, 203), dtype=np.float32)
    w = rng.standard_normal((130, 203), dtype=np.float32)
    together = matmul(x, w)
    for i in range(m):
        np.testing.assert_array_equal(together[i], matmul(x[i : i + 1].copy(), w)[0])


@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, MAX_ROWS), n=st.integers(1, 3 * PANEL + 5), seed=st.integers(0, 2**31 - 1))
def test_the_serial_kernel_gives_the_parallel_kernels_bits(m, n, seed):
    """One thread's decoding runs the serial kernel: its results are the same."""
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((m, 70), dtype=np.float32), rng.standard_normal((n, 70), dtype=np.float32)
    panels = pack_panels(w)
    serial = np.full((m, panels.shape[0] * PANEL), np.nan, dtype=np.float32)
    panel_matmul(x, panels, serial, serial=True)
    np.testing.assert_array_equal(serial, np.pad(matmul(x, w), ((0, 0), (0, serial.shape[1] - n))))


def test_the_kernel_takes_only_the_signature_it_was_vectorized_for():
    """Any other layout would be compiled on the spot without the SLP vectorizer, five times slower."""
    w = np.ones((PANEL, 8), dtype=np.float32)
    out = np.empty((2, PANEL), dtype=np.float32)
    with pytest.raises(TypeError):
        panel_matmul(np.ones((8, 2), dtype=np.float32).T, pack_panels(w), out)


def test_pack_panels_pads_columns_with_zeros():
    w = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)
    panels = pack_panels(w)
    assert panels.shape == (1, 5, PANEL)
    np.testing.assert_array_equal(panels[0, :, :3], w.T)
    assert not panels[0, :, 3:].any()


def test_linear_routes_few_row_inference_products_to_the_panels():
    """Eager few-row inference products run on the panel kernel whatever the weight's size;
    everything else on F.linear."""
    torch.manual_seed(0)
    n_out = COPY_MAX_WEIGHT // 96 + 1
    big, small = PanelLinear(96, n_out), PanelLinear(96, 64)
    few, many = torch.randn(1, 3, 96), torch.randn(2, MAX_ROWS, 96)
    with torch.inference_mode():
        for layer in (big, small):
            y = layer(few)
            torch.testing.assert_close(y, F.linear(few, layer.weight), rtol=1e-5, atol=1e-5)
            assert y.shape == (1, 3, layer.out_features)
            assert isinstance(layer._panels.value, np.ndarray)  # packed on the first eligible call
            assert torch.equal(layer(many), F.linear(many, layer.weight))
            with panels_enabled(False):
                assert torch.equal(layer(few), F.linear(few, layer.weight))
    # a compiled step's transposed copy: small weights only, made when a decoding session arms the layer
    for layer in (big, small):
        layer.arm(True)
    assert big._copy.value is None
    assert torch.equal(small._copy.value, small.weight.t()) and small._copy.value.is_contiguous()
    copy = small._copy.value
    small.arm(False)
    small.arm(True)
    assert small._copy.value is copy  # the same tensor while the weight is the same: compiled graphs keep it
    # With autograd the product stays on F.linear, so gradients flow to the weight.
    for layer in (big, small):
        layer(few).sum().backward()
        torch.testing.assert_close(layer.weight.grad, few.reshape(3, 96).sum(0).expand(layer.out_features, -1))


@pytest.mark.parametrize("n_in", [512, 64])
def test_linear_repacks_after_the_weight_changes(n_in):
    """A model can alternate training and sampling: an optimizer step must not leave stale panels."""
    torch.manual_seed(0)
    layer = PanelLinear(n_in, 512)
    x = torch.randn(1, n_in)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    with torch.inference_mode():
        before = layer(x)
    assert layer._panels.value is not None
    layer(torch.randn(4, n_in)).square().sum().backward()
    opt.step()
    with torch.inference_mode():
        after = layer(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, F.linear(x, layer.weight), rtol=1e-4, atol=1e-4)
    layer.load_state_dict({"weight": torch.zeros(512, n_in)})
    with torch.inference_mode():
        assert not layer(x).any()


def test_the_kernel_leaves_torchs_thread_count_alone():
    """Numba's OpenMP pool may be torch's own, and starting it (once per process, hence
    a fresh one here) resized torch's: decoding with 1 thread then ran with all cores."""
    script = (
        "import torch; torch.set_num_threads(1)\n"
        "from bytemtp.model.panels import PanelLinear\n"
        "layer = PanelLinear(512, 512)\n"
        "with torch.inference_mode(): layer(torch.randn(2, 512))\n"
        "assert layer._panels.value is not None\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1"]


def test_panel_linear_state_dict_is_nn_linears():
    layer = PanelLinear(8, 4)
    plain = torch.nn.Linear(8, 4, bias=False)
    plain.load_state_dict(layer.state_dict())
    assert list(layer.state_dict()) == ["weight"]


def test_compiled_graphs_read_the_copy_only_while_armed():
    """A compiled step cannot check the copy's freshness: it multiplies by the copy while a decoding
    session has armed the layer (arming refreshes it) and by the weight itself otherwise."""
    torch.manual_seed(0)
    layer = PanelLinear(64, 96)
    x = torch.randn(1, 8, 64)
    compiled = torch.compile(layer, backend="eager", dynamic=False)
    with torch.no_grad():
        layer.arm(True)
        torch.testing.assert_close(compiled(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
        before = F.linear(x, layer.weight)
        layer.weight.mul_(2)  # changed behind the armed copy's back: the graph still reads the copy
        torch.testing.assert_close(compiled(x), before, rtol=1e-5, atol=1e-5)
        layer.arm(True)  # a new session refreshes it
        torch.testing.assert_close(compiled(x), 2 * before, rtol=1e-5, atol=1e-5)
        layer.arm(False)
        layer.weight.mul_(2)
        torch.testing.assert_close(compiled(x), 4 * before, rtol=1e-5, atol=1e-5)  # disarmed: the weight
        big = PanelLinear(512, 512)
        big.arm(True)
        assert not big._armed  # big weights: F.linear in a graph


@pytest.mark.parametrize("head_kind, draft_mlp", [("linear", 0), ("linear", 16), ("transformer", 0)])
def test_the_models_cache_arms_the_layers_decoding_multiplies_by(head_kind, draft_mlp):
    """A decoding session arms the trunk's layers and head 1's, and transformer draft heads' (each
    runs at every position); linear draft heads' unembeddings and MLPs are read stacked, unarmed."""
    model = ByteMTP(ModelConfig(d_model=32, n_layers=1, n_attn_heads=4, n_future=3, max_seq_len=16,
                                head_kind=head_kind, draft_mlp=draft_mlp))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PanelLinear)}
    model.setup_cache(1, 16)
    armed = {name for name, layer in layers.items() if layer._armed}
    stacked = {name for name in layers if name.startswith(("heads.1", "heads.2", "draft_mlps"))}
    assert armed == set(layers) - (stacked if head_kind == "linear" else set())
    assert len(armed) > 2 and (stacked - armed if head_kind == "linear" else stacked <= armed)
    model.clear_cache()
    assert not any(layer._armed for layer in layers.values())


def test_sharded_evaluation_reads_each_steps_weights(gloo_group):
    """FSDP2 all-gathers each step's weights into the same unsharded parameters without bumping
    their versions; layouts keyed on (pointer, version) served step 0's weights at step 1. Its
    layers compute as torch does: bit for bit what the unsharded model computes without layouts."""
    torch.manual_seed(0)
    model = ByteMTP(ModelConfig(d_model=32, n_layers=2, n_attn_heads=2, n_future=2, max_seq_len=32))
    reference = MTPObjective(copy.deepcopy(model))
    sharded = shard(MTPObjective(model))
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        for step in range(3):
            with panels_enabled(False):
                want = reference(ids)[1]
            torch.testing.assert_close(sharded(ids)[1], want, rtol=0, atol=0, msg=f"step {step}")
            for p, q in zip(sharded.parameters(), reference.parameters(), strict=True):
                p.mul_(1.1)  # what an optimizer step does to the shards
                q.mul_(1.1)
