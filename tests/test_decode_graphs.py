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

import numpy as np
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
        if enabled is False:  # eager, as compile_decode_step leaves it
            return None

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
    own = [n for n in loose if not n.startswith(("l_args_", "l_kwargs_"))]  # not the step's own arguments
    assert loose and not own, own


@pytest.mark.parametrize("strategy", [
    {"draft_costs": (1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5)},  # an adaptive chain: the counts it verifies vary
    {"tree_nodes": 7},
    {"temperature": 0.8, "seed": 1, "tree_nodes": 7},
], ids=["adaptive chain", "greedy tree", "sampled tree"])
def test_one_graph_through_the_window_end_and_the_adaptive_policy(strategy, monkeypatch):
    """Every compiled step of a generation has one width, so dynamo traces the step once: an
    adaptive chain masks the drafts it does not verify, and the steps near the window's end that
    fit fewer drafts than the step holds run eager. The rows cut their windows (the prompt and
    budget outgrow the model's 128 positions)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(generate_module, "compile_decode_step",
                        lambda step, device, enabled=None: torch.compile(step, backend=backend, dynamic=False))
    torch.compiler.reset()
    model = trained_model()
    prompts = [bytes(range(97, 123)) * 3, b"import os\n" * 8]
    gen = Decoder(model, GenerationConfig(max_new_bytes=120, stop_at_bos=False, **strategy), compile=True).generate(
        prompts
    )
    gen.read_all()
    assert all(row.stats.window_cuts for row in gen.rows)
    assert len(graphs) == 1


def test_adaptive_costs_are_the_decoding_copys_and_flat_when_compiled(monkeypatch, recorder):
    """``--adaptive`` times the steps of the model as the decoders run it (bfloat16 on CUDA, made
    to happen here on the CPU), not the float32 model they were cast from; compiled, a step costs
    the same whatever it verifies, so the curve is flat and nothing is timed or compiled for it."""
    import bytemtp.decode.step_costs as step_costs
    import bytemtp.model.decode_dtype as decode_dtype
    from bytemtp.decode.bench import BenchConfig, run_bench

    timed = []
    def measure(decoder, cache_len, rows):
        timed.append(next(decoder.model.parameters()).dtype)
        return ((1.0, 1.5) + (2.0,) * (decoder.n_drafts - 1),)

    monkeypatch.setattr(step_costs, "measure_step_costs", measure)
    monkeypatch.setattr(decode_dtype, "decoding_dtype", lambda device: torch.bfloat16)  # as on CUDA
    config = BenchConfig(prompts=1, max_bytes=4, adaptive=True, warmup=0)
    assert run_bench(trained_model(), [b"def "], config).draft_costs == ((1.0, 1.5) + (2.0,) * 6,)
    assert timed == [torch.bfloat16]
    assert run_bench(trained_model(), [b"def "], config, compile=True).draft_costs == ((1.0,) * 8,)
    assert timed == [torch.bfloat16]


def test_packed_inputs_come_back_as_they_went():
    """``upload``'s CUDA path: every array packed into one byte buffer at aligned offsets and read
    back as views of its dtype and shape (on the CPU here; on CUDA the buffer is pinned and sent whole)."""
    from bytemtp.decode.transfer import ALIGN, pack, unpack

    arrays = {"ids": np.arange(6).reshape(2, 3), "mask": np.array([[True, False, True]]),
              "u": np.linspace(0, 1, 10, dtype=np.float32).reshape(2, 5), "none": np.zeros((2, 0), np.int64),
              "moves": np.arange(12).reshape(2, 2, 3)}
    buffer, layout = pack(arrays)
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    assert all(offset % ALIGN == 0 for offset, _, _ in layout.values())
    for name, got in unpack(buffer, layout).items():
        assert got.dtype == torch.from_numpy(arrays[name]).dtype and np.array_equal(got.numpy(), arrays[name]), name
        assert got.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()  # views of the one buffer


def counted_call(calls: dict[str, int], name: str, real, *args):
    calls[name] += 1
    return real(*args)


@pytest.mark.parametrize("strategy", [*STRATEGIES, "adaptive chain"])
def test_a_step_sends_its_inputs_in_one_copy_and_reads_back_one(strategy, recorder, monkeypatch):
    """Between two steps, one upload of all the next step's inputs and one read-back of the step's
    result (``bytemtp.decode.transfer``: on CUDA one pinned, non-blocking copy each way)."""
    import bytemtp.decode.chain as chain
    import bytemtp.decode.sampled_tree as sampled_tree
    import bytemtp.decode.tree as tree

    calls = {"upload": 0, "download": 0}
    for module in (chain, tree, sampled_tree):
        for name in calls:
            real = getattr(module, name)
            monkeypatch.setattr(module, name, functools.partial(counted_call, calls, name, real))
    per_step = []
    step = recorder.compile

    def compile(fn, device, enabled=None):
        run = step(fn, device, enabled)

        def counted(*args, **kwargs):
            per_step.append(dict(calls))
            return run(*args, **kwargs)

        return counted

    monkeypatch.setattr(generate_module, "compile_decode_step", compile)
    adaptive = {"draft_costs": (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.4)}
    config = GenerationConfig(max_new_bytes=40, **(adaptive if strategy == "adaptive chain" else STRATEGIES[strategy]))
    Decoder(trained_model(), config, compile=True).generate(PROMPTS).read_all()
    between = [(b["upload"] - a["upload"], b["download"] - a["download"]) for a, b in zip(per_step, per_step[1:])]
    assert len(between) > 3 and set(between) == {(1, 1)}
