"""Copy a QINCo1-architecture :class:`QincoModel` into faiss' C++ ``QINCo`` / ``IndexQINCo``
(faiss >= 1.9: per step a codebook, ``Linear(2D -> D)`` on ``[codeword; x_hat]``, ``L``
residual blocks; exhaustive greedy encoding). Needs ``de=None``, no IVF step, no codeword
skip. faiss works in the space it is given: feed it ``model.normalize(x)``.
"""

from __future__ import annotations

import faiss
import numpy as np

from ..errors import ConfigError
from .model import QincoModel


def _array(t) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().float().numpy())


def _check(model: QincoModel) -> None:
    cfg = model.cfg
    net = model.steps[1].net if len(model.steps) > 1 else None
    if cfg.ivf_K or cfg.E != cfg.D or (net is not None and net.codeword_skip):
        raise ConfigError("faiss QINCo needs a QINCo1-architecture model: de=None (d_e = D), "
                          f"no IVF step, no codeword skip; got {cfg}")


def fill_faiss_qinco(model: QincoModel, target) -> None:
    """Copy the weights of ``model`` into an existing ``faiss.QINCo`` of the same shape."""
    _check(model)
    target.codebook0.from_array(_array(model.steps[0].codebook))
    for m, step in enumerate(model.steps[1:]):
        dest = target.get_step(m)
        dest.codebook.from_array(_array(step.codebook))
        dest.MLPconcat.from_array(_array(step.net.fuse.weight), _array(step.net.fuse.bias))
        for l, block in enumerate(step.net.blocks):
            rb = dest.get_residual_block(l)
            rb.linear1.from_array(_array(block.up.weight))
            rb.linear2.from_array(_array(block.down.weight))


def to_faiss_qinco(model: QincoModel) -> "faiss.QINCo":
    """A ``faiss.QINCo(d, K, L, M, h)`` holding the weights of ``model``."""
    cfg = model.cfg
    target = faiss.QINCo(cfg.D, cfg.K, cfg.L, cfg.M, cfg.dh)
    fill_faiss_qinco(model, target)
    return target


def to_faiss_index_qinco(model: QincoModel) -> "faiss.IndexQINCo":
    """A trained, empty ``faiss.IndexQINCo`` (K must be a power of two) with the model's weights."""
    cfg = model.cfg
    nbits = cfg.K.bit_length() - 1
    if 1 << nbits != cfg.K:
        raise ConfigError(f"faiss.IndexQINCo needs K to be a power of two, got K={cfg.K}")
    index = faiss.IndexQINCo(cfg.D, cfg.M, nbits, cfg.L, cfg.dh)
    fill_faiss_qinco(model, index.qinco)
    index.is_trained = True
    return index
