"""One run per output directory: an exclusive OS lock on ``DIR/.lock`` for the life of a run.

The lock is ``flock(2)`` on the file ``DIR/.lock``, which names its holder (``pid N on host H``).
The kernel drops it when the holder's process ends, however it ends (SIGKILL included), so a
lock is never stale: a ``.lock`` file left by a killed run blocks nothing, and the next run
takes it over. A second run into a locked directory stops (after a grace of two seconds, in
which a holder just killed has exited), having written nothing.
The holder removes ``.lock`` when it is done, and the directory too if it created it and
left it empty (a run refused after taking the lock leaves no trace).

flock works between processes of one machine and, on Linux, on NFS (as a POSIX lock); other
network file systems may not honour it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

NAME = ".lock"
GRACE_SECONDS = 2.0  # a holder just killed (kill -9, then a resume at once) may take a moment to exit


class InUse(ValueError):
    """The directory is locked by another running process."""


@contextlib.contextmanager
def held(directory: str | Path, *, hold: bool = True) -> Iterator[None]:
    """Hold the lock of ``directory`` (created if missing) while inside; ``hold=False`` (the
    ranks other than 0 of a data-parallel run) takes nothing. Raises :class:`InUse` at once if
    another process holds it, ValueError if the directory cannot be used at all."""
    if not hold:
        yield
        return
    directory = Path(directory)
    created = not directory.exists()
    fd = acquire(directory)
    try:
        yield
    finally:
        release(directory, fd, created)


def acquire(directory: Path) -> int:
    """Lock ``directory``; the open lock file's descriptor (closing it releases the lock)."""
    path = directory / NAME
    while True:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's name stays readable
        except OSError as error:
            raise ValueError(f"cannot use {directory} as the output directory ({error.strerror})") from error
        try:
            lock_(fd)
        except OSError as error:
            holder = owner(fd)
            os.close(fd)
            if isinstance(error, BlockingIOError):
                raise InUse(f"{directory} is in use by another run ({holder}); "
                            "wait for it or choose another --output-dir") from None
            raise ValueError(f"cannot lock {directory} ({error.strerror})") from error
        if same_file(fd, path):
            break
        os.close(fd)  # its holder removed the file between our open and our lock: lock the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    return fd


def release(directory: Path, fd: int, created: bool) -> None:
    """Remove the lock file (while still holding it, so no one locks a removed file), then unlock;
    remove ``directory`` too if this run ``created`` it and it is empty."""
    with contextlib.suppress(OSError):
        (directory / NAME).unlink()
    os.close(fd)
    if created:
        with contextlib.suppress(OSError):
            directory.rmdir()  # only an empty one


def lock_(fd: int) -> None:
    """Lock ``fd`` exclusively, trying for up to ``GRACE_SECONDS``; BlockingIOError if still held."""
    deadline = time.monotonic() + GRACE_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def owner(fd: int) -> str:
    """The holder's ``pid N on host H``, as it wrote it into the lock file (waiting a moment
    for a holder that has only just taken the lock)."""
    for _ in range(20):
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "pid unknown"
