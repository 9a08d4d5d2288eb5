"""Stop strings over a byte stream that arrives a few bytes at a time.

A stop string ends generation and is not part of the output. Bytes that could
still be the start of a stop string are held back until the following bytes
settle it, so nothing that later turns out to belong to a stop string is ever
shown, however the stream is split into chunks.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[bytes]):
        self.stops = tuple(stops)
        self.held = b""
        self.hit = False  # a stop string has been seen; the stream is over

    def push(self, data: bytes) -> bytes:
        """The bytes (of what was held, then ``data``) now certain to be output."""
        if self.hit:
            return b""
        if not self.stops:
            return data
        buf = self.held + data
        # The stop string that completes first ends the stream, as if bytes came one by one.
        found = [(i + len(s), i) for s, i in ((s, buf.find(s)) for s in self.stops) if i >= 0]
        if found:
            self.hit, self.held = True, b""
            return buf[: min(found)[1]]
        keep = self._undecided_tail(buf)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> bytes:
        """What is held back, once the stream has ended for another reason."""
        out, self.held = self.held, b""
        return out

    def _undecided_tail(self, buf: bytes) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        for n in range(min(len(buf), max(map(len, self.stops)) - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
