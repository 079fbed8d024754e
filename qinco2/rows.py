"""Several row arrays seen as one, without copying them: :class:`RowStack`.

A training split is often two memory maps (training rows, then validation rows) that later
stages read as one ``(N, D)`` array; concatenating them would copy the whole split into memory.
"""

from __future__ import annotations

import numpy as np


class RowStack:
    """Arrays ``(N_i, D)`` laid end to end, read by row slices: ``rows[a:b]`` copies only the
    rows ``a..b`` (as a numpy array in the parts' common dtype); ``len``, ``shape``, ``dtype``."""

    ndim = 2

    def __init__(self, parts):
        self.parts = [p for p in parts]
        self.offsets_P = np.cumsum([0] + [len(p) for p in self.parts])
        self.dtype = np.result_type(*[p.dtype for p in self.parts])
        self.shape = (int(self.offsets_P[-1]), self.parts[0].shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a RowStack is read by contiguous row slices only (rows[a:b])")
        start, stop, _ = key.indices(len(self))
        out = [np.asarray(p[max(start - lo, 0):min(stop - lo, len(p))])
               for p, lo in zip(self.parts, self.offsets_P[:-1].tolist(), strict=True)
               if max(start - lo, 0) < min(stop - lo, len(p))]
        if not out:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        return out[0].astype(self.dtype, copy=False) if len(out) == 1 else np.concatenate(out).astype(self.dtype)

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)
