"""``PanelLinear``: ``nn.Linear`` whose decoding-sized CPU products keep the weight in a layout made for them.

A CPU decoding step multiplies 1..8 rows per sequence by every weight of the model, and a
speculative step's speedup is divided by what its 8 rows cost over one. ``F.linear`` hands
BLAS the weight transposed, which its general kernel repacks on every call, and from two
rows on even a transposed copy goes through that general kernel. So few-row products on
CPU float32 inference (up to ``MAX_ROWS`` rows) run on the panel kernel
(``bytemtp_native.panels``), which reads the weights once whatever the number of rows and
gives every row the same result it would get alone, so a speculative step's 8 positions
compute bit for bit what 8 autoregressive steps would. Within a step the weights come from
the last-level cache (the step has touched everything since), where the kernel's one pass
over them counts: on a 2-core EPYC, one thread, caches flushed between calls, 8 rows of a
128-wide model's products take 7-15 µs on the panels against 10-24 µs on BLAS with a transposed
copy, and the stacked draft heads' one row (128 x 1799, ``ByteMTP.draft_logits``) 23 µs against
41 µs with ``F.linear``;
one row of a small weight costs the same either way, once the kernel runs on the calling
thread (``serial``: a parallel launch costs a few µs even on one thread).

Compiled decoding steps cannot call the kernel (a Numba call is a graph break): they
multiply small weights (under ``COPY_MAX_WEIGHT``) by a transposed copy, [in, out], while a
decoding session has armed the layer (``arm``), and bigger ones with ``F.linear``. Everything else
(training, evaluation, long prompts, GPUs, other dtypes) stays on ``F.linear``. The state
dict is ``nn.Linear``'s, so checkpoints do not care.

The decoding layouts of the weight are made on the first call that needs them and again
whenever the weight changed since (an optimizer step or ``load_state_dict`` bumps the
tensor's version), so a model can alternate training and sampling. They cost one or two
more copies of the weights in memory for a model that decodes on a CPU. FSDP2 breaks that
contract (``drop_layouts``), so its modules compute as torch does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numba
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bytemtp_native.panels import PANEL, pack_panels, panel_matmul

# Up to here the panels beat BLAS on a 2-core CPU (about 1.7x at 32 rows, 1.2-1.7x at 64: a
# step of 8 rows verifying 7 drafts each); beyond it, BLAS's general kernel is at home:
# prompts, big batches, training.
MAX_ROWS = 64
# Compiled steps multiply weights smaller than this by a transposed copy (inductor's own
# product of a big weight needs none).
COPY_MAX_WEIGHT = 512 * 512

_enabled = True
# per thread (Numba's count is a thread's own): torch's thread count Numba's was last set from
_numba_threads = threading.local()


@contextmanager
def panels_enabled(enabled: bool) -> Iterator[None]:
    """Within the block, eligible products use the decoding layouts (True) or ``F.linear`` (False)."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


def _has_layout(weight: torch.Tensor) -> bool:
    """Whether ``weight`` gets a decoding layout: layouts are on, and it is a CPU float32 tensor
    with a version counter (an inference tensor has none to notice a change by)."""
    return _enabled and weight.is_cpu and weight.dtype == torch.float32 and not weight.is_inference()


def decoding_weight(weight: torch.Tensor) -> bool:
    """Whether an eager inference step may multiply or scale by ``weight``'s decoding layouts: it has
    them (``_has_layout``) and autograd wants no gradient of it."""
    return _has_layout(weight) and not (torch.is_grad_enabled() and weight.requires_grad)


class WeightLayout:
    """A layout of a weight, ``make(weight.detach())``, made again whenever the weight changed since
    (another tensor, or an optimizer step or ``load_state_dict`` bumped its version); otherwise the
    same object, so a compiled graph that reads it needs no new graph. Its ``value`` is None until
    first made."""

    def __init__(self, make: Callable[[torch.Tensor], Any]):
        self.make, self.value = make, None
        self._source: tuple[int, int] | None = None

    def of(self, weight: torch.Tensor) -> Any:
        source = (weight.data_ptr(), weight._version)
        if source != self._source:
            self.value, self._source = self.make(weight.detach()), source
        return self.value


def weights_source(weights: list[torch.Tensor], *extra: Any) -> tuple | None:
    """What a layout made from ``weights`` (and ``extra`` choices) depends on, as ``WeightLayout``
    compares it: their storage and versions; None for inference tensors, which have no version."""
    if any(w.is_inference() for w in weights):
        return None
    return (*((w.data_ptr(), w._version) for w in weights), *extra)


