"""The one code-packing function, against a bit-by-bit reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qinco2.errors import InputError
from qinco2.packing import pack_codes, packed_bytes, unpack_codes


def _reference_pack(codes_NS: np.ndarray, bits: int) -> np.ndarray:
    """Obvious little-endian bit stream: bit b of code s goes to stream bit s * bits + b."""
    N, S = codes_NS.shape
    out = np.zeros((N, (S * bits + 7) // 8), np.uint8)
    for n in range(N):
        for s in range(S):
            for b in range(bits):
                if (int(codes_NS[n, s]) >> b) & 1:
                    pos = s * bits + b
                    out[n, pos // 8] |= 1 << (pos % 8)
    return out


@pytest.mark.parametrize("bits,S", [(4, 6), (5, 8), (6, 4), (7, 8), (8, 5), (3, 7), (12, 5), (16, 3)])
def test_pack_matches_reference_and_round_trips(bits, S):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(9, S))
    codes[0] = (1 << bits) - 1                          # all ones: every bit field full
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (9, packed_bytes(S, bits))
    np.testing.assert_array_equal(packed, _reference_pack(codes, bits))
    np.testing.assert_array_equal(unpack_codes(packed, S, bits), codes)
    t = pack_codes(torch.from_numpy(codes), bits)       # torch in, torch out, same bytes
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), packed)
    np.testing.assert_array_equal(unpack_codes(t, S, bits).numpy(), codes)


def test_pack_refuses_codes_that_do_not_fit():
    with pytest.raises(InputError, match=r"\[0, 2\^4\)"):
        pack_codes(np.array([[3, 16]]), 4)
    with pytest.raises(InputError, match="2-D integer"):
        pack_codes(np.zeros((2, 3), np.float32), 8)
    with pytest.raises(InputError, match="bytes per row"):
        unpack_codes(np.zeros((2, 3), np.uint8), 8, 4)
