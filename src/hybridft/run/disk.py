"""Disk faults as one-line errors: a full disk, a permission or a read-only file system, or the
output directory removed mid-run, met while a run writes its checkpoint, logs, model or
``eval.json``, becomes :class:`WriteFailed`, whose message says what could not be written, why,
which checkpoint is the last complete one, and how to continue. What was complete before is
never touched: checkpoints and results are written under temporary names and renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from hybridft.run.checkpoint import checkpoints

# what the user can do about an error number (any other: "fix that")
FIXES = {errno.ENOSPC: "free space", errno.EDQUOT: "free space", errno.EACCES: "make it writable",
         errno.EPERM: "make it writable", errno.EROFS: "make it writable"}


class WriteFailed(RuntimeError):
    """A run could not write to its output directory (the one-line message says what to do)."""


@contextlib.contextmanager
def writing(what: str, out: Path, *, again: str | None = None) -> Iterator[None]:
    """Turn an OSError or SafetensorError raised inside into :class:`WriteFailed` about writing
    ``what`` to ``out``; ``again``: the command to run once fixed (default: resume the run)."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        raise WriteFailed(message(what, Path(out), error, again)) from error


def require(directory: Path) -> None:
    """Raise FileNotFoundError if ``directory`` is gone (removed mid-run: writers that create
    missing directories would otherwise write a partial run into a new, empty one)."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(directory))


def message(what: str, out: Path, error: BaseException, again: str | None = None) -> str:
    """``cannot write WHAT to OUT (REASON); the last complete checkpoint is ...: FIX and run ...``."""
    number = error_number(error)
    reason = os.strerror(number) if number else (str(error).splitlines() or [type(error).__name__])[0]
    fix = FIXES.get(number or 0, "fix that")
    if again is not None:
        return f"cannot write {what} to {out} ({reason}): {fix} and run {again} again"
    if not (out / "config.json").is_file():
        return f"cannot write {what} to {out} ({reason}); {out} holds no run to resume: {fix} and start the run again"
    try:
        saved = checkpoints(out)
    except OSError:
        saved = []
    last = f"the last complete checkpoint is {saved[-1]}" if saved else \
        "there is no complete checkpoint yet (a resumed run starts from step 0)"
    return f"cannot write {what} to {out} ({reason}); {last}: {fix} and run hybridft train --resume {out}"


def error_number(error: BaseException) -> int | None:
    """The errno of an OSError, or of the OS error a SafetensorError wraps (its message reads
    ``... I/O error: No space left on device (os error 28)``, or in older versions
    ``... IoError(Os { code: 28, kind: StorageFull, ... })``)."""
    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", str(error))
    return int(found.group(1) or found.group(2)) if found else None
