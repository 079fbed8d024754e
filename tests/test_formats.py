"""Tests of qinco2.formats: round trips, memory mapping, conversion and every corruption case."""

from __future__ import annotations

import os
import re
import resource
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qinco2.errors import InputError, VectorFileError
from qinco2.formats import (
    VECTOR_SUFFIXES,
    count_vectors,
    fbin_to_fvecs,
    open_vectors,
    read_vectors,
    verify_vectors,
    write_vectors,
)

# Deterministic examples (derandomize) and no deadline: file I/O timing varies between machines.
FAST = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
NATIVE = {
    ".fvecs": np.float32, ".bvecs": np.uint8, ".ivecs": np.int32,
    ".fbin": np.float32, ".u8bin": np.uint8, ".ibin": np.int32,
}
VECS = (".fvecs", ".bvecs", ".ivecs")
BINS = (".fbin", ".u8bin", ".ibin")
NPY_DTYPES = (np.float16, np.float32, np.float64, np.uint8, np.int32, np.int64)
shapes = st.tuples(st.integers(1, 20), st.integers(1, 16))


def _random(suffix: str, n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = NATIVE.get(suffix, np.float32)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal((n, d)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=(n, d), endpoint=True, dtype=dtype)


def _values(dtype) -> st.SearchStrategy:
    if np.dtype(dtype).kind == "f":
        return st.floats(allow_nan=False, allow_infinity=False, width=np.dtype(dtype).itemsize * 8)
    return st.integers(np.iinfo(dtype).min, np.iinfo(dtype).max)


def _memmap_base(x: np.ndarray) -> np.memmap | None:
    while x is not None:
        if isinstance(x, np.memmap) and not isinstance(x.base, np.ndarray):
            return x
        x = x.base
    return None


def _raises_naming(path: Path, *words: str) -> AbstractContextManager:
    """pytest.raises(VectorFileError) whose message names the file and contains ``words``."""
    return pytest.raises(VectorFileError, match=".*".join(map(re.escape, [str(path), *words])))


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", VECS + BINS)
@FAST
@given(data=st.data(), shape=shapes)
def test_round_trip_native(tmp_path, suffix, data, shape):
    dtype = NATIVE[suffix]
    x = data.draw(hnp.arrays(dtype, shape, elements=_values(dtype)))
    path = tmp_path / f"x{suffix}"
    write_vectors(path, x)
    assert count_vectors(path) == shape
    y = read_vectors(path)
    assert y.dtype == dtype and y.flags.c_contiguous
    np.testing.assert_array_equal(y, x)  # exact: values are stored bit for bit


@FAST
@given(data=st.data(), shape=shapes, dtype=st.sampled_from(NPY_DTYPES), fortran=st.booleans())
def test_round_trip_npy_keeps_dtype(tmp_path, data, shape, dtype, fortran):
    x = data.draw(hnp.arrays(dtype, shape, elements=_values(dtype)))
    x = np.asfortranarray(x) if fortran else x
    path = tmp_path / "x.npy"
    write_vectors(path, x)
    y = read_vectors(path)
    assert y.dtype == dtype and y.flags.c_contiguous
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize(
    ("suffix", "x", "expected_dtype"),
    [
        (".fvecs", np.array([[0.5, -1.25]], np.float64), np.float32),
        (".fbin", np.array([[1, -7]], np.int64), np.float32),
        (".fvecs", np.array([[1.0, 2.0]], np.float16), np.float32),
        (".bvecs", np.array([[0, 255]], np.int64), np.uint8),
        (".u8bin", np.array([[3, 4]], np.int16), np.uint8),
        (".ivecs", np.array([[0, 255]], np.uint8), np.int32),
        (".ibin", np.array([[-(2**31), 2**31 - 1]], np.int64), np.int32),
    ],
)
def test_write_converts_fitting_dtypes(tmp_path, suffix, x, expected_dtype):
    path = tmp_path / f"x{suffix}"
    write_vectors(path, x)
    y = read_vectors(path)
    assert y.dtype == expected_dtype
    np.testing.assert_array_equal(y, x.astype(expected_dtype))


@pytest.mark.parametrize(
    ("suffix", "x"),
    [
        (".bvecs", np.array([[0.0, 1.0]], np.float32)),  # floats into a uint8 format
        (".bvecs", np.array([[0, 256]], np.int64)),
        (".u8bin", np.array([[-1, 2]], np.int32)),
        (".ivecs", np.array([[0, 2**31]], np.int64)),
        (".ibin", np.array([[1.5]], np.float64)),
        (".fvecs", np.array([[2**24 + 1]], np.int64)),  # not exact in float32
        (".fvecs", np.array([[np.nan, 1.0]], np.float32)),
        (".fbin", np.array([[1e39]], np.float64)),  # overflows float32
        (".fvecs", np.zeros(4, np.float32)),  # 1-D
        (".npy", np.zeros((2, 2, 2), np.float32)),  # 3-D
        (".npy", np.array([["a"]], dtype=object)),
        (".fvecs", np.zeros((0, 3), np.float32)),  # *vecs cannot store zero vectors
        (".fbin", np.zeros((3, 0), np.float32)),
    ],
)
def test_write_rejects_bad_arrays(tmp_path, suffix, x):
    path = tmp_path / f"x{suffix}"
    with pytest.raises(InputError, match=re.escape(str(path))):
        write_vectors(path, x)
    assert list(tmp_path.iterdir()) == []  # no partial or temporary file left behind


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "x.fvecs"
    x = _random(".fvecs", 5, 3)
    write_vectors(path, x)
    bad = np.full((5, 3), np.inf, np.float32)
    with pytest.raises(InputError, match="row 0"):
        write_vectors(path, bad)
    np.testing.assert_array_equal(read_vectors(path), x)
    assert [p.name for p in tmp_path.iterdir()] == ["x.fvecs"]


def test_write_to_missing_directory(tmp_path):
    path = tmp_path / "nope" / "x.fvecs"
    with pytest.raises(VectorFileError, match="does not exist"):
        write_vectors(path, np.zeros((1, 2), np.float32))


def test_write_accepts_lists(tmp_path):
    write_vectors(tmp_path / "x.ivecs", [[1, 2], [3, 4]])
    np.testing.assert_array_equal(read_vectors(tmp_path / "x.ivecs"), [[1, 2], [3, 4]])


# --- slices, memory mapping, dtype conversion --------------------------------------------------


@pytest.mark.parametrize("suffix", VECTOR_SUFFIXES)
@FAST
@given(shape=shapes, bounds=st.tuples(st.integers(0, 20), st.integers(0, 20)))
def test_row_slices_equal_full_read(tmp_path, suffix, shape, bounds):
    n, d = shape
    start, stop = sorted(min(b, n) for b in bounds)
    path = tmp_path / f"x{suffix}"
    write_vectors(path, _random(suffix, n, d, seed=n * 100 + d))
    full = read_vectors(path)
    block = read_vectors(path, start, stop)
    assert block.flags.c_contiguous and block.flags.owndata and not isinstance(block, np.memmap)
    np.testing.assert_array_equal(block, full[start:stop])
    np.testing.assert_array_equal(read_vectors(path, start), full[start:])


@pytest.mark.parametrize("suffix", VECTOR_SUFFIXES)
def test_open_returns_memmap_view(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    x = _random(suffix, 50, 7)
    write_vectors(path, x)
    mm = open_vectors(path)
    base = _memmap_base(mm)
    assert base is not None and np.shares_memory(mm, base)
    assert mm.shape == (50, 7) and mm.dtype == x.dtype
    np.testing.assert_array_equal(mm, x)
    if suffix in VECS:  # strided view over the records, header column skipped, not a copy
        assert mm.strides == (4 + 7 * x.itemsize, x.itemsize)
        assert base.nbytes == os.path.getsize(path)


@pytest.mark.parametrize("suffix", [".fbin", ".npy"])
def test_open_reads_no_data(tmp_path, suffix):
    """A 1 GiB sparse file opens and serves its last rows without the whole file in memory."""
    n, d = 1 << 18, 1024
    path = tmp_path / f"big{suffix}"
    if suffix == ".npy":
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d)).flush()
    else:
        with open(path, "wb") as f:
            f.write(np.array([n, d], "<u4").tobytes())
            f.truncate(8 + n * d * 4)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    mm = open_vectors(path)
    tail = read_vectors(path, n - 2, n)
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert mm.shape == (n, d) and count_vectors(path) == (n, d)
    assert tail.shape == (2, d) and not tail.any()
    assert peak_after - peak_before < 256 * 1024  # far below the 1 GiB a full read would take


