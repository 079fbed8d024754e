"""Tests of qinco2.codec.model: configs and presets, parameter counts, initialisation, IVF step,
decoding and the two training losses."""

from __future__ import annotations

import pytest
import torch

from qinco2.codec.model import PRESETS, ModelConfig, QincoModel, StepNetwork, count_parameters, expected_parameter_count
from qinco2.errors import ConfigError

# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name, fields", [
    ("qinco1", dict(L=16, de=None, dh=256, A=0, B=1, M=8, K=256, codeword_skip=False, zero_init=False)),
    ("qinco2-S", dict(L=2, de=128, dh=256, A=16, B=32, M=8, K=256, codeword_skip=True, zero_init=True)),
    ("qinco2-M", dict(L=4, de=384, dh=384, A=16, B=32, M=8, K=256, codeword_skip=True, zero_init=True)),
    ("qinco2-L", dict(L=16, de=384, dh=384, A=16, B=32, M=8, K=256, codeword_skip=True, zero_init=True)),
])
def test_presets_hold_the_published_values(name, fields):
    cfg = ModelConfig.from_preset(name)
    for key, value in fields.items():
        assert getattr(cfg, key) == value, (name, key)
    assert cfg.ivf_K == 0 and not cfg.double_skip


def test_preset_overrides_change_only_the_given_fields():
    base = ModelConfig.from_preset("qinco2-M")
    cfg = ModelConfig.from_preset("qinco2-M", M=16, A=32, B=64, D=96)
    assert (cfg.M, cfg.A, cfg.B, cfg.D) == (16, 32, 64, 96)
    assert (cfg.L, cfg.de, cfg.dh, cfg.K) == (base.L, base.de, base.dh, base.K)
    assert PRESETS["qinco2-M"]["M"] == 8  # the preset table itself is not modified


@pytest.mark.parametrize("bad", [
    dict(M=0), dict(K=0), dict(dh=0), dict(L=-1), dict(A=-1), dict(B=0), dict(A=300), dict(de=0),
])
def test_invalid_fields_raise_config_error(bad):
    with pytest.raises(ConfigError):
        ModelConfig.from_preset("qinco2-S", **bad)
    with pytest.raises(ConfigError):
        QincoModel(ModelConfig(D=8, **{**dict(K=16, A=4), **bad}))


def test_unknown_preset_and_missing_dimension_raise_config_error():
    with pytest.raises(ConfigError, match="qinco2-XL"):
        ModelConfig.from_preset("qinco2-XL")
    with pytest.raises(ConfigError, match="D"):
        QincoModel(ModelConfig.from_preset("qinco2-S"))  # D not set


# ----------------------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("fields", [
    dict(D=12, M=3, K=8, L=2, de=6, dh=10, A=4, B=2),          # projections, pre-selector
    dict(D=12, M=3, K=8, L=2, de=None, dh=10, A=4, B=2),       # no projections
    dict(D=12, M=4, K=8, L=0, de=20, dh=10, A=0, B=1),         # no pre-selector, no FFN block
    dict(D=12, M=1, K=8, L=3, de=6, dh=10, A=4, B=2),          # a single plain step
    dict(D=12, M=2, K=8, L=1, de=6, dh=10, A=4, B=2, ivf_K=5), # IVF: table not counted
    dict(D=12, M=2, K=8, L=1, de=None, dh=10, A=0, B=1, ivf_K=5),
])
def test_parameter_count_matches_closed_form(fields):
    cfg = ModelConfig(**fields)
    model = QincoModel(cfg)
    assert count_parameters(model) == expected_parameter_count(cfg)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("D, M, K, L, h", [(16, 4, 8, 2, 12), (10, 2, 4, 3, 7), (128, 8, 256, 8, 256)])
def test_qinco1_parameter_count_formula(D, M, K, L, h):
    cfg = ModelConfig.from_preset("qinco1", D=D, M=M, K=K, L=L, dh=h)
    formula = M * K * D + (M - 1) * (2 * D * D + D + 2 * L * D * h)
    assert expected_parameter_count(cfg) == formula
    assert count_parameters(QincoModel(cfg)) == formula
    if (D, M, K, L) == (128, 8, 256, 8):
        assert round(formula / 1e6, 1) == 4.2  # QINCo1 paper, BigANN 8 bytes, L=8


