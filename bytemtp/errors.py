"""The one exception type that reaches a user as a one-line message, not a traceback."""


class BytemtpError(Exception):
    """A problem with the user's input or environment: bad flag, bad file, bad data.

    The CLI prints ``error: <message>`` and exits with status 1. The message should
    name the file or flag at fault and say what is wrong with it.
    """
