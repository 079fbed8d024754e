"""Validation of the arrays that enter the library: one vector checker, one code checker.

Every entry point (codec, IVF, IVF-PQ, the IVF search pipeline, re-ranking) calls these, so the
same mistake gives the same message everywhere. The messages follow one pattern::

    {what} must be a 2-D numpy array (N, D), got {shape or type}; {fix}
    {what} has dtype {dtype} but must be {allowed}; convert it with {what}.astype(...)
    {what} has dimension {d} but {dim_owner}; {fix}
    {what} has {n} rows but {rows_owner}; {fix}
    {what} holds NaN or Inf values (first in row {r}); clean or drop those rows first
    {what} must have shape (N, {m}) ({columns_are}), got shape {shape}; {fix}
    {what}: values must lie in [0, {K_name}={K}), got [{lo}, {hi}]; {fix}

``what`` names the argument as the caller knows it (``x``, ``queries``, ``db_codes``); an
owner phrase says where the expectation comes from ("the codec was trained on D=96", "the
index has dim=128"). Nothing is copied: arrays come back as given (a memory map stays one),
and the finiteness of float vectors is checked chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .errors import InputError

FINITE_CHUNK_BYTES = 64 << 20  # bytes of float vectors tested for NaN/Inf at a time
VECTOR_KINDS = "iuf"           # default vector dtypes: signed/unsigned integers and floats
CODE_KINDS = "iu"


def _is_array(a) -> bool:
    """A numpy array, or an array-like of rows with a numpy dtype (such as the lazy
    :class:`~qinco2.codec.code_layout.PackedCodes` of a codes file)."""
    return isinstance(a, np.ndarray) or (isinstance(getattr(a, "dtype", None), np.dtype)
                                         and hasattr(a, "shape") and hasattr(a, "__getitem__"))


def _describe(a) -> str:
    return f"shape {a.shape}" if _is_array(a) else type(a).__name__


def _check_array(a, what: str, layout: str, kinds: str, kind_words: str, dtypes) -> None:
    """Type, rank and dtype of a 2-D array (``layout`` such as ``(N, D)``)."""
    if not _is_array(a):
        raise InputError(f"{what} must be a 2-D numpy array {layout}, got {_describe(a)}; "
                         f"convert it with np.asarray({what})")
    if a.ndim != 2:
        raise InputError(f"{what} must be a 2-D numpy array {layout}, got {_describe(a)}; "
                         f"use {what}.reshape(1, -1) for one row")
    if dtypes is not None:
        allowed = [np.dtype(t) for t in dtypes]
        ok, words, to = a.dtype in allowed, ", ".join(t.name for t in allowed), allowed[0].name
    else:
        ok, words = a.dtype.kind in kinds, kind_words
        to = "float32" if "f" in kinds else "int64"
    if not ok:
        raise InputError(f"{what} has dtype {a.dtype} but must be {words}; "
                         f"convert it with {what}.astype(np.{to})")


def _check_rows(a: np.ndarray, what: str, rows: int | None, rows_owner: str | None, fix: str | None) -> None:
    if rows is not None and len(a) != rows:
        raise InputError(f"{what} has {len(a)} rows but {rows_owner or f'{rows} are expected'}; "
                         f"{fix or f'pass exactly {rows} rows'}")


def first_nonfinite(x: np.ndarray, *, chunk_rows: int | None = None) -> int | None:
    """Index of the first row of ``x`` holding NaN or Inf, or None; rows are tested ``chunk_rows``
    at a time (default: about :data:`FINITE_CHUNK_BYTES`), so a memory-mapped array is read
    once and never copied whole. Integer arrays are always finite and are not read."""
    if x.dtype.kind not in "fc" or x.size == 0:
        return None
    if chunk_rows is None:
        chunk_rows = max(1, FINITE_CHUNK_BYTES // max(1, x.itemsize * x.shape[1]))
    for i in range(0, len(x), chunk_rows):
        ok_n = np.isfinite(x[i:i + chunk_rows]).all(axis=1)
        if not ok_n.all():
            return i + int(np.argmin(ok_n))
    return None


def check_finite(x: np.ndarray, what: str = "x", *, first_row: int = 0, row_ids=None,
                 chunk_rows: int | None = None) -> None:
    """:class:`InputError` naming the first row of ``x`` that holds NaN or Inf (found by
    :func:`first_nonfinite`). The row named is ``first_row + i``, or ``row_ids[i]`` when ``x``
    holds the rows ``row_ids`` of a larger array.
    """
    bad = first_nonfinite(x, chunk_rows=chunk_rows)
    if bad is not None:
        row = int(row_ids[bad]) if row_ids is not None else first_row + bad
        raise InputError(f"{what} holds NaN or Inf values (first in row {row}); "
                         "clean or drop those rows first")


def check_vectors(x, what: str = "x", dim: int | None = None, *, dim_owner: str | None = None,
                  rows: int | None = None, rows_owner: str | None = None, dtypes=None,
                  finite: bool = True, fix: str | None = None, chunk_rows: int | None = None) -> np.ndarray:
    """``x`` itself, checked to be vectors ``(N, D)``, or :class:`InputError`.

    ``x``: a numpy array (memory-mapped or not) of rank 2 whose dtype is an integer or float
    kind, or one of ``dtypes`` when given. ``dim``: the expected ``D``, with ``dim_owner``
    saying where it comes from ("the index has dim=128"). ``rows``: the expected ``N``, with
    ``rows_owner`` ("the codes have 1000 rows"). ``finite``: test float values for NaN/Inf,
    chunk by chunk (:func:`check_finite`). ``fix`` replaces the default remedy of the
    dimension and row errors.
    """
    _check_array(x, what, "(N, D)", VECTOR_KINDS, "an integer or float dtype", dtypes)
    if dim is not None and x.shape[1] != dim:
        raise InputError(f"{what} has dimension {x.shape[1]} but {dim_owner or f'D={dim} is expected'}; "
                         f"{fix or f'pass vectors of dimension {dim}'}")
    _check_rows(x, what, rows, rows_owner, fix)
    if finite:
        check_finite(x, what, chunk_rows=chunk_rows)
    return x


def _columns_spec(columns: int | tuple) -> tuple[str, Callable[[int], bool]]:
    """The shape ``(N, ...)`` in words for an exact count or an inclusive ``(lo, hi)`` range."""
    if isinstance(columns, tuple):
        lo, hi = columns
        spec = f"(N, m) with m >= {lo}" if hi is None else f"(N, m) with {lo} <= m <= {hi}"
        return spec, lambda m: m >= lo and (hi is None or m <= hi)
    return f"(N, {columns})", lambda m: m == columns


def _check_values(lo_M, hi_M, K_M, what: str, K_name: str, fix: str | None) -> None:
    """Column minima ``lo_M`` and maxima ``hi_M`` against bounds ``K_M`` (one or per column)."""
    for m in np.nonzero((lo_M < 0) | (hi_M >= K_M))[0][:1]:
        where, K = (what, K_M) if np.ndim(K_M) == 0 else (f"{what} column {m}", K_M[m])
        raise InputError(f"{where}: values must lie in [0, {K_name}={K}), got [{lo_M[m]}, {hi_M[m]}]; "
                         f"{fix or f'pass the {K_name} the codes were made with'}")


def check_codes(codes, K: int | Sequence[int] | None = None, what: str = "codes", *,
                columns: int | tuple | None = None, columns_are: str = "one column per step",
                rows: int | None = None, rows_owner: str | None = None, K_name: str = "K",
                fix: str | None = None) -> np.ndarray:
    """``codes`` itself, checked to be integer codes ``(N, M)``, or :class:`InputError`.

    ``K``: values must lie in ``[0, K)`` (a pass over the codes); a sequence gives one ``K``
    per column and the error names the column; None skips the pass (for codes checked block
    by block later). ``columns``: the expected ``M``, or an inclusive range ``(lo, hi)``
    (``hi`` None: no upper bound), ``columns_are`` saying what the columns hold. ``rows`` and
    ``rows_owner`` as in :func:`check_vectors`; ``K_name`` names the bound (``C`` for IVF
    ids); ``fix`` replaces the default remedy of the shape and value errors.
    """
    _check_array(codes, what, "(N, M)", CODE_KINDS, "an integer dtype", None)
    if columns is not None:
        spec, ok = _columns_spec(columns)
        if not ok(codes.shape[1]):
            raise InputError(f"{what} must have shape {spec} ({columns_are}), got shape {codes.shape}; "
                             f"{fix or 'pass the codes made for this model'}")
    _check_rows(codes, what, rows, rows_owner, fix)
    if K is None or codes.size == 0:
        return codes
    if np.ndim(K) == 0:                    # one bound: one minimum and maximum
        _check_values(np.array([codes.min()]), np.array([codes.max()]), int(K), what, K_name, fix)
        return codes
    if len(K) != codes.shape[1]:
        raise InputError(f"{what} must have shape (N, {len(K)}) (one column per K in {list(K)}), "
                         f"got shape {codes.shape}; {fix or 'pass the codes made for this model'}")
    _check_values(codes.min(axis=0), codes.max(axis=0), np.asarray(K), what, K_name, fix)
    return codes