# ----------------------------------------------------------------------------- initialisation

def _inputs(D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(7, D, generator=g), torch.randn(7, D, generator=g)


def test_zero_init_with_projections_is_exactly_the_codeword():
    torch.manual_seed(0)
    net = StepNetwork(ModelConfig(D=10, M=2, K=4, L=2, de=6, dh=8))
    c, xhat = _inputs(10)
    assert torch.equal(net(c, xhat), c)          # P_out starts at zero: every added term is 0
    assert net.proj_in.weight.abs().sum() > 0    # P_in random, so P_out gets gradients at once


def test_reference_init_with_projections_is_c_plus_projected_c():
    torch.manual_seed(0)
    net = StepNetwork(ModelConfig(D=10, M=2, K=4, L=2, de=6, dh=8, identity_init=False))
    c, xhat = _inputs(10)
    expected = c + c @ net.proj_in.weight.T @ net.proj_out.weight.T
    # float32 matmuls of width 6-10: 1e-5 absolute is ~100x the rounding error
    torch.testing.assert_close(net(c, xhat), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(net(c, xhat), c)  # P_out P_in is not the identity


def test_zero_init_without_projections_is_exactly_the_codeword():
    c, xhat = _inputs(8)
    net = StepNetwork(ModelConfig(D=8, M=2, K=4, L=3, de=None, dh=8))
    assert torch.equal(net(c, xhat), c)  # all added terms are exact zeros
    same = StepNetwork(ModelConfig(D=8, M=2, K=4, L=3, de=8, dh=8))  # de == D: no projection
    assert isinstance(same.proj_in, torch.nn.Identity) and torch.equal(same(c, xhat), c)
    net2 = StepNetwork(ModelConfig(D=8, M=2, K=4, L=3, de=8, dh=8, double_skip=True))
    assert torch.equal(net2(c, xhat), 2 * c)


def test_qinco1_init_uses_pytorch_defaults_not_zeros():
    torch.manual_seed(0)
    net = StepNetwork(ModelConfig.from_preset("qinco1", D=8, L=2, dh=12))
    assert net.fuse.weight.abs().max() > 0 and net.fuse.bias.abs().max() > 0
    assert all(b.down.weight.abs().max() > 0 for b in net.blocks)
    assert net.fuse.weight.abs().max() <= 1 / 16 ** 0.5  # U(-1/sqrt(fan_in), ..), fan_in = 2D
    c, xhat = _inputs(8)
    assert not torch.allclose(net(c, xhat), c)


# ----------------------------------------------------------------------------- IVF step

def test_frozen_ivf_step_is_a_buffer_and_decodes_to_centroid_plus_updates(make_model):
    centroids = torch.randn(5, 6, dtype=torch.float64)
    model = make_model(D=6, M=2, K=8, L=1, de=4, dh=8, A=3, B=2, ivf_K=5,
                       ivf_centroids=centroids.float())
    ivf = model.steps[0]
    assert ivf.frozen and ivf.net is None and ivf.preselector is None
    assert not ivf.codebook.requires_grad
    assert all(p is not ivf.codebook for p in model.parameters())
    assert "steps.0.codebook" in dict(model.named_buffers())
    assert model.n_codes == 3 and all(s.net is not None for s in model.steps[1:])
    # the random re-initialisation of parameters did not touch the table
    torch.testing.assert_close(ivf.codebook, centroids.float().double())

    codes = torch.tensor([[0, 1, 2], [4, 7, 0], [2, 2, 2]])
    partial = model.partial_reconstructions(codes)
    assert torch.equal(partial[0], ivf.codebook[codes[:, 0]])
    expected = ivf.codebook[codes[:, 0]]
    for m in (1, 2):
        expected = expected + model.steps[m].net(model.steps[m].codebook[codes[:, m]], expected)
    torch.testing.assert_close(model.decode(codes), expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- decoding

def test_partial_reconstructions_are_prefix_consistent(make_model):
    model = make_model(D=6, M=4, K=8, L=2, de=5, dh=7, A=2, B=2)
    codes = torch.randint(0, 8, (20, 4), generator=torch.Generator().manual_seed(1))
    full = model.partial_reconstructions(codes)
    assert len(full) == 4
    assert torch.equal(full[0], model.steps[0].codebook[codes[:, 0]])
    for m in range(1, 5):
        prefix = model.partial_reconstructions(codes[:, :m])
        assert len(prefix) == m
        for a, b in zip(prefix, full):
            assert torch.equal(a, b)
        assert torch.equal(model.decode(codes[:, :m]), full[m - 1])
    for m in range(1, 4):  # each step adds f(C[i], x_hat) to the previous reconstruction
        step = model.steps[m]
        torch.testing.assert_close(full[m] - full[m - 1],
                                   step.net(step.codebook[codes[:, m]], full[m - 1]),
                                   rtol=1e-10, atol=1e-10)


def test_normalize_denormalize_round_trip():
    model = QincoModel(ModelConfig(D=3, M=1, K=2, A=0))
    model.mean.copy_(torch.tensor([1.0, -2.0, 3.0]))
    model.scale.fill_(4.0)
    x = torch.tensor([[5.0, 2.0, 3.0]])
    assert torch.equal(model.normalize(x), torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(model.denormalize(model.normalize(x)), x)


# ----------------------------------------------------------------------------- losses

def _loss_setup(make_model, **extra):
    model = make_model(D=6, M=3, K=8, L=1, de=4, dh=5, A=3, B=2, dtype=torch.float32, **extra)
    g = torch.Generator().manual_seed(2)
    u = torch.randn(16, 6, generator=g)
    codes = torch.randint(0, 8, (16, model.n_codes), generator=g)
    if extra.get("ivf_K"):
        codes[:, 0] = torch.randint(0, extra["ivf_K"], (16,), generator=g)
    return model, u, codes


def test_loss_values_are_sums_of_per_step_mses(make_model):
    model, u, codes = _loss_setup(make_model)
    loss_rec, loss_pre = model.losses(u, codes)
    partial = model.partial_reconstructions(codes)
    want_rec = sum(((p - u) ** 2).mean() for p in partial)
    prev = [torch.zeros_like(u)] + partial[:-1]
    want_pre = sum(((prev[m] + model.steps[m].preselector[codes[:, m]] - u) ** 2).mean()
                   for m in (1, 2))
    torch.testing.assert_close(loss_rec, want_rec, rtol=1e-5, atol=0)  # float32 sums
    torch.testing.assert_close(loss_pre, want_pre, rtol=1e-5, atol=0)


def test_ivf_step_contributes_no_loss(make_model):
    model, u, codes = _loss_setup(make_model, ivf_K=5, ivf_centroids=torch.randn(5, 6))
    loss_rec, _ = model.losses(u, codes)
    partial = model.partial_reconstructions(codes)
    want = sum(((p - u) ** 2).mean() for p in partial[1:])
    torch.testing.assert_close(loss_rec, want, rtol=1e-5, atol=0)


def test_preselector_loss_trains_only_the_preselectors(make_model):
    model, u, codes = _loss_setup(make_model)
    _, loss_pre = model.losses(u, codes)
    loss_pre.backward()
    for name, p in model.named_parameters():
        if name.endswith("preselector"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or not p.grad.any(), name


def test_reconstruction_loss_does_not_train_the_preselectors(make_model):
    model, u, codes = _loss_setup(make_model)
    loss_rec, _ = model.losses(u, codes)
    loss_rec.backward()
    for name, p in model.named_parameters():
        if name.endswith("preselector"):
            assert p.grad is None or not p.grad.any(), name
    # gradients flow through x_hat into earlier steps: step 0's codebook gets a gradient
    assert model.steps[0].codebook.grad.abs().sum() > 0
    assert model.steps[1].net.fuse.weight.grad.abs().sum() > 0
