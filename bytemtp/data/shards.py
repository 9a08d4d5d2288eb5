"""The on-disk dataset format: zstd shards of documents plus a manifest.

A shard is one zstd frame (content checksum on) whose content is::

    header   32 bytes: magic b"BMTPSHRD", u32 version, u32 reserved, u64 n_docs, u64 n_bytes
    offsets  (n_docs + 1) little-endian u64, offsets[0] == 0, offsets[-1] == n_bytes
    data     n_bytes of document bytes, concatenated

Offsets come before the data so a reader can size its arrays up front; the writer
therefore holds one shard (``shard_bytes``, 64 MiB by default) in memory, which is
what bounds the memory of ``prepare`` whatever the input size.

Shards are read through ``stream_reader``: python-zstandard's one-shot
``decompress()`` silently stops after the first frame of a multi-frame blob.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import zstandard

from bytemtp.data.atomic import atomic_open, atomic_write_bytes
from bytemtp.errors import BytemtpError

MAGIC = b"BMTPSHRD"
SHARD_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "bytemtp-shards"
_HEADER = struct.Struct("<8sIIQQ")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ShardInfo:
    """One manifest entry. ``file`` is relative to the dataset directory."""

    file: str
    split: str
    n_docs: int
    n_bytes: int
    sha256: str
    compressed_bytes: int


@dataclass
class Shard:
    """A decoded shard: document ``i`` is ``data[offsets[i]:offsets[i + 1]]``."""

    offsets: np.ndarray  # uint64, n_docs + 1
    data: np.ndarray  # uint8, n_bytes

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    def doc(self, i: int) -> bytes:
        return self.data[int(self.offsets[i]) : int(self.offsets[i + 1])].tobytes()

    def docs(self) -> Iterator[bytes]:
        for i in range(self.n_docs):
            yield self.doc(i)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.zst"


class ShardBuffer:
    """The documents of one shard being filled, held in one contiguous buffer.

    ``prepare`` streams inputs of any size into shards; keeping the pending shard as one
    ``bytearray`` plus a packed ``uint64`` offset array (rather than a list of ``bytes``)
    makes its memory the document bytes plus 8 bytes per document, which is what lets
    ``--shard-bytes`` bound peak memory even for millions of tiny documents.
    """

    def __init__(self) -> None:
        self._data = bytearray()
        self._offsets = array.array("Q", [0])

    @property
    def n_docs(self) -> int:
        return len(self._offsets) - 1

    @property
    def n_bytes(self) -> int:
        return len(self._data)

    def add(self, doc: bytes) -> None:
        self._data += doc
        self._offsets.append(len(self._data))

    def write(self, path: Path, *, level: int = 3, threads: int = -1) -> ShardInfo:
        """Write the buffered documents as one shard at ``path`` atomically, return its manifest entry and
        empty the buffer. ``threads=-1`` lets zstd compress on every core; the output is still one frame."""
        offsets = np.frombuffer(self._offsets, dtype=np.uint64)
        info = _write_shard_content(path, offsets, [self._data], level=level, threads=threads)
        self._data = bytearray()
        self._offsets = array.array("Q", [0])
        return info


def _write_shard_content(path: Path, offsets: np.ndarray, chunks, *, level: int, threads: int) -> ShardInfo:
    """Compress header, ``offsets`` and the document bytes (``chunks``, concatenated) into ``path``."""
    split = path.name.split("-")[0]
    n_docs = len(offsets) - 1
    n_bytes = int(offsets[-1])
    header = _HEADER.pack(MAGIC, SHARD_VERSION, 0, n_docs, n_bytes)
    content_size = len(header) + offsets.nbytes + n_bytes
    cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    sha = hashlib.sha256()

    class _Hashing:
        """File wrapper that hashes what zstd writes, so the file is never re-read."""

        def __init__(self, f):
            self.f = f

        def write(self, b):
            sha.update(b)
            return self.f.write(b)

    with atomic_open(path) as f:
        with cctx.stream_writer(_Hashing(f), size=content_size, closefd=False) as w:
            w.write(header)
            w.write(offsets.tobytes())
            for chunk in chunks:
                w.write(chunk)
        compressed = f.tell()
    return ShardInfo(path.name, split, n_docs, n_bytes, sha.hexdigest(), compressed)


def _read_exact(reader, n: int, path: Path, what: str) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = reader.readinto(view[got:])
        if k == 0:
            raise BytemtpError(f"{path}: truncated shard ({what}: got {got} of {n} bytes)")
        got += k
    return buf


def read_shard(path: str | os.PathLike) -> Shard:
    """Decode a shard fully, checking header, sizes and the zstd content checksum.

    Any corruption or truncation is a ``BytemtpError`` naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            dctx = zstandard.ZstdDecompressor()
            with dctx.stream_reader(f, read_across_frames=True) as r:
                head = _read_exact(r, _HEADER.size, path, "header")
                magic, version, _, n_docs, n_bytes = _HEADER.unpack(head)
                if magic != MAGIC:
                    raise BytemtpError(f"{path}: not a bytemtp shard (bad magic)")
                if version != SHARD_VERSION:
                    raise BytemtpError(f"{path}: shard version {version}, expected {SHARD_VERSION}")
                offsets = np.frombuffer(_read_exact(r, 8 * (n_docs + 1), path, "offsets"), dtype="<u8")
                if offsets[0] != 0 or offsets[-1] != n_bytes or np.any(np.diff(offsets.astype(np.int64)) < 0):
                    raise BytemtpError(f"{path}: corrupt shard (inconsistent document offsets)")
                data = np.frombuffer(_read_exact(r, n_bytes, path, "data"), dtype=np.uint8)
                if r.read(1):
                    raise BytemtpError(f"{path}: corrupt shard (trailing bytes after the data)")
    except FileNotFoundError:
        raise BytemtpError(f"{path}: shard file is missing") from None
    except zstandard.ZstdError as e:
        raise BytemtpError(f"{path}: corrupt shard ({e})") from None
    return Shard(offsets.astype(np.uint64, copy=False), data)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_dataset_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a bytemtp dataset manifest, valid or damaged.

    What a command that writes or deletes a directory asks before touching one: a
    dataset is never to be mixed with, or replaced by, anything else.
    """
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT


def load_manifest(root: Path) -> tuple[dict, list[ShardInfo]]:
    """The manifest of the dataset at ``root`` and its shard entries, checked for shape.

    Everything a reader relies on is checked here, once, so that a damaged or hand-edited
    manifest is a one-line error naming it rather than a failure deep inside a reader:
    the format and version, ``source`` and ``params`` as objects, and each shard entry's
    fields and types. A shard's ``file`` must be a plain name: a path would let a
    manifest point a reader outside the dataset directory.
    """
    path = root / MANIFEST
    if not path.is_file():
        raise BytemtpError(f"{root}: not a prepared dataset (no {MANIFEST}; run `bytemtp prepare`)")
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise BytemtpError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise BytemtpError(f"{path}: not a bytemtp manifest (no \"format\": \"{MANIFEST_FORMAT}\")")
    version = manifest.get("version")
    if type(version) is not int or version != SHARD_VERSION:
        raise BytemtpError(f"{path}: format version {version!r} is not supported (this bytemtp reads {SHARD_VERSION})")
    for key in ("source", "params"):
        if not isinstance(manifest.get(key, {}), dict):
            raise BytemtpError(f"{path}: {key!r} is not a JSON object")
    entries = manifest.get("shards")
    if not isinstance(entries, list):
        raise BytemtpError(f"{path}: 'shards' is not a list of shard entries")
    shards = [_shard_info(path, i, entry) for i, entry in enumerate(entries)]
    files = [s.file for s in shards]
    if len(set(files)) != len(files):
        raise BytemtpError(f"{path}: a shard file is listed twice")
    return manifest, shards


_SHARD_FIELDS = {"file": str, "split": str, "n_docs": int, "n_bytes": int, "sha256": str, "compressed_bytes": int}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _shard_info(path: Path, i: int, entry: object) -> ShardInfo:
    """Shard entry ``i`` of the manifest at ``path`` as a ``ShardInfo``, or what is wrong with it."""
    if not isinstance(entry, dict):
        raise BytemtpError(f"{path}: shard entry {i} is not a JSON object")
    for key, kind in _SHARD_FIELDS.items():
        value = entry.get(key)
        if type(value) is not kind or (kind is int and value < 0):
            wanted = "a count (an integer, 0 or more)" if kind is int else "a string"
            raise BytemtpError(f"{path}: shard entry {i}: {key!r} must be {wanted}, got {value!r}")
    file = entry["file"]
    if Path(file).name != file or file in (".", "..") or "\\" in file:
        raise BytemtpError(f"{path}: shard entry {i}: file {file!r} is not a file name inside the dataset directory")
    if entry["split"] not in SPLITS:
        raise BytemtpError(f"{path}: shard entry {i}: split {entry['split']!r} is not one of {', '.join(SPLITS)}")
    if not _SHA256.fullmatch(entry["sha256"]):
        raise BytemtpError(f"{path}: shard entry {i}: sha256 {entry['sha256']!r} is not 64 hex digits")
    return ShardInfo(**{key: entry[key] for key in _SHARD_FIELDS})


class Dataset:
    """A prepared dataset directory: its (validated) manifest and access to its shards."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.manifest, self._shards = load_manifest(self.root)

    def shards(self, split: str | None = None) -> list[ShardInfo]:
        return [s for s in self._shards if split is None or s.split == split]

    def n_bytes(self, split: str) -> int:
        return sum(s.n_bytes for s in self.shards(split))

    def n_docs(self, split: str) -> int:
        return sum(s.n_docs for s in self.shards(split))

    def read(self, info: ShardInfo) -> Shard:
        shard = read_shard(self.root / info.file)
        if shard.n_docs != info.n_docs or len(shard.data) != info.n_bytes:
            raise BytemtpError(f"{self.root / info.file}: shard does not match the manifest (size differs)")
        return shard

    def verify(self, info: ShardInfo) -> None:
        """Full check of one shard: sha256 of the file, then decode and sizes."""
        path = self.root / info.file
        if not path.is_file():
            raise BytemtpError(f"{path}: shard file is missing")
        if file_sha256(path) != info.sha256:
            raise BytemtpError(f"{path}: sha256 mismatch (file corrupt or modified)")
        self.read(info)


def write_manifest(root: Path, shards: list[ShardInfo], *, source: dict, params: dict) -> None:
    """Write the manifest last and atomically: its presence means every shard is complete."""
    from bytemtp import __version__

    manifest = {
        "format": MANIFEST_FORMAT,
        "version": SHARD_VERSION,
        "created_by": f"bytemtp {__version__}",
        "source": source,
        "params": params,
        "shards": [asdict(s) for s in shards],
    }
    atomic_write_bytes(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
