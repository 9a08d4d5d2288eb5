"""The KV cache of batched decoding: rows at their own slots, positions and masks decode as if alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bytemtp import VOCAB
from bytemtp.model import panels
from bytemtp.model.cache import KVCache
from bytemtp.model.config import HEAD_KINDS, ModelConfig
from bytemtp.model.transformer import ByteMTP

ROWS, FED, SLOTS, PROMPT = 3, 4, 48, 8  # batch rows, ids fed per step, cache slots, longest prompt
Outputs = list[list[tuple[torch.Tensor, torch.Tensor]]]  # [step][row] -> (head-1 logits, draft features)


def model_of(head_kind: str, d_model: int = 32) -> ByteMTP:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=d_model, n_layers=2, n_attn_heads=4, n_future=4, head_kind=head_kind, max_seq_len=64)
    return ByteMTP(cfg).eval()


def random_tree_step(rng: np.random.Generator, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A draft tree of ``FED`` nodes fed at slots ``start..``: node 0 is the pending byte, every
    other node's parent an earlier node. Returns its RoPE positions [FED], its attention mask
    [FED, SLOTS] (the context and its ancestors) and one root-to-leaf path of node numbers."""
    parent = [-1] + [int(rng.integers(0, j)) for j in range(1, FED)]
    depth, mask = np.zeros(FED, dtype=np.int64), np.zeros((FED, SLOTS), dtype=bool)
    mask[:, :start] = True
    for j in range(FED):
        depth[j] = 0 if j == 0 else depth[parent[j]] + 1
        mask[j, start + j] = True
        if j:
            mask[j] |= mask[parent[j]]
    path = [int(rng.integers(0, FED))]
    while parent[path[-1]] > 0:
        path.append(parent[path[-1]])
    return start + depth, mask, np.array(path[::-1])


def decode_ragged(model: ByteMTP, tree: bool, seed: int = 0) -> tuple[Outputs, Outputs]:
    """Decode ``ROWS`` rows together, then each row alone, through the same steps: prompts of
    different lengths fed in one padded forward, then steps of ``FED`` ids at each row's own
    slots, each row accepting its own number of them (and, with ``tree``, feeding its own draft
    tree and moving its accepted path into place). Returns the outputs of every step, batched
    (row b sliced out) and alone."""
    rng = np.random.default_rng(seed)
    ids = torch.randint(0, VOCAB, (ROWS, SLOTS), generator=torch.Generator().manual_seed(seed))
    prompt = rng.integers(1, PROMPT + 1, ROWS)
    steps = []  # per step: (ids [B, P], slots [B, P], rope [B, P] | None, mask [B, P, S] | None, moves [B, k] pairs)
    # Every prompt padded to PROMPT ids: a row's slots past its prompt hold junk until its steps rewrite them.
    steps.append((ids[:, :PROMPT], torch.arange(PROMPT).expand(ROWS, PROMPT), None, None, None))
    start = prompt.copy()
    for _ in range(6):
        slots = torch.from_numpy(start[:, None] + np.arange(FED))
        fed = torch.gather(ids, 1, slots)
        if tree:
            rope, mask, paths = zip(*(random_tree_step(rng, int(s)) for s in start))
            rope, mask = torch.from_numpy(np.stack(rope)), torch.from_numpy(np.stack(mask))
            k = min(len(p) for p in paths)  # a fixed-shape move: every row moves as many entries
            src = torch.from_numpy(np.stack([start[b] + paths[b][:k] for b in range(ROWS)]))
            dst = torch.from_numpy(start[:, None] + np.arange(k))
            steps.append((fed, slots, rope, mask, (src, dst)))
            start = start + k
        else:
            steps.append((fed, slots, None, None, None))
            start = start + rng.integers(1, FED + 1, ROWS)
    batched, alone = [], [[] for _ in range(ROWS)]
    with torch.inference_mode():
        model.setup_cache(ROWS, SLOTS)
        for fed, slots, rope, mask, moves in steps:
            logits, feats = model.decode(fed, slots, 4, rope, mask)
            batched.append([(logits[b], feats[b]) for b in range(ROWS)])
            if moves is not None:
                model.move_cache(*moves)
        model.clear_cache()
        for b in range(ROWS):
            model.setup_cache(1, SLOTS)
            for fed, slots, rope, mask, moves in steps:
                row = [None if t is None else t[b] for t in (rope, mask)]
                logits, feats = model.decode(fed[b : b + 1], slots[b], 4, *row)
                alone[b].append((logits[0], feats[0]))
                if moves is not None:
                    model.move_cache(moves[0][b], moves[1][b])
            model.clear_cache()
    return batched, [list(step) for step in zip(*alone)]


