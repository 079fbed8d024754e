"""Packed codes: the byte layout (checked against a byte-by-byte reference), the codec's
``packed=True`` encode/decode, and the lazy PackedCodes view that reads only the rows asked for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qinco2 import InputError
from qinco2.codec.code_layout import CodeLayout, PackedCodes, int_width
from qinco2.rerank import refine_with_codec


def _reference_pack(codes_Nm: np.ndarray, layout: CodeLayout) -> np.ndarray:
    """One value at a time, byte by byte, little-endian."""
    widths = [layout.ivf_bytes] * (1 if layout.ivf_K else 0) + [layout.step_bytes] * layout.M
    out = []
    for row in codes_Nm:
        b = []
        for value, w in zip(row.tolist(), widths, strict=True):
            b += [(value >> (8 * i)) & 0xFF for i in range(w)]
        out.append(b)
    return np.array(out, dtype=np.uint8).reshape(len(codes_Nm), layout.code_size)


def test_widths_are_the_smallest_integer_types():
    assert [int_width(n) for n in (2, 256, 257, 1 << 16, (1 << 16) + 1, 1 << 20, 1 << 32)] == [1, 1, 2, 2, 4, 4, 4]
    assert CodeLayout(M=8, K=256).code_size == 8                       # the advertised 8 bytes
    assert CodeLayout(M=8, K=256, ivf_K=1 << 16).code_size == 10
    assert CodeLayout(M=8, K=256, ivf_K=1 << 20).code_size == 12
    assert CodeLayout(M=4, K=4096).code_size == 8
    with pytest.raises(InputError, match="32 bits"):
        int_width((1 << 32) + 1)


@pytest.mark.parametrize("M,K,ivf_K", [(8, 256, 0), (3, 16, 16), (4, 300, 70_000), (2, 256, 1 << 20)])
def test_pack_matches_the_reference_and_unpacks_back(M, K, ivf_K):
    rng = np.random.default_rng(M + K)
    layout = CodeLayout(M=M, K=K, ivf_K=ivf_K)
    cols = [rng.integers(0, ivf_K, (50, 1))] if ivf_K else []
    codes = np.concatenate([*cols, rng.integers(0, K, (50, M))], axis=1).astype(np.int32)
    codes[0] = [ivf_K - 1] * bool(ivf_K) + [K - 1] * M                 # the largest values fit
    packed = layout.pack(codes)
    assert packed.dtype == np.uint8 and packed.shape == (50, layout.code_size)
    np.testing.assert_array_equal(packed, _reference_pack(codes, layout))
    np.testing.assert_array_equal(layout.unpack(packed), codes)
    with pytest.raises(InputError, match="must be uint8 of shape"):
        layout.unpack(packed[:, 1:])


def test_packed_codes_view_reads_only_the_rows_asked_for(monkeypatch):
    layout = CodeLayout(M=3, K=16, ivf_K=16)
    codes = np.random.default_rng(0).integers(0, 16, (1000, 4)).astype(np.int32)
    view = PackedCodes(layout.pack(codes), layout)
    unpacked = []
    unpack = CodeLayout.unpack
    monkeypatch.setattr(CodeLayout, "unpack", lambda self, b: unpacked.append(len(b)) or unpack(self, b))
    assert view.shape == (1000, 4) and len(view) == 1000 and view.dtype == np.int32
    part = view[100:300]
    assert isinstance(part, PackedCodes) and part.shape == (200, 4) and unpacked == []   # a view: no bytes read
    ids = np.array([5, 999, 5, 17])
    np.testing.assert_array_equal(view[ids], codes[ids])
    np.testing.assert_array_equal(view[17], codes[17])
    np.testing.assert_array_equal(view[ids, 1:], codes[ids, 1:])
    assert unpacked == [4, 1, 4]
    np.testing.assert_array_equal(np.asarray(part), codes[100:300])
    np.testing.assert_array_equal(part.astype(np.int64), codes[100:300])


def test_codec_encodes_and_decodes_packed_codes(make_codec):
    x = np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32)
    codec = make_codec(ivf_K=16, ivf_centroids=torch.from_numpy(x[:16].copy()))
    assert codec.code_size == 4 and codec.code_layout == CodeLayout(M=3, K=16, ivf_K=16)
    codes = codec.encode(x, batch_size=64)
    packed = codec.encode(x, packed=True, batch_size=64)
    np.testing.assert_array_equal(packed, codec.code_layout.pack(codes))
    np.testing.assert_array_equal(codec.decode(packed, packed=True, batch_size=50), codec.decode(codes))
    np.testing.assert_array_equal(codec.decode(PackedCodes(packed, codec.code_layout)), codec.decode(codes))
    with pytest.raises(InputError, match="code_size bytes per vector"):
        codec.decode(packed[:, :3], packed=True)


def test_refining_with_a_codes_file_reads_only_the_candidates(make_codec, monkeypatch):
    codec = make_codec()
    rng = np.random.default_rng(2)
    x, q = rng.normal(size=(2000, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
    view = PackedCodes(codec.encode(x, packed=True), codec.code_layout)
    candidates = rng.choice(2000, (5, 20), replace=False)
    unpacked = []
    unpack = CodeLayout.unpack
    monkeypatch.setattr(CodeLayout, "unpack", lambda self, b: unpacked.append(len(b)) or unpack(self, b))
    _, ids = refine_with_codec(codec, view, q, candidates, 3)
    assert sum(unpacked) == candidates.size                   # 100 of the 2000 rows
    monkeypatch.setattr(CodeLayout, "unpack", unpack)
    _, want = refine_with_codec(codec, codec.encode(x), q, candidates, 3)
    np.testing.assert_array_equal(ids, want)