@pytest.mark.parametrize(
    ("suffix", "dtype"), [(".bvecs", np.float32), (".npy", np.float32), (".fvecs", np.float16)]
)
def test_read_converts_dtype(tmp_path, suffix, dtype):
    path = tmp_path / f"x{suffix}"
    x = _random(".bvecs", 10, 4).astype(np.float16 if suffix == ".npy" else NATIVE.get(suffix))
    write_vectors(path, x)
    y = read_vectors(path, 2, 8, dtype=dtype)
    assert y.dtype == dtype and y.flags.c_contiguous
    np.testing.assert_array_equal(y, x[2:8].astype(dtype))


def test_read_rejects_lossy_dtype_and_bad_range(tmp_path):
    path = tmp_path / "x.fvecs"
    write_vectors(path, _random(".fvecs", 10, 4))
    with pytest.raises(InputError, match="cannot convert"):
        read_vectors(path, dtype=np.uint8)
    for start, stop in [(-1, 3), (5, 3), (0, 11)]:
        with pytest.raises(InputError, match="out of range"):
            read_vectors(path, start, stop)


# --- fbin -> fvecs -----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_fbin_to_fvecs(tmp_path, chunk_rows):
    x = _random(".fbin", 300, 9, seed=chunk_rows)
    src, dst = tmp_path / "x.fbin", tmp_path / "x.fvecs"
    write_vectors(src, x)
    fbin_to_fvecs(src, dst, chunk_rows=chunk_rows, progress=chunk_rows == 64)
    assert dst.read_bytes() == _fvecs_bytes(x)
    np.testing.assert_array_equal(read_vectors(dst), x)


