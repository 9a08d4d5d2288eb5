"""``torch.compile`` for training: every transformer block, and the per-head cross-entropy.

Blocks are compiled one by one and in place (``nn.Module.compile``), not the model as
a whole: the sequential head schedule runs the trunk and then each head separately,
with an ``autograd.grad`` between heads that no single graph could span; all blocks
share one structure, so a single compiled graph serves every block of the trunk and
of the heads and compile time does not grow with depth; and in-place compilation
keeps the eager model's state-dict keys, so checkpoints do not care whether a run
was compiled. The per-head cross-entropy of the sequential schedule is a chain of
memory-bound passes over [B*T, vocab] that compilation fuses into a couple of
kernels; ``ByteMTP.compiled`` tells the objective to use the compiled version.
"""

from __future__ import annotations

from bytemtp.model.transformer import Block, ByteMTP


def compile_model(model: ByteMTP, enabled: bool | None = None) -> bool:
    """Compile ``model`` for training, in place; returns whether it did.

    ``enabled=None`` decides by device: compile on CUDA, stay eager on the CPU, where
    inductor's warm-up costs more than a short run gains. Call it after moving the
    model to its device.
    """
    if enabled is None:
        enabled = model.embed.weight.is_cuda
    if not enabled:
        return False
    for module in model.modules():
        if isinstance(module, Block):
            module.compile()
    model.compiled = True
    return True
