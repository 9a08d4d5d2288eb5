"""Streaming text out of a byte stream: whole UTF-8 characters only, as Server-Sent Events.

A step decides a few bytes, and a multi-byte character may straddle two steps. A
streamed chunk must never carry half a character (a client decoding each chunk would show
two replacement characters for one good one), so the incomplete tail of what has arrived
is held back until its continuation bytes come; bytes that can never be valid UTF-8 are
replaced by U+FFFD at once, and an incomplete tail left at the end of the stream too.
Stop strings are already settled upstream (``bytemtp.decode.stops``): nothing of a stop
string reaches this layer, however the chunks fall.
"""

from __future__ import annotations

import json
from typing import Any


def _incomplete_tail(data: bytes) -> int:
    """Bytes at the end of ``data`` that start a multi-byte character whose continuation has not
    arrived yet (0 if none): a lead byte in the last three, followed only by continuation bytes."""
    for back in range(1, min(3, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:  # a continuation byte: look further back for its lead
            continue
        need = 2 if 0xC2 <= b <= 0xDF else 3 if 0xE0 <= b <= 0xEF else 4 if 0xF0 <= b <= 0xF4 else 1
        return back if back < need else 0
    return 0


class Utf8Stream:
    """Bytes in, text out, never splitting a character: ``push`` returns the bytes now released and
    their text; ``finish`` what is left."""

    def __init__(self) -> None:
        self.held = b""

    def push(self, data: bytes) -> tuple[bytes, str]:
        buf = self.held + data
        keep = _incomplete_tail(buf)
        out, self.held = buf[: len(buf) - keep], buf[len(buf) - keep :]
        return out, out.decode("utf-8", "replace")

    def finish(self) -> tuple[bytes, str]:
        out, self.held = self.held, b""
        return out, out.decode("utf-8", "replace")


def event(payload: dict[str, Any] | str) -> bytes:
    """One SSE event: ``data: <json>`` (or the ``[DONE]`` marker) and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8")
