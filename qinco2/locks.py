"""Exclusive locks on output files: one writer at a time.

:func:`exclusive_lock` holds the lock file ``.<name>.lock`` beside ``<name>`` while a block
runs. The lock file is created atomically (``O_CREAT | O_EXCL``) and holds its owner's pid,
host and start time, so that a second writer is refused with an error naming the owner. A
lock left by a process that died (same host, pid no longer running) is taken over with a
warning; a lock of another host cannot be checked and is never taken over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import QincoError

log = logging.getLogger(__name__)


class LockedError(QincoError, RuntimeError):
    """A file is being written by another process (its lock file is held)."""


def lock_path(path) -> Path:
    """The lock file of ``path`` (``out/codes.npy`` -> ``out/.codes.npy.lock``)."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                     # a process of another user
        return True
    return True


def _read_owner(lock: Path) -> dict | None:
    """The owner recorded in ``lock`` ({} when unreadable), or None when it no longer exists."""
    try:
        text = lock.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        owner = json.loads(text)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict) -> str:
    if not owner:
        return "an unknown process (the lock file is empty or unreadable)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    return f"process {owner.get('pid')} on host {owner.get('host')} (since {since})"


def _is_stale(owner: dict) -> bool:
    """The owner is a process of this host that no longer runs."""
    pid = owner.get("pid")
    return owner.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)


def _try_create(lock: Path, owner: dict) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, json.dumps(owner).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _take_over(lock: Path, stale: dict) -> None:
    """Remove the stale lock file ``lock`` whose content was ``stale``: renamed away first (an
    atomic step only one process wins), put back if it was a fresh lock meanwhile."""
    aside = lock.with_name(f"{lock.name}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return                                  # another process took it over first
    if _read_owner(aside) != stale:             # a new owner created it after we read it
        with contextlib.suppress(OSError):
            os.link(aside, lock)                # back in place (never over another lock)
    aside.unlink(missing_ok=True)


def _acquire(path: Path, lock: Path, owner: dict, attempts: int = 20) -> None:
    for _ in range(attempts):
        if _try_create(lock, owner):
            return
        held = _read_owner(lock)
        if held is None:                        # released between our two looks: try again
            continue
        if not _is_stale(held):
            raise LockedError(
                f"{path} is being written by {_describe(held)}: its lock file {lock} exists. Wait for that "
                f"process to finish or write to another output; if it is no longer running (for example it "
                f"ran on another machine and was killed), delete {lock} and run again")
        log.warning("taking over the lock %s of %s, which no longer runs", lock, _describe(held))
        _take_over(lock, held)
    raise LockedError(f"could not take the lock file {lock} of {path} after {attempts} attempts (other processes "
                      f"keep taking it); make sure a single process writes {path}")


@contextlib.contextmanager
def exclusive_lock(path) -> Iterator[Path]:
    """Hold the exclusive lock of the file ``path`` during the block; yields the lock file.

    Raises :class:`LockedError`, naming the owner, when another process (or another block of
    this process) holds it. The lock file is removed when the block ends, also on an error;
    a process killed meanwhile leaves it behind, and the next writer on the same host takes
    it over with a warning."""
    path = Path(path)
    lock = lock_path(path)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "id": uuid.uuid4().hex}
    _acquire(path, lock, owner)
    try:
        yield lock
    finally:
        if _read_owner(lock) == owner:          # still ours (not removed by hand and retaken)
            lock.unlink(missing_ok=True)
        else:
            log.warning("the lock file %s of %s was removed or taken by another process while held", lock, path)
