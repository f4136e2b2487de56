"""Graceful stops: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (what SLURM's ``--signal`` sends) ask a
run to stop at its next safe point, where it writes a checkpoint and ends with
:class:`Stopped` (exit code 128 + the signal's number, as a shell reports a process the signal
ended: 143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1). A second signal stops at once
(``SystemExit`` with the same code): a checkpoint being written is abandoned, and since
checkpoints are written atomically the previous one is intact.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Stopped(Exception):
    """A run stopped by a signal at a checkpoint; ``exit_code`` is 128 + the signal's number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def name(signum: int) -> str:
    """``SIGTERM``, ``SIGINT``, ..."""
    return signal.Signals(signum).name


def signal_of(returncode: int) -> int | None:
    """The stop signal a child process ended by, from its exit status: -N (killed by it before
    it could stop gracefully) or 128 + N (stopped gracefully); None for any other status."""
    for signum in SIGNALS:
        if returncode in (-signum, 128 + signum):
            return signum
    return None


@dataclass
class Request:
    """The stop signal this process received (None: none yet)."""

    signum: int | None = None


@contextlib.contextmanager
def requested(forward: Callable[[int], None] | None = None) -> Iterator[Request]:
    """While inside, the first stop signal is recorded in the yielded :class:`Request` (the
    caller stops at its next safe point) and a second raises ``SystemExit(128 + signal)``;
    each one is passed to ``forward`` first (e.g. to a child process). A signal ignored on entry
    stays ignored (a job started with ``&`` ignores SIGINT); the previous handlers are restored
    on exit. Outside the main thread nothing is installed (Python allows handlers only there)."""
    request = Request()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, _frame: object) -> None:
        if forward is not None:
            forward(signum)
        if request.signum is not None:
            raise SystemExit(128 + signum)
        request.signum = signum

    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    try:
        for signum, handler in previous.items():
            if handler is not signal.SIG_IGN:
                signal.signal(signum, handle)
        yield request
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: set from outside Python, cannot be restored
                signal.signal(signum, handler)
