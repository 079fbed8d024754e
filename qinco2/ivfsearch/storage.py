"""The rows an :class:`~qinco2.ivfsearch.index.IVFQincoIndex` holds: arrays that grow block by
block (its packed codes and user ids), vectors normalised as they are read (the ``cosine``
metric) and the check of user ids."""

from __future__ import annotations

import numpy as np

from ..errors import InputError


def unit_rows(x_nD) -> np.ndarray:
    """Float32 rows scaled to unit L2 norm (all-zero rows stay zero)."""
    x = np.array(x_nD, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))
    return x


class UnitRows:
    """Rows of ``x`` normalised as they are read by row slices (``len``, ``shape``, ``[a:b]``)."""

    ndim, dtype = 2, np.dtype(np.float32)

    def __init__(self, x):
        self.x, self.shape = x, x.shape

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, rows) -> np.ndarray:
        return unit_rows(self.x[rows])


class GrowingRows:
    """Rows appended block by block to an array whose capacity doubles (amortised O(1) per row);
    a read-only array (a memory map) is copied into memory on the first append."""

    def __init__(self, rows: np.ndarray):
        self._a, self._n = rows, len(rows)

    def __len__(self) -> int:
        return self._n

    @property
    def rows(self) -> np.ndarray:
        return self._a[:self._n]

    def append(self, new: np.ndarray) -> None:
        n = self._n + len(new)
        if n > len(self._a) or not self._a.flags.writeable:
            grown = np.empty((max(n, 2 * self._n, 1024), *self._a.shape[1:]), dtype=self._a.dtype)
            grown[:self._n] = self._a[:self._n]
            self._a = grown
        self._a[self._n:n] = new
        self._n = n


def check_ids(ids, n: int) -> np.ndarray:
    """User ids: ``n`` integers >= 0 (-1 means "no result" in search outputs), as int64."""
    a = np.asarray(ids)
    if a.ndim != 1 or len(a) != n or a.dtype.kind not in "iu":
        raise InputError(f"ids must be a 1-D integer array with one id per vector ({n}), got "
                         f"{a.dtype} {a.shape}; pass e.g. np.arange(n, dtype=np.int64) + offset")
    if n and (a.min() < 0 or a.max() > np.iinfo(np.int64).max):
        raise InputError(f"ids must lie in [0, 2**63) (-1 marks a missing result), got [{a.min()}, {a.max()}]")
    return a.astype(np.int64)
