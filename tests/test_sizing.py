"""Model size against training-set size (qinco2.codec.sizing) and its use by QincoCodec.train."""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np
import pytest

from qinco2.codec.codec import QincoCodec
from qinco2.codec.model import ModelConfig, QincoModel
from qinco2.codec.sizing import (
    MIXED_VALUES_PER_PARAMETER,
    SMALL_DATA_MIX,
    VALUES_PER_PARAMETER,
    fit_to_data,
    network_parameter_count,
    values_per_parameter,
)
from qinco2.datasets import DataLimits, resolve_dataset
from qinco2.errors import DatasetError
from qinco2.metrics import mse


@pytest.mark.parametrize("fields", [dict(de=8, A=4), dict(de=None, A=0), dict(de=8, A=4, ivf_K=5)])
def test_network_count_is_the_model_minus_its_codebooks(fields):
    cfg = ModelConfig(D=12, M=3, K=16, L=2, dh=10, **fields)
    model = QincoModel(cfg)
    net = sum(p.numel() for s in model.steps if s.net is not None for p in s.net.parameters())
    assert network_parameter_count(cfg) == net


def test_enough_data_keeps_the_model():
    cfg = ModelConfig.from_preset("qinco2-S", D=128)
    n = 1 + int(VALUES_PER_PARAMETER * network_parameter_count(cfg) / 128)
    assert fit_to_data(cfg, n) == (cfg, None)


def test_small_data_shrinks_unfixed_fields_until_the_rule_holds():
    cfg = ModelConfig.from_preset("qinco2-S", D=384)          # ~2M network values
    new, note = fit_to_data(cfg, 10_000)
    assert "small for this model" in note and "instead of" in note
    assert values_per_parameter(new, 10_000) >= VALUES_PER_PARAMETER or (new.dh, new.L, new.E) == (64, 1, 32)
    assert new.dh < cfg.dh and new.M == cfg.M and new.K == cfg.K
    kept, _ = fit_to_data(cfg, 10_000, fixed={"dh", "L"})
    assert (kept.dh, kept.L) == (cfg.dh, cfg.L) and kept.E < cfg.E
    same, note = fit_to_data(cfg, 10_000, fixed={"dh", "L", "de"})
    assert same is cfg and "train on more rows" in note


def test_mixed_rows_need_fewer_values_per_parameter():
    cfg = ModelConfig.from_preset("qinco2-S", D=384)
    n = int(10 * network_parameter_count(cfg) / 384)                  # 10 values per parameter
    shrunk, _ = fit_to_data(cfg, n)
    assert values_per_parameter(shrunk, n) >= VALUES_PER_PARAMETER
    kept, note = fit_to_data(cfg, n, least=MIXED_VALUES_PER_PARAMETER)
    assert kept is cfg and "small for this model" in note and "keeping L=2 de=128 dh=256" in note
    tiny = n // 4                                                     # 2.5 values per parameter
    new, _ = fit_to_data(cfg, tiny, least=MIXED_VALUES_PER_PARAMETER)
    assert MIXED_VALUES_PER_PARAMETER <= values_per_parameter(new, tiny) < VALUES_PER_PARAMETER
    assert new.dh < cfg.dh


def test_codec_keeps_a_network_its_mixed_rows_can_train(clustered, caplog):
    """11 values per parameter: enough with neighbour mixing (the rule's default), too few without."""
    x = clustered(700, D=16)
    fields = dict(M=2, K=16, A=4, B=2, de=8, dh=8, batch=256, max_epochs=1, epochs=1, ramp_epochs=1)  # L: preset
    with caplog.at_level(logging.WARNING, logger="qinco2.codec.codec"):
        mixed = QincoCodec.from_preset("qinco2-S", **fields).train(x[:500], x[500:], progress=False)
    assert 5 < values_per_parameter(mixed.model_config, 500) < VALUES_PER_PARAMETER
    assert mixed.model_config.L == 2 and mixed.train_config.neighbour_mix == SMALL_DATA_MIX
    assert mixed.train_config.patience > 5 and "keeping" in caplog.text
    plain = QincoCodec.from_preset("qinco2-S", neighbour_mix=0.0, **fields).train(x[:500], x[500:], progress=False)
    assert plain.model_config.L == 1 and plain.train_config.patience <= 5


def test_codec_train_adapts_and_says_so(clustered, caplog):
    x = clustered(1200, D=16)
    fields = dict(M=2, K=16, A=4, B=2, batch=256, max_epochs=1, epochs=1, ramp_epochs=1)  # L, de, dh: preset
    with caplog.at_level(logging.WARNING, logger="qinco2.codec.codec"):
        codec = QincoCodec.from_preset("qinco2-S", **fields).train(x[:1000], x[1000:], progress=False)
    assert "small for this model" in caplog.text and "neighbour_mix=0.5" in caplog.text
    assert codec.model_config.dh < 256 and codec.train_config.patience <= 5
    assert codec.train_config.neighbour_mix == SMALL_DATA_MIX
    pinned = QincoCodec.from_preset("qinco2-S", small_data="keep", **fields).train(x[:1000], x[1000:],
                                                                                  progress=False)
    assert (pinned.model_config.dh, pinned.model_config.L, pinned.model_config.de) == (256, 2, 128)
    assert pinned.train_config.neighbour_mix == 0                              # keep: nothing changes
    given = QincoCodec.from_preset("qinco2-S", dh=32, neighbour_mix=0.0, **fields).train(x[:1000], x[1000:],
                                                                                        progress=False)
    assert given.model_config.dh == 32 and given.model_config.de < 128        # given fields stay
    assert given.train_config.neighbour_mix == 0
    big = QincoCodec.from_preset("qinco2-S", L=1, de=8, dh=8, **fields).train(x[:1000], x[1000:], progress=False)
    assert big.train_config.neighbour_mix == 0                                 # not small: no mixing


def test_small_text_set_beats_faiss_rq_of_the_same_size():
    """On a 10k-row slice of real sentence embeddings (D=384), the default recipe, adapted to
    the small set, ends at least as good as faiss RQ (beam 1) with the same M and K."""
    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    try:
        ds = resolve_dataset("wordnet-minilm", data_root=root)
    except DatasetError:
        pytest.skip(f"wordnet-minilm is not under {root}")
    learn = ds.train_val(DataLimits())[0]
    x_train = np.asarray(learn[:8_000], dtype=np.float32)          # 8k train + 2k validation rows
    x_val = np.asarray(learn[8_000:10_000], dtype=np.float32)
    x_db = np.asarray(ds.database(DataLimits(db=2_000)), dtype=np.float32)
    M, K = 2, 256
    rq = faiss.ResidualQuantizer(x_train.shape[1], M, 8)
    rq.max_beam_size = 1
    rq.train(x_train)
    rq_mse = mse(x_db, rq.decode(rq.compute_codes(x_db)))
    codec = QincoCodec.from_preset("qinco2-S", M=M, K=K, A=4, B=2, lr=2e-3, batch=256, loop=8_000,
                                   epochs=4, ramp_epochs=1, max_epochs=4)
    codec.train(x_train, x_val, progress=False)
    assert codec.train_config.neighbour_mix == SMALL_DATA_MIX     # the small-set rule applied
    ours = mse(x_db, codec.decode(codec.encode(x_db)))
    assert ours <= rq_mse, (ours, rq_mse)
