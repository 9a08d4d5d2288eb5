"""SIGINT and SIGTERM as requests to stop a training run cleanly, after a checkpoint."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

FINISHING_STEP = "finishing the current step, then saving a checkpoint"


class StopSignals:
    """SIGINT / SIGTERM ask the loop to stop after the current step and save.

    The first signal is answered at once on stderr with what the run is doing
    (``status``, which the loop keeps current: a final evaluation can take a while
    and a silent wait looks like a hang); a second SIGINT interrupts at once (for a
    save or an evaluation that hangs). Handlers can only be installed from the main
    thread; elsewhere signals keep their defaults.
    """

    def __init__(self, announce: bool = True) -> None:
        self.received: int | None = None
        self.status = FINISHING_STEP
        self._announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        if self._announce:
            print(f"{signal.Signals(signum).name}: {self.status}; Ctrl-C again to abort", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def stop_reason(signum: int, finished: bool, over_budget: bool) -> str | None:
    """Why the run stops after this step (a signal first), or None to go on."""
    if signum:
        return signal.Signals(signum).name
    if finished:
        return "done"
    if over_budget:
        return "time budget"
    return None
