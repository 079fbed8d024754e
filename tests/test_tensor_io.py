"""Torch tensors wherever numpy arrays are accepted, answered in kind (qinco2.tensor_io)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qinco2
from qinco2 import ivfpq
from qinco2.tensor_io import accepts_tensors, to_numpy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@accepts_tensors
def _pair(x, y=None):
    return x * 2, (x if y is None else y) + 1


def test_numpy_in_numpy_out_and_tensors_in_tensors_out():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = _pair(a)
    assert all(isinstance(o, np.ndarray) for o in out)
    t_out = _pair(torch.from_numpy(a), y=torch.ones(2, 3))
    assert all(isinstance(o, torch.Tensor) for o in t_out)
    np.testing.assert_array_equal(t_out[0].numpy(), out[0])
    np.testing.assert_array_equal(t_out[1].numpy(), np.full((2, 3), 2.0))


def test_to_numpy_of_odd_tensors():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    np.testing.assert_array_equal(to_numpy(t.T), t.numpy().T)                 # not contiguous
    np.testing.assert_array_equal(to_numpy(t.bfloat16()), t.numpy())          # numpy has no bfloat16
    np.testing.assert_array_equal(to_numpy(t.requires_grad_()), t.detach().numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_codec_encode_decode_take_and_return_tensors(make_codec, device):
    codec = make_codec().to(device)
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    codes = codec.encode(x)
    codes_t = codec.encode(torch.from_numpy(x).to(device))
    assert isinstance(codes_t, torch.Tensor) and codes_t.device.type == device
    np.testing.assert_array_equal(codes_t.cpu().numpy(), codes)
    packed_t = codec.encode(torch.from_numpy(x).to(device), packed=True)
    assert packed_t.dtype == torch.uint8
    x_hat = codec.decode(codes)
    x_hat_t = codec.decode(codes_t)
    assert isinstance(x_hat_t, torch.Tensor) and x_hat_t.device.type == device
    np.testing.assert_allclose(x_hat_t.cpu().numpy(), x_hat, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(codec.decode(packed_t, packed=True).cpu().numpy(), x_hat)


@pytest.mark.parametrize("device", DEVICES)
def test_ivfpq_and_ivf_take_and_return_tensors(clustered, device):
    x = clustered(3000, seed=3)
    q = x[:20] + 0.01
    params = ivfpq.IndexParams(n_lists=8, pq_dim=4, kmeans_n_iters=5)
    index = ivfpq.build(params, torch.from_numpy(x).to(device), device=device)
    index_np = ivfpq.build(params, x, device=device)
    d, i = ivfpq.search(ivfpq.SearchParams(n_probes=4), index_np, q, 5)
    d_t, i_t = ivfpq.search(ivfpq.SearchParams(n_probes=4), index, torch.from_numpy(q).to(device), 5)
    assert isinstance(i_t, torch.Tensor) and i_t.device.type == device and i_t.dtype == torch.int64
    np.testing.assert_array_equal(i_t.cpu().numpy(), i)
    np.testing.assert_allclose(d_t.cpu().numpy(), d, rtol=1e-5)
    _, r_t = ivfpq.refine(torch.from_numpy(x), torch.from_numpy(q), i_t, 3)
    assert isinstance(r_t, torch.Tensor)
    centroids = qinco2.train_ivf_centroids(x, 8, niter=3)
    c_t = qinco2.train_ivf_centroids(torch.from_numpy(x), 8, niter=3)
    assert isinstance(c_t, torch.Tensor)
    np.testing.assert_allclose(c_t.numpy(), centroids, rtol=1e-5, atol=1e-5)
    assign = qinco2.assign_to_centroids(torch.from_numpy(x).to(device), torch.from_numpy(centroids))
    np.testing.assert_array_equal(assign.cpu().numpy(), qinco2.assign_to_centroids(x, centroids))
