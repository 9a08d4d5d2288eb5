"""Requests and responses of the completions API, and its errors, in OpenAI's shapes.

Bodies are checked field by field here rather than by a schema library, so that every
bad field is a 400 naming it (a library's own 422 is not what OpenAI's clients expect),
and a value that would travel on into the decoder (a NaN temperature, a 10**12 byte
budget) never gets past the door. One token of this model is one byte: ``max_tokens``,
``usage`` and ``logprobs`` count bytes.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any

from bytemtp import MAX_SEED

MAX_TOKENS = 1 << 16  # bytes one choice may ask for
MAX_PROMPTS = 64  # prompts in one request
MAX_STOPS = 16
MAX_LOGPROBS = 20



class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
             429: "rate_limit_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class CompletionRequest:
    prompts: list[bytes]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[bytes, ...] = ()
    seed: int | None = None
    stream: bool = False
    echo: bool = False
    logprobs: int | None = None


def _bad(param: str, what: str) -> APIError:
    return APIError(400, f"{param}: {what}", param)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        raise _bad(name, f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise _bad(name, f"must be in [{low}, {high}], got {value}")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, f"must be true or false, got {value!r}")
    return value


def _texts(value: Any, name: str, most: int) -> list[str]:
    """A string or a non-empty list of at most ``most`` strings."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise _bad(name, "must be a string or a non-empty list of strings")
    if len(value) > most:
        raise _bad(name, f"at most {most} strings, got {len(value)}")
    if not all(isinstance(v, str) for v in value):
        raise _bad(name, "must be a string or a list of strings (token ids are not taken: one byte is one token)")
    return value


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def parse_completion(raw: bytes, model_name: str) -> CompletionRequest:
    """A request body -> the request, or an ``APIError`` naming the first bad field."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", f"must be a string, got {model!r}")
    if model not in (None, model_name):
        raise APIError(404, f"The model '{model}' does not exist (this server serves '{model_name}')", "model",
                       "model_not_found")
    if "prompt" not in body:
        raise _bad("prompt", "is required")
    prompts = [_utf8(p) for p in _texts(body["prompt"], "prompt", MAX_PROMPTS)]
    stop: list[bytes] = []
    if body.get("stop") is not None:
        stop = [_utf8(s) for s in _texts(body["stop"], "stop", MAX_STOPS)]
        if not all(stop):
            raise _bad("stop", "stop strings must not be empty")
    if _integer(body, "n", 1, 1, 1) != 1 or _integer(body, "best_of", 1, 1, 1) != 1:
        raise _bad("n", "must be 1")
    top_k = _integer(body, "top_k", 0, -1, 1 << 20)
    request = CompletionRequest(
        prompts=prompts,
        max_tokens=_integer(body, "max_tokens", 16, 0, MAX_TOKENS),
        temperature=_number(body, "temperature", 1.0, 0.0, 100.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=max(top_k, 0),  # -1: off, as vLLM takes it
        stop=tuple(stop),
        seed=_integer(body, "seed", None, 0, MAX_SEED),
        stream=_flag(body, "stream"),
        echo=_flag(body, "echo"),
        logprobs=_integer(body, "logprobs", None, 0, MAX_LOGPROBS),
    )
    if request.logprobs is not None and request.stream:
        raise _bad("logprobs", "is not available with stream: ask without streaming")
    return request


def byte_token(b: int) -> str:
    """How one byte is named as a token: itself when ASCII, else ``bytes:\\xNN`` (OpenAI's convention
    for a token that is no whole character)."""
    return chr(b) if b < 0x80 else f"bytes:\\x{b:02x}"


def exact_bytes(data: bytes, text: str) -> dict[str, str]:
    """The extension field carrying the exact bytes, when ``text`` (decoded with replacement) loses them."""
    return {} if _utf8(text) == data else {"base64": base64.b64encode(data).decode("ascii")}
