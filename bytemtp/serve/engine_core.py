"""The engine process: the one owner of the model, decoding the server's rows step after step.

Why a process of its own: a step of a small model is mostly Python, and in one process with
the HTTP layer the engine's thread and the event loop took the GIL from each other at every
torch call: a served step cost 1.5–2x the engine's own. Here the engine never waits for the
HTTP layer, and the HTTP layer never waits for a step.

The front (``bytemtp.serve.scheduler``) sends the model's bytes first, then
``("submit", [Job])``, ``("cancel", [key])`` and ``("stop", message)`` over a pipe. Each
turn this process reads what arrived, retires the cancelled rows, admits waiting jobs into
free rows and steps the batch once, then sends one ``("turn", Turn)``: every job's decided
bytes, ends and errors, the jobs it admitted, and the gauges. A finished job's log-probabilities, when asked, are head 1's, teacher-forced over
the prompt and the output in one forward after its row finishes: only this process runs the
model.
"""

from __future__ import annotations

import io
import logging
import signal
import time
from collections import deque
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

import torch

from bytemtp import BOS
from bytemtp.decode.batch import Row, RowParams
from bytemtp.decode.config import GenerationConfig
from bytemtp.decode.engine import Engine
from bytemtp.decode.generate import Decoder
from bytemtp.errors import BytemtpError
from bytemtp.model.transformer import ByteMTP
from bytemtp.serve.schemas import byte_token

log = logging.getLogger("bytemtp.serve")
FAILED = "the decode engine failed; see the server's log"


