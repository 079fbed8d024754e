"""Readers and writers for the vector file formats of ANN benchmarks (spec section 1.1).

All multi-byte values are little-endian.

* ``.fvecs`` / ``.bvecs`` / ``.ivecs``: one record per vector, an int32 dimension ``d``
  followed by ``d`` float32 / uint8 / int32 values; file size ``n * (4 + d * itemsize)``.
* ``.fbin`` / ``.u8bin`` / ``.ibin`` (big-ann-benchmarks): a header ``uint32 n, uint32 d``,
  then ``n * d`` float32 / uint8 / int32 values, row-major; file size ``8 + n * d * itemsize``.
* ``.npy``: a 2-D NumPy array of an integer or float dtype.

`open_vectors` memory-maps a file as an ``(N, D)`` array and reads no vector data,
`count_vectors` returns ``(N, D)`` from the header and size, `read_vectors` copies a block of
rows into memory, `write_vectors` writes any format atomically, and `fbin_to_fvecs` converts
files larger than RAM in chunks. Headers and sizes are checked by :mod:`qinco2.formats_layout`.

Every malformed file (also a missing one) raises `VectorFileError`, naming the file, the problem
and how to fix it; a bad array or argument passed in raises `InputError`.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm.auto import tqdm

from qinco2.atomic import atomic_open
from qinco2.errors import InputError, VectorFileError
from qinco2.formats_layout import BIN_DTYPES, VECS_DTYPES, VECTOR_SUFFIXES, PathLike, inspect_vector_file, vector_suffix

logger = logging.getLogger(__name__)

_HEADER_CHECK_ROWS = 1 << 20  # *vecs dimension headers compared per chunk
_FINITE_CHECK_VALUES = 1 << 24  # values tested for NaN/Inf per chunk
_WRITE_CHUNK_BYTES = 64 << 20  # bytes of vector data converted and written per chunk
_FLOAT32_EXACT_INT = 1 << 24  # integers up to this magnitude are exact in float32
_INT32 = np.iinfo(np.int32)

__all__ = ["VECTOR_SUFFIXES", "count_vectors", "open_vectors", "read_vectors", "write_vectors",
           "fbin_to_fvecs"]


def count_vectors(path: PathLike) -> tuple[int, int]:
    """Return ``(N, D)`` of a vector file from its header and size only (reads no vectors)."""
    _, _, layout = inspect_vector_file(path)
    return layout.n, layout.d


def open_vectors(path: PathLike) -> np.ndarray:
    """Memory-map a vector file as an ``(N, D)`` array in the file's own dtype.

    No vector data is read. For *vecs files the result is a strided view of the records
    without their dimension header; every header is checked to hold the same dimension.
    """
    p, suffix, layout = inspect_vector_file(path)
    if layout.n * layout.d == 0:
        return np.empty((layout.n, layout.d), dtype=layout.dtype)
    if suffix in VECS_DTYPES:
        raw = np.memmap(p, dtype=np.uint8, mode="r", shape=(layout.n, layout.record_bytes))
        _check_vecs_headers(p, raw[:, :4].view("<i4")[:, 0], layout.d)
        return raw[:, 4:].view(layout.dtype)
    order = "F" if layout.fortran else "C"
    shape = (layout.n, layout.d)
    return np.memmap(
        p, dtype=layout.dtype, mode="r", offset=layout.offset, shape=shape, order=order
    )


def _check_vecs_headers(p: Path, headers_N: np.ndarray, d: int) -> None:
    """Raise if any *vecs record header differs from the first one (checked in chunks)."""
    for start in range(0, len(headers_N), _HEADER_CHECK_ROWS):
        chunk = np.asarray(headers_N[start : start + _HEADER_CHECK_ROWS])
        bad = np.flatnonzero(chunk != d)
        if bad.size:
            row = start + int(bad[0])
            raise VectorFileError(
                f"{p}: record {row} has dimension header {int(chunk[bad[0]])}, but record 0 "
                f"has {d}; all records must have the same dimension. The file is corrupt or "
                "was concatenated from files of different dimensions: regenerate or "
                "re-download it."
            )


def read_vectors(
    path: PathLike,
    start: int = 0,
    stop: int | None = None,
    *,
    dtype: npt.DTypeLike | None = None,
    check_finite: bool = True,
) -> np.ndarray:
    """Read rows ``[start, stop)`` of a vector file into a C-contiguous in-memory array.

    Only those rows are read. ``dtype=None`` keeps the file's dtype (native byte order);
    otherwise the rows are converted (``same_kind`` casting, e.g. uint8 or float16 to float32).
    With ``check_finite``, float results holding NaN or Inf raise `VectorFileError`.
    """
    x_ND = open_vectors(path)
    n = x_ND.shape[0]
    start = operator.index(start)
    stop = n if stop is None else operator.index(stop)
    if not 0 <= start <= stop <= n:
        raise InputError(
            f"{path}: rows [{start}, {stop}) are out of range for a file of {n} vectors; "
            f"use 0 <= start <= stop <= {n}."
        )
    target = x_ND.dtype.newbyteorder("=") if dtype is None else np.dtype(dtype)
    if not np.can_cast(x_ND.dtype, target, casting="same_kind"):
        raise InputError(
            f"{path}: cannot convert the file's {x_ND.dtype} vectors to {target} without losing "
            "values; read them with dtype=None and convert explicitly."
        )
    with np.errstate(over="ignore"):
        block_ND = np.array(x_ND[start:stop], dtype=target, order="C")
    if check_finite and target.kind == "f":
        bad = _first_nonfinite_row(block_ND)
        if bad is not None:
            note = "" if target == x_ND.dtype else f" (after conversion to {target})"
            raise VectorFileError(
                f"{path}: row {start + bad} holds NaN or Inf{note}. Clean the data (drop or "
                "replace the row) and rewrite the file, or pass check_finite=False "
                "to read it anyway."
            )
    return block_ND


def _first_nonfinite_row(x_ND: np.ndarray) -> int | None:
    """Index of the first row of a float array holding NaN or Inf, or None (checked in chunks)."""
    rows = max(1, _FINITE_CHECK_VALUES // max(1, x_ND.shape[1]))
    for start in range(0, x_ND.shape[0], rows):
        ok_N = np.isfinite(x_ND[start : start + rows]).all(axis=1)
        if not ok_N.all():
            return start + int(np.argmin(ok_N))
    return None


def write_vectors(path: PathLike, x: npt.ArrayLike) -> None:
    """Write a 2-D array to ``path`` in the format given by its suffix, atomically.

    ``.fvecs``/``.fbin`` take floats (stored as float32) or integers exact in float32,
    ``.bvecs``/``.u8bin`` integers in 0..255, ``.ivecs``/``.ibin`` integers fitting int32,
    ``.npy`` any integer or float array as is. The file is written to a temporary file in
    the same directory, synced and renamed, so readers never see a partial file.
    """
    p = Path(path)
    suffix = vector_suffix(p)
    x_ND = _check_array(p, x)
    if suffix == ".npy":
        with _atomic_open(p) as f:
            np.save(f, x_ND, allow_pickle=False)
        return
    is_vecs = suffix in VECS_DTYPES
    target = VECS_DTYPES[suffix] if is_vecs else BIN_DTYPES[suffix]
    _check_fits(p, x_ND, target, is_vecs)
    n, d = x_ND.shape
    rows = max(1, _WRITE_CHUNK_BYTES // (d * target.itemsize))
    with _atomic_open(p) as f:
        if not is_vecs:
            f.write(np.array([n, d], dtype="<u4").tobytes())
        for start, chunk_ND in _converted_chunks(x_ND, target, rows):
            bad = _first_nonfinite_row(chunk_ND) if target.kind == "f" else None
            if bad is not None:
                raise InputError(
                    f"{p}: row {start + bad} of the array is NaN, Inf or outside the float32 "
                    "range; clean the data before writing it."
                )
            f.write(memoryview(_vecs_records(chunk_ND) if is_vecs else chunk_ND))
    logger.debug("wrote %d x %d vectors to %s", n, d, p)


def _check_array(p: Path, x: npt.ArrayLike) -> np.ndarray:
    """Return ``x`` as a 2-D integer or float array, or raise `InputError`."""
    x_ND = np.asarray(x)
    if x_ND.ndim != 2:
        raise InputError(
            f"cannot write {p}: expected a 2-D (N, D) array, got shape {x_ND.shape} "
            f"(rank {x_ND.ndim}); reshape it, e.g. x.reshape(1, -1) for a single vector."
        )
    if x_ND.dtype.fields is not None or x_ND.dtype.kind not in "iuf":
        raise InputError(
            f"cannot write {p}: expected an integer or float array, got dtype {x_ND.dtype}; "
            "convert it, e.g. x.astype(np.float32)."
        )
    return x_ND


def _check_fits(p: Path, x_ND: np.ndarray, target: np.dtype, is_vecs: bool) -> None:
    """Raise `InputError` unless ``x_ND`` converts to ``target`` without changing values."""
    n, d = x_ND.shape
    if d == 0 or (is_vecs and n == 0) or max(n, d) > _INT32.max:
        raise InputError(
            f"cannot write {p}: a {p.suffix} file cannot store an array of shape {x_ND.shape}; "
            "use .npy for empty (or over 2**31 rows) arrays."
        )
    kind = x_ND.dtype.kind
    if target.kind == "f":
        if kind == "f" or x_ND.size == 0:
            return
        low, high = -_FLOAT32_EXACT_INT, _FLOAT32_EXACT_INT
        rule = "integers in [-2**24, 2**24] (exact in float32), or floats"
    elif kind == "f":
        raise InputError(
            f"cannot write {p}: a {p.suffix} file stores {target} integers, got a {x_ND.dtype} "
            "array; round and convert it explicitly, e.g. np.rint(x).astype(np.int32)."
        )
    elif target == np.uint8:
        low, high, rule = 0, 255, "integers in 0..255"
    else:
        low, high, rule = int(_INT32.min), int(_INT32.max), "integers fitting int32"
    if x_ND.size and (int(x_ND.min()) < low or int(x_ND.max()) > high):
        raise InputError(
            f"cannot write {p}: a {p.suffix} file stores {rule}, but the {x_ND.dtype} array holds "
            f"values in [{int(x_ND.min())}, {int(x_ND.max())}]; clip or rescale it, or use .npy."
        )


def _converted_chunks(
    x_ND: np.ndarray, dtype: np.dtype, rows: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, block)``: C-contiguous blocks of ``rows`` rows converted to ``dtype``."""
    for start in range(0, x_ND.shape[0], rows):
        yield start, _as_contiguous(x_ND[start : start + rows], dtype)


