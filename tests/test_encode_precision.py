"""Tests of the encoder's precomputed codeword embeddings and of its reduced-precision path
(``precision="bf16" | "fp16" | "tf32"``, :mod:`qinco2.codec.precision`).

fp32 must give the codes of the per-candidate network; bf16 codes must be nearly as good as
fp32 ones and always the best, in float32, of the final beams; invalid or unsupported
precisions are refused with a message that names a fix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qinco2.codec.encode as encode_module
from qinco2.codec.codes_io import encode_to_file, load_encoded
from qinco2.codec.encode import RESCORED_BEAMS, StepRunner, beam_search, encode, prepare_steps, rescore
from qinco2.codec.evaluate import evaluate_mse
from qinco2.codec.precision import PRECISIONS, matmul_precision
from qinco2.errors import InputError

ARCHS = {   # projections + codeword skip; QINCo1-like (no projections); exhaustive; IVF
    "qinco2": dict(D=16, M=4, K=32, L=2, de=8, dh=16, A=4, B=4),
    "qinco1": dict(D=16, M=3, K=16, L=1, de=None, dh=24, A=0, B=4, codeword_skip=False, zero_init=False),
    "exhaustive": dict(D=12, M=3, K=16, L=1, de=6, dh=12, A=0, B=3),
    "ivf": dict(D=12, M=3, K=16, L=1, de=6, dh=12, A=3, B=4, ivf_K=24),
}


def _model(make_model, arch: str, dtype=torch.float32):
    fields = dict(ARCHS[arch])
    centroids = torch.randn(fields["ivf_K"], fields["D"], generator=torch.Generator().manual_seed(1)) * 2 \
        if "ivf_K" in fields else None
    return make_model(dtype=dtype, ivf_centroids=centroids, **fields)


def _data(N: int, D: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(seed)) * 1.5


def _mse(u: torch.Tensor, xhat: torch.Tensor) -> float:
    return ((u - xhat) ** 2).sum(1).mean().item()


# ----------------------------------------------------------------------------- fp32: the precomputed table

@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fp32_codes_equal_those_of_the_per_candidate_network(make_model, arch, monkeypatch):
    """The (K, E) codeword embeddings computed once per call give the codes of the network run
    on every candidate, as the encoder did before."""
    model = _model(make_model, arch)
    cfg, u = model.cfg, _data(120, model.cfg.D)
    codes, xhat = beam_search(model, u, cfg.A, cfg.B)
    same_codes, same_xhat = beam_search(model, u, cfg.A, cfg.B, precision="fp32")
    assert torch.equal(codes, same_codes) and torch.equal(xhat, same_xhat)     # the default

    def per_candidate(self, codebook_KD, cand_NBA, xhat_NB1D):
        return self.net(codebook_KD[cand_NBA], xhat_NB1D)
    monkeypatch.setattr(StepRunner, "delta", per_candidate)
    old_codes, old_xhat = beam_search(model, u, cfg.A, cfg.B)
    assert torch.equal(codes, old_codes)
    # the same operations in the same order: bitwise equal with torch's CPU GEMM on the Xeon
    # (AMX) machines, but on AMD Zen 4 the GEMM's row results depend on the row count (up to
    # 8e-5 on values of order 3, 2.7e-5 relative, measured): float32 rounding, not another sum
    torch.testing.assert_close(xhat, old_xhat, rtol=1e-4, atol=1e-4)


def test_the_table_is_the_codeword_part_of_the_network(make_model):
    model = _model(make_model, "qinco2", dtype=torch.float64)
    step, runner = model.steps[1], prepare_steps(model)[1]
    assert prepare_steps(model)[0] is None                                   # the plain first step
    assert runner.net is step.net and runner.emb_KE.shape == (model.cfg.K, model.cfg.E)
    c = step.codebook[:5]
    xhat = torch.randn(5, model.cfg.D, dtype=torch.float64)
    torch.testing.assert_close(step.net.from_embedding(runner.emb_KE[:5], c, xhat), step.net(c, xhat),
                               rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- bf16

def test_bf16_codes_are_nearly_as_good_as_fp32(trained_codec, codec_data):
    codec = trained_codec
    x = codec_data[1]
    u = codec.model_.normalize(torch.as_tensor(x))
    c32, x32 = encode(codec.model_, u, A=4, B=4)
    c16, x16 = encode(codec.model_, u, A=4, B=4, precision="bf16")
    assert x16.dtype == torch.float32 and c16.shape == c32.shape
    # bf16 keeps ~3 significant digits in the networks: the codes' error within 0.5% of fp32's
    assert _mse(u, x16) <= 1.005 * _mse(u, x32)
    assert (c16 == c32).all(1).float().mean() >= 0.9
    # the decoder agrees with the returned reconstruction (it is the float32 decoding)
    torch.testing.assert_close(codec.model_.decode(c16), x16, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_bf16_returns_the_final_beam_of_least_fp32_error(make_model, arch):
    model = _model(make_model, arch)
    cfg, u = model.cfg, _data(200, model.cfg.D, seed=2)
    codes, xhat = beam_search(model, u, cfg.A, cfg.B, precision="bf16")
    runners = prepare_steps(model, "bf16")
    finals_NFm, _ = encode_module._search_beams(model, runners, u, cfg.A, cfg.B, min(cfg.B, RESCORED_BEAMS))
    N, F, n_codes = finals_NFm.shape
    assert F == min(cfg.B, RESCORED_BEAMS) and n_codes == model.n_codes
    err_NF = torch.stack([((u - model.decode(finals_NFm[:, f])) ** 2).sum(1) for f in range(F)], 1)
    err_N = ((u - model.decode(codes)) ** 2).sum(1)
    # the returned code is one of the final beams, and its float32 error is their minimum
    assert ((finals_NFm == codes[:, None, :]).all(2)).any(1).all()
    torch.testing.assert_close(err_N, err_NF.min(1).values, rtol=1e-5, atol=1e-6)
    assert (err_N <= err_NF[:, 0] * (1 + 1e-5) + 1e-6).all()     # never worse than bf16's own pick
    # GEMMs over other row counts: float32 rounding of up to 3e-5 on AMD Zen 4 (measured)
    torch.testing.assert_close(xhat, model.decode(codes), rtol=1e-4, atol=1e-4)


def test_reduced_precision_networks_follow_the_weights(make_model):
    """The bf16 copy of a step network is made once and takes the current weights at each
    prepare (training changes them between batches)."""
    model = _model(make_model, "qinco2")
    m = next(i for i, s in enumerate(model.steps) if s.net is not None)
    first = prepare_steps(model, "bf16")[m].net
    with torch.no_grad():
        for p in model.steps[m].net.parameters():
            p.add_(0.25)
    again = prepare_steps(model, "bf16")[m].net
    assert again is first
    for cast, p in zip(again.parameters(), model.steps[m].net.parameters()):
        assert cast.dtype == torch.bfloat16 and not cast.requires_grad
        torch.testing.assert_close(cast, p.to(torch.bfloat16), rtol=0, atol=0)


def test_unrescored_encoding_keeps_the_reduced_precision_pick(make_model, monkeypatch):
    """``rescored=False``: the best final beam by bf16 scores, no float32 decoding (training);
    in float32 the switch changes nothing."""
    model = _model(make_model, "qinco2")
    cfg, u = model.cfg, _data(300, model.cfg.D, seed=3)
    finals_NFm, xhat_NFD = encode_module._search_beams(model, prepare_steps(model, "bf16"), u, cfg.A, cfg.B, 1)
    calls = []
    monkeypatch.setattr(encode_module, "rescore", lambda *a, real=rescore: calls.append(1) or real(*a))
    codes, xhat = encode(model, u, A=cfg.A, B=cfg.B, precision="bf16", rescored=False)
    assert not calls
    monkeypatch.undo()
    torch.testing.assert_close(codes, finals_NFm[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(xhat, xhat_NFD[:, 0], rtol=0, atol=0)
    rescored_codes, _ = encode(model, u, A=cfg.A, B=cfg.B, precision="bf16")
    assert (rescored_codes != codes).any(1).any()              # random weights: re-scoring moves some
    fp32 = [encode(model, u, A=cfg.A, B=cfg.B, rescored=r)[0] for r in (True, False)]
    torch.testing.assert_close(fp32[0], fp32[1], rtol=0, atol=0)


def test_rescoring_changes_some_choices_of_the_reduced_precision(make_model):
    """On random weights (large, chaotic networks) bf16 misranks near-ties of the last step;
    re-scoring in float32 picks another final beam for some vectors and lowers their error."""
    model = _model(make_model, "qinco2")
    cfg, u = model.cfg, _data(300, model.cfg.D, seed=3)
    finals_NFm, _ = encode_module._search_beams(model, prepare_steps(model, "bf16"), u, cfg.A, cfg.B, cfg.B)
    codes, xhat = rescore(model, u, finals_NFm)
    changed = (codes != finals_NFm[:, 0]).any(1)
    assert changed.any()
    err_first = ((u - model.decode(finals_NFm[:, 0])) ** 2).sum(1)
    assert (((u - xhat) ** 2).sum(1)[changed] < err_first[changed]).all()


def test_codec_evaluation_and_codes_files_take_the_precision(make_codec, tmp_path):
    codec = make_codec()
    x = (_data(70, 8, seed=4) * 2).numpy()
    want = codec.encode(x, precision="bf16")
    assert want.shape == (70, codec.n_codes)
    np.testing.assert_array_equal(codec.encode(x, precision="bf16", batch_size=16), want)
    packed = codec.encode(x, precision="bf16", packed=True)
    np.testing.assert_array_equal(codec.code_layout.unpack(packed), want)
    encode_to_file(codec, x, tmp_path / "codes.npy", progress=False, precision="bf16")
    np.testing.assert_array_equal(np.asarray(load_encoded(tmp_path / "codes.npy")["codes"][:]), want)
    r16, r32 = evaluate_mse(codec, x, precision="bf16"), evaluate_mse(codec, x)
    assert r16["mse"] == pytest.approx(float(((codec.decode(want) - x) ** 2).sum(1).mean()), rel=1e-5)
    assert r16["mse"] <= 1.05 * r32["mse"]      # a random tiny model: a loose bound


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("bad", ["fp64", "BF16", "", None, 16, torch.bfloat16])
def test_an_unknown_precision_is_refused_with_the_choices(make_model, make_codec, bad):
    model = _model(make_model, "qinco2")
    u = _data(4, model.cfg.D)
    for call in (lambda: beam_search(model, u, 4, 4, precision=bad),
                 lambda: encode(model, u, A=4, B=4, precision=bad),
                 lambda: make_codec().encode(u[:, :8].numpy(), precision=bad)):
        with pytest.raises(InputError, match="precision must be one of fp32, bf16, fp16, tf32.*pass precision='fp32'"):
            call()


@pytest.mark.parametrize("precision", ["fp16", "tf32"])
def test_gpu_only_precisions_are_refused_on_the_cpu(make_model, make_codec, tmp_path, precision):
    model = _model(make_model, "qinco2")
    u = _data(4, model.cfg.D)
    codec = make_codec()
    for call in (lambda: encode(model, u, A=4, B=4, precision=precision),
                 lambda: codec.encode(u[:, :8].numpy(), precision=precision),
                 lambda: encode_to_file(codec, u[:, :8].numpy(), tmp_path / "c.npy", precision=precision)):
        with pytest.raises(InputError, match=f"precision='{precision}' needs a CUDA device.*on the CPU pass "
                                             "precision='bf16'"):
            call()
    assert not (tmp_path / "c.npy").exists()


def test_tf32_switch_is_restored():
    before = torch.backends.cuda.matmul.allow_tf32
    with matmul_precision("tf32"):
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before
    with matmul_precision("bf16"):
        assert torch.backends.cuda.matmul.allow_tf32 == before


# ----------------------------------------------------------------------------- CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_reduced_precisions_match_fp32(trained_codec, codec_data):
    model = trained_codec.model_
    cuda_model = type(model)(model.cfg).cuda()
    cuda_model.load_state_dict(model.state_dict())
    u = cuda_model.normalize(torch.as_tensor(codec_data[1]).cuda())
    c32, x32 = encode(cuda_model, u, A=4, B=4)
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    assert set(PRECISIONS) == {"fp32", "bf16", "fp16", "tf32"}
    for precision in ("tf32", "bf16", "fp16"):
        codes, xhat = encode(cuda_model, u, A=4, B=4, precision=precision)
        assert codes.device == u.device and xhat.dtype == torch.float32
        assert _mse(u, xhat) <= 1.005 * _mse(u, x32), precision
        assert (codes == c32).all(1).float().mean() >= 0.9, precision
        torch.testing.assert_close(cuda_model.decode(codes), xhat, rtol=1e-4, atol=1e-4)
    assert torch.backends.cuda.matmul.allow_tf32 == tf32_before           # left as found


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_prepared_decode_matches_the_model(make_model, arch):
    """The decoder with prepared steps gives ``model.decode`` in fp32 (to float rounding, also
    for code prefixes); in bf16 the vectors differ by far less than the codec's error."""
    model = _model(make_model, arch)
    u = _data(300, model.cfg.D)
    codes = encode(model, u, A=model.cfg.A, B=model.cfg.B)[0]
    ref = model.decode(codes)
    for m in (1, codes.shape[1]):
        got = encode_module.decode_prepared(model, prepare_steps(model, "fp32"), codes[:, :m])
        # embeddings looked up, not recomputed per row: float32 rounding only (3e-5 on AMD Zen 4)
        torch.testing.assert_close(got, model.decode(codes[:, :m]), rtol=1e-4, atol=1e-4)
    bf16 = encode_module.decode_prepared(model, prepare_steps(model, "bf16"), codes)
    assert bf16.dtype == torch.float32
    err, shift = ((u - ref) ** 2).sum(1).mean(), ((bf16 - ref) ** 2).sum(1).mean()
    assert 0 < shift < 1e-3 * err          # bfloat16 networks (8-bit mantissa) move the vectors a little


def test_codec_decode_precision_and_cache(trained_codec, codec_data):
    codec = trained_codec
    codes = codec.encode(codec_data[1])
    fp32 = codec.decode(codes)
    runners = codec._prepared_steps("fp32")
    assert codec._prepared_steps("fp32") is runners                   # kept while the weights are unchanged
    with torch.no_grad():
        next(codec.model_.parameters()).add_(0.0)                        # in place, same values: new version
    assert codec._prepared_steps("fp32") is not runners
    np.testing.assert_allclose(codec.decode(codes, precision="bf16"), fp32, rtol=0.05, atol=0.05)
    with pytest.raises(InputError, match="bf16"):
        codec.decode(codes, precision="tf32")
