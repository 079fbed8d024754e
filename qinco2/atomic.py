"""Atomic file writes: write a temporary file beside the target, then rename it over.

A reader never sees a half-written file, and a crash leaves the old file (or none) plus at
most a hidden ``.<name>.*.tmp`` file. The new file gets the old file's permissions, or 0o644.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


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
