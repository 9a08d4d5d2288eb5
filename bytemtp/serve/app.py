"""The FastAPI app: OpenAI's legacy completions API, models, health, metrics and the playground.

``POST /v1/completions`` turns each prompt into a ``Choice`` for the scheduler and either
waits for them all (one JSON response) or streams their bytes as Server-Sent Events as each
step decides them. A client that disconnects cancels its rows: they leave the batch at the
next step. Every error, the client's or the server's, answers in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from bytemtp.decode.batch import RowParams
from bytemtp.serve.metrics import Metrics
from bytemtp.serve.scheduler import Choice, Scheduler
from bytemtp.serve.schemas import APIError, CompletionRequest, exact_bytes, parse_completion
from bytemtp.serve.sse import Utf8Stream, event

PLAYGROUND = Path(__file__).with_name("playground.html")
FINISH = {"max_bytes": "length", "stop_string": "stop", "end_of_document": "stop"}
POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(scheduler: Scheduler, metrics: Metrics, model_name: str, max_body: int) -> FastAPI:
    """The app serving ``model_name`` through ``scheduler`` (started and stopped with the app)."""
    window = scheduler.window
    app = FastAPI(title="bytemtp", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        what = "no such path" if e.status_code == 404 else e.detail
        return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {what}"))

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.alive
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "bytemtp", "max_model_len": window}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            req = parse_completion(await read_body(request, max_body), model_name)
            if req.logprobs is not None and any(len(p) + 1 + req.max_tokens > window for p in req.prompts):
                raise APIError(400, f"logprobs: the prompt and max_tokens must fit the model's window of {window} "
                                    "bytes", "logprobs")
            events: asyncio.Queue = asyncio.Queue()
            params = [RowParams(req.temperature, req.top_k, req.top_p, req.stop, seed(req, i), req.max_tokens)
                      for i in range(len(req.prompts))]
            choices = [
                Choice(i, p, params[i], events, req.logprobs, req.echo)
                for i, p in enumerate(req.prompts)
            ]
            scheduler.submit(choices)
        except APIError as e:
            outcome = "rejected" if e.status in (429, 503) else "invalid"
            metrics.requests.labels(outcome=outcome).inc()
            return error_response(e)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        if req.stream:
            return StreamingResponse(stream(req, choices, head), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await respond(request, req, choices, head)

    async def respond(request: Request, req: CompletionRequest, choices: list[Choice], head: dict) -> Response:
        """Wait for every choice, then one response; a client that leaves meanwhile cancels them."""
        logprobs: dict[int, dict | None] = {}
        while len(logprobs) < len(choices):
            try:
                i, kind, payload = await asyncio.wait_for(choices[0].events.get(), POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    scheduler.cancel(choices)
                    metrics.requests.labels(outcome="cancelled").inc()
                    return Response(status_code=499)
                continue
            if kind == "error":
                scheduler.cancel(choices)
                metrics.requests.labels(outcome="failed").inc()
                return error_response(payload)
            if kind == "done":
                logprobs[i] = payload
        metrics.requests.labels(outcome="completed").inc()
        out = [choice_body(req, c, logprobs[c.index]) for c in choices]
        completion = sum(len(c.output) for c in choices)
        prompt = sum(len(c.prompt) for c in choices)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        return JSONResponse({**head, "choices": out, "usage": usage})

    async def stream(req: CompletionRequest, choices: list[Choice], head: dict) -> AsyncIterator[bytes]:
        """SSE: each step's decided bytes as soon as they are decided, whole characters only."""
        texts = [Utf8Stream() for _ in choices]
        left, finished, kind = len(choices), False, ""
        try:
            if req.echo:
                for c in choices:
                    yield event({**head, "choices": [chunk(c.index, c.prompt.decode("utf-8", "replace"))]})
            while left:
                i, kind, payload = await choices[0].events.get()
                if kind == "error":
                    yield event(payload.body())
                    break
                c = choices[i]
                if kind == "bytes":
                    data, drafted = payload
                    raw, text = texts[i].push(data)
                    if raw:
                        yield event({**head, "choices": [chunk(i, text, extra={"drafted": drafted})]})
                    continue
                raw, text = texts[i].finish()
                yield event({**head, "choices": [chunk(i, text, FINISH[c.stats.stop_reason], stats(c))]})
                left -= 1
            else:
                yield event("[DONE]")
                metrics.requests.labels(outcome="completed").inc()
                finished = True
        finally:
            if not finished:  # the client went away, or an error ended the stream: free the rows
                scheduler.cancel(choices)
                metrics.requests.labels(outcome="failed" if left and kind == "error" else "cancelled").inc()

    return app


def seed(req: CompletionRequest, i: int) -> int | None:
    """Prompt i of a seeded request samples with seed + i, as ``sample --num-samples`` does."""
    return None if req.seed is None else req.seed + i


def chunk(index: int, text: str, finish: str | None = None, extra: dict | None = None) -> dict:
    body = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
    if extra:
        body["bytemtp"] = extra
    return body


def stats(c: Choice) -> dict:
    """The ``bytemtp`` extension of a choice: how its decoding went. ``bytes``: how many the model
    generated, a stop string included (the text's length misleads: U+FFFD stands for one invalid byte)."""
    s = c.stats
    return {"bytes": s.bytes, "forwards": s.forwards, "bytes_per_forward": round(s.bytes_per_forward, 4),
            "acceptance": [round(a, 4) for a in s.acceptance], "stop_reason": s.stop_reason}


def choice_body(req: CompletionRequest, c: Choice, logprobs: dict | None) -> dict:
    data = (c.prompt if req.echo else b"") + bytes(c.output)
    text = data.decode("utf-8", "replace")
    body = chunk(c.index, text, FINISH[c.stats.stop_reason], {**stats(c), **exact_bytes(data, text)})
    body["logprobs"] = logprobs
    return body


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with 413 past ``limit`` bytes (before reading it, when it says its length)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the body is {declared} bytes; this server takes at most {limit}")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"the body is over {limit} bytes; this server takes at most {limit}")
    return bytes(body)

