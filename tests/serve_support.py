"""A real server on a free loopback port (its front in a thread of the test process, its engine in a
process of its own), for the serving tests."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

import httpx

from bytemtp.decode.generate import GenerationConfig
from bytemtp.serve.engine_core import EngineSpec
from bytemtp.serve.server import build_server, listen


@contextmanager
def running_server(model, max_batch: int = 4, max_queue: int = 16, **decoder):
    """Serve ``model`` (a copy, in the engine process) -> its URL."""
    spec = EngineSpec.of(model, GenerationConfig(**decoder), max_batch)
    server = build_server(spec, "tiny", "127.0.0.1", 0, max_queue, max_body=1 << 16, grace=2.0)
    sock = listen("127.0.0.1", 0)  # as ``bytemtp serve`` listens
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.url:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield server.url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def sse_events(lines) -> list:
    """The ``data:`` payloads of an SSE stream, checking its framing: every event one ``data:`` line
    then a blank line; JSON except the final ``[DONE]``."""
    events, expect_blank = [], False
    for line in lines:
        if expect_blank:
            assert line == "", f"an event is not followed by a blank line: {line!r}"
            expect_blank = False
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
        expect_blank = True
    return events


def metric(url: str, name: str) -> float:
    """One sample of the server's Prometheus text (0 when absent)."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.split()[-1])
    return 0.0
