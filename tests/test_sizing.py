"""Model size against training-set size (qinco2.codec.sizing) and its use by QincoCodec.train."""

from __future__ import annotations

import logging

import pytest

from qinco2.codec.codec import QincoCodec
from qinco2.codec.model import ModelConfig, QincoModel
from qinco2.codec.sizing import (
    VALUES_PER_PARAMETER,
    fit_to_data,
    network_parameter_count,
    values_per_parameter,
)


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


def test_codec_train_adapts_and_says_so(clustered, caplog):
    x = clustered(1200, D=16)
    fields = dict(M=2, K=16, A=4, B=2, batch=256, max_epochs=1, epochs=1, ramp_epochs=1)  # L, de, dh: preset
    with caplog.at_level(logging.WARNING, logger="qinco2.codec.codec"):
        codec = QincoCodec.from_preset("qinco2-S", **fields).train(x[:1000], x[1000:], progress=False)
    assert "small for this model" in caplog.text
    assert codec.model_config.dh < 256 and codec.train_config.patience <= 5
    pinned = QincoCodec.from_preset("qinco2-S", small_data="keep", **fields).train(x[:1000], x[1000:],
                                                                                  progress=False)
    assert (pinned.model_config.dh, pinned.model_config.L, pinned.model_config.de) == (256, 2, 128)
    given = QincoCodec.from_preset("qinco2-S", dh=32, **fields).train(x[:1000], x[1000:], progress=False)
    assert given.model_config.dh == 32 and given.model_config.de < 128        # given fields stay
