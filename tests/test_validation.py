"""The shared input checks (qinco2.validation): each failure mode, chunked finiteness on a
memory map, code ranges, and one wording through several entry points."""

from __future__ import annotations

import re

import numpy as np
import pytest

from qinco2 import ivfpq, validation
from qinco2.errors import InputError
from qinco2.ivf import assign_to_centroids, train_ivf_centroids
from qinco2.ivfpq import IndexParams
from qinco2.rerank import refine
from qinco2.validation import check_codes, check_finite, check_vectors

X = np.arange(40, dtype=np.float32).reshape(10, 4)


# ----------------------------------------------------------------------------- vectors

@pytest.mark.parametrize("bad, kwargs, match", [
    ([[0.0] * 4], {}, r"x must be a 2-D numpy array \(N, D\), got list; convert it with np.asarray\(x\)"),
    (np.zeros(4, np.float32), {}, r"x must be a 2-D numpy array \(N, D\), got shape \(4,\); use x.reshape"),
    (np.zeros((2, 3, 4), np.float32), {}, r"2-D numpy array \(N, D\), got shape \(2, 3, 4\)"),
    (np.zeros((2, 4), bool), {}, r"x has dtype bool but must be an integer or float dtype; convert it with "
                                 r"x.astype\(np.float32\)"),
    (np.zeros((2, 4), np.complex64), {}, "has dtype complex64"),
    (np.zeros((2, 4), object), {}, "has dtype object"),
    (np.zeros((2, 4), np.float64), dict(dtypes=(np.float32, np.uint8)),
     "x has dtype float64 but must be float32, uint8"),
    (X, dict(dim=5, dim_owner="the index has dim=5"), "x has dimension 4 but the index has dim=5; "
                                                     "pass vectors of dimension 5"),
    (X, dict(dim=5), "x has dimension 4 but D=5 is expected"),
    (X, dict(rows=3, rows_owner="the codes have 3"), "x has 10 rows but the codes have 3; pass exactly 3 rows"),
    (X, dict(rows=3, fix="pass one row per code"), "x has 10 rows but 3 are expected; pass one row per code$"),
])
def test_each_vector_failure_has_its_message(bad, kwargs, match):
    with pytest.raises(InputError, match=match):
        check_vectors(bad, "x", **kwargs)


def test_good_vectors_come_back_as_given():
    for x in (X, X.astype(np.uint8), X.astype(np.int64), X.astype(np.float16), X[:0]):
        assert check_vectors(x, dim=4) is x
    assert check_vectors(X, dtypes=(np.float32,), rows=10) is X
    nan = X.copy()
    nan[3, 1] = np.nan
    assert check_vectors(nan, finite=False) is nan


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_names_the_first_bad_row(value):
    x = X.copy()
    x[7, 2], x[9, 0] = value, np.nan
    with pytest.raises(InputError, match=r"^x holds NaN or Inf values \(first in row 7\); clean or drop"):
        check_vectors(x)
    for chunk_rows in (1, 3, 7, 8, 100):      # a later chunk, the chunk's first row, one chunk
        with pytest.raises(InputError, match=r"\(first in row 7\)"):
            check_vectors(x, chunk_rows=chunk_rows)
    with pytest.raises(InputError, match=r"\(first in row 107\)"):
        check_finite(x, first_row=100)
    with pytest.raises(InputError, match=r"\(first in row 70\)"):
        check_finite(x, row_ids=np.arange(0, 100, 10))


def test_default_chunks_follow_the_byte_budget(monkeypatch):
    x = np.zeros((1000, 4), np.float32)
    x[901, 3] = np.inf
    seen = []
    isfinite = np.isfinite
    monkeypatch.setattr(validation, "FINITE_CHUNK_BYTES", 16 * 100)   # 100 rows of 16 bytes
    monkeypatch.setattr(np, "isfinite", lambda a: seen.append(len(a)) or isfinite(a))
    with pytest.raises(InputError, match=r"\(first in row 901\)"):
        check_vectors(x)
    assert seen == [100] * 10


def test_a_memory_map_is_read_chunk_by_chunk_never_copied(tmp_path, monkeypatch):
    path = tmp_path / "x.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(5000, 8))
    mm[:] = 1.0
    mm[4321, 5] = np.nan
    mm.flush()
    x = np.memmap(path, dtype=np.float32, mode="r", shape=(5000, 8))
    sizes = []
    isfinite = np.isfinite
    monkeypatch.setattr(np, "isfinite", lambda a: sizes.append(a.size) or isfinite(a))
    with pytest.raises(InputError, match=r"\(first in row 4321\)"):
        check_vectors(x, "db", 8, chunk_rows=1000)
    assert sizes == [1000 * 8] * 5                     # five chunks, the last one holds row 4321
    good = np.memmap(path, dtype=np.float32, mode="r", shape=(4000, 8))
    assert check_vectors(good, chunk_rows=1000) is good  # the memory map itself, not a copy