def host_copy(weight: torch.Tensor) -> np.ndarray:
    """A numpy copy of ``weight``: a view would pin the parameter's storage, which FSDP frees and
    regrows between steps."""
    return weight.clone().numpy()


def drop_layouts(module: nn.Module) -> None:
    """Turn off for good the decoding layouts of every layer in ``module``: they compute as torch does.

    For modules under FSDP2, whose evaluation would otherwise read an earlier step's weights: it
    all-gathers each step's weights into the same unsharded parameters with their version counters
    preserved, often into the same memory, so a layout keyed on (pointer, version) looks fresh."""
    for layer in module.modules():
        if any(isinstance(value, WeightLayout) for value in vars(layer).values()):
            layer.layouts = False


def _pack(weight: torch.Tensor) -> np.ndarray:
    return pack_panels(host_copy(weight))


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    return weight.t().contiguous()


def eager_inference(x: torch.Tensor) -> bool:
    """Whether ``x`` is a CPU float32 input of an eager inference step, which the decoding layouts
    and kernels take (while they are enabled; not an empty one, which numpy cannot reshape)."""
    return (
        not torch.compiler.is_compiling()  # first: a graph being traced reads nothing else here
        and _enabled
        and x.numel() > 0
        and x.is_cpu
        and x.dtype == torch.float32
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def few_rows(x: torch.Tensor, in_features: int) -> bool:
    """Whether ``x`` [..., in_features] is a few-row CPU float32 inference input the panel kernel takes."""
    return eager_inference(x) and x.numel() <= MAX_ROWS * in_features


def panel_product(x: torch.Tensor, panels: np.ndarray, n_out: int) -> torch.Tensor:
    """``x [..., K] @ W[:n_out].T`` for ``panels = pack_panels(W)``, on the panel kernel: only the
    panels that hold the first ``n_out`` columns are read."""
    threads = torch.get_num_threads()
    if threads != getattr(_numba_threads, "of", None):  # asking Numba costs ~8 µs: only on a change
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        _numba_threads.of = threads
    n_panels = -(-n_out // PANEL)
    width = n_panels * PANEL
    rows = np.ascontiguousarray(x.detach().numpy().reshape(-1, x.shape[-1]))  # numpy's views: cheaper than torch's
    out = np.empty((*x.shape[:-1], width), dtype=np.float32)
    panel_matmul(rows, panels if n_panels == len(panels) else panels[:n_panels], out.reshape(-1, width),
                 serial=threads == 1)
    if torch.get_num_threads() != threads:
        # Numba's OpenMP layer can share torch's libgomp, and starting it up resizes
        # that pool: give torch back the thread count it was asked for.
        torch.set_num_threads(threads)
    y = torch.from_numpy(out)
    return y if width == n_out else y[..., :n_out]


class PanelLinear(nn.Linear):
    """``nn.Linear`` (without bias) with decoding layouts of its weight for few-row CPU float32 inference."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, **kwargs):
        if bias:
            raise ValueError("bytemtp.model.panels.PanelLinear has no bias")
        super().__init__(in_features, out_features, bias=False, **kwargs)
        self._panels = WeightLayout(_pack)  # eager products
        self._copy = WeightLayout(_transposed)  # compiled steps: a small weight transposed
        self._copied = in_features * out_features < COPY_MAX_WEIGHT
        self._armed = False  # a decoding session holds a fresh transposed copy (``arm``)
        self.layouts = True  # False: always ``F.linear`` (``drop_layouts``)

    def arm(self, armed: bool) -> None:
        """Decoding starts (True) or ends (False). A compiled decoding step cannot check that
        the transposed copy of a small weight is fresh, so it uses the copy only while armed,
        and arming makes it fresh (``ByteMTP.setup_cache`` arms, ``clear_cache`` disarms)."""
        weight = self._parameters["weight"]
        self._armed = armed and self.layouts and self._copied and _has_layout(weight)
        if self._armed:
            self._copy.of(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Runs 17 times per forward of a small model, whose whole forward is under a
        # millisecond: the weight is looked up once and the cheap tests come first.
        weight = self._parameters["weight"]
        if torch.compiler.is_compiling():  # the copy is a graph input, fresh while armed
            if self._armed and x.is_cpu and x.dtype == torch.float32 and not torch.is_grad_enabled():
                return torch.matmul(x, self._copy.value)
            return F.linear(x, weight)
        if not (self.layouts and few_rows(x, self.in_features) and decoding_weight(weight)):
            return F.linear(x, weight)
        return panel_product(x, self._panels.of(weight), self.out_features)
