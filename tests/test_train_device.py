"""What training does differently on a GPU, checked on the CPU where it can be: precision
scoped to training, no host synchronisation per step, FLOPs for MFU, the FSDP2 precision
policy, the demo's step calibration, and the torch version the code needs."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from bytemtp.model.config import ModelConfig, preset
from bytemtp.model.transformer import ByteMTP
from bytemtp.train import loop
from bytemtp.train.config import TrainConfig
from bytemtp.train.flops import PEAK_BF16_FLOPS, flops_per_byte, peak_flops
from bytemtp.train.loop import CHECK_EVERY, train
from bytemtp.train.objective import multihead_loss, resolve_loss_mode
from bytemtp.train.parallel import MTPObjective, fsdp_mixed_precision, shard
from bytemtp.train.precision import training_precision
from train_support import MICRO, gloo_group, metrics, micro_train  # noqa: F401 (gloo_group: a fixture)

ROOT = Path(__file__).resolve().parent.parent
# The newest API each torch version the code relies on first offered: the floor in pyproject.toml must cover them.
NEEDS = {
    (2, 4): "torch.get_autocast_dtype, nn.RMSNorm",
    (2, 6): "torch.distributed.fsdp.fully_shard and MixedPrecisionPolicy (FSDP2 in its public place)",
    (2, 7): "torch._dynamo.config.recompile_limit (named cache_size_limit before)",
}


def test_torch_floor_covers_the_apis_used():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("torch"))
    floor = tuple(int(x) for x in re.search(r">=(\d+)\.(\d+)", spec).groups())
    assert floor >= max(NEEDS), f"{spec} admits versions without {NEEDS[max(NEEDS)]}"
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401

    assert isinstance(torch._dynamo.config.recompile_limit, int)
    assert callable(torch.get_autocast_dtype) and torch.nn.RMSNorm


def test_training_precision_is_restored_after_the_block():
    before = torch.get_float32_matmul_precision()
    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    with training_precision(cuda):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(KeyError), training_precision(cuda):
        raise KeyError
    assert torch.get_float32_matmul_precision() == before
    with training_precision(torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == before  # the CPU trains in plain fp32


@pytest.mark.gpu
def test_decoding_after_training_in_process_runs_in_default_precision(micro_data, tmp_path):
    before = torch.get_float32_matmul_precision()
    train(micro_train(steps=2, device="cuda", compile=False), MICRO, micro_data, tmp_path / "run", progress=False)
    assert torch.get_float32_matmul_precision() == before


def test_no_host_sync_between_checks(micro_data, tmp_path, monkeypatch):
    """The loop reads nothing back from the device except at steps it must (logged, saved,
    checked every CHECK_EVERY): counted on every call from bytemtp's code that copies a tensor
    value to the host."""
    steps = 2 * CHECK_EVERY + 5
    at_step = {"now": 0}
    syncs: list[int] = []
    real_step = loop._Run._step

    def step(self):
        real_step(self)
        at_step["now"] = self.step

    monkeypatch.setattr(loop._Run, "_step", step)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            if "/bytemtp/" in sys._getframe(1).f_code.co_filename:
                syncs.append(at_step["now"])
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    train(micro_train(steps=steps, log_every=1000), MICRO, micro_data, tmp_path / "run", progress=False)
    assert set(syncs) == {1, CHECK_EVERY, 2 * CHECK_EVERY, steps}  # log of step 1, two checks, the end
    # one agreement read per check, two reads per logged step, one of the saved weights' finiteness
    assert len(syncs) <= 4 + 2 * 2 + 1


def test_flops_per_byte_of_tiny_by_hand():
    d, layers, ffn, vocab_padded, heads, T = 128, 4, 384, 320, 8, 256
    block = 4 * d * d + 3 * d * ffn  # q, k, v, o; SwiGLU in (2 ffn) and out (ffn)
    matmul = layers * block + heads * d * vocab_padded
    assert flops_per_byte(preset("tiny", ffn="swiglu"), T) == 6 * matmul + 12 * layers * d * T == 8_650_752


@pytest.mark.parametrize("head_kind", ["linear", "transformer"])
def test_flops_count_every_matrix_the_model_multiplies_by(head_kind):
    """6 FLOPs per weight matrix entry (each head's unembedding counted once per head), nothing else."""
    cfg = ModelConfig(d_model=64, n_layers=2, n_attn_heads=4, n_future=3, head_kind=head_kind, ffn="gelu")
    model = ByteMTP(cfg)
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and not name.startswith("embed"))
    if head_kind == "transformer":  # one shared unembedding, run by each of the 3 heads
        matrices += 2 * cfg.d_model * cfg.vocab_padded
    attention_layers = 2 + (3 if head_kind == "transformer" else 0)
    assert flops_per_byte(cfg, 100) == 6 * matrices + 12 * attention_layers * 64 * 100


