"""Atomic file writes: write a temporary file beside the target, then rename it over.

A reader never sees a half-written file, and a crash leaves the old file (or none) plus at
most a hidden ``.<name>.*.tmp`` file. The new file gets the old file's permissions, or 0o644.
:func:`check_writable` tells, before a long computation, whether its output can be written.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import InputError


def check_writable(path, what: str = "the output file") -> None:
    """Raise :class:`~qinco2.errors.InputError` (naming ``what``, the path and the reason) when
    a file cannot be written at ``path`` the way :func:`atomic_path` writes it: ``path`` is a
    folder, lies under a regular file, or its folder does not accept a new file (permissions, a
    read-only disk). Call it before long work. A temporary file is created beside ``path`` (in
    its nearest existing folder; missing folders are not created) and removed at once."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"cannot write {what} {path}: it is a folder; give the path of a file "
                         "(a new name, or one inside that folder)")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:   # missing folders: made by the writer
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"cannot write {what} {path}: {folder} is a file, not a folder; "
                         "choose a path whose folders are folders")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise InputError(f"cannot write {what} {path}: creating a file in {folder} failed "
                         f"({exc.strerror or exc}); choose a folder you can write to, or change "
                         "its permissions") from None
    os.close(fd)
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """The name of a temporary file to write (for writers that need a file name, such as
    ``faiss.write_index``); renamed to ``path`` when the block ends without an error."""
    path = Path(path)
    mode = path.stat().st_mode & 0o777 if path.is_file() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; not possible everywhere
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def atomic_open(path) -> Iterator[BinaryIO]:
    """A binary file to write, fsync-ed and renamed to ``path`` when the block ends without
    an error."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
