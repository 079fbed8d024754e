"""Shared fixtures: tiny random-weight models, small clustered data, one trained codec."""

from __future__ import annotations

import json

import torch  # before faiss: one OpenMP runtime for both (qinco2.openmp)

# isort: split
import faiss
import numpy as np
import pytest
from torch import nn

from qinco2.codec.codec import QincoCodec
from qinco2.codec.model import ModelConfig, QincoModel

# The test tensors are tiny: one thread is as fast as several, avoids OpenMP spin-waits on a
# shared machine (a 20x6 matmul took ~20 ms with 2 threads under load) and fixes the
# reduction order, so CPU results are reproducible.
torch.set_num_threads(1)
faiss.omp_set_num_threads(1)


def _random_model(*, seed: int = 0, dtype=torch.float64, std: float = 0.5,
                  ivf_centroids: torch.Tensor | None = None, **fields) -> QincoModel:
    """A model whose every parameter (codebooks, pre-selectors, all weights) is N(0, std^2).

    Random non-zero weights make every network term matter, so an encoder that skips or
    reorders a term gives different codes. float64 by default, so that exact code
    comparisons are not at the mercy of float32 near-ties.
    """
    torch.manual_seed(seed)
    model = QincoModel(ModelConfig(**fields).validated(), ivf_centroids)
    with torch.no_grad():
        for p in model.parameters():
            nn.init.normal_(p, std=std)
    return model.to(dtype)


@pytest.fixture
def make_model():
    """Factory: ``make_model(D=5, M=3, K=4, ...)`` -> random-weight :class:`QincoModel`."""
    return _random_model


def _random_codec(**fields) -> QincoCodec:
    """A codec around a random-weight float32 model (D=8, M=3, K=16, ... unless overridden):
    tests of codes files, packing and model files need no training."""
    model = _random_model(dtype=torch.float32, **{"D": 8, "M": 3, "K": 16, "L": 1, "de": 4, "dh": 8, "A": 4, "B": 2,
                                                  **fields})
    codec = QincoCodec(ModelConfig(**model.cfg.to_dict()))
    codec.model_, codec.model_config = model, model.cfg
    return codec


@pytest.fixture
def make_codec():
    """Factory: ``make_codec(ivf_K=16, ivf_centroids=..., ...)`` -> :class:`QincoCodec` of a random model."""
    return _random_codec


def _clustered(n: int, D: int = 16, C: int = 16, seed: int = 0) -> np.ndarray:
    """Gaussian clusters, each with its own random rotation and anisotropic spread.

    The local shape of the data depends on the cluster, which a shared RQ codebook cannot
    follow but an implicit (codeword-conditioned) codebook can.
    """
    rng = np.random.default_rng(seed)
    centres_CD = rng.normal(0.0, 4.0, (C, D))
    rotations_CDD = np.stack([np.linalg.qr(rng.standard_normal((D, D)))[0] for _ in range(C)])
    scales_D = 2.0 * np.arange(1, D + 1) ** -1.0
    labels_N = rng.integers(0, C, n)
    z_ND = rng.standard_normal((n, D)) * scales_D
    x_ND = centres_CD[labels_N] + np.einsum("nd,ned->ne", z_ND, rotations_CDD[labels_N])
    return x_ND.astype(np.float32)


@pytest.fixture(scope="session")
def clustered():
    """Factory: ``clustered(n, D=16, C=16, seed=0)`` -> float32 ``(n, D)``."""
    return _clustered


# Small architecture shared by the codec tests: D=16, M=3, K=16, QINCo2 with projections.
TINY_CODEC = dict(M=3, K=16, L=1, de=8, dh=16, A=4, B=4, batch=256, epochs=3, ramp_epochs=1,
                  lr=3e-3, max_epochs=3, seed=0)


@pytest.fixture
def tiny_codec_fields():
    """The preset overrides of :func:`trained_codec` (a fresh dict)."""
    return dict(TINY_CODEC)


@pytest.fixture(scope="session")
def codec_data():
    x = _clustered(2600, seed=1)
    return x[:2000], x[2000:]


@pytest.fixture(scope="session")
def trained_codec(codec_data):
    """One qinco2-S-shaped codec trained for 3 short epochs (read-only: do not mutate)."""
    x_train, x_val = codec_data
    return QincoCodec.from_preset("qinco2-S", **TINY_CODEC).train(x_train, x_val, progress=False)


def run_cli(capsys, *argv: str) -> tuple[int, str, str, dict | None]:
    """Run the CLI in-process: exit code, stdout, stderr and the parsed RESULT line."""
    from qinco2.cli.main import main
    rc = main(list(argv))
    out, err = capsys.readouterr()
    results = [json.loads(line[len("RESULT "):]) for line in out.splitlines()
               if line.startswith("RESULT ")]
    return rc, out, err, results[-1] if results else None


def _dies_after(codec, n_calls: int):
    """``codec.encode`` that raises KeyboardInterrupt (a kill) on call ``n_calls + 1``."""
    encode, calls = codec.encode, []

    def encode_or_die(*args, **kwargs):
        if len(calls) == n_calls:
            raise KeyboardInterrupt
        calls.append(1)
        return encode(*args, **kwargs)
    return encode_or_die


@pytest.fixture
def dies_after():
    """Factory: ``dies_after(codec, n)`` -> a ``codec.encode`` killed (KeyboardInterrupt) on call n + 1."""
    return _dies_after
