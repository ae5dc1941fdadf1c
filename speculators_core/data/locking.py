"""A non-blocking exclusive file lock: one writer per output folder."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from speculators_core.errors import SpeculatorsError

__all__ = ["exclusive_lock"]


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) or fail at once.

    The lock dies with the process (SIGKILL included), so an interrupted run never leaves a
    stale lock behind. ``what`` names the output in the error, e.g. ``"'out/hs'"``.
    """
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpeculatorsError(
                f"another process is writing {what} (lock '{path}' is held); wait for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)