def test_peak_flops():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), override_tflops=100) == 100e12
    assert PEAK_BF16_FLOPS["H100"] == PEAK_BF16_FLOPS["H200"] == 989e12


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100-PCIE-40GB", 312), ("NVIDIA L4", None),
])
def test_peak_flops_tells_the_h100_cards_apart(name, tflops, monkeypatch):
    """The PCIe and NVL cards run at lower clocks than the SXM modules: their MFU is against their own peak."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert peak_flops(torch.device("cuda")) == (tflops and tflops * 1e12)


@pytest.mark.gpu
def test_mfu_is_logged_on_cuda(micro_data, tmp_path):
    run = tmp_path / "run"
    train(micro_train(steps=2, device="cuda", compile=False, peak_tflops=100.0), MICRO, micro_data, run,
          progress=False)
    for record in metrics(run):
        assert 0 < record["mfu"] < 1 and record["bytes_per_s_per_gpu"] == record["bytes_per_s"]


def test_fsdp_precision_policy():
    assert fsdp_mixed_precision(torch.device("cpu")) is None
    policy = fsdp_mixed_precision(torch.device("cuda"))
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32


def test_fsdp_policy_keeps_the_rope_tables_float32(gloo_group, monkeypatch):
    """Under the CUDA policy (applied here on the CPU) the blocks compute with bf16 weights, but
    the RoPE tables they rotate by stay float32 (FSDP2 would cast them with the blocks' inputs)."""
    import bytemtp.model.layers as layers

    seen = []
    rope = layers.apply_rope
    monkeypatch.setattr(layers, "apply_rope", lambda x, cos, sin: seen.append((x.dtype, cos.dtype)) or rope(x, cos, sin))
    cfg = ModelConfig(d_model=64, n_layers=2, n_attn_heads=4, n_future=2, max_seq_len=32)
    objective = shard(MTPObjective(ByteMTP(cfg), "stacked"), fsdp_mixed_precision(torch.device("cuda")))
    objective(torch.randint(0, 257, (2, 32 + 2)))
    assert seen == [(torch.bfloat16, torch.float32)] * cfg.n_layers


@pytest.mark.parametrize("mode", ["sequential", "stacked"])
def test_fsdp_computes_in_bf16_and_keeps_fp32_gradients(gloo_group, mode):
    """Under the CUDA policy (applied here on the CPU), FSDP2 runs the step on bf16 copies
    of the weights and hands fp32 gradients to the fp32 master weights."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_layers=2, n_attn_heads=4, n_future=3, max_seq_len=32)
    reference = ByteMTP(cfg)
    ids = torch.randint(0, 257, (2, 32 + 3))
    want_loss = multihead_loss(reference, ids, mode).loss
    want_loss.backward()

    model = ByteMTP(cfg)
    model.load_state_dict(reference.state_dict())
    objective = shard(MTPObjective(model, mode), fsdp_mixed_precision(torch.device("cuda")))
    loss, _ = objective(ids)
    loss.backward()
    assert loss.item() != want_loss.item()  # computed in bf16 ...
    torch.testing.assert_close(loss.float(), want_loss, rtol=2e-2, atol=0)  # ... to bf16 accuracy
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        grad = p.grad.full_tensor()
        assert p.dtype == grad.dtype == torch.float32, name
        assert (grad - q.grad).norm() <= 5e-2 * q.grad.norm() + 1e-6, name


def test_demo_calibrates_with_the_training_step():
    from bytemtp.demo import measure_step

    cfg = ModelConfig(d_model=32, n_layers=1, n_attn_heads=2, n_future=2, max_seq_len=32)
    cost = measure_step(cfg, TrainConfig(batch_size=2, device="cpu").resolved(cfg), torch.device("cpu"))
    assert cost.per_step > 0 and cost.warmup == 0.0  # eager on the CPU: nothing compiled


def test_auto_head_schedule_per_device():
    assert resolve_loss_mode("auto", torch.device("cpu")) == "sequential"  # measured faster on the CPU
    assert resolve_loss_mode("auto", torch.device("cuda")) == "stacked"
    assert resolve_loss_mode("naive", torch.device("cuda")) == "naive"
    assert TrainConfig().loss_mode == "auto"
