"""Parity with faiss' independent C++ QINCo1 codec (``faiss.QINCo``, ``faiss.IndexQINCo``).

A QINCo1-architecture model (d_e = D, no pre-selector, greedy, no codeword skip) with random
weights is copied into faiss by :mod:`qinco2.codec.faiss_export`; both must decode the same codes
to the same vectors and (exhaustive greedy) encode vectors to the same codes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")
if not hasattr(faiss, "QINCo"):
    pytest.skip("this faiss has no QINCo (needs faiss >= 1.9)", allow_module_level=True)

from qinco2.codec.encode import beam_search  # noqa: E402
from qinco2.codec.faiss_export import to_faiss_index_qinco, to_faiss_qinco  # noqa: E402
from qinco2.errors import ConfigError  # noqa: E402

D, K, M, L, H = 8, 16, 3, 2, 12


@pytest.fixture(scope="module")
def model():
    """qinco1 preset shape, random N(0, 0.3^2) weights, mean 0 / scale 1 (so that the raw
    space faiss sees is the model's normalised space), float32 like faiss."""
    from qinco2.codec.model import ModelConfig, QincoModel
    torch.manual_seed(0)
    m = QincoModel(ModelConfig.from_preset("qinco1", D=D, K=K, M=M, L=L, dh=H))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    assert not m.mean.any() and m.scale.item() == 1.0
    return m.requires_grad_(False)


def _vectors(n, seed=0):
    return np.random.default_rng(seed).normal(0.0, 1.5, (n, D)).astype(np.float32)


def test_faiss_decode_equals_ours(model):
    fq = to_faiss_qinco(model)
    assert (fq.d, fq.K, fq.M, fq.L, fq.h) == (D, K, M, L, H)
    codes = np.random.default_rng(1).integers(0, K, (300, M)).astype(np.int32)
    theirs = fq.decode(faiss.Int32Tensor2D(codes)).numpy()
    ours = model.decode(torch.as_tensor(codes, dtype=torch.long)).numpy()
    # two float32 implementations of the same network: 1e-5 of the data range
    assert np.abs(theirs - ours).max() <= 1e-5 * np.abs(ours).max()


def test_faiss_encode_equals_our_greedy_encode(model):
    fq = to_faiss_qinco(model)
    x = _vectors(500)
    theirs = fq.encode(faiss.Tensor2D(x)).numpy()
    ours, _ = beam_search(model, torch.as_tensor(x), A=0, B=1)
    mismatch = (theirs != ours.numpy()).any(1).mean()
    # both are exhaustive greedy searches; a differing float32 rounding can only flip a
    # near-tie between two candidates: allow 1% of the vectors (0 observed)
    assert mismatch <= 0.01
    assert not (theirs == theirs[:1]).all()  # the codes are not degenerate


def test_index_qinco_reconstructs_our_decoding(model):
    index = to_faiss_index_qinco(model)
    assert index.is_trained and index.code_size == (M * 4 + 7) // 8
    x = _vectors(400, seed=2)
    index.add(x)
    ours_codes, ours_xhat = beam_search(model, torch.as_tensor(x), A=0, B=1)
    theirs_codes = index.qinco.encode(faiss.Tensor2D(x)).numpy()
    same = (theirs_codes == ours_codes.numpy()).all(1)
    assert same.mean() >= 0.99  # as above: float32 near-ties only
    rec = index.reconstruct_n(0, len(x))
    np.testing.assert_allclose(rec[same], ours_xhat.numpy()[same], rtol=1e-5, atol=1e-5)
    # searching the index finds the database vector whose reconstruction is nearest
    _, ids = index.search(x[:20], 1)
    d = ((x[:20, None, :] - rec[None]) ** 2).sum(-1)
    assert (ids[:, 0] == d.argmin(1)).mean() >= 0.95


@pytest.mark.parametrize("fields", [dict(de=4), dict(de=None, codeword_skip=True, double_skip=True),
                                    dict(de=None, ivf_K=4)])
def test_models_faiss_cannot_run_are_refused(fields):
    from qinco2.codec.model import ModelConfig, QincoModel
    cfg = ModelConfig.from_preset("qinco1", **{**dict(D=D, K=K, M=M, L=L, dh=H), **fields})
    with pytest.raises(ConfigError):
        to_faiss_qinco(QincoModel(cfg))


def test_index_qinco_needs_a_power_of_two_k():
    from qinco2.codec.model import ModelConfig, QincoModel
    cfg = ModelConfig.from_preset("qinco1", D=D, K=12, M=2, L=1, dh=H)
    with pytest.raises(ConfigError, match="power of two"):
        to_faiss_index_qinco(QincoModel(cfg))
