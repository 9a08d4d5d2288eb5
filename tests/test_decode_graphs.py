"""What a compiled decode step needs from the strategies driving it, checked on the CPU.

Under CUDA graphs (``reduce-overhead``) a replay overwrites the previous replay's outputs, copies
every input that is not static into its own buffers, and records a new graph for every new
shape or static address. So: nothing a step returns may be fed to the next step; the large
tensors a step reads (weights, KV cache, coupling tables) must be static inputs, placed once;
and a generation must not change the step's width. Here the step is recorded uncompiled (an
identity "compiler") or traced by dynamo with a backend that only reads the graph.
"""

from __future__ import annotations

import functools

import pytest
import torch

import bytemtp.decode.generate as generate_module
from bytemtp.decode.generate import Decoder, GenerationConfig
from fixtures_train import trained_model

PROMPTS = [b"def f(x):\n    return", b"import os\n"]
STRATEGIES = {
    "greedy chain": {},
    "sampled chain": {"temperature": 0.8, "seed": 1},
    "greedy tree": {"tree_nodes": 7},
    "sampled tree": {"temperature": 0.8, "seed": 1, "tree_nodes": 7},
}


def tensors(x) -> list[torch.Tensor]:
    """Every tensor in ``x`` (nested tuples, lists and dicts)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in tensors(item)]
    return []


class StepRecorder:
    """Stands in for ``compile_decode_step``: the step runs as it is, and every call's width and
    whether an input shares memory with an output of the call before are recorded."""

    def __init__(self):
        self.widths: list[int] = []
        self.fed_back = 0  # calls fed a tensor the previous call returned
        self._previous: list[torch.Tensor] = []  # held, so no new tensor can reuse their memory

    def compile(self, step, device, enabled=None):
        @functools.wraps(step)
        def run(*args, **kwargs):
            returned = {t.untyped_storage().data_ptr() for t in self._previous if t.numel()}
            self.fed_back += any(t.untyped_storage().data_ptr() in returned for t in tensors(args) + tensors(kwargs))
            self.widths.append((kwargs["ids"] if "ids" in kwargs else args[0]).shape[1])
            out = step(*args, **kwargs)
            self._previous = tensors(out)
            return out

        return run


@pytest.fixture
def recorder(monkeypatch) -> StepRecorder:
    rec = StepRecorder()
    monkeypatch.setattr(generate_module, "compile_decode_step", rec.compile)
    return rec


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_step_is_fed_what_the_step_before_returned(strategy, recorder):
    """Sampling keeps the new drafts' distributions for the step that judges them: copied out of
    the step's output, as a CUDA graph's next replay overwrites it. The rows stop at different
    steps, so steps with parked rows are covered too."""
    config = GenerationConfig(max_new_bytes=40, stop=(b"\n",), **STRATEGIES[strategy])
    decoder = Decoder(trained_model(), config, compile=True)
    decoder.generate(PROMPTS).read_all()
    assert len(recorder.widths) > 3 and recorder.fed_back == 0


def test_coupling_tables_are_placed_once_and_static():
    """The byte trigrams stay on the host (not a buffer ``.to()`` moves), and the coupling tables
    made from them are placed on the device once for every decoder of the model, marked static:
    a CUDA graph reads them where they lie instead of copying them at every replay."""
    model = trained_model()
    assert model.byte_trigrams is not None and all(b is not model.byte_trigrams for b in model.buffers())
    config = GenerationConfig(temperature=0.8)
    first, second = Decoder(model, config).context, Decoder(model, config, compile=True).context
    assert all(a is b for a, b in zip(first, second))
    assert all(torch._dynamo.utils.get_static_address_type(t) is not None for t in first)


def test_the_traced_step_reads_weights_cache_and_tables_as_static_inputs(monkeypatch):
    """Traced by dynamo (the graph only read, then run eager): the tensors a compiled sampled step
    reads that are not the step's own small inputs (weights, KV cache, stacked draft
    unembeddings, coupling tables) are all static inputs, and the step traces as one graph."""
    inputs: list[tuple[str, bool]] = []

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "placeholder" and isinstance(node.meta.get("example_value"), torch.Tensor):
                static = node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type") is not None
                inputs.append((node.name, static))
        return gm.forward

    monkeypatch.setattr(generate_module, "compile_decode_step",
                        lambda step, device, enabled=None: torch.compile(step, backend=backend, dynamic=False))
    torch.compiler.reset()
    decoder = Decoder(trained_model(), GenerationConfig(max_new_bytes=12, temperature=0.8, seed=0), compile=True)
    decoder.generate([PROMPTS[0]]).read()
    names = {name for name, _ in inputs}
    for part in ("kv_cache", "context", "draft_weight", "parameters"):
        assert any(part in name for name in names), part
    loose = [name for name, static in inputs if not static]
    assert loose and all(name.startswith("l_args_") for name in loose), loose  # the step's own arguments
