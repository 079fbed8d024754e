"""Tests of what qinco2.formats reads when: only the first *vecs header at open, the headers of
the rows copied by read_vectors, and every header on demand (verify_vectors, check="full")."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pytest

from qinco2 import formats, formats_layout
from qinco2.datasets import DataLimits, resolve_dataset
from qinco2.errors import InputError, VectorFileError
from qinco2.formats import count_vectors, open_vectors, read_vectors, verify_vectors, write_vectors
from qinco2.formats_layout import inspect_vector_file

VECS = {".fvecs": np.dtype("<f4"), ".bvecs": np.dtype("u1"), ".ivecs": np.dtype("<i4")}
HUGE_N = 10**8


def _sparse_vecs(path: Path, n: int, d: int) -> Path:
    """A *vecs file of ``n`` records whose first header says ``d`` and every other byte is 0.

    The file is sparse (holes read as zeros), so it takes no disk space whatever ``n``; every
    header after the first one is 0, i.e. wrong.
    """
    record = 4 + d * VECS[path.suffix].itemsize
    with open(path, "wb") as f:
        f.write(np.int32(d).tobytes())
        f.truncate(n * record)
    return path


def _set_header(path: Path, row: int, value: int) -> None:
    d = int(np.fromfile(path, dtype="<i4", count=1)[0])
    with open(path, "r+b") as f:
        f.seek(row * (4 + d * VECS[path.suffix].itemsize))
        f.write(np.int32(value).tobytes())


@pytest.mark.parametrize(("suffix", "d"), [(".fvecs", 1), (".bvecs", 4), (".ivecs", 1)])
def test_huge_file_opens_from_its_first_header(tmp_path, suffix, d):
    """10^8 records with wrong headers after the first: opening reads none of them."""
    path = _sparse_vecs(tmp_path / f"huge{suffix}", HUGE_N, d)
    assert count_vectors(path) == (HUGE_N, d)
    assert inspect_vector_file(path)[2].n == HUGE_N
    x_ND = open_vectors(path)
    assert x_ND.shape == (HUGE_N, d) and x_ND.dtype == VECS[suffix]
    assert not x_ND[HUGE_N - 1].any()  # the view reads the values and checks no header
    assert not read_vectors(path, 0, 1).any()  # record 0 is the only good one
    for start, stop, row in [(0, 2, 1), (5, 9, 5), (HUGE_N - 3, HUGE_N, HUGE_N - 3)]:
        with pytest.raises(VectorFileError, match=rf"{path}: record {row} has dimension header 0, "
                                                  rf"but record 0 has {d}.*re-download"):
            read_vectors(path, start, stop)
    with pytest.raises(VectorFileError, match=r"record 1 has dimension header 0"):
        verify_vectors(path)  # fails in its first chunk: no need to scan 10^8 records


def test_datasets_open_huge_file_from_its_first_header(tmp_path):
    """What datasets.py does at open (dimension checks, views) reads no header but the first."""
    path = _sparse_vecs(tmp_path / "base.bvecs", HUGE_N, 4)
    ds = resolve_dataset(path, trainset=path)
    assert ds.dim == 4
    assert ds.database(DataLimits(db=1000)).shape == (1000, 4)
    train_ND, val_ND = ds.train_val(DataLimits(valset=10, trainset=100))
    assert train_ND.shape == (100, 4) and val_ND.shape == (10, 4)


class _CountingFile:
    """A binary file that adds the size of every read to ``counts``."""

    def __init__(self, counts: list[int], *args, **kwargs) -> None:
        self._f, self._counts = builtins.open(*args, **kwargs), counts  # noqa: SIM115 (closed in __exit__)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._counts.append(len(data))
        return data

    def readinto(self, buffer) -> int:
        got = self._f.readinto(buffer)
        self._counts.append(got)
        return got


@pytest.mark.parametrize("suffix", list(VECS))
def test_bytes_read_at_open_and_by_verify(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"x{suffix}"
    write_vectors(path, np.arange(300 * 5).reshape(300, 5) % 100)
    counts: list[int] = []
    monkeypatch.setattr(formats_layout, "open", lambda *a, **k: _CountingFile(counts, *a, **k), raising=False)
    checked: list[tuple[int, int]] = []

    def recording_check(p, headers_R, d, first_row=0):
        checked.append((first_row, len(headers_R)))
        return formats_layout.check_vecs_headers(p, headers_R, d, first_row)

    monkeypatch.setattr(formats, "check_vecs_headers", recording_check)
    for call in (count_vectors, open_vectors):
        counts.clear()
        call(path)
        assert counts == [4]  # the first header; the size comes from stat
    assert checked == []  # and no header of the memory map is compared
    read_vectors(path, 17, 42)
    assert checked == [(17, 25)]  # exactly the headers of the rows copied
    counts.clear()
    assert verify_vectors(path, chunk_rows=64) == (300, 5)
    assert counts == [4] + [64 * (4 + 5 * VECS[suffix].itemsize)] * 4 + [44 * (4 + 5 * VECS[suffix].itemsize)]


@pytest.mark.parametrize("chunk_rows", [None, 1000, 54_321, 54_322, 10**5, 10**6])
def test_full_check_finds_one_bad_header(tmp_path, chunk_rows):
    """10^5 records, one wrong header in the middle: found by the full check, whatever the chunks."""
    path = _sparse_vecs(tmp_path / "x.bvecs", 10**5, 3)
    records_NB = np.memmap(path, dtype=np.uint8, mode="r+", shape=(10**5, 7))
    records_NB[:, :4].view("<i4")[:, 0] = 3
    records_NB.flush()
    del records_NB
    assert verify_vectors(path, chunk_rows=chunk_rows) == (10**5, 3)
    _set_header(path, 54_321, 2)
    assert open_vectors(path).shape == (10**5, 3)
    for call in (lambda p: verify_vectors(p, chunk_rows=chunk_rows, progress=True),
                 lambda p: open_vectors(p, check="full")):
        with pytest.raises(VectorFileError, match=rf"{path}: record 54321 has dimension header 2, but "
                                                  "record 0 has 3; all records must have the same dimension"):
            call(path)
    assert read_vectors(path, 0, 54_321).shape == (54_321, 3)
    assert read_vectors(path, 54_322).shape == (10**5 - 54_322, 3)


@pytest.mark.parametrize("suffix", [".fbin", ".npy", ".fvecs"])
def test_verify_good_files(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    write_vectors(path, np.ones((7, 2), np.float32))
    assert verify_vectors(path, chunk_rows=1) == (7, 2)
    assert open_vectors(path, check="full").shape == (7, 2)


def test_verify_and_open_reject_bad_arguments(tmp_path):
    path = tmp_path / "x.fvecs"
    write_vectors(path, np.ones((3, 2), np.float32))
    with pytest.raises(InputError, match="chunk_rows"):
        verify_vectors(path, chunk_rows=0)
    with pytest.raises(InputError, match="'first' or 'full'"):
        open_vectors(path, check="all")
    with pytest.raises(VectorFileError, match="does not exist"):
        verify_vectors(tmp_path / "missing.bvecs")


def test_verify_notices_a_file_cut_while_checked(tmp_path, monkeypatch):
    path = tmp_path / "x.ivecs"
    write_vectors(path, np.ones((10, 2), np.int32))
    layout = inspect_vector_file(path)[2]
    path.write_bytes(path.read_bytes()[: 6 * layout.record_bytes])
    with pytest.raises(VectorFileError, match=r"ended after 72 bytes while being checked \(120 expected\)"):
        list(formats_layout.scan_vecs_headers(path, layout, 4))
