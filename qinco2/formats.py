"""Readers and writers for the vector file formats of ANN benchmarks (spec section 1.1).

All multi-byte values are little-endian.

* ``.fvecs`` / ``.bvecs`` / ``.ivecs``: one record per vector, an int32 dimension ``d``
  followed by ``d`` float32 / uint8 / int32 values; file size ``n * (4 + d * itemsize)``.
* ``.fbin`` / ``.u8bin`` / ``.ibin`` (big-ann-benchmarks): a header ``uint32 n, uint32 d``,
  then ``n * d`` float32 / uint8 / int32 values, row-major; file size ``8 + n * d * itemsize``.
* ``.npy``: a 2-D NumPy array of an integer or float dtype.

`open_vectors` memory-maps a file as an ``(N, D)`` array and reads no vector data,
`count_vectors` returns ``(N, D)`` from the header and size, `read_vectors` copies a block of
rows into memory, `verify_vectors` checks a whole file, `write_vectors` writes any format
atomically, and `fbin_to_fvecs` converts files larger than RAM in chunks.

What is checked when (by :mod:`qinco2.formats_layout`):

* at open (`open_vectors`, `count_vectors`): the header and the file size only. For *vecs files
  that is the first record's dimension header, so opening the first rows of a 1B-row file
  reads 4 bytes, not the file; the memory-mapped view does not check the other headers.
* `read_vectors`: also the dimension header of every record it copies, and NaN/Inf.
* `verify_vectors` (or ``open_vectors(path, check="full")``): every record header of the file,
  read sequentially in bounded chunks, with a progress bar for big files.

Every malformed file (also a missing one) raises `VectorFileError`, naming the file, the problem
and how to fix it; a bad array or argument passed in raises `InputError`.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from qinco2.atomic import atomic_open
from qinco2.errors import InputError, VectorFileError
from qinco2.formats_layout import (
    BIN_DTYPES,
    VECS_DTYPES,
    VECTOR_SUFFIXES,
    Layout,
    PathLike,
    check_vecs_headers,
    inspect_vector_file,
    scan_vecs_headers,
    vector_suffix,
)
from qinco2.progress import progress_bar
from qinco2.tensor_io import accepts_tensors
from qinco2.validation import first_nonfinite

logger = logging.getLogger(__name__)

_VERIFY_CHUNK_BYTES = 64 << 20  # bytes of a *vecs file read per chunk by verify_vectors
_VERIFY_PROGRESS_BYTES = 1 << 30  # verify_vectors shows a progress bar from this file size on
_WRITE_CHUNK_BYTES = 64 << 20  # bytes of vector data converted and written per chunk
_FLOAT32_EXACT_INT = 1 << 24  # integers up to this magnitude are exact in float32
_INT32 = np.iinfo(np.int32)

__all__ = [
    "VECTOR_SUFFIXES",
    "count_vectors",
    "fbin_to_fvecs",
    "open_vectors",
    "read_vectors",
    "verify_vectors",
    "write_vectors",
]


def count_vectors(path: PathLike) -> tuple[int, int]:
    """Return ``(N, D)`` of a vector file from its header and size only (reads no vectors)."""
    _, _, layout = inspect_vector_file(path)
    return layout.n, layout.d


def open_vectors(path: PathLike, *, check: Literal["first", "full"] = "first") -> np.ndarray:
    """Memory-map a vector file as an ``(N, D)`` array in the file's own dtype.

    No vector data is read. For *vecs files the result is a strided view of the records
    without their dimension header. ``check="first"`` (the default) checks the header and the
    file size only: for *vecs files the first record's dimension, not the others (accessing
    the view does not check them; `read_vectors` does, for the rows it copies).
    ``check="full"`` first checks every record header, as `verify_vectors` does.
    """
    if check not in ("first", "full"):
        raise InputError(f"open_vectors: check must be 'first' or 'full', got {check!r}.")
    p, suffix, layout = inspect_vector_file(path)
    if check == "full":
        _verify(p, suffix, layout, progress=None, chunk_rows=None)
    return _map_vectors(p, suffix, layout)[0]


def _map_vectors(p: Path, suffix: str, layout: Layout) -> tuple[np.ndarray, np.ndarray | None]:
    """Memory-mapped ``(x_ND, headers_N)``: the vectors, and for *vecs files their int32 headers.

    Both are views of a memory map; nothing is read until they are accessed.
    """
    if layout.n * layout.d == 0:
        return np.empty((layout.n, layout.d), dtype=layout.dtype), None
    if suffix in VECS_DTYPES:
        raw_NB = np.memmap(p, dtype=np.uint8, mode="r", shape=(layout.n, layout.record_bytes))
        return raw_NB[:, 4:].view(layout.dtype), raw_NB[:, :4].view("<i4")[:, 0]
    order = "F" if layout.fortran else "C"
    shape = (layout.n, layout.d)
    x_ND = np.memmap(p, dtype=layout.dtype, mode="r", offset=layout.offset, shape=shape, order=order)
    return x_ND, None


def verify_vectors(
    path: PathLike, *, progress: bool | None = None, chunk_rows: int | None = None
) -> tuple[int, int]:
    """Check a whole vector file and return its ``(N, D)``; raise `VectorFileError` if broken.

    Beyond the header and size checked at open, every *vecs record's dimension header is
    checked, reading the file sequentially ``chunk_rows`` records at a time (default: 64 MiB
    worth), so memory stays bounded. ``progress=None`` shows a progress bar for files of
    1 GiB or more. Vector values are not checked (`read_vectors` checks NaN/Inf).
    """
    p, suffix, layout = inspect_vector_file(path)
    _verify(p, suffix, layout, progress=progress, chunk_rows=chunk_rows)
    return layout.n, layout.d


def _verify(p: Path, suffix: str, layout: Layout, *, progress: bool | None, chunk_rows: int | None) -> None:
    """Check every record header of a *vecs file (other formats have only the one header)."""
    if suffix not in VECS_DTYPES:
        return
    if chunk_rows is None:
        chunk_rows = max(1, _VERIFY_CHUNK_BYTES // layout.record_bytes)
    if operator.index(chunk_rows) <= 0:
        raise InputError(f"verify_vectors: chunk_rows must be a positive integer, got {chunk_rows}.")
    if progress is None:
        progress = layout.n * layout.record_bytes >= _VERIFY_PROGRESS_BYTES
    bar = progress_bar(total=layout.n, unit="vec", desc=f"checking {p.name}", disable=not progress)
    with bar:
        for rows in scan_vecs_headers(p, layout, chunk_rows):
            bar.update(rows)


def read_vectors(
    path: PathLike,
    start: int = 0,
    stop: int | None = None,
    *,
    dtype: npt.DTypeLike | None = None,
    check_finite: bool = True,
) -> np.ndarray:
    """Read rows ``[start, stop)`` of a vector file into a C-contiguous in-memory array.

    Only those rows are read, and for *vecs files the dimension header of each of them is
    checked. ``dtype=None`` keeps the file's dtype (native byte order); otherwise the rows are
    converted (``same_kind`` casting, e.g. uint8 or float16 to float32).
    With ``check_finite``, float results holding NaN or Inf raise `VectorFileError`.
    """
    p, suffix, layout = inspect_vector_file(path)
    x_ND, headers_N = _map_vectors(p, suffix, layout)
    start, stop = _row_range(path, layout.n, start, stop)
    target = x_ND.dtype.newbyteorder("=") if dtype is None else np.dtype(dtype)
    if not np.can_cast(x_ND.dtype, target, casting="same_kind"):
        raise InputError(
            f"{path}: cannot convert the file's {x_ND.dtype} vectors to {target} without losing "
            "values; read them with dtype=None and convert explicitly."
        )
    if headers_N is not None:
        check_vecs_headers(p, headers_N[start:stop], layout.d, first_row=start)
    with np.errstate(over="ignore"):
        block_ND = np.array(x_ND[start:stop], dtype=target, order="C")
    if check_finite and target.kind == "f":
        bad = first_nonfinite(block_ND)
        if bad is not None:
            note = "" if target == x_ND.dtype else f" (after conversion to {target})"
            raise VectorFileError(
                f"{path}: row {start + bad} holds NaN or Inf{note}. Clean the data (drop or "
                "replace the row) and rewrite the file, or pass check_finite=False "
                "to read it anyway."
            )
    return block_ND


def _row_range(path: PathLike, n: int, start: int, stop: int | None) -> tuple[int, int]:
    """``(start, stop)`` as integers, or raise `InputError` unless ``0 <= start <= stop <= n``."""
    start = operator.index(start)
    stop = n if stop is None else operator.index(stop)
    if not 0 <= start <= stop <= n:
        raise InputError(
            f"{path}: rows [{start}, {stop}) are out of range for a file of {n} vectors; "
            f"use 0 <= start <= stop <= {n}."
        )
    return start, stop


@accepts_tensors
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
            bad = first_nonfinite(chunk_ND) if target.kind == "f" else None
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
    if path.is_dir():
        raise VectorFileError(
            f"cannot write {path}: it is a directory; give the name of a file to write."
        )
    if path.parent.exists() and not path.parent.is_dir():
        raise VectorFileError(
            f"cannot write {path}: {path.parent} is a file, not a directory; choose another path."
        )
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
    bar = progress_bar(total=n, unit="vec", desc=f"{src_p.name} -> {dst_p.name}", disable=not progress)
    with bar, _atomic_open(dst_p) as f:
        for start, chunk_ND in _converted_chunks(x_ND, np.dtype("<f4"), chunk_rows):
            bad = first_nonfinite(chunk_ND)
            if bad is not None:
                raise VectorFileError(
                    f"{src_p}: row {start + bad} holds NaN or Inf; clean the source data before "
                    "converting it."
                )
            f.write(memoryview(_vecs_records(chunk_ND)))
            bar.update(len(chunk_ND))
    logger.info("converted %s (%d x %d) to %s", src_p, n, d, dst_p)