def _fvecs_bytes(x: np.ndarray) -> bytes:
    """Obvious reference writer: one record at a time."""
    return b"".join(np.int32(x.shape[1]).tobytes() + row.astype("<f4").tobytes() for row in x)


def test_fbin_to_fvecs_errors(tmp_path):
    src = tmp_path / "x.fbin"
    x = _random(".fbin", 10, 3)
    x[6, 1] = np.nan
    src.write_bytes(np.array([10, 3], "<u4").tobytes() + x.tobytes())
    with _raises_naming(src, "row 6", "NaN"):
        fbin_to_fvecs(src, tmp_path / "y.fvecs", chunk_rows=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.fbin"]
    with pytest.raises(VectorFileError, match=r"\.fvecs"):
        fbin_to_fvecs(src, tmp_path / "y.bvecs")
    with pytest.raises(InputError, match="chunk_rows"):
        fbin_to_fvecs(src, tmp_path / "y.fvecs", chunk_rows=0)


# --- corruption ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", VECTOR_SUFFIXES)
@FAST
@given(shape=shapes, data=st.data())
def test_truncated_file_raises(tmp_path, suffix, shape, data):
    n, d = shape
    path = tmp_path / f"x{suffix}"
    write_vectors(path, _random(suffix, n, d))
    size = path.stat().st_size
    cut = data.draw(st.integers(1, size - 1))
    record = 4 + d * np.dtype(NATIVE.get(suffix, np.float32)).itemsize
    assume(suffix not in VECS or (size - cut) % record != 0)
    with open(path, "r+b") as f:
        f.truncate(size - cut)
    with pytest.raises(VectorFileError, match=re.escape(str(path))) as err:
        open_vectors(path)
    if suffix in VECS and size - cut >= 4:
        assert f"{size - cut} bytes" in str(err.value) and f"record size {record}" in str(err.value)
        assert "truncated" in str(err.value)
    with pytest.raises(VectorFileError):
        count_vectors(path)


@pytest.mark.parametrize("suffix", VECS)
@FAST
@given(shape=st.tuples(st.integers(2, 20), st.integers(1, 16)), data=st.data())
def test_changed_header_dimension_raises(tmp_path, suffix, shape, data):
    n, d = shape
    path = tmp_path / f"x{suffix}"
    write_vectors(path, _random(suffix, n, d))
    row = data.draw(st.integers(1, n - 1))
    new_d = data.draw(st.integers(-(2**31), 2**31 - 1).filter(lambda v: v != d))
    record = 4 + d * np.dtype(NATIVE[suffix]).itemsize
    with open(path, "r+b") as f:
        f.seek(row * record)
        f.write(np.int32(new_d).tobytes())
    assert count_vectors(path) == (n, d)  # header and size only: corruption inside is not seen
    assert open_vectors(path).shape == (n, d)  # the same at open: only the first header is read
    words = [f"record {row}", f"header {new_d}", f"record 0 has {d}", "re-download"]
    for call in (verify_vectors, lambda p: open_vectors(p, check="full"), read_vectors,
                 lambda p: read_vectors(p, row, row + 1), lambda p: read_vectors(p, row - 1)):
        with _raises_naming(path, *words):
            call(path)
    np.testing.assert_array_equal(read_vectors(path, 0, row), _random(suffix, n, d)[:row])
    if row + 1 < n:  # the rows after the bad one are read without it
        np.testing.assert_array_equal(read_vectors(path, row + 1), _random(suffix, n, d)[row + 1 :])


@pytest.mark.parametrize("suffix", VECS)
def test_bad_first_header_raises(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(np.array([0, 1, 2, 3], "<i4").tobytes())
    with _raises_naming(path, "dimension 0", "positive"):
        open_vectors(path)


@pytest.mark.parametrize("suffix", VECTOR_SUFFIXES)
def test_trailing_bytes_raise(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    write_vectors(path, _random(suffix, 4, 3))
    with open(path, "ab") as f:
        f.write(b"\0" * 3)
    words = ["not a multiple of the record size"] if suffix in VECS else ["extra bytes"]
    with _raises_naming(path, *words):
        open_vectors(path)


@pytest.mark.parametrize("suffix", VECTOR_SUFFIXES)
def test_empty_file_raises(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    path.touch()
    with _raises_naming(path, "empty file"):
        open_vectors(path)


@pytest.mark.parametrize("suffix", VECTOR_SUFFIXES)
def test_missing_file_raises(tmp_path, suffix):
    path = tmp_path / f"missing{suffix}"
    with _raises_naming(path, "does not exist"):
        read_vectors(path)
    folder = tmp_path / f"folder{suffix}"
    folder.mkdir()
    with _raises_naming(folder, "is a directory"):
        open_vectors(folder)


def test_unknown_suffix_raises(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes(b"1234")
    for call in (open_vectors, count_vectors, read_vectors):
        with _raises_naming(path, "unknown vector file suffix", ".fvecs", ".npy"):
            call(path)
    with _raises_naming(path, "unknown vector file suffix"):
        write_vectors(path, np.zeros((1, 1), np.float32))


@pytest.mark.parametrize("suffix", [".fvecs", ".fbin", ".npy"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_raise(tmp_path, suffix, bad):
    path = tmp_path / f"x{suffix}"
    x = _random(".fvecs", 8, 3)
    x[5, 2] = bad
    if suffix == ".npy":
        write_vectors(path, x)  # .npy stores arrays as they are
    elif suffix == ".fbin":
        path.write_bytes(np.array([8, 3], "<u4").tobytes() + x.tobytes())
    else:
        path.write_bytes(b"".join(np.int32(3).tobytes() + row.tobytes() for row in x))
    assert open_vectors(path).shape == (8, 3)  # opening reads no values
    with _raises_naming(path, "row 5", "NaN or Inf", "check_finite=False"):
        read_vectors(path)
    np.testing.assert_array_equal(read_vectors(path, 0, 5), x[:5])
    np.testing.assert_array_equal(read_vectors(path, check_finite=False), x)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), ()])
def test_npy_wrong_rank_raises(tmp_path, shape):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(shape, np.float32))
    with _raises_naming(path, f"rank {len(shape)}", "2-D"):
        open_vectors(path)


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"not a numpy file at all", ["not a valid .npy file"]),
        (None, ["dtype complex64"]),
    ],
)
def test_npy_invalid_raises(tmp_path, payload, words):
    path = tmp_path / "x.npy"
    if payload is None:
        np.save(path, np.zeros((2, 2), np.complex64))
    else:
        path.write_bytes(payload)
    with _raises_naming(path, *words):
        open_vectors(path)


