"""Tests of qinco2.codec.codec.QincoCodec: numpy boundary, typed errors, files, overrides, prefixes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qinco2.checkpoint import FORMAT_TAG, FORMAT_VERSION, atomic_torch_save
from qinco2.codec.codec import QincoCodec
from qinco2.codec.model import ModelConfig
from qinco2.errors import ConfigError, InputError, ModelFileError, NotTrainedError
from qinco2.metrics import mse

# ----------------------------------------------------------------------------- numpy boundary

def test_encode_decode_types_and_shapes(trained_codec, codec_data):
    x = codec_data[1][:50]
    codes = trained_codec.encode(x)
    assert codes.dtype == np.int32 and codes.shape == (50, 3) == (50, trained_codec.n_codes)
    assert codes.min() >= 0 and codes.max() < 16
    xhat = trained_codec.decode(codes)
    assert isinstance(xhat, np.ndarray) and xhat.dtype == np.float32 and xhat.shape == (50, 16)
    assert trained_codec.dim == 16


def test_training_lowers_the_error_and_decode_matches_encode(trained_codec, codec_data):
    x_val = codec_data[1]
    state = trained_codec.train_state_
    assert state.best_mse < state.init_mse
    # the validation MSE of training is the codec's own encode -> decode MSE (float32 sums)
    assert mse(x_val, trained_codec.decode(trained_codec.encode(x_val))) == pytest.approx(state.best_mse, rel=1e-4)


def test_uint8_and_float64_inputs_are_accepted(trained_codec, codec_data):
    x = np.clip(codec_data[1][:40] * 10 + 128, 0, 255).astype(np.uint8)
    assert np.array_equal(trained_codec.encode(x), trained_codec.encode(x.astype(np.float32)))
    x64 = codec_data[1][:40].astype(np.float64)
    assert np.array_equal(trained_codec.encode(x64), trained_codec.encode(x64.astype(np.float32)))


def test_batch_size_does_not_change_codes(trained_codec, codec_data):
    x = codec_data[1][:100]
    codes = trained_codec.encode(x)
    # exact: a code flip would need a float32 near-tie (< 1e-6 relative) between candidates
    assert np.array_equal(trained_codec.encode(x, batch_size=7), codes)
    assert np.array_equal(trained_codec.encode(x, max_bytes=1), codes)
    # float32 matmuls of other batch shapes round differently: 1e-5 relative is ~10x that
    np.testing.assert_allclose(trained_codec.decode(codes, batch_size=9), trained_codec.decode(codes),
                               rtol=1e-5, atol=1e-5)


def test_wider_search_is_not_worse_on_average(trained_codec, codec_data):
    x = codec_data[1]
    err = {(A, B): mse(x, trained_codec.decode(trained_codec.encode(x, A=A, B=B)))
           for A, B in ((4, 1), (4, 4), (0, 8))}
    # statistical statement on 600 vectors: 1% margin (observed gaps are larger)
    assert err[(4, 4)] <= err[(4, 1)] * 1.01
    assert err[(0, 8)] <= err[(4, 4)] * 1.01


def test_prefix_decoding_error_does_not_grow_with_more_codes(trained_codec, codec_data):
    x = codec_data[1]
    codes = trained_codec.encode(x)
    errs = [mse(x, trained_codec.decode(codes[:, :m])) for m in range(1, 4)]
    # each step is trained to reduce the error of the previous prefix; 1e-6 relative slack
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:]))
    assert errs[-1] < errs[0]


# ----------------------------------------------------------------------------- errors

def test_untrained_codec_raises_not_trained():
    codec = QincoCodec.from_preset("qinco2-S", M=2, K=16)
    x = np.zeros((3, 8), np.float32)
    for call in (lambda: codec.encode(x), lambda: codec.decode(np.zeros((3, 2), np.int32)),
                 lambda: codec.save("never.pt"), lambda: codec.dim, lambda: codec.n_codes):
        with pytest.raises(NotTrainedError):
            call()


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 15), np.float32), "dimension 15"),
    (np.zeros(16, np.float32), "2-D"),
    (np.zeros((2, 4, 16), np.float32), "2-D"),
    ([[0.0] * 16], "numpy array"),
    (np.full((2, 16), "a"), "dtype"),
    (np.zeros((2, 16), bool), "dtype"),
    (np.zeros((2, 16), np.complex64), "dtype"),
    (np.zeros((2, 16), object), "dtype"),
    (np.array([[np.nan] + [0.0] * 15], np.float32), "NaN"),
    (np.array([[np.inf] + [0.0] * 15], np.float32), "NaN or Inf"),
])
def test_bad_vectors_raise_input_error(trained_codec, bad, match):
    with pytest.raises(InputError, match=match):
        trained_codec.encode(bad)


@pytest.mark.parametrize("bad", [
    np.array([[0, 0, 16]], np.int32),            # code >= K
    np.array([[0, -1, 0]], np.int64),            # negative code
    np.array([[0, 0, 0, 0]], np.int32),          # more columns than steps
    np.zeros((1, 0), np.int32),                  # no column
    np.zeros(3, np.int32),                       # 1-D
    np.zeros((1, 3), np.float32),                # not integers
    [[0, 0, 0]],                                 # not a numpy array
])
def test_bad_codes_raise_input_error(trained_codec, bad):
    with pytest.raises(InputError):
        trained_codec.decode(bad)


def test_bad_search_parameters_and_configs(trained_codec, codec_data, tiny_codec_fields):
    with pytest.raises(InputError):
        trained_codec.encode(codec_data[1][:2], B=0)
    with pytest.raises(InputError):
        trained_codec.encode(codec_data[1][:2], A=-1)
    with pytest.raises(ConfigError, match="colour"):
        QincoCodec.from_preset("qinco2-S", colour="red")
    with pytest.raises(ConfigError):
        QincoCodec.from_preset("qinco3")
    with pytest.raises(InputError, match="K=16"):
        QincoCodec.from_preset("qinco2-S", **tiny_codec_fields).train(codec_data[1][:10], codec_data[1][:5])


# ----------------------------------------------------------------------------- files

def test_save_load_round_trip(trained_codec, codec_data, tmp_path):
    x = codec_data[1][:200]
    path = tmp_path / "sub" / "codec.pt"
    trained_codec.save(path)
    loaded = QincoCodec.load(path)
    codes = trained_codec.encode(x)
    assert np.array_equal(loaded.encode(x), codes)
    assert np.array_equal(loaded.decode(codes), trained_codec.decode(codes))
    assert loaded.model_config == trained_codec.model_.cfg
    assert torch.equal(loaded.model_.scale, trained_codec.model_.scale)
    payload = torch.load(path, weights_only=True)  # a plain, safe-to-load file
    assert payload["format"] == FORMAT_TAG and payload["version"] == FORMAT_VERSION


def test_load_with_search_overrides(trained_codec, codec_data, tmp_path):
    x = codec_data[1][:200]
    path = tmp_path / "codec.pt"
    trained_codec.save(path)
    greedy = QincoCodec.load(path, A=0, B=1)
    assert (greedy.model_.cfg.A, greedy.model_.cfg.B) == (0, 1)
    assert np.array_equal(greedy.encode(x), trained_codec.encode(x, A=0, B=1))
    assert (trained_codec.model_.cfg.A, trained_codec.model_.cfg.B) == (4, 4)  # untouched
    with pytest.raises(ConfigError):
        QincoCodec.load(path, K=32)


def test_foreign_files_raise_model_file_error(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(1000))
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.ones(3)}, plain)
    array = tmp_path / "array.pt"
    torch.save(np.ones(3), array)  # needs unpickling numpy objects: refused by weights_only
    future = tmp_path / "future.pt"
    atomic_torch_save({"format": FORMAT_TAG, "version": FORMAT_VERSION + 1,
                       "model_config": {}, "state_dict": {}}, future)
    for path, match in ((junk, "not a qinco2 model"), (plain, "format tag"),
                        (array, "not a qinco2 model"), (future, "version"),
                        (tmp_path / "missing.pt", "does not exist")):
        with pytest.raises(ModelFileError, match=match):
            QincoCodec.load(path)


# ----------------------------------------------------------------------------- IVF codec

def test_ivf_codec_first_column_is_the_nearest_raw_centroid(codec_data, tiny_codec_fields):
    x_train, x_val = codec_data
    centroids = x_train[::250][:8].copy()  # 8 raw-space centroids
    codec = QincoCodec.from_preset("qinco2-S", **{**tiny_codec_fields, "M": 2, "max_epochs": 1})
    codec.train(x_train, x_val, ivf_centroids=centroids, progress=False)
    assert codec.n_codes == 3 and codec.model_.cfg.ivf_K == 8
    codes = codec.encode(x_val)
    d = ((x_val[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1)
    # the nearest centroid in normalised space is the nearest in raw space (affine map with
    # one scalar scale); allow 1% float32 near-ties
    assert (codes[:, 0] == d.argmin(1)).mean() >= 0.99
    np.testing.assert_allclose(codec.decode(codes[:, :1]), centroids[codes[:, 0]], rtol=1e-5, atol=1e-4)


def test_preselection_cannot_be_requested_from_an_exhaustive_model(codec_data, tmp_path):
    xt = codec_data[0]
    codec = QincoCodec.from_preset("qinco1", M=2, K=16, L=1, dh=16, loop=2000, max_epochs=1)
    codec.train(xt, progress=False)
    with pytest.raises(InputError, match="trained with A=0"):
        codec.encode(xt[:10], A=4)
    codec.save(tmp_path / "q1.pt")
    with pytest.raises(ConfigError, match="A=0"):
        QincoCodec.load(tmp_path / "q1.pt", A=4)


def test_model_preset_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="unknown model field"):
        ModelConfig.from_preset("qinco2-S", Mx=4)
