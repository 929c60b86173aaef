"""Locks across processes (BSD ``flock``): one builder of a cached artefact at a time (DDP ranks, parallel runs),
one runner per run folder, one writer per model directory."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import IO, Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; what these locks keep apart is then not kept apart
    fcntl = None


def try_lock(handle: IO) -> bool | None:
    """An exclusive lock on the open file ``handle``, without waiting: ``True`` held, ``False`` another process
    holds it, ``None`` nothing can be locked here (no ``flock`` on this platform, or a file system without
    locks: some NFS, FUSE, CIFS mounts). A lock lives as long as the open file (and any process it passes to)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def wait_lock(handle: IO) -> None:
    """Wait for an exclusive lock on ``handle`` (after ``try_lock`` said another process holds it)."""
    if fcntl is not None:
        fcntl.flock(handle, fcntl.LOCK_EX)


@contextlib.contextmanager
def building(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (created, with its folder, if absent) for the block.
    Whoever waits should look for the artefact again: the holder may have built it meanwhile."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as handle:  # closing the file releases the lock
        if try_lock(handle) is False:
            wait_lock(handle)
        yield
