"""Muon's orthogonalisation dtype: the float32 iteration against torch's bf16 one, the update
against torch.optim.Muon's, the per-device choice, and which dtypes a CPU step computes in."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.optim._muon as torch_muon
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bytemtp.decode.config import GenerationConfig
from bytemtp.decode.generate import generate
from bytemtp.errors import BytemtpError
from bytemtp.model.config import PRESETS, ModelConfig
from bytemtp.model.layers import Block
from bytemtp.model.transformer import ByteMTP
from bytemtp.train import muon
from bytemtp.train.config import TrainConfig, merge_for_resume
from bytemtp.train.muon import Muon, newton_schulz, orthogonalisation_dtype
from bytemtp.train.optim import build_optimizer
from bytemtp.train.loop import train
from bytemtp.train.step_timing import training_step
from train_support import MICRO, metrics, micro_train

ABC = (torch_muon.DEFAULT_A, torch_muon.DEFAULT_B, torch_muon.DEFAULT_C)
STEPS, EPS = torch_muon.DEFAULT_NS_STEPS, torch_muon.EPS
CPU = torch.device("cpu")


def _block_shapes(preset: str) -> list[tuple[int, int]]:
    """The shapes of the matrices Muon trains in ``preset`` (its blocks' 2-D weights)."""
    with torch.device("meta"):
        model = ByteMTP(PRESETS[preset])
    return sorted({tuple(p.shape) for m in model.modules() if isinstance(m, Block) for p in m.parameters()
                   if p.dim() == 2})


def _relative(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x.double() - reference.double()).norm() / reference.double().norm()).item()


# The bf16 iteration rounds to bf16 16 times: the cast, then three products in each of 5 steps,
# each moving an entry by at most u = 2^-8 of itself. Counting every rounding at its full size
# and none cancelling, its result is within 16u of the exact iteration in relative Frobenius
# norm, as long as the iteration does not amplify what a rounding moved: it amplifies
# directions along tiny singular values (by up to a^5 ~ 490), of which a Gaussian matrix has
# few (on a low-rank gradient plus noise the bf16 result is ~14% off: float32's gain). float32
# rounds the same 16 times at 2^-24, 2^16 times less; the bound below leaves it 2^8 for sums
# over up to 4096 terms.
BF16_BOUND = 16 * 2.0**-8
FLOAT32_BOUND = BF16_BOUND * 2.0**-8
TINY = _block_shapes("tiny")
LARGER = sorted({s for p in ("small", "base") for s in _block_shapes(p)})


@pytest.mark.parametrize("shape", TINY + [pytest.param(s, marks=pytest.mark.slow) for s in LARGER])
def test_float32_iteration_matches_torchs_bf16_one_to_bf16_precision(shape):
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    theirs = torch_muon._zeropower_via_newtonschulz(grad, ABC, STEPS, EPS)
    exact = newton_schulz(grad.double(), torch.float64, ABC, STEPS, EPS)
    ours = newton_schulz(grad, torch.float32, ABC, STEPS, EPS)
    assert ours.dtype == torch.float32 and ours.shape == grad.shape
    assert _relative(ours, exact) <= FLOAT32_BOUND  # float32 is the (near) exact iteration
    assert _relative(theirs, exact) <= BF16_BOUND
    assert _relative(ours, theirs) <= BF16_BOUND + FLOAT32_BOUND
    assert torch.equal(newton_schulz(grad, torch.bfloat16, ABC, STEPS, EPS), theirs)  # same iteration, same dtype
    fewer = newton_schulz(grad, torch.float32, ABC, STEPS - 1, EPS)
    assert _relative(fewer, theirs) > 2 * BF16_BOUND  # the bound tells the iteration apart from a step less


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in TINY]


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_muon_updates_as_torchs_muon_with_the_iteration_in_dtype(monkeypatch, dtype, nesterov):
    """torch.optim.Muon as it is (bf16) or with its iteration swapped for the float32 one:
    three steps of ours, weight decay and lr scaling included, are bitwise its."""
    if dtype == torch.float32:
        monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz",
                            lambda g, abc, steps, eps: newton_schulz(g, torch.float32, abc, steps, eps))
    ours, theirs = _params(0), _params(0)
    kwargs = dict(lr=0.02, weight_decay=0.01, momentum=0.9, nesterov=nesterov)
    optimizers = [Muon(ours, ns_dtype=dtype, **kwargs), torch.optim.Muon(theirs, **kwargs)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        for params, optimizer in zip((ours, theirs), optimizers):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
    first = Muon(_params(0), ns_dtype=dtype, momentum=0.9, nesterov=nesterov)
    for p in first.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    first.step()  # the orthogonalisation must leave the momentum it reads as it was
    assert all(torch.equal(s["momentum_buffer"], torch.full_like(p, 0.1)) for p, s in first.state.items())


@pytest.fixture
def cpu_flags(monkeypatch):
    """Set the CPU flags torch reports and ONEDNN_MAX_CPU_ISA, as a new process would see them."""

    def set_flags(flags: dict[str, bool], isa: str | None = None) -> None:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, **flags})
        for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
            monkeypatch.delenv(var, raising=False)
        if isa is not None:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        muon._cpu_choice.cache_clear()

    yield set_flags
    muon._cpu_choice.cache_clear()


