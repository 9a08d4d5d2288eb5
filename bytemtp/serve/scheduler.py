"""The scheduler: the event loop's side of the engine process (``bytemtp.serve.engine_core``).

Every prompt of a request is a ``Choice``. The event loop ``submit``s a request's choices
(refused with 429 when ``max_queue`` are waiting for a row) and reads their events from an
``asyncio.Queue``: ``("bytes", (data, drafted))``, ``("done", logprobs or None)``,
``("error", APIError)``. The engine process admits waiting choices into free rows at its
next step and reports, after every step, what each row decided; the event loop reads those
reports from the pipe itself (``add_reader``), so a step's bytes reach their streams with one
wake-up and no thread of this process ever competes with the loop. A client that goes away
``cancel``s its choices: their rows leave at the engine's next step. Everything here but
``start`` and ``request_stop`` runs in the event loop's thread.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import multiprocessing
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from bytemtp.decode.batch import GenerationStats, RowParams
from bytemtp.errors import BytemtpError
from bytemtp.serve import engine_core
from bytemtp.serve.engine_core import EngineSpec, Job, Turn
from bytemtp.serve.metrics import Metrics
from bytemtp.serve.schemas import APIError

log = logging.getLogger("bytemtp.serve")
STOP_TIMEOUT_S = 30.0  # how long a stopping engine process may take to answer its rows and exit


@dataclass
class Choice:
    """One prompt of a request, decoded in one row of the engine; ``key`` is its name there."""

    index: int
    prompt: bytes
    params: RowParams
    events: asyncio.Queue  # shared by a request's choices: ``(index, kind, payload)``
    logprobs: int | None = None
    echo: bool = False
    key: int = -1
    output: bytearray = field(default_factory=bytearray)
    stats: GenerationStats | None = None  # set when it is done


class Scheduler:
    """Feeds the engine process built from ``spec`` with at most ``max_queue`` waiting choices."""

    def __init__(self, spec: EngineSpec, metrics: Metrics, max_queue: int):
        self.metrics, self.max_queue, self.window = metrics, max_queue, spec.window
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads and a model
        self.conn, self._child_conn = context.Pipe()
        # the weights follow over the pipe: the spawn's own pickle is read only once the process has
        # imported torch, and a front stopped meanwhile would leave it a truncated pickle to fail on
        self._weights = spec.model
        self.process = context.Process(target=engine_core.main, args=(replace(spec, model=b""), self._child_conn),
                                       name="bytemtp-engine", daemon=True)
        self.send_lock = threading.Lock()  # ``request_stop`` may come from a timer's thread
        self.choices: dict[int, Choice] = {}  # submitted, not yet ended
        self.queued: set[int] = set()  # submitted, not yet admitted to a row
        self.keys = itertools.count()
        self.accepting, self.stopping, self.ended = True, "", False
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start the engine process and wait until its engine is ready; ``BytemtpError`` if it fails.
        However this process ends from then on, the engine process ends first (``close``)."""
        self.process.start()
        self._child_conn.close()  # the process has its own: the pipe ends when the process does
        atexit.register(self.close)  # before multiprocessing's own exit handler, which would wait for it
        try:
            self.conn.send_bytes(self._weights)
            kind, payload = self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            kind, payload = "failed", f"the decode engine process exited (status {self.process.exitcode})"
        except BaseException:  # interrupted while it started
            self.close()
            raise
        finally:
            self._weights = b""
        if kind == "failed":
            self.close()
            raise BytemtpError(payload)

    def close(self) -> None:
        """End the engine process now, answering nobody: for a front that is exiting."""
        self.conn.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the engine's reports in ``loop`` from now on."""
        self.loop = loop
        loop.add_reader(self.conn.fileno(), self._read)

    @property
    def alive(self) -> bool:
        return self.accepting and not self.ended

    def submit(self, choices: list[Choice]) -> None:
        """Queue a request's choices, all or none."""
        if not self.alive:
            raise APIError(503, "the decode engine has stopped" if self.ended and not self.stopping
                           else "the server is shutting down")
        if len(self.queued) + len(choices) > self.max_queue:
            raise APIError(429, f"the queue is full ({self.max_queue} waiting): retry shortly",
                           headers={"Retry-After": "1"})
        for c in choices:
            c.key = next(self.keys)
            self.choices[c.key] = c
            self.queued.add(c.key)
        self.metrics.queue.set(len(self.queued))
        self._send("submit", [Job(c.key, c.prompt, c.params, c.logprobs, c.echo) for c in choices])

    def cancel(self, choices: list[Choice]) -> None:
        """The client has gone: its rows leave at the next step, its waiting choices never start."""
        keys = [c.key for c in choices if self.choices.pop(c.key, None) is not None]
        self.queued.difference_update(keys)
        self.metrics.queue.set(len(self.queued))
        if keys:
            self._send("cancel", keys)

    def drain(self) -> None:
        """Take no more requests; the queued and running ones go on."""
        self.accepting = False

    def request_stop(self, message: str = "the server is shutting down") -> None:
        """Ask the engine process to answer every choice not finished with ``message`` (a 503) and end.
        Safe from any thread; its answers arrive through the event loop as any report does."""
        self.accepting = False
        with self.send_lock:
            first, self.stopping = not self.stopping, self.stopping or message
        if first:
            self._send("stop", message)

    async def stop(self, message: str = "the server is shutting down") -> None:
        """``request_stop``, then wait for the engine process to end (killed past ``STOP_TIMEOUT_S``)."""
        self.request_stop(message)
        await asyncio.get_running_loop().run_in_executor(None, self.process.join, STOP_TIMEOUT_S)
        if self.process.is_alive():
            log.error("the decode engine process did not stop in %.0f s: killed", STOP_TIMEOUT_S)
            self.process.kill()
        self._read()  # its last reports, and the end of the pipe
        self._fail_all(APIError(503, message))

    def _send(self, kind: str, payload: Any) -> None:
        try:
            with self.send_lock:
                self.conn.send((kind, payload))
        except (BrokenPipeError, ConnectionResetError, OSError):  # the engine process has ended: ``_read`` answers
            pass

    def _read(self) -> None:
        """Every report the engine process has sent; at the pipe's end, every choice left fails."""
        if self.ended:
            return
        try:
            while self.conn.poll():
                _, turn = self.conn.recv()
                self._dispatch(turn)
            return
        except (EOFError, OSError):
            pass
        self.ended = True
        if self.loop is not None:
            self.loop.remove_reader(self.conn.fileno())
        if not self.stopping:
            log.error("the decode engine process ended (status %s)", self.process.exitcode)
        self._fail_all(APIError(503, self.stopping) if self.stopping else APIError(500, engine_core.FAILED))

    def _dispatch(self, turn: Turn) -> None:
        m = self.metrics
        self.queued.difference_update(turn.admitted)
        m.queue.set(len(self.queued))
        m.running.set(turn.live)
        if turn.step_s is not None:
            m.step_seconds.observe(turn.step_s)
            m.forwards.inc()
        for key, kind, payload in turn.events:
            c = self.choices.get(key) if kind == "bytes" else self.choices.pop(key, None)
            if c is None:  # cancelled meanwhile
                continue
            if kind == "bytes":
                c.output += payload[0]
            elif kind == "done":
                c.stats, payload = payload
                m.finished(c.stats)
            else:
                payload = APIError(*payload)
            c.events.put_nowait((c.index, kind, payload))

    def _fail_all(self, error: APIError) -> None:
        left = list(self.choices.values())
        self.choices.clear()
        self.queued.clear()
        self.metrics.queue.set(0)
        self.metrics.running.set(0)
        for c in left:
            c.events.put_nowait((c.index, "error", error))
