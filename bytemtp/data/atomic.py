"""Atomic file and directory writes: a crash midway leaves the previous state intact.

Everything persistent (shards, manifests, checkpoints) goes through here: write to a
temporary name in the same directory, fsync, rename over the final name, fsync the
directory so the rename itself survives a power cut.

A signal is an exception like any other here: SIGINT raises ``KeyboardInterrupt``, and
``sigterm_as_error`` makes SIGTERM (what a scheduler sends at a time limit or a cancel)
raise too, so the temporaries are removed on the way out instead of being left behind by
the default action. The renames that put a finished directory in place run with both
signals held back, so no signal can land between moving the old directory aside and
moving the new one in.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Iterator

from bytemtp.errors import BytemtpError

_HELD_BACK = {signal.SIGINT, signal.SIGTERM}


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
        if path.exists() and not replace:
            raise FileExistsError(f"{path} already exists")
        with _signals_held_back():
            _put_in_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _put_in_place(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` to ``path``, an existing ``path`` first moved aside, then removed."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _signals_held_back() -> Iterator[None]:
    """SIGINT and SIGTERM wait (the kernel keeps them pending) until the block is done."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_BACK)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def sigterm_as_error(out: str | os.PathLike) -> Iterator[None]:
    """Within the block, SIGTERM raises a ``BytemtpError`` saying that writing ``out`` was
    stopped; ``atomic_dir``'s cleanup, which the exception runs, removes the temporaries.
    ``out`` is then as it was before, or complete if the signal came during the final
    renames (it waits for them): either way nothing is half-written. Signal handlers
    belong to the main thread; elsewhere SIGTERM keeps its default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise BytemtpError(f"{out}: stopped by SIGTERM; nothing half-written is left behind")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
