"""Converting model files of the reference QINCo release (qinco2.codec.reference).

Each test writes a file in a reference layout (names and shapes as documented in the module
doc of :mod:`qinco2.codec.reference`, small sizes), converts it, and checks the converted
model's decoding against a slow, obvious evaluation of the reference formula on the same
weights, in float64. Tolerance: the converted model runs in float32 on values of order 1-10,
so 1e-4 relative to the scale of the output.
"""

from __future__ import annotations

import sys
import types
import zipfile

import numpy as np
import pytest
import torch
from conftest import run_cli
from torch import nn

from qinco2 import ModelFileError, QincoCodec, write_vectors

D, M, K, L, H = 16, 3, 16, 1, 8


def _close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(1.0, np.abs(b).max()))


def _codes(n: int, ivf_K: int = 0, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, K, (n, M + bool(ivf_K)))
    if ivf_K:
        codes[:, 0] = rng.integers(0, ivf_K, n)
    return codes.astype(np.int32)


# ------------------------------------------------------------------ QINCo2 release layout

def qinco2_state(*, de=None, A=0, ivf_K=0, seed=0) -> dict[str, torch.Tensor]:
    """Weights named as in the reference QINCo2 checkpoints (qinco/model/qinco_base.py)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.3):
        return torch.randn(*shape, generator=g) * std

    E = de or D
    state = {"data_mean": rnd(D, std=3.0), "data_std": torch.tensor(2.5)}
    for m in range(M + bool(ivf_K)):
        p = f"steps.{m}."
        if ivf_K and m == 0:
            state[p + "ivf_centroids.weight"] = rnd(ivf_K, D, std=1.0)
            continue
        state[p + "codebook.weight"] = rnd(K, D, std=1.0)
        state[p + "xtarget_mean"], state[p + "xtarget_var"] = rnd(D), rnd(D).abs()
        if m == 0:
            continue
        if A:
            state[p + "substep.codebook.weight"] = rnd(K, D, std=1.0)
        state[p + "concat.mlp.weight"], state[p + "concat.mlp.bias"] = rnd(E, E + D), rnd(E)
        for i in range(L):
            state[p + f"residual_blocks.{i}.up_proj.weight"] = rnd(H, E)
            state[p + f"residual_blocks.{i}.down_proj.weight"] = rnd(E, H)
        if de:
            state[p + "in_proj.weight"], state[p + "out_proj.weight"] = rnd(E, D), rnd(D, E)
    return state


def save_qinco2(path, state, **params):
    """A checkpoint as the reference's save_model writes it (qinco/utils.py)."""
    params = {"K": K, "M": M, "dh": H, "L": L, "B": 2, **params}
    torch.save({"epoch": None, "model": state, "optimizer": None, "scheduler": None, "logger": None,
                "parameters": {k: v for k, v in params.items() if v is not None}, "data_dim": D}, path)
    return path


def qinco2_formula(state, codes, *, qinco1_mode=False) -> np.ndarray:
    """The reference decoder, one vector and one step at a time, in float64."""
    out = []
    for row in codes.tolist():
        xhat = torch.zeros(D, dtype=torch.float64)
        for m, code in enumerate(row):
            w = {k[len(f"steps.{m}."):]: v.double() for k, v in state.items() if k.startswith(f"steps.{m}.")}
            if m == 0:
                xhat = xhat + w.get("ivf_centroids.weight", w.get("codebook.weight"))[code]
                continue
            c = w["codebook.weight"][code]
            z = w["in_proj.weight"] @ c if "in_proj.weight" in w else c
            z = z + w["concat.mlp.weight"] @ torch.cat([z, xhat]) + w["concat.mlp.bias"]
            for i in range(L):
                up, down = w[f"residual_blocks.{i}.up_proj.weight"], w[f"residual_blocks.{i}.down_proj.weight"]
                z = z + down @ torch.relu(up @ z)
            y = w["out_proj.weight"] @ z if "out_proj.weight" in w else z
            xhat = xhat + (y if qinco1_mode else c + y)       # QINCo2: codeword skip, also when d_e = D
        out.append((xhat * state["data_std"].double() + state["data_mean"].double()).numpy())
    return np.stack(out)


@pytest.mark.parametrize("de, A", [(None, 0), (None, 4), (8, 4)])
def test_qinco2_checkpoint_decodes_as_the_reference(tmp_path, de, A):
    state = qinco2_state(de=de, A=A)
    codec = QincoCodec.from_reference(save_qinco2(tmp_path / "ref.pt", state, de=de, A=A))
    cfg = codec.model_.cfg
    assert (cfg.D, cfg.M, cfg.K, cfg.L, cfg.dh, cfg.de, cfg.A, cfg.B) == (D, M, K, L, H, de, A, 2)
    assert cfg.codeword_skip and cfg.double_skip == (de is None)
    codes = _codes(40)
    _close(codec.decode(codes), qinco2_formula(state, codes))
    if A:   # the pre-selection codebooks are the reference's substep codebooks
        assert torch.equal(codec.model_.steps[2].preselector, state["steps.2.substep.codebook.weight"])
    x = qinco2_formula(state, _codes(30, seed=2)).astype(np.float32)
    assert codec.encode(x).shape == (30, M)