@pytest.mark.parametrize(
    "flags, isa, expected",
    [
        ({}, None, torch.float32),
        ({"avx512_bf16": False, "amx_bf16": False}, None, torch.float32),
        ({"avx512_bf16": True}, None, torch.bfloat16),
        ({"amx_bf16": True}, None, torch.bfloat16),
        ({"avx512_bf16": True}, "AVX2", torch.float32),
        ({"avx512_bf16": True, "amx_bf16": True}, "avx512_core", torch.float32),
        ({"avx512_bf16": True}, "AVX512_CORE_BF16", torch.bfloat16),
        ({"amx_bf16": True}, "ALL", torch.bfloat16),
    ],
)
def test_auto_follows_the_cpus_bf16_instructions(cpu_flags, flags, isa, expected):
    cpu_flags(flags, isa)
    dtype, why = orthogonalisation_dtype("auto", CPU)
    assert dtype == expected and why
    if isa is not None and expected == torch.float32:
        assert f"ONEDNN_MAX_CPU_ISA={isa}" in why
    assert orthogonalisation_dtype("auto", torch.device("cuda"))[0] == torch.bfloat16


def test_the_choice_is_made_once_per_process_and_the_config_overrides_it(cpu_flags, monkeypatch):
    cpu_flags({})
    assert orthogonalisation_dtype("auto", CPU)[0] == torch.float32
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert orthogonalisation_dtype("auto", CPU)[0] == torch.float32  # not asked again
    assert orthogonalisation_dtype("bfloat16", CPU) == (torch.bfloat16, "muon_dtype=bfloat16")
    assert orthogonalisation_dtype("float32", torch.device("cuda"))[0] == torch.float32
    model = ByteMTP(ModelConfig(d_model=32, n_layers=1, n_attn_heads=2, n_future=2, max_seq_len=16))
    for setting, dtype in (("auto", torch.float32), ("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        optimizer = build_optimizer(model, TrainConfig(optimizer="muon", muon_dtype=setting), CPU)
        assert optimizer.muon.ns_dtype == dtype and optimizer.muon.describe().startswith(
            f"Muon orthogonalises in {str(dtype)[6:]}: ")


def test_muon_dtype_is_validated_and_chosen_anew_on_resume():
    assert TrainConfig().muon_dtype == "auto"
    with pytest.raises(BytemtpError, match="muon_dtype: 'float16' is not one of auto, bfloat16, float32"):
        TrainConfig(muon_dtype="float16")
    saved = (PRESETS["tiny"], TrainConfig(optimizer="muon", muon_dtype="bfloat16", seq_len=256, decay_steps=200))
    _, resumed = merge_for_resume(saved, None, TrainConfig(optimizer="muon", muon_dtype="float32"), "ckpt")
    assert resumed.muon_dtype == "float32"


def test_training_says_and_logs_the_dtype(micro_data, tmp_path, capsys):
    train(micro_train(steps=3, optimizer="muon", muon_dtype="float32"), MICRO, micro_data, tmp_path / "run")
    assert "Muon orthogonalises in float32: muon_dtype=float32\n" in capsys.readouterr().out
    assert [r["muon_dtype"] for r in metrics(tmp_path / "run")] == ["float32"] * 3
    train(micro_train(steps=2), MICRO, micro_data, tmp_path / "adamw")
    assert "Muon" not in capsys.readouterr().out and "muon_dtype" not in metrics(tmp_path / "adamw")[0]


class _Dtypes(TorchDispatchMode):
    """The ops that produced a floating tensor of a dtype other than float32, by dtype."""

    def __init__(self):
        super().__init__()
        self.other: dict[torch.dtype, set[str]] = collections.defaultdict(set)
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32:
                self.other[t.dtype].add(func.__name__)
        return out


def test_a_cpu_training_and_decoding_step_compute_in_float32_except_muons_bf16_iteration():
    """No autocast, optimizer state or loss cast puts a CPU step in a dtype the CPU may emulate;
    only the orthogonalisation, where bf16 was chosen, runs in bf16."""
    cfg = ModelConfig(d_model=32, n_layers=1, n_attn_heads=2, n_future=3, max_seq_len=32, qk_norm=True, ffn="relu2")
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))
    for setting in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = ByteMTP(cfg)
        optimizer = build_optimizer(model, TrainConfig(optimizer="muon", muon_dtype=setting), CPU)
        step = training_step(model, ids, "sequential", optimizer)
        step()  # the optimizer's state exists before the step watched
        with _Dtypes() as seen:
            step()
        assert seen.ops > 100
        if setting == "float32":
            assert not seen.other
        else:
            assert set(seen.other) == {torch.bfloat16} and {"mm.default", "addmm.default"} <= seen.other[torch.bfloat16]
    model.eval()
    with _Dtypes() as seen:
        generate(model, GenerationConfig(prompt=b"def f(x):\n", max_new_bytes=16)).read()
    assert seen.ops > 100 and not seen.other
