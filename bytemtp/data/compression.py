"""Compressed inputs: which compression a file or stream uses, and a reader that decodes it.

Compression is chosen by file extension (``.gz``, ``.zst``/``.zstd``, ``.xz``,
``.bz2``) and, for stdin, by the stream's magic bytes (gzip, zstd and xz). A truncated
stream of any kind is an error, never silently shorter data.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import zlib
from typing import BinaryIO, ContextManager

import zstandard

COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".xz": "xz", ".bz2": "bzip2"}
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"))
# What reading a damaged compressed stream raises, besides the caller's own errors.
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error, zstandard.ZstdError)


def sniff_compression(head: bytes) -> str | None:
    """The compression whose magic bytes ``head`` starts with, None for none of them."""
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


def decompressed(raw: BinaryIO, compression: str | None) -> ContextManager[BinaryIO]:
    """``raw`` decoded as ``compression`` (None: read as it is)."""
    if compression is None:
        return contextlib.nullcontext(raw)
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "xz":
        return lzma.LZMAFile(raw)
    if compression == "bzip2":
        return bz2.BZ2File(raw)
    return io.BufferedReader(ZstdFrames(raw), buffer_size=1 << 20)


class ZstdFrames(io.RawIOBase):
    """Decode a (multi-frame) zstd stream and fail if it ends inside a frame.

    python-zstandard's ``stream_reader`` returns a short result without any error when
    its input is truncated, which would turn a cut-off download into silently missing
    documents. A ``decompressobj`` knows whether its frame ended, but has no output
    limit, so it is fed small slices: one slice expands to at most about 8 MiB
    (a 3-byte RLE block yields 128 KiB), which keeps memory bounded on any input.
    """

    _FEED = 256
    _READ = 1 << 16

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None
        self._input = memoryview(b"")
        self._output = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._output:
            if not self._decode_more():
                return 0
        n = min(len(buf), len(self._output))
        buf[:n] = self._output[:n]
        self._output = self._output[n:]
        return n

    def _decode_more(self) -> bool:
        if not self._input:
            self._input = memoryview(self._raw.read(self._READ))
            if not self._input:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("input ends inside a zstd frame")
                return False
        if self._frame is None or self._frame.eof:
            self._frame = self._dctx.decompressobj()
        piece = self._input[: self._FEED]
        self._output = memoryview(self._frame.decompress(piece))
        used = len(piece) - len(self._frame.unused_data) if self._frame.eof else len(piece)
        self._input = self._input[used:]
        return True