def test_empty_fbin_and_npy_are_valid(tmp_path):
    (tmp_path / "x.fbin").write_bytes(np.array([0, 5], "<u4").tobytes())
    np.save(tmp_path / "x.npy", np.zeros((0, 5), np.float16))
    for name in ("x.fbin", "x.npy"):
        assert count_vectors(tmp_path / name) == (0, 5)
        assert read_vectors(tmp_path / name).shape == (0, 5)


# --- real data ----------------------------------------------------------------------------------


def _data_root() -> Path | None:
    candidates = [os.environ.get("QINCO2_DATA"), "/work/shared/data"]
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for root in candidates:
        if root and Path(root).is_dir():
            return Path(root)
    return None


@pytest.mark.parametrize(
    ("relpath", "shape", "dtype"),
    [
        ("siftsmall/siftsmall_query.fvecs", (100, 128), np.float32),
        ("sift-photos/query.bvecs", (1000, 128), np.uint8),
    ],
)
def test_real_files(relpath, shape, dtype):
    root = _data_root()
    if root is None or not (root / relpath).is_file():
        pytest.skip(f"{relpath} not found (set QINCO2_DATA)")
    path = root / relpath
    assert count_vectors(path) == shape
    x = read_vectors(path)
    assert x.shape == shape and x.dtype == dtype
    np.testing.assert_array_equal(x[10:20], read_vectors(path, 10, 20))
    assert read_vectors(path, dtype=np.float32).dtype == np.float32