@dataclass
class EngineSpec:
    """What the engine process builds its engine from; picklable. ``model``: the model's config,
    weights, byte trigrams and fitted coupling as ``torch.save`` bytes (a copy the process owns, whatever device it
    is moved to); ``adaptive``: price drafts by steps measured at 1, ``max_batch`` / 2 and
    ``max_batch`` rows (``bytemtp.decode.step_costs``) in this process, where they will run."""

    model: bytes
    config: GenerationConfig
    max_batch: int
    window: int
    compile: bool | None = None
    adaptive: bool = False
    device: str = "cpu"
    threads: int = 1

    @classmethod
    def of(cls, model: ByteMTP, config: GenerationConfig, max_batch: int, compile: bool | None = None,
           adaptive: bool = False, device: str | torch.device | None = None) -> EngineSpec:
        """The spec of an engine of ``model`` on ``device`` (default: the model's), with this
        process's torch threads."""
        buf = io.BytesIO()
        torch.save({"cfg": model.cfg, "state": model.state_dict(), "trigrams": model.byte_trigrams,
                    "fitted": model.fitted_coupling}, buf)
        device = str(device or next(model.parameters()).device)
        return cls(buf.getvalue(), config, max_batch, model.cfg.max_seq_len, compile, adaptive, device,
                   torch.get_num_threads())

    def decoder(self) -> Decoder:
        saved = torch.load(io.BytesIO(self.model), map_location="cpu", weights_only=False)
        model = ByteMTP(saved["cfg"])
        model.load_state_dict(saved["state"])
        model.byte_trigrams, model.fitted_coupling = saved["trigrams"], saved["fitted"]
        model = model.to(self.device).eval()
        if not self.adaptive:
            return Decoder(model, self.config, self.compile)
        from bytemtp.decode.step_costs import adaptive_decoder

        return adaptive_decoder(model, self.config, self.compile, self.window,
                                (max(1, self.max_batch // 2), self.max_batch))


@dataclass
class Job:
    """One prompt of a request, as the front sends it: ``key`` names it in both processes (and is
    its row's index)."""

    key: int
    prompt: bytes
    params: RowParams
    logprobs: int | None = None
    echo: bool = False


@dataclass
class Turn:
    """What one turn tells the front. ``events``: ``(key, kind, payload)`` with kind ``"bytes"``
    (payload ``(data, drafted)``: ``drafted`` of the step's decided bytes were accepted drafts),
    ``"done"`` (``(GenerationStats, logprobs or None)``) or ``"error"`` (``(status, message)``)."""

    events: list[tuple[int, str, Any]] = field(default_factory=list)
    admitted: list[int] = field(default_factory=list)
    step_s: float | None = None  # the step's wall time, when the turn stepped
    live: int = 0  # rows decoding after the turn


@dataclass
class Running:
    job: Job
    row: Row
    output: bytearray = field(default_factory=bytearray)
    accepted: int = 0  # draft bytes accepted so far


def main(spec: EngineSpec, conn: Connection) -> None:
    """The engine process: take the model's bytes (``spec`` comes without them), build the engine,
    say ``("ready", None)`` (or ``("failed", message)``), then serve turns until the front says
    stop or goes away. Signals are the front's to handle: a terminal's Ctrl-C, or a SIGTERM sent
    to the whole process group, must not cut the running requests short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(spec.threads)
    try:
        spec = replace(spec, model=conn.recv_bytes())
        try:
            engine = spec.decoder().engine(spec.max_batch, spec.window)
            engine.start()
        except BytemtpError as e:  # a setting this engine cannot run (a draft tree too large, ...)
            conn.send(("failed", str(e)))
            return
        except Exception as e:  # a server fault at start-up (out of memory, ...): the front reports it and exits
            log.exception("the decode engine could not start")
            conn.send(("failed", f"the decode engine could not start: {type(e).__name__}: {e}"))
            return
        conn.send(("ready", None))
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the front went away while it started
        return
    try:
        Core(engine, conn).run()
    finally:
        engine.close()


class Core:
    """The turns of ``engine``, fed by ``conn``."""

    def __init__(self, engine: Engine, conn: Connection):
        self.engine, self.conn = engine, conn
        self.waiting: deque[Job] = deque()
        self.running: dict[int, Running] = {}
        self.cancelled: set[int] = set()
        self.stopped: str | None = None

    def run(self) -> None:
        try:
            while self.stopped is None:
                self.turn()
            self.fail_all(503, self.stopped)
        except (EOFError, BrokenPipeError, ConnectionResetError):  # the front has gone: nobody to decode for
            pass
        except Exception:  # a server fault (never a client's input): every client hears of it
            log.exception("the decode engine failed")
            self.fail_all(500, FAILED)

    def receive(self) -> None:
        """Everything the front has sent; waits for something when there is nothing to decode."""
        if not self.waiting and not self.running:
            self.handle(self.conn.recv())
        while self.stopped is None and self.conn.poll():
            self.handle(self.conn.recv())

    def handle(self, message: tuple[str, Any]) -> None:
        kind, payload = message
        if kind == "submit":
            self.waiting.extend(payload)
        elif kind == "cancel":
            self.cancelled.update(payload)
        elif kind == "stop":
            self.stopped = payload

    def turn(self) -> None:
        """Retire, admit, step, tell."""
        self.receive()
        if self.stopped is not None:
            return
        turn = Turn()
        for key in self.cancelled:
            if key in self.running:
                self.engine.retire(self.running.pop(key).row)
        self.waiting = deque(j for j in self.waiting if j.key not in self.cancelled)
        self.cancelled.clear()
        while self.waiting and self.engine.free:
            self.admit(self.waiting.popleft(), turn)
        if self.engine.live:
            start = time.perf_counter()
            out = self.engine.step()
            turn.step_s = time.perf_counter() - start
            for row, data in out:
                self.advance(row, data, turn)
        turn.live = self.engine.live
        self.conn.send(("turn", turn))

    def admit(self, job: Job, turn: Turn) -> None:
        row = self.engine.row(job.prompt, job.params, job.key)
        turn.admitted.append(job.key)
        try:
            self.engine.admit(row)
        except BytemtpError as e:  # a row this engine cannot decode (a draft tree's one setting)
            turn.events.append((job.key, "error", (400, str(e))))
            return
        self.running[job.key] = Running(job, row)
        if row.done:  # no byte budget
            self.finish(job.key, turn)

    def advance(self, row: Row, data: bytes, turn: Turn) -> None:
        key = row.index
        r = self.running.get(key)
        if r is None:
            return
        accepted = sum(row.stats.accepted)
        r.output += data
        if data:
            turn.events.append((key, "bytes", (data, accepted - r.accepted)))
        r.accepted = accepted
        if row.done:
            self.finish(key, turn)

    def finish(self, key: int, turn: Turn) -> None:
        r = self.running.pop(key)
        scored = None
        if r.job.logprobs is not None:
            scored = score(self.engine.model, r.job.prompt, bytes(r.output), r.job.echo, r.job.logprobs)
        turn.events.append((key, "done", (r.row.stats, scored)))

    def fail_all(self, status: int, message: str) -> None:
        keys = [j.key for j in self.waiting] + list(self.running)
        self.waiting.clear()
        self.running.clear()
        try:
            self.conn.send(("turn", Turn(events=[(k, "error", (status, message)) for k in keys])))
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass


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