def test_ivf_checkpoint_keeps_its_normalised_table(tmp_path):
    state = qinco2_state(de=8, A=4, ivf_K=10)
    path = save_qinco2(tmp_path / "ivf.pt", state, de=8, A=4, ivf_in_use=True, ivf_K=10)
    codec = QincoCodec.from_reference(path)
    assert codec.model_.cfg.ivf_K == 10 and codec.n_codes == M + 1
    assert torch.equal(codec.model_.steps[0].codebook, state["steps.0.ivf_centroids.weight"])
    codes = _codes(40, ivf_K=10)
    _close(codec.decode(codes), qinco2_formula(state, codes))


def test_qinco1_mode_checkpoint_has_no_codeword_skip(tmp_path):
    state = qinco2_state()
    codec = QincoCodec.from_reference(save_qinco2(tmp_path / "q1.pt", state, A=0, B=1, qinco1_mode=True,
                                                  ivf_K=1048576))      # the qinco1 preset stores ivf_K
    cfg = codec.model_.cfg
    assert not cfg.codeword_skip and cfg.ivf_K == 0 and cfg.A == 0 and cfg.B == 1
    codes = _codes(40)
    _close(codec.decode(codes), qinco2_formula(state, codes, qinco1_mode=True))


def test_older_weight_names_are_read(tmp_path):
    """``module.`` prefixes, ``residual_blocks.N.in_proj`` and an unused step-0 pre-selector."""
    state = qinco2_state(de=8, A=4)
    old = {}
    for name, t in state.items():
        name = name.replace("in_proj", "residual_blocks.0.in_proj").replace("out_proj", "residual_blocks.0.out_proj")
        old["module." + name] = t
    old["module.steps.0.substep.codebook.weight"] = torch.zeros(K, D)
    codec = QincoCodec.from_reference(save_qinco2(tmp_path / "old.pt", old, de=8, A=4))
    codes = _codes(20)
    _close(codec.decode(codes), qinco2_formula(state, codes))


# ------------------------------------------------------------------ QINCo1: a whole pickled module

class QINCoStep(nn.Module):
    """The module tree of model_qinco.QINCoStep (names and shapes only)."""

    __module__ = "model_qinco"

    def __init__(self, lowrank: bool):
        super().__init__()
        self.codebook = nn.Embedding(K, D)
        self.MLPconcat = (nn.Sequential(nn.Linear(2 * D, H, bias=False), nn.Linear(H, D, bias=False))
                          if lowrank else nn.Linear(2 * D, D))
        self.residual_blocks = []
        for i in range(L):
            block = nn.Sequential(nn.Linear(D, H, bias=False), nn.ReLU(), nn.Linear(H, D, bias=False))
            self.add_module(f"residual_block{i}", block)
            self.residual_blocks.append(block)


class QINCo(nn.Module):
    """model_qinco.QINCo: codebook0, then step1 .. step{M-1}."""

    __module__ = "model_qinco"
    lowrank, ivf_K = False, 0

    def __init__(self):
        super().__init__()
        self.codebook0 = nn.Embedding(self.ivf_K or K, D)
        self.steps = []
        for m in range(0 if self.ivf_K else 1, M):
            step = QINCoStep(self.lowrank)
            self.add_module(f"step{m}", step)
            self.steps.append(step)
        self.db_scale = np.float32(3.5)        # train_qinco.py: xt.max(), a numpy scalar


class IVFQINCo(QINCo):
    """model_qinco.IVFQINCo: codebook0 is the IVF table, then step0 .. step{M-1}."""

    __module__ = "model_qinco"
    ivf_K = 10


class QINCoLR(QINCo):
    """model_qinco.QINCoLR: MLPconcat is two bias-free maps 2D -> h -> D."""

    __module__ = "model_qinco"
    lowrank = True


class PQ_QINCo(nn.Module):
    __module__ = "model_qinco"


def pickle_qinco1(path, cls, monkeypatch):
    """``torch.save(model)`` of a model_qinco class; the module is gone again before loading."""
    fake = types.ModuleType("model_qinco")
    for c in (QINCoStep, QINCo, IVFQINCo, QINCoLR, PQ_QINCo):
        setattr(fake, c.__name__, c)
    torch.manual_seed(0)
    model = cls()
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "model_qinco", fake)
        torch.save(model, path)
    assert "model_qinco" not in sys.modules
    return model


def qinco1_formula(model, codes) -> np.ndarray:
    """The QINCo1 decoder (model_qinco.py), one vector and one step at a time, in float64."""
    out = []
    for row in codes.tolist():
        xhat = model.codebook0.weight.double()[row[0]]
        for step, code in zip(model.steps, row[1:]):
            c = step.codebook.weight.double()[code]
            z = c + step.MLPconcat.double()(torch.cat([c, xhat]))
            for block in step.residual_blocks:
                z = z + block.double()(z)
            xhat = xhat + z
        out.append(xhat.detach().numpy() * float(model.db_scale))
    return np.stack(out)


