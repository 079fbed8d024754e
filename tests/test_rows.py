"""RowStack: two row arrays read as one by row slices, never copied whole."""

from __future__ import annotations

import numpy as np
import pytest

from qinco2.rows import RowStack


class _Recording(np.ndarray):
    """An array that records the row slices read from it."""

    def __getitem__(self, key):
        if isinstance(key, slice):
            self.reads.append(len(range(*key.indices(len(self)))))
        return np.asarray(super().__getitem__(key))


def _recording(a: np.ndarray) -> _Recording:
    out = a.view(_Recording)
    out.reads = []
    return out


def test_slices_across_parts_read_only_the_rows_asked_for():
    a, b = np.arange(30, dtype=np.float32).reshape(10, 3), np.arange(12, dtype=np.uint8).reshape(4, 3)
    ra, rb = _recording(a), _recording(b)
    rows = RowStack([ra, rb])
    assert rows.shape == (14, 3) and len(rows) == 14 and rows.dtype == np.float32
    want = np.concatenate([a, b.astype(np.float32)])
    for lo, hi in [(0, 14), (8, 12), (10, 14), (3, 5), (12, 99), (5, 5)]:
        np.testing.assert_array_equal(rows[lo:hi], want[lo:hi])
    assert ra.reads == [10, 2, 2] and rb.reads == [4, 2, 4, 2]
    np.testing.assert_array_equal(np.asarray(rows), want)
    with pytest.raises(TypeError, match="row slices"):
        rows[[1, 2]]