@pytest.mark.parametrize("head_kind", HEAD_KINDS)
@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_batched_rows_decode_as_if_alone(head_kind, tree):
    """On BLAS (the panel kernel off), a row's results within rounding of its own alone."""
    with panels.panels_enabled(False):
        batched, alone = decode_ragged(model_of(head_kind), tree)
    for step_batched, step_alone in zip(batched, alone, strict=True):
        for (logits, feats), (logits_1, feats_1) in zip(step_batched, step_alone, strict=True):
            torch.testing.assert_close(logits, logits_1, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(feats, feats_1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_kind", HEAD_KINDS)
def test_batched_rows_are_bit_identical_on_the_panel_kernel(head_kind):
    """Where every product gives each row the result it gets alone (the CPU panel kernel, which
    eager decoding's products run on), a row's logits and features do not depend on the batch at all."""
    batched, alone = decode_ragged(model_of(head_kind), tree=True)
    for step_batched, step_alone in zip(batched, alone, strict=True):
        for (logits, feats), (logits_1, feats_1) in zip(step_batched, step_alone, strict=True):
            assert torch.equal(logits, logits_1) and torch.equal(feats, feats_1)


def test_every_layer_has_its_own_buffers_written_in_place():
    """No buffer is a view of another tensor (a captured graph may refuse mutated views), and a
    decoding forward writes them in place: same tensors, same memory, new contents."""
    model = model_of("transformer")
    cache = model.setup_cache(ROWS, SLOTS)
    buffers = [*cache.k, *cache.v]
    assert len(buffers) == 2 * len(model.attention_layers())
    assert all(t._base is None for t in buffers)
    assert len({t.untyped_storage().data_ptr() for t in buffers}) == len(buffers)
    addresses = [t.data_ptr() for t in buffers]
    slots = torch.tensor([[0, 1], [5, 6], [9, 10]])
    with torch.inference_mode():
        model.decode(torch.randint(0, VOCAB, (ROWS, 2)), slots, 4)
    assert [t.data_ptr() for t in cache.k + cache.v] == addresses
    for t in buffers:  # exactly the fed slots of each row were written
        written = t.abs().sum(dim=(1, 3)) > 0  # [B, S]
        assert written.nonzero().tolist() == [[b, s] for b, row in enumerate(slots.tolist()) for s in row]


@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "every-row"])
def test_compiled_writes_are_the_eager_writes(per_row):
    """A compiled step writes with an indexed assignment, an eager one with ``scatter_``: same slots,
    same values, the same buffers (traced by dynamo, run by its eager backend)."""
    torch.manual_seed(0)
    eager, traced = (KVCache(2, ROWS, 4, SLOTS, 8, torch.float32, torch.device("cpu")) for _ in range(2))
    for a, b in zip(eager.k + eager.v, traced.k + traced.v):
        b.copy_(a.normal_())
    slots = torch.tensor([[3, 4, 5], [0, 7, 9], [20, 21, 40]]) if per_row else torch.tensor([1, 2, 30])
    k, v = torch.randn(2, ROWS, 4, 3, 8).unbind(0)
    buffers = [t.data_ptr() for t in traced.k + traced.v]
    eager.write(1, eager.slot_index(slots), k, v, SLOTS)
    torch.compile(lambda s, k, v: traced.write(1, traced.slot_index(s), k, v, SLOTS), backend="eager", fullgraph=True)(
        slots, k, v
    )
    assert [t.data_ptr() for t in traced.k + traced.v] == buffers
    for a, b in zip(eager.k + eager.v, traced.k + traced.v):
        assert torch.equal(a, b)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "every-row"])
def test_move_copies_each_rows_slots(per_row, traced):
    """Eager and traced by dynamo (as in a compiled tree step), where the move is an indexed
    assignment, never ``scatter_`` (which inductor makes a copy of the whole buffer and back)."""
    cache = KVCache(2, ROWS, 2, 16, 4, torch.float32, torch.device("cpu"))
    for t in cache.k + cache.v:
        t.copy_(torch.randn_like(t))
    before = [t.clone() for t in cache.k + cache.v]
    if per_row:  # overlapping, as a tree path moving down: row b's nodes to the slots after its context
        src, dst = torch.tensor([[4, 6], [9, 10], [3, 7]]), torch.tensor([[3, 4], [9, 10], [2, 3]])
    else:
        src, dst = torch.tensor([5, 8, 9]), torch.tensor([4, 5, 6])
    if traced:
        ops = []

        def backend(gm, inputs):
            ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_method" or n.op == "call_function")
            return gm.forward

        torch.compile(cache.move, backend=backend, fullgraph=True)(src, dst)
        assert ops and not [op for op in ops if "scatter" in op]
    else:
        cache.move(src, dst)
    for old, new in zip(before, cache.k + cache.v, strict=True):
        want = old.clone()
        for b in range(ROWS):
            s, d = (src[b], dst[b]) if per_row else (src, dst)
            want[b][:, d] = old[b][:, s]
        assert torch.equal(new, want)


@pytest.mark.parametrize("head_kind", HEAD_KINDS)
@pytest.mark.parametrize("rows", [[0, 1], [2, 0], [1]], ids=["prefix", "listed", "one"])
def test_a_forward_of_some_rows_computes_those_as_a_full_one_does(head_kind, rows):
    """``decode(rows=...)``: the named rows' outputs and cache writes are what a forward of every
    row gives them (up to float32 reassociation: the products are fewer rows tall), the other
    rows' outputs are zeros and their cache is untouched, bit for bit."""
    model = model_of(head_kind)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (ROWS, 2))
    slots = torch.tensor([[5, 6], [9, 10], [0, 1]])
    with torch.inference_mode():
        cache = model.setup_cache(ROWS, SLOTS)
        for t in cache.k + cache.v:
            t.normal_()
        before = [t.clone() for t in cache.k + cache.v]
        full = model.decode(ids, slots, 4)
        after_full = [t.clone() for t in cache.k + cache.v]
        for t, old in zip(cache.k + cache.v, before):
            t.copy_(old)
        some = model.decode(ids, slots, 4, rows=rows)
    others = [r for r in range(ROWS) if r not in rows]
    for a, b in zip(full, some, strict=True):
        torch.testing.assert_close(b[rows], a[rows], rtol=1e-4, atol=1e-4)
        assert not b[others].any()
    for new, old, want in zip(cache.k + cache.v, before, after_full, strict=True):
        assert torch.equal(new[others], old[others])
        torch.testing.assert_close(new[rows], want[rows], rtol=1e-4, atol=1e-4)