def _as_contiguous(x_ND: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """C-contiguous ``x_ND`` in ``dtype``; float overflow gives Inf, caught by the finite checks."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(x_ND, dtype=dtype)


def _vecs_records(chunk_ND: np.ndarray) -> np.ndarray:
    """Bytes of the *vecs records of a C-contiguous block: int32 dimension, then the row."""
    n, d = chunk_ND.shape
    records = np.empty((n, 4 + d * chunk_ND.itemsize), dtype=np.uint8)
    records[:, :4] = np.array([d], dtype="<i4").view(np.uint8)
    records[:, 4:] = chunk_ND.view(np.uint8).reshape(n, -1)
    return records


def _atomic_open(path: Path):
    """:func:`qinco2.atomic.atomic_open` of a vector file whose folder must exist."""
    if not path.parent.is_dir():
        raise VectorFileError(
            f"cannot write {path}: directory {path.parent} does not exist; create it first."
        )
    return atomic_open(path)


def fbin_to_fvecs(
    src: PathLike, dst: PathLike, *, chunk_rows: int = 1 << 20, progress: bool = False
) -> None:
    """Convert a ``.fbin`` file to ``.fvecs``, streaming ``chunk_rows`` rows at a time.

    Works for files larger than RAM (the source is memory-mapped); the output is written
    atomically and NaN/Inf rows in the source raise `VectorFileError`.
    """
    src_p, dst_p = Path(src), Path(dst)
    for p, wanted in ((src_p, ".fbin"), (dst_p, ".fvecs")):
        if p.suffix.lower() != wanted:
            raise VectorFileError(
                f"{p}: fbin_to_fvecs needs a {wanted} path here, got suffix {p.suffix!r}."
            )
    if operator.index(chunk_rows) <= 0:
        raise InputError(f"fbin_to_fvecs: chunk_rows must be a positive integer, got {chunk_rows}.")
    x_ND = open_vectors(src_p)
    n, d = x_ND.shape
    if n == 0:
        raise VectorFileError(
            f"{src_p}: holds no vectors, and a .fvecs file cannot store 0 vectors."
        )
    bar = tqdm(total=n, unit="vec", desc=f"{src_p.name} -> {dst_p.name}", disable=not progress)
    with bar, _atomic_open(dst_p) as f:
        for start, chunk_ND in _converted_chunks(x_ND, np.dtype("<f4"), chunk_rows):
            bad = _first_nonfinite_row(chunk_ND)
            if bad is not None:
                raise VectorFileError(
                    f"{src_p}: row {start + bad} holds NaN or Inf; clean the source data before "
                    "converting it."
                )
            f.write(memoryview(_vecs_records(chunk_ND)))
            bar.update(len(chunk_ND))
    logger.info("converted %s (%d x %d) to %s", src_p, n, d, dst_p)
