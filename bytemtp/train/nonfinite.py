"""Non-finite losses and gradients, noticed on the device without stopping the host.

Reading a flag back every step would make the host wait for the device every
step, so the CPU could never queue the next step while the GPU runs this one.
Instead the first bad step and its loss are recorded in device tensors, and the
loop reads them only when it synchronises anyway (every few steps and before
every checkpoint). Steps taken after a bad one are wasted, never saved: no
checkpoint is written without a look at the flag first.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bytemtp.errors import BytemtpError
from bytemtp.train.objective import LN2


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity.

    The watch sees losses and gradients, which are computed before a step's update: weights an
    update made non-finite (an infinite learning rate) show only in the next step's loss, so the
    weights themselves are looked at before they are saved or resumed from."""
    floats = {name: t for name, t in tensors.items() if t.is_floating_point()}
    if not floats:
        return []
    bad = torch.stack([~torch.isfinite(t).all() for t in floats.values()]).tolist()  # one host read for all
    return [name for name, b in zip(floats, bad) if b]


def refuse_nonfinite_weights(tensors: dict[str, torch.Tensor], what: str, advice: str) -> None:
    bad = nonfinite_tensors(tensors)
    if bad:
        raise BytemtpError(f"{what}: {len(bad)} of {len(tensors)} weight tensors hold NaN or infinity "
                           f"(first {bad[0]}); {advice}")


class NonFiniteWatch:
    """The first optimizer step whose loss or gradient norm was not finite, kept on the device."""

    def __init__(self, device: torch.device, step: int):
        self._step = torch.tensor(step, device=device)  # counts along on the device
        self._first_bad = torch.zeros((), dtype=torch.long, device=device)  # 0: none yet
        self._loss = torch.zeros((), device=device)

    def observe(self, head_losses: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Record step k+1's losses [n] (nats) and gradient norm; no host synchronisation."""
        self._step += 1
        bad = ~(torch.isfinite(head_losses).all() & torch.isfinite(grad_norm))
        first = bad & (self._first_bad == 0)
        self._first_bad = torch.where(first, self._step, self._first_bad)
        self._loss = torch.where(first, head_losses.float().mean() / LN2, self._loss)

    @property
    def flag(self) -> torch.Tensor:
        """1.0 once a bad step was seen, else 0.0 (a device scalar, for the ranks' agreement)."""
        return (self._first_bad > 0).float()

    def error(self, last_ckpt: Path | None) -> BytemtpError:
        kept = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        step, loss = int(self._first_bad), float(self._loss)
        if step == 0:  # another rank saw it
            return BytemtpError(f"loss or gradient became non-finite on another process: stopped; {kept}")
        return BytemtpError(f"loss or gradient became non-finite (loss {loss}) at step {step}: stopped; {kept}")