def test_integer_vectors_are_not_read_for_finiteness(monkeypatch):
    monkeypatch.setattr(np, "isfinite", lambda a: pytest.fail("integers were scanned"))
    check_vectors(np.zeros((5, 4), np.uint8))


# ----------------------------------------------------------------------------- codes

CODES = np.array([[0, 1, 2], [3, 0, 1]], np.int32)


@pytest.mark.parametrize("bad, kwargs, match", [
    ([[0, 1]], {}, r"codes must be a 2-D numpy array \(N, M\), got list"),
    (np.zeros(3, np.int32), {}, r"2-D numpy array \(N, M\), got shape \(3,\)"),
    (CODES.astype(np.float32), {}, r"codes has dtype float32 but must be an integer dtype; convert it with "
                                   r"codes.astype\(np.int64\)"),
    (CODES.astype(bool), {}, "has dtype bool"),
    (CODES, dict(columns=4, columns_are="M=4 columns"), r"codes must have shape \(N, 4\) \(M=4 columns\), "
                                                        r"got shape \(2, 3\)"),
    (CODES, dict(columns=(1, 2)), r"shape \(N, m\) with 1 <= m <= 2"),
    (CODES, dict(columns=(4, None)), r"shape \(N, m\) with m >= 4"),
    (CODES, dict(rows=5, rows_owner="the index holds 5 vectors"), "codes has 2 rows but the index holds 5"),
    (CODES, dict(K=3), r"codes: values must lie in \[0, K=3\), got \[0, 3\]; pass the K the codes were made"),
    (CODES - 1, dict(K=8), r"codes: values must lie in \[0, K=8\), got \[-1, 2\]"),
    (CODES, dict(K=[4, 4, 2]), r"codes column 2: values must lie in \[0, K=2\), got \[1, 2\]"),
    (CODES, dict(K=[4, 4]), r"shape \(N, 2\)"),
    (CODES[:, :1], dict(K=3, K_name="C", fix="were these made with these centroids?"),
     r"values must lie in \[0, C=3\), got \[0, 3\]; were these made with these centroids\?"),
])
def test_each_code_failure_has_its_message(bad, kwargs, match):
    with pytest.raises(InputError, match=match):
        check_codes(bad, what="codes", **kwargs)


def test_good_codes_come_back_as_given():
    for codes in (CODES, CODES.astype(np.uint8), CODES[:0]):
        assert check_codes(codes, 4, columns=3) is codes
    assert check_codes(CODES, [4, 2, 3], rows=2, columns=(1, 3)) is CODES
    assert check_codes(CODES + 100, None) is not None        # K=None: values not read


# ----------------------------------------------------------------------------- one wording

def _message(call, what: str) -> str:
    with pytest.raises(InputError) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(what + " ")
    return msg.replace(what, "<what>")


def test_the_same_bad_input_gets_the_same_message_everywhere(trained_codec, codec_data):
    x = codec_data[1][:300].copy()
    x[123, 4] = np.nan
    centroids = codec_data[0][:4]
    candidates = np.zeros((300, 2), np.int64)
    entry_points = {
        "codec.encode": (lambda: trained_codec.encode(x), "x"),
        "ivfpq.build": (lambda: ivfpq.build(IndexParams(n_lists=4, pq_dim=4), x), "dataset"),
        "train_ivf_centroids": (lambda: train_ivf_centroids(x, 4, progress=False), "x"),
        "assign_to_centroids": (lambda: assign_to_centroids(x, centroids), "x"),
        "rerank.refine": (lambda: refine(codec_data[0], x, candidates, 1), "queries"),
    }
    messages = {name: _message(call, what) for name, (call, what) in entry_points.items()}
    assert set(messages.values()) == {"<what> holds NaN or Inf values (first in row 123); "
                                      "clean or drop those rows first"}, messages
    one = x[0]                                           # a single vector, not a (1, D) batch
    ranks = {name: _message(call, what) for name, (call, what) in {
        "codec.encode": (lambda: trained_codec.encode(one), "x"),
        "ivfpq.build": (lambda: ivfpq.build(IndexParams(n_lists=4, pq_dim=4), one), "dataset"),
        "assign_to_centroids": (lambda: assign_to_centroids(one, centroids), "x"),
        "rerank.refine": (lambda: refine(codec_data[0], one, candidates, 1), "queries"),
    }.items()}
    assert set(ranks.values()) == {"<what> must be a 2-D numpy array (N, D), got shape (16,); "
                                   "use <what>.reshape(1, -1) for one row"}, ranks


def test_dimension_errors_name_their_owner(trained_codec, codec_data):
    x = codec_data[1][:20, :15]
    with pytest.raises(InputError, match=re.escape("x has dimension 15 but the codec was trained on D=16")):
        trained_codec.encode(x)
    with pytest.raises(InputError, match=re.escape("queries has dimension 15 but the dataset has dimension 16")):
        refine(codec_data[0], x, np.zeros((20, 1), np.int64), 1)
    with pytest.raises(InputError, match=re.escape("ivf_centroids has dimension 15 but the data have dimension 16")):
        assign_to_centroids(codec_data[1], x)
