"""The streamed synthetic generator behind the scale benchmark's files."""

from __future__ import annotations

import numpy as np
import pytest

from qinco2 import InputError, open_vectors
from qinco2.synthetic import stream_synthetic, synthetic_vectors, write_synthetic


def test_streamed_rows_follow_the_embedded_distribution_block_by_block(tmp_path):
    blocks = list(stream_synthetic(5000, chunk_rows=2048))
    assert [len(b) for b in blocks] == [2048, 2048, 904] and all(b.dtype == np.uint8 for b in blocks)
    x = np.concatenate(blocks).astype(np.float32)
    ref = synthetic_vectors(0)["base"]
    assert abs(x.mean() - ref.mean()) < 0.05 * ref.mean() and abs(x.std() - ref.std()) < 0.05 * ref.std()
    other = next(stream_synthetic(100, stream=2))
    assert not np.array_equal(other, blocks[0][:100])              # another stream: other rows
    path = write_synthetic(tmp_path / "x.npy", 5000, chunk_rows=2048)
    np.testing.assert_array_equal(open_vectors(path), x)           # the same rows, on disk
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]
    with pytest.raises(InputError, match=".npy"):
        write_synthetic(tmp_path / "x.fvecs", 10)
