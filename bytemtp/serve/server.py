"""Running the app: uvicorn in this process, the engine in a process of its own, and a graceful stop.

On SIGINT or SIGTERM the server stops taking requests (uvicorn closes its socket; a
request on a kept-alive connection gets a 503), lets the queued and running ones finish
for up to ``grace`` seconds, then answers whatever is left with a clear 503 error (a
streamed one as an error event) and exits with status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager

import uvicorn

from bytemtp.serve.app import create_app
from bytemtp.serve.engine_core import EngineSpec
from bytemtp.serve.metrics import Metrics
from bytemtp.serve.scheduler import Scheduler

GRACE_MESSAGE = "the server is shutting down and the request did not finish within its grace period"


class Server(uvicorn.Server):
    """uvicorn's server, draining the scheduler on the first signal and reporting where it listens."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, grace: float,
                 on_ready: Callable[[str], None] | None = None):
        super().__init__(config)
        self.scheduler, self.grace, self.on_ready = scheduler, grace, on_ready
        self.url = ""

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            self.scheduler.drain()
            timer = threading.Timer(self.grace, self.scheduler.request_stop, args=(GRACE_MESSAGE,))
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, without raising the signal again after the graceful stop: a stop asked for by
        a signal is a normal end of the server, exit status 0."""
        with super().capture_signals():
            yield
            self._captured_signals.clear()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.url = f"http://{host}:{port}"
            if self.on_ready is not None:
                self.on_ready(self.url)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket whose connections send small writes at once (``TCP_NODELAY``, which the
    accepted sockets inherit). A response's headers and body are two small writes: with Nagle's
    algorithm the body waited for the client's delayed ACK, 40 ms on every request after a
    kept-alive connection's first (asyncio sets the option itself only on sockets it made)."""
    sock = socket.create_server((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def build_server(spec: EngineSpec, model_name: str, host: str, port: int, max_queue: int,
                 max_body: int = 4 << 20, grace: float = 30.0, log_level: str = "warning",
                 on_ready: Callable[[str], None] | None = None) -> Server:
    """A server of the engine ``spec`` describes (``spec.max_batch`` rows, each with the model's whole
    window of cache), at most ``max_queue`` waiting choices. Its engine process starts here, and
    is ready when this returns (``BytemtpError`` if it could not start); it stops with the server."""
    metrics = Metrics()
    scheduler = Scheduler(spec, metrics, max_queue)
    scheduler.start()

    @asynccontextmanager
    async def lifespan(app):
        scheduler.attach(asyncio.get_running_loop())
        yield
        await scheduler.stop()

    app = create_app(scheduler, metrics, model_name, max_body)
    app.router.lifespan_context = lifespan
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=grace + 5, lifespan="on")
    return Server(config, scheduler, grace, on_ready)
