"""The one exception type that reaches a user as a one-line message, not a traceback."""

from __future__ import annotations

from collections.abc import Iterable


class BytemtpError(Exception):
    """A problem with the user's input or environment: bad flag, bad file, bad data.

    The CLI prints ``error: <message>`` and exits with status 1. The message should
    name the file or flag at fault and say what is wrong with it.
    """


def require_at_least_one(config: object, names: Iterable[str], *, flags: bool = False) -> None:
    """Reject the first field of ``config`` among ``names`` that is below 1, naming it as the
    config field or, with ``flags``, as the command-line flag it comes from (``--prompt-bytes``)."""
    for name in names:
        value = getattr(config, name)
        if value < 1:
            label = f"--{name.replace('_', '-')}" if flags else name
            raise BytemtpError(f"{label}: must be at least 1, got {value}")
