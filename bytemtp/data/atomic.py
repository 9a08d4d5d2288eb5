"""Atomic file and directory writes: a crash midway leaves the previous state intact.

Everything persistent (shards, manifests, checkpoints) goes through here: write to a
temporary name in the same directory, fsync, rename over the final name, fsync the
directory so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import (single-threaded then): os.umask can only be read by setting it.
_UMASK = _read_umask()


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a directory entry (a rename or a new file) on filesystems that need it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open ``path`` for binary writing; it appears under its name only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the file from other users
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete the temporary directories ``atomic_dir(path)`` calls left behind when killed.

    A temporary carries the id of the process that made it (``.NAME.PID.XXXXXXXX.tmp``);
    only those whose process no longer exists are removed, so a write in progress is
    never touched (a process of another user counts as alive).
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[A-Za-z0-9_]+\.tmp")
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path.parent):
            match = pattern.fullmatch(entry.name)
            if match and entry.is_dir(follow_symlinks=False) and not _process_exists(int(match[1])):
                shutil.rmtree(entry.path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # none has this id (or none could have it)
        return False
    except PermissionError:  # another user's
        pass
    return True


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; rename it to ``path`` on success.

    With ``replace``, an existing ``path`` is swapped out only after the new one is
    complete, and removed afterwards; without it, an existing ``path`` is an error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp's 0700 would hide the directory from other users
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} already exists")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
