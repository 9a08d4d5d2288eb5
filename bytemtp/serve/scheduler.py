"""The scheduler: one engine thread owns the model; requests wait in a bounded queue and join the
running batch in a free row at the next step.

Every prompt of a request is a ``Choice``, decoded in one engine row. The event loop
``submit``s choices (refused with 429 when the queue is full) and reads their events
(decided bytes, the end, an error) from an ``asyncio.Queue`` the engine thread feeds with
``call_soon_threadsafe``. Between two steps the engine thread retires the rows whose
clients have gone (``cancel``), admits waiting choices into free rows, then steps the
batch once: a new row's prompt is encoded in that step, the others wait one forward, as
when a row's window is re-encoded (``bytemtp.decode.engine``). A finished row frees its
slot at once. Log-probabilities, when asked, are head 1's, teacher-forced over the prompt
and the output in one forward of the model after the row finishes, in the same thread:
only this thread ever runs the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from bytemtp import BOS
from bytemtp.decode.batch import Row
from bytemtp.decode.engine import Engine
from bytemtp.errors import BytemtpError
from bytemtp.serve.metrics import Metrics
from bytemtp.serve.schemas import APIError, byte_token

log = logging.getLogger("bytemtp.serve")


@dataclass
class Choice:
    """One prompt of a request, decoded in one row. Its events go to ``events`` as ``(index, kind,
    payload)``: ``("bytes", (data, drafted))`` (``drafted``: how many of the step's decided bytes were
    accepted drafts), ``("done", logprobs or None)``, ``("error", APIError)``."""

    index: int
    prompt: bytes
    row: Row
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    logprobs: int | None = None
    echo: bool = False
    output: bytearray = field(default_factory=bytearray)
    cancelled: bool = False
    accepted: int = 0  # draft bytes accepted so far

    def send(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, payload))
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass


class Scheduler:
    """Feeds ``engine`` (its model's only user) from a queue of at most ``max_queue`` waiting choices."""

    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self.model = engine.model
        self.cond = threading.Condition()
        self.waiting: deque[Choice] = deque()
        self.running: dict[int, Choice] = {}  # by id() of the row
        self.accepting, self.closed = True, False
        self.thread = threading.Thread(target=self._loop, name="bytemtp-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, choices: list[Choice]) -> None:
        """Queue a request's choices, all or none."""
        with self.cond:
            if not self.accepting:
                raise APIError(503, "the server is shutting down")
            if len(self.waiting) + len(choices) > self.max_queue:
                raise APIError(429, f"the queue is full ({self.max_queue} waiting): retry shortly",
                               headers={"Retry-After": "1"})
            self.waiting.extend(choices)
            self.metrics.queue.set(len(self.waiting))
            self.cond.notify()

    def cancel(self, choices: list[Choice]) -> None:
        """The client has gone: its rows leave at the next step, its waiting choices never start."""
        with self.cond:
            for c in choices:
                c.cancelled = True
            self.cond.notify()

    def drain(self) -> None:
        """Take no more requests; the queued and running ones go on."""
        with self.cond:
            self.accepting = False

    @property
    def idle(self) -> bool:
        with self.cond:
            return not self.waiting and not self.running

    def stop(self, message: str = "the server is shutting down") -> None:
        """End the engine thread; every choice not finished gets ``message`` as a 503."""
        with self.cond:
            self.accepting, self.closed = False, True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join()
        self._fail_all(APIError(503, message))

    def _fail_all(self, error: APIError) -> None:
        with self.cond:
            left = [*self.waiting, *self.running.values()]
            self.waiting.clear()
            self.running.clear()
            self.metrics.queue.set(0)
            self.metrics.running.set(0)
        for c in left:
            c.send("error", error)

    def _loop(self) -> None:
        try:
            self.engine.start()
            while self._turn():
                pass
        except Exception:  # a server fault (never a client's input): every client hears of it
            log.exception("the decode engine failed")
            self._fail_all(APIError(500, "the decode engine failed; see the server's log"))
        finally:
            self.engine.close()

    def _turn(self) -> bool:
        """One round: retire, admit, step. False once the scheduler is stopped."""
        with self.cond:
            while not self.closed and not self.waiting and not self.running:
                self.cond.wait()
            if self.closed:
                return False
            gone = [c for c in self.running.values() if c.cancelled]
            self.waiting = deque(c for c in self.waiting if not c.cancelled)
            admit = [self.waiting.popleft() for _ in range(min(len(self.waiting), len(self.engine.free)))]
            self.metrics.queue.set(len(self.waiting))
        for c in gone:
            self.engine.retire(c.row)
            self._drop(c)
        for c in admit:
            try:
                self.engine.admit(c.row)
            except BytemtpError as e:  # a row this engine cannot decode (a draft tree's one setting)
                c.send("error", APIError(400, str(e)))
                continue
            with self.cond:
                self.running[id(c.row)] = c
            if c.row.done:  # no byte budget
                self._finish(c)
        self.metrics.running.set(self.engine.live)
        if not self.engine.live:
            return True
        start = time.perf_counter()
        out = self.engine.step()
        self.metrics.step_seconds.observe(time.perf_counter() - start)
        self.metrics.forwards.inc()
        for row, data in out:
            c = self.running.get(id(row))
            if c is None:
                continue
            accepted = sum(row.stats.accepted)
            c.output += data
            if data:
                c.send("bytes", (data, accepted - c.accepted))
            c.accepted = accepted
            if row.done:
                self._finish(c)
        self.metrics.running.set(self.engine.live)
        return True

    def _drop(self, c: Choice) -> None:
        with self.cond:
            self.running.pop(id(c.row), None)

    def _finish(self, c: Choice) -> None:
        self._drop(c)
        self.metrics.finished(c.row.stats)
        scored = None
        if c.logprobs is not None:
            scored = score(self.model, c.prompt, bytes(c.output), c.echo, c.logprobs)
        c.send("done", scored)


@torch.inference_mode()
def score(model: torch.nn.Module, prompt: bytes, output: bytes, echo: bool, k: int) -> dict[str, list]:
    """Head 1's log-probability of each byte of ``output`` (and of ``prompt`` first, with ``echo``),
    teacher-forced after ``BOS + prompt``, and the ``k`` likeliest bytes at each, in OpenAI's
    ``logprobs`` shape. The caller keeps ``BOS + prompt + output`` within the model's window."""
    ids = [BOS, *prompt, *output]
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids[:-1]], device=device), n_heads=1)[0, :, 0]
    lp = logits.float().log_softmax(dim=-1)[:, :256]  # bytes only: BOS is no token of a text
    first = 0 if echo else len(prompt)
    targets = torch.tensor(ids[1 + first :], device=device)
    rows = lp[first:]
    chosen = rows.gather(1, targets[:, None])[:, 0].tolist()
    top = rows.topk(k, dim=-1) if k else None
    data = bytes(ids[1 + first :])
    offsets, chars = [], 0
    for b in data:  # character offsets into the text: a byte of a character points at its start
        offsets.append(chars - (b & 0xC0 == 0x80))
        chars += b & 0xC0 != 0x80
    return {
        "tokens": [byte_token(b) for b in data],
        "token_logprobs": chosen,
        "top_logprobs": None if top is None else [
            {byte_token(b): v for b, v in zip(idx, val)} for idx, val in zip(top.indices.tolist(), top.values.tolist())
        ],
        "text_offset": offsets,
    }
