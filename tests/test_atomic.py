"""Atomic writes: all or nothing, no temporary left behind, usual permissions."""

import os

import pytest

from qinco2.atomic import atomic_open, atomic_path


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write(b"new, half written")
            raise RuntimeError("crash")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_new_files_get_0644_and_rewrites_keep_the_mode(tmp_path):
    path = tmp_path / "f.bin"
    with atomic_path(path) as tmp:
        open(tmp, "wb").write(b"a")
    assert path.read_bytes() == b"a" and path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o600)
    with atomic_open(path) as f:
        f.write(b"b")
    assert path.read_bytes() == b"b" and path.stat().st_mode & 0o777 == 0o600
