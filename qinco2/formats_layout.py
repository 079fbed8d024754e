"""On-disk layout of each vector file format: suffixes, dtypes, headers and size checks.

:func:`inspect_vector_file` reads a file's header and size (no vector data) and returns
its :class:`Layout`, or raises `VectorFileError` saying what is wrong and how to fix it.
For ``.fvecs``/``.bvecs``/``.ivecs`` only the first record's dimension header is read there
(4 bytes, whatever the file size); the size must be ``n * (4 + d * itemsize)``. The other
records' headers are checked when their rows are read (:func:`check_vecs_headers`) or by
a full scan on demand (:func:`scan_vecs_headers`, chunked so memory stays bounded).
The formats themselves are described in :mod:`qinco2.formats`, which reads and writes them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qinco2.errors import VectorFileError

PathLike = str | os.PathLike[str]

VECTOR_SUFFIXES = (".fvecs", ".bvecs", ".ivecs", ".fbin", ".u8bin", ".ibin", ".npy")
VECS_DTYPES = {".fvecs": np.dtype("<f4"), ".bvecs": np.dtype("u1"), ".ivecs": np.dtype("<i4")}
BIN_DTYPES = {".fbin": np.dtype("<f4"), ".u8bin": np.dtype("u1"), ".ibin": np.dtype("<i4")}

_HEADER_CHECK_ROWS = 1 << 20  # *vecs dimension headers compared per chunk
NPY_MAGIC = b"\x93NUMPY"  # the first bytes of a .npy file
ZIP_MAGIC = b"PK\x03\x04"  # the first bytes of a zip archive (.npz, torch.save files)


@dataclass(frozen=True)
class Layout:
    """Shape and placement of the vectors in a file, derived from its header and size."""

    n: int
    d: int
    dtype: np.dtype
    offset: int = 0  # bytes before the first row (npy header, fbin header)
    record_bytes: int = 0  # *vecs only: bytes per record, dimension header included
    fortran: bool = False  # npy only: column-major storage


def vector_suffix(path: Path) -> str:
    """Return the lower-case suffix of ``path``, or raise if it is not a known vector format."""
    suffix = path.suffix.lower()
    if suffix not in VECTOR_SUFFIXES:
        raise VectorFileError(
            f"{path}: unknown vector file suffix {path.suffix!r}; expected one of "
            f"{', '.join(VECTOR_SUFFIXES)}. Rename the file to its real format or convert it."
        )
    return suffix


def inspect_vector_file(path: PathLike) -> tuple[Path, str, Layout]:
    """Check that ``path`` exists with a known suffix and read its layout (no vector data).
    A file whose content is of another format than its suffix says (e.g. a ``.npy`` file
    renamed ``.fvecs``) is reported as such, with the suffix to rename it to."""
    p = Path(path)
    if p.is_dir():
        raise VectorFileError(f"{p}: is a directory, not a vector file; give the path of a file in it.")
    suffix = vector_suffix(p)
    if not p.is_file():
        what = "does not exist" if not p.exists() else "is not a regular file"
        raise VectorFileError(f"{p}: {what}; check the path.")
    size = p.stat().st_size
    if size == 0:
        raise VectorFileError(
            f"{p}: empty file (0 bytes); it was probably not written completely. "
            "Regenerate or re-download it."
        )
    if suffix in VECS_DTYPES:
        layout = _vecs_layout(p, suffix, size)
    elif suffix in BIN_DTYPES:
        layout = _bin_layout(p, suffix, size)
    else:
        layout = _npy_layout(p, size)
    return p, suffix, layout


# ---------------------------------------------------------------------------
# content of another format than the suffix says


def _fits_vecs(p: Path, size: int, head: bytes, itemsize: int) -> bool:
    """Whether the file is two or more whole records of ``itemsize``-byte values, its second
    header equal to the first (one record alone is no evidence: a truncated file may fit)."""
    if len(head) < 4:
        return False
    d = int(np.frombuffer(head[:4], dtype="<i4")[0])
    record = 4 + d * itemsize
    if d <= 0 or size % record or size < 2 * record:
        return False
    with open(p, "rb") as f:
        f.seek(record)
        return f.read(4) == head[:4]


def _fits_bin(size: int, head: bytes, itemsize: int) -> bool:
    if len(head) < 8:
        return False
    n, d = (int(v) for v in np.frombuffer(head[:8], dtype="<u4"))
    return d > 0 and 8 + n * d * itemsize == size


def _other_format(p: Path, size: int, suffix: str) -> VectorFileError | None:
    """The error saying which other format the content of ``p`` looks like, or None."""
    with open(p, "rb") as f:
        head = f.read(8)
    if head.startswith(NPY_MAGIC):
        return _renamed(p, suffix, [".npy"], "it starts with the NumPy magic b'\\x93NUMPY'")
    if head.startswith(ZIP_MAGIC):
        return VectorFileError(
            f"{p}: the content is a zip archive (a .npz file, or a torch/qinco2 model file), not a "
            f"{suffix} vector file. Save the vectors with numpy.save (a .npy file) or qinco2.formats."
            "write_vectors, and pass that file."
        )
    fits = [s for s, t in VECS_DTYPES.items() if s != suffix and _fits_vecs(p, size, head, t.itemsize)]
    if fits:
        return _renamed(p, suffix, fits, "its size and record headers fit one int32 dimension header per vector")
    fits = [s for s, t in BIN_DTYPES.items() if s != suffix and _fits_bin(size, head, t.itemsize)]
    if fits:      # a truncated file may fit another item size: not sure
        return _renamed(p, suffix, fits, "its size is that of its (n, d) uint32 header", sure=False)
    return None


def _renamed(p: Path, suffix: str, fits: list[str], why: str, sure: bool = True) -> VectorFileError:
    names = " or ".join(p.with_suffix(s).name for s in fits)
    fix = (f"The file was probably renamed: rename it to {names} (its real format), or convert it." if sure else
           f"If it is one, rename it to {names}; otherwise it is damaged: re-download or regenerate it.")
    kind = " or ".join(fits)
    return VectorFileError(f"{p}: the content looks like a {kind} file, not a {suffix} file ({why}). {fix}")


def _vecs_layout(p: Path, suffix: str, size: int) -> Layout:
    dtype = VECS_DTYPES[suffix]
    with open(p, "rb") as f:
        head = f.read(4)
    if len(head) < 4:
        raise VectorFileError(
            f"{p}: file of {size} bytes is shorter than one 4-byte record header; "
            "the file is truncated. Regenerate or re-download it."
        )
    if head == NPY_MAGIC[:4]:
        raise _renamed(p, suffix, [".npy"], "it starts with the NumPy magic b'\\x93NUMPY'")
    d = int(np.frombuffer(head, dtype="<i4")[0])
    if d <= 0:
        raise _other_format(p, size, suffix) or VectorFileError(
            f"{p}: the first record header says dimension {d}, but a {suffix} record starts with a "
            f"positive int32 dimension. Is this really a {suffix} file (not a renamed .fbin/.npy)?"
        )
    record = 4 + d * dtype.itemsize
    n, rest = divmod(size, record)
    if rest:
        other = _other_format(p, size, suffix)
        if other is not None:
            raise other
        if n == 0:
            raise VectorFileError(
                f"{p}: file size {size} bytes is smaller than the record size {record} bytes "
                f"(4-byte header + {d} x {dtype.itemsize}-byte values, d={d} from the first header): "
                f"the file is truncated within its first record, or is not a {suffix} file. "
                "Check its real format, or re-download or regenerate it."
            )
        raise VectorFileError(
            f"{p}: file size {size} bytes is not a multiple of the record size {record} bytes "
            f"(4-byte header + {d} x {dtype.itemsize}-byte values, d={d} from the first header): "
            f"the last record is truncated ({rest} bytes after {n} whole records). "
            f"Re-download or regenerate the file, or cut it to {n * record} bytes "
            f"to keep the {n} whole records."
        )
    return Layout(n=n, d=d, dtype=dtype, record_bytes=record)


def _bin_layout(p: Path, suffix: str, size: int) -> Layout:
    dtype = BIN_DTYPES[suffix]
    if size < 8:
        raise VectorFileError(
            f"{p}: file of {size} bytes is shorter than the 8-byte {suffix} header "
            "(uint32 n, uint32 d); the file is truncated. Re-download or regenerate it."
        )
    with open(p, "rb") as f:
        head = f.read(8)
    if head.startswith(NPY_MAGIC):
        raise _renamed(p, suffix, [".npy"], "it starts with the NumPy magic b'\\x93NUMPY'")
    n, d = (int(v) for v in np.frombuffer(head, dtype="<u4"))
    if d == 0:
        raise _other_format(p, size, suffix) or VectorFileError(
            f"{p}: the header says dimension d=0 (n={n}); the file is corrupt."
        )
    expected = 8 + n * d * dtype.itemsize
    if expected != size:
        problem = "truncated" if size < expected else "followed by extra bytes"
        raise _other_format(p, size, suffix) or VectorFileError(
            f"{p}: the header says n={n}, d={d}, so the file should be "
            f"8 + {n}*{d}*{dtype.itemsize} = {expected} bytes, but it is {size} bytes "
            f"(data {problem}). Re-download the file, or check that it really is a {suffix} "
            "file (not a renamed .fvecs)."
        )
    return Layout(n=n, d=d, dtype=dtype, offset=8)


def _npy_layout(p: Path, size: int) -> Layout:
    try:
        with open(p, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = f.tell()
    except (ValueError, EOFError) as e:
        raise _other_format(p, size, ".npy") or VectorFileError(
            f"{p}: not a valid .npy file ({e}); re-save it with numpy.save."
        ) from e
    if dtype.fields is not None or dtype.kind not in "iuf":
        raise VectorFileError(
            f"{p}: holds dtype {dtype}, expected an integer or float dtype; "
            "re-save it with x.astype(np.float32)."
        )
    if len(shape) != 2:
        raise VectorFileError(
            f"{p}: holds an array of shape {shape} (rank {len(shape)}), expected a 2-D (N, D) "
            "array; reshape it (e.g. x.reshape(len(x), -1)) and save it again."
        )
    expected = offset + shape[0] * shape[1] * dtype.itemsize
    if expected != size:
        problem = "truncated" if size < expected else "followed by extra bytes"
        raise VectorFileError(
            f"{p}: the .npy header says shape {shape} of {dtype}, so the file should be {expected} "
            f"bytes, but it is {size} bytes (data {problem}). Re-save or re-download it."
        )
    return Layout(n=shape[0], d=shape[1], dtype=dtype, offset=offset, fortran=fortran)


# ---------------------------------------------------------------------------
# *vecs record headers beyond the first one


def check_vecs_headers(p: Path, headers_R: np.ndarray, d: int, first_row: int = 0) -> None:
    """Raise `VectorFileError` if a header of records ``first_row, first_row + 1, ...`` is not ``d``.

    ``headers_R`` holds the int32 dimension headers of consecutive records (it may be a
    memory-mapped view: only those headers are read, in chunks).
    """
    for start in range(0, len(headers_R), _HEADER_CHECK_ROWS):
        chunk_C = np.asarray(headers_R[start : start + _HEADER_CHECK_ROWS])
        bad = np.flatnonzero(chunk_C != d)
        if bad.size:
            row = first_row + start + int(bad[0])
            raise VectorFileError(
                f"{p}: record {row} has dimension header {int(chunk_C[bad[0]])}, but record 0 "
                f"has {d}; all records must have the same dimension. The file is corrupt or "
                "was concatenated from files of different dimensions: regenerate or "
                "re-download it."
            )


def scan_vecs_headers(p: Path, layout: Layout, chunk_rows: int) -> Iterator[int]:
    """Check every record header of a *vecs file, reading ``chunk_rows`` records at a time.

    Reads the whole file sequentially into one reused buffer (memory stays bounded) and
    yields the number of records checked after each chunk, for a progress bar.
    """
    record = layout.record_bytes
    buf_RB = np.empty((max(1, min(chunk_rows, layout.n)), record), dtype=np.uint8)
    with open(p, "rb") as f:
        for start in range(0, layout.n, len(buf_RB)):
            chunk_RB = buf_RB[: min(len(buf_RB), layout.n - start)]
            got = f.readinto(memoryview(chunk_RB).cast("B"))
            if got != chunk_RB.nbytes:
                raise VectorFileError(
                    f"{p}: the file ended after {start * record + got} bytes while being checked "
                    f"({layout.n * record} expected); it was changed meanwhile. Check it again."
                )
            check_vecs_headers(p, chunk_RB[:, :4].view("<i4")[:, 0], layout.d, start)
            yield len(chunk_RB)
