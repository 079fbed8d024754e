"""Fault injection on training and evaluation: NaN/Inf rows (in memory and in files), a
diverging loss, empty sets, bad API arguments and training settings, and resuming a run
that had already ended."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

import qinco2.codec.train as train_module
from qinco2.checkpoint import load_checkpoint
from qinco2.codec.codec import QincoCodec
from qinco2.codec.evaluate import evaluate_codec, evaluate_mse, evaluate_prefixes, evaluate_search
from qinco2.codec.model import ModelConfig, QincoModel
from qinco2.codec.train import TrainConfig, fit, initialize
from qinco2.errors import ConfigError, InputError
from qinco2.formats import open_vectors

D = 8
# 1000 training rows in batches of 128: 8 batches (the last of 104 rows) per epoch
FIELDS = dict(M=2, K=16, L=1, de=None, dh=16, A=4, B=4, batch=128, epochs=2, ramp_epochs=1,
              lr=3e-3, max_epochs=1, seed=0)


def _codec(**overrides) -> QincoCodec:
    return QincoCodec.from_preset("qinco2-S", small_data="keep", **{**FIELDS, **overrides})


def _model_and_config(**overrides) -> tuple[QincoModel, TrainConfig]:
    """The model and training settings of :func:`_codec`, for calling ``fit`` directly."""
    model_fields = {k: v for k, v in FIELDS.items() if k in ("M", "K", "L", "de", "dh", "A", "B")}
    train_fields = {k: v for k, v in {**FIELDS, **overrides}.items() if k not in model_fields}
    model = QincoModel(ModelConfig.from_preset("qinco2-S", D=D, **model_fields))
    return model, TrainConfig.from_preset("qinco2-S", **train_fields)


@pytest.fixture(scope="module")
def x(clustered):
    return clustered(1400, D=D, C=8, seed=3)


@pytest.fixture(scope="module")
def codec(x):
    return _codec().train(x[:1000], x[1000:1200], progress=False)


def _npy(tmp_path, x_ND, name="learn.npy") -> np.ndarray:
    """``x_ND`` written to a .npy file (NaN allowed) and memory-mapped back."""
    path = tmp_path / name
    np.save(path, x_ND)
    return open_vectors(path)


def _fvecs(tmp_path, x_ND, name="learn.fvecs") -> np.ndarray:
    """``x_ND`` written as raw fvecs records (NaN allowed) and memory-mapped back."""
    records = np.empty((len(x_ND), x_ND.shape[1] + 1), dtype=np.float32)
    records[:, 0] = np.array([x_ND.shape[1]], dtype=np.int32).view(np.float32)
    records[:, 1:] = x_ND
    path = tmp_path / name
    records.tofile(path)
    return open_vectors(path)


# ----------------------------------------------------------------------------- NaN / Inf rows

@pytest.mark.parametrize("write", [_npy, _fvecs])
def test_nan_in_the_init_sample_names_the_row_and_the_file(tmp_path, x, write):
    bad = x.copy()
    bad[7, 3] = np.nan
    learn = write(tmp_path, bad)
    with pytest.raises(InputError, match=r"x_train holds NaN or Inf values in row 7 \(row 7 of file .*learn\."):
        _codec().train(learn[:1000], learn[1000:1200], progress=False)


def test_the_training_file_is_checked_as_read_not_scanned_upfront(tmp_path, x):
    bad = x.copy()
    bad[1300] = np.inf                 # past the init sample and the windows of epochs 0 and 1
    learn = _npy(tmp_path, bad)
    settings = dict(init_samples=500, loop=640)
    done = _codec(**settings).train(learn[:1350], learn[1350:], progress=False)
    assert done.train_state_.epoch == 1
    out = tmp_path / "m.pt"            # epoch 2's window (rows 1280..1349, 0..569) reads row 1300
    with pytest.raises(InputError, match=r"x_train holds NaN or Inf values in row 1300 \(row 1300 of file"):
        _codec(**settings, max_epochs=3).train(learn[:1350], learn[1350:], output=out, progress=False)
    assert load_checkpoint(out)["training"]["state"]["epoch"] == 2   # epochs 0 and 1 ran


def test_a_nan_row_after_the_init_sample_stops_fit_with_its_row(x):
    x_train = x[:1000].copy()
    x_train[900, 0] = np.nan           # read by epoch 0's permutation, never by the init sample
    model, cfg = _model_and_config(init_samples=256)
    initialize(model, cfg, x_train)
    with pytest.raises(InputError, match=r"x_train holds NaN or Inf values in row 900;"):
        fit(model, cfg, x_train, x[1000:1200], progress=False)


@pytest.mark.parametrize("value, dtype", [(np.inf, np.float32), (np.nan, np.float32),
                                          (1e300, np.float64)])    # Inf once cast to float32
def test_a_bad_validation_row_stops_fit(x, value, dtype):
    x_val = x[1000:1200].astype(dtype)
    x_val[42, 1] = value
    model, cfg = _model_and_config()
    initialize(model, cfg, x[:1000])
    with pytest.raises(InputError, match=r"x_val holds NaN or Inf values in row 42;"):
        fit(model, cfg, x[:1000], x_val, progress=False)


def test_a_bad_validation_row_in_a_file_names_the_file_row_and_writes_no_model(tmp_path, x):
    bad = x.copy()
    bad[1042, 1] = np.inf
    learn = _fvecs(tmp_path, bad)
    out = tmp_path / "m.pt"
    with pytest.raises(InputError, match=r"x_val holds NaN or Inf values in row 42 \(row 1042 of file"):
        _codec().train(learn[:1000], learn[1000:1300], output=out, progress=False)
    assert not out.exists()


def test_bad_database_and_query_rows_are_named_in_evaluation(tmp_path, codec, x):
    bad = x[1000:1400].copy()
    bad[203, 0] = np.nan
    base = _npy(tmp_path, bad, "base.npy")
    with pytest.raises(InputError, match=r"db holds NaN or Inf values in row 203 \(row 203 of file .*base\.npy"):
        evaluate_codec(codec, base, batch=100)
    with pytest.raises(InputError, match=r"x holds NaN or Inf values in row 203"):
        evaluate_mse(codec, bad, batch=100)
    queries = x[1200:1220].copy()
    queries[5, 2] = -np.inf
    gt = np.zeros((20, 1), dtype=np.int64)
    with pytest.raises(InputError, match=r"queries holds NaN or Inf values in row 5"):
        evaluate_search(codec, x[1000:1200], queries, gt)


# ----------------------------------------------------------------------------- diverging runs

def test_a_nan_loss_stops_training_and_keeps_the_best_model(tmp_path, x, monkeypatch):
    out, losses, seen = tmp_path / "m.pt", QincoModel.losses, {"calls": 0}

    def poisoned(self, u_ND, codes_NM):
        seen["calls"] += 1
        loss_rec, loss_pre = losses(self, u_ND, codes_NM)
        if seen["calls"] == 12:        # epoch 1, its 4th batch: step 11
            seen["file"] = out.read_bytes()
            return loss_rec * math.nan, loss_pre
        return loss_rec, loss_pre

    monkeypatch.setattr(QincoModel, "losses", poisoned)
    codec = _codec(max_epochs=3)
    with pytest.raises(ConfigError, match=r"loss is nan at epoch 1, step 11 \(batch 4 of 8\).*lr=0\.003 now"):
        codec.train(x[:1000], x[1000:1200], output=out, progress=False)
    assert out.read_bytes() == seen["file"]             # the model file was left as it was
    best = load_checkpoint(out)["state_dict"]
    for name, t in codec.model_.state_dict().items():   # the codec holds the best weights
        assert torch.equal(t, best[name]), name


def test_a_nan_validation_mse_stops_training(tmp_path, x, monkeypatch):
    out, validation_mse, calls = tmp_path / "m.pt", train_module.validation_mse, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        mse = validation_mse(*args, **kwargs)
        return math.nan if len(calls) == 3 else mse   # the initialisation, epoch 0, epoch 1

    monkeypatch.setattr(train_module, "validation_mse", poisoned)
    with pytest.raises(ConfigError, match=r"validation MSE is nan after epoch 1.*lower learning rate"):
        _codec(max_epochs=3).train(x[:1000], x[1000:1200], output=out, progress=False)
    assert load_checkpoint(out)["training"]["state"]["epoch"] == 1


# ----------------------------------------------------------------------------- empty sets

def test_an_empty_validation_set_is_refused(tmp_path, x):
    out = tmp_path / "m.pt"
    with pytest.raises(InputError, match="x_val has no rows.*ds.valset >= 1"):
        _codec().train(x[:1000], x[:0], output=out, progress=False)
    assert not out.exists()
    model, cfg = _model_and_config()
    initialize(model, cfg, x[:1000])
    with pytest.raises(InputError, match="x_val has no rows"):
        fit(model, cfg, x[:1000], x[:0], progress=False)


def test_empty_sets_are_refused_by_evaluation(codec, x):
    empty, gt = x[:0], np.zeros((20, 1), dtype=np.int64)
    for call, what in [(lambda: evaluate_mse(codec, empty), "x"),
                       (lambda: evaluate_prefixes(codec, empty), "x"),
                       (lambda: evaluate_codec(codec, empty), "db"),
                       (lambda: evaluate_search(codec, empty, x[1200:1220], gt), "db"),
                       (lambda: evaluate_search(codec, x[1000:1200], empty, gt[:0]), "queries"),
                       (lambda: evaluate_codec(codec, x[1000:1200], 1.0, empty, gt[:0]), "queries")]:
        with pytest.raises(InputError, match=f"^{what} has no rows"):
            call()


# ----------------------------------------------------------------------------- API arguments

@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_encode_and_decode_refuse_a_bad_batch_size(codec, x, batch_size):
    with pytest.raises(InputError, match="batch_size must be a whole number >= 1"):
        codec.encode(x[:10], batch_size=batch_size)
    with pytest.raises(InputError, match="batch_size must be a whole number >= 1"):
        codec.decode(np.zeros((10, codec.n_codes), dtype=np.int32), batch_size=batch_size)


@pytest.mark.parametrize("field, value", [
    ("lr", -1.0), ("lr", 0.0), ("lr", math.nan), ("max_epochs", 0), ("epochs", 0),
    ("weight_decay", -0.1), ("patience", 0), ("init_samples", 0), ("seed", -1),
    ("max_time_s", 0.0), ("ramp_epochs", -1), ("lr_min_factor", -0.5), ("init_noise", -1.0),
    ("grad_clip", -1.0), ("batch", 2.5),
])
def test_training_settings_out_of_range_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=f"training setting {field}="):
        TrainConfig(**{field: value}).validated()
    with pytest.raises(ConfigError, match=f"training setting {field}="):
        QincoCodec.from_preset("qinco2-S", **{field: value})


def test_train_validates_settings_given_to_the_constructor(x):
    model_cfg = ModelConfig.from_preset("qinco2-S", M=2, K=16, L=1, dh=16)
    for bad in (TrainConfig(lr=-1.0), TrainConfig(max_epochs=0)):
        with pytest.raises(ConfigError, match="training setting"):
            QincoCodec(model_cfg, bad).train(x[:1000], x[1000:1200], progress=False)


@pytest.mark.parametrize("limit", [dict(max_epochs=2), dict(max_epochs=5, max_time_s=1e-9)])
def test_resuming_a_run_that_had_ended_trains_nothing_more(tmp_path, x, caplog, limit):
    out = tmp_path / "m.pt"
    first = _codec(**limit).train(x[:1000], x[1000:1200], output=out, progress=False)
    before = out.read_bytes()
    with caplog.at_level(logging.WARNING, logger="qinco2.codec.train"):
        again = _codec(**limit).train(x[:1000], x[1000:1200], output=out, resume=True, progress=False)
    assert again.train_state_.epoch == first.train_state_.epoch
    assert again.train_state_.history == first.train_state_.history
    assert out.read_bytes() == before
    assert "nothing more was trained" in caplog.text and ("max_epochs=2" in caplog.text
                                                        or "max_time_s=1e-09" in caplog.text)
    assert np.array_equal(again.encode(x[1000:1200]), first.encode(x[1000:1200]))


def test_resuming_on_data_of_another_dimension_is_refused(tmp_path, x):
    out = tmp_path / "m.pt"
    _codec().train(x[:1000], x[1000:1200], output=out, progress=False)
    before = out.read_bytes()
    with pytest.raises(InputError, match=f"model of D={D} vectors but the training data has D={D - 2}"):
        _codec().train(x[:1000, :-2], x[1000:1200, :-2], output=out, resume=True, progress=False)
    assert out.read_bytes() == before