@pytest.mark.parametrize("cls", [QINCo, IVFQINCo, QINCoLR])
def test_pickled_qinco1_model_decodes_as_the_reference(tmp_path, monkeypatch, cls):
    model = pickle_qinco1(tmp_path / "v1.pt", cls, monkeypatch)
    codec = QincoCodec.from_reference(tmp_path / "v1.pt")
    cfg = codec.model_.cfg
    assert (cfg.M, cfg.K, cfg.L, cfg.dh, cfg.de, cfg.A, cfg.B, cfg.ivf_K) == (M, K, L, H, None, 0, 1, cls.ivf_K)
    assert not cfg.codeword_skip
    assert float(codec.model_.scale) == pytest.approx(3.5) and not codec.model_.mean.any()
    codes = _codes(40, ivf_K=cls.ivf_K)
    _close(codec.decode(codes), qinco1_formula(model, codes))


def test_numpy_1_era_db_scale_is_read(tmp_path, monkeypatch):
    """Files pickled under numpy 1 name its scalars numpy.core.multiarray.scalar."""
    pickle_qinco1(tmp_path / "v1.pt", QINCo, monkeypatch)
    with zipfile.ZipFile(tmp_path / "v1.pt") as src, zipfile.ZipFile(tmp_path / "np1.pt", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(item, data)
    assert float(QincoCodec.from_reference(tmp_path / "np1.pt").model_.scale) == pytest.approx(3.5)


# ------------------------------------------------------------------ the command line

def test_cli_convert_then_eval(tmp_path, capsys):
    state = qinco2_state(de=8, A=4)
    ref = save_qinco2(tmp_path / "ref.pt", state, de=8, A=4)
    out = tmp_path / "models" / "ours.pt"
    rc, _, err, result = run_cli(capsys, "task=convert", f"model={ref}", f"output={out}", "cpu=true",
                                 "verbose=false")
    assert rc == 0, err
    assert result["output"] == str(out) and (result["M"], result["de"], result["A"]) == (M, 8, 4)
    codes = _codes(20)
    _close(QincoCodec.load(out).decode(codes), qinco2_formula(state, codes))
    db = tmp_path / "db.fvecs"
    write_vectors(db, qinco2_formula(state, _codes(50, seed=3)).astype(np.float32))
    rc, _, err, result = run_cli(capsys, "task=eval", f"model={out}", f"db={db}", "cpu=true", "verbose=false",
                                 "progress=false")
    assert rc == 0, err
    assert result["mse"] >= 0


def test_cli_convert_refuses_to_overwrite_its_input(tmp_path, capsys):
    ref = save_qinco2(tmp_path / "ref.pt", qinco2_state())
    rc, _, err, _ = run_cli(capsys, "task=convert", f"model={ref}", f"output={ref}", "cpu=true")
    assert rc == 2 and "destroy that input" in err


# ------------------------------------------------------------------ refusals

class Foreign:
    pass


def _payload(state=None, **params):
    return {"model": qinco2_state() if state is None else state, "parameters": {"K": K, "M": M, **params},
            "data_dim": D}


@pytest.mark.parametrize("content, words", [
    ({"state_dict": {"w": torch.zeros(2)}}, ["a dict with keys ['state_dict']", "expected a file of the reference"]),
    ({"model": qinco2_state()}, ["without 'parameters'", "task=convert"]),
    (_payload({**qinco2_state(), "steps.1.extra.weight": torch.zeros(2)}),
     ["unknown weights ['steps.1.extra.weight']"]),
    (_payload({**qinco2_state(), "steps.2.concat.mlp.bias": torch.zeros(3)}),
     ["steps.2.concat.mlp.bias has shape (3,)", "expected (16,)"]),
    (_payload(M=5), ["disagree with its weights", "M=5 (weights: 3)"]),
    (_payload(A=4), ["A=4 does not match the pre-selection codebooks"]),
    (_payload(ivf_in_use=True), ["ivf_in_use", "holds no IVF table"]),
    (Foreign(), ["Foreign", "not part of a file of the reference QINCo release"]),
    ({"format": "qinco2-model", "version": 1}, ["already a qinco2 model file"]),
])
def test_unknown_layouts_are_refused_with_what_was_found(tmp_path, content, words):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(ModelFileError) as info:
        QincoCodec.from_reference(path)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_non_torch_files_and_pq_qinco_are_refused(tmp_path, monkeypatch):
    (tmp_path / "text.pt").write_text("not a model")
    with pytest.raises(ModelFileError, match="not a torch file"):
        QincoCodec.from_reference(tmp_path / "text.pt")
    with pytest.raises(ModelFileError, match="does not exist"):
        QincoCodec.from_reference(tmp_path / "missing.pt")
    pickle_qinco1(tmp_path / "pq.pt", PQ_QINCo, monkeypatch)
    with pytest.raises(ModelFileError, match="not PQ-QINCo"):
        QincoCodec.from_reference(tmp_path / "pq.pt")
