"""Tests of qinco2.codec.train: schedule, normalisation, initialisation,
codeword resets, and short end-to-end fits (quality, seeding, checkpoints, resume)."""

from __future__ import annotations

import copy
import math
import os
import time

import faiss
import numpy as np
import pytest
import torch

import qinco2.codec.train as train_module
from qinco2.checkpoint import atomic_torch_save, load_checkpoint
from qinco2.codec.codec import QincoCodec
from qinco2.codec.encode import beam_search
from qinco2.codec.model import ModelConfig, QincoModel
from qinco2.codec.resets import reset_after_batch, reset_dead_codewords
from qinco2.codec.train import (
    TrainConfig,
    cosine_factor,
    fit,
    fit_normalization,
    initialize,
)
from qinco2.distributed import Workers
from qinco2.errors import ConfigError
from qinco2.metrics import code_usage, mse

# A fast training setup on 16-d clustered data: 12 batches of 256 per epoch.
FAST = dict(M=2, K=16, L=1, de=None, dh=32, A=4, B=4, batch=256, epochs=6, ramp_epochs=1,
            lr=3e-3, seed=0)


@pytest.fixture(scope="module")
def data(clustered):
    x = clustered(3600, seed=0)
    return x[:3000], x[3000:]


# ----------------------------------------------------------------------------- configs

def test_train_presets_and_validation():
    q1 = TrainConfig.from_preset("qinco1")
    assert (q1.optimizer, q1.lr, q1.weight_decay, q1.grad_clip, q1.scheduler, q1.patience,
            q1.codeword_reset, q1.normalization) == ("adam", 1e-4, 0.0, None, "plateau", 20, False, "max_abs")
    q2 = TrainConfig.from_preset("qinco2-S", lr=1e-3)
    assert (q2.optimizer, q2.lr, q2.weight_decay, q2.grad_clip, q2.epochs, q2.ramp_epochs,
            q2.patience, q2.init_noise) == ("adamw", 1e-3, 0.1, 0.1, 60, 3, 10, 0.1)
    for bad in (dict(optimizer="sgd"), dict(scheduler="step"), dict(normalization="l2"), dict(batch=0)):
        with pytest.raises(ConfigError):
            TrainConfig.from_preset("qinco2-M", **bad)
    with pytest.raises(ConfigError):
        TrainConfig.from_preset("nope")


# ----------------------------------------------------------------------------- schedule

def test_cosine_factor_values():
    cfg = TrainConfig(epochs=60, ramp_epochs=3, lr_min_factor=1e-3)
    assert cosine_factor(0.0, cfg) == 1e-3                    # floor during the first batches
    assert cosine_factor(1.5, cfg) == pytest.approx(0.5)      # linear ramp t / 3
    assert cosine_factor(3.0, cfg) == pytest.approx(1.0)
    assert cosine_factor(33.0, cfg) == pytest.approx(math.cos(math.pi / 4))
    assert cosine_factor(60.0, cfg) == pytest.approx(math.cos(math.pi / 2 * 57 / 60))  # ~0.078
    assert cosine_factor(63.0, cfg) == 1e-3                   # cosine reaches 0 at ramp + epochs
    assert cosine_factor(100.0, cfg) == 1e-3
    ts = np.linspace(0, 70, 701)
    f = np.array([cosine_factor(t, cfg) for t in ts])
    assert (f >= 1e-3).all() and (f <= 1.0).all()
    assert (np.diff(f[ts <= 3]) >= 0).all() and (np.diff(f[ts >= 3]) <= 1e-15).all()


# ----------------------------------------------------------------------------- initialisation

def test_fit_normalization_mean_std_and_max_abs(clustered):
    x = clustered(500, D=6)
    model = QincoModel(ModelConfig(D=6, M=1, K=4, A=0))
    fit_normalization(model, x, "mean_std")
    np.testing.assert_allclose(model.mean.numpy(), x.mean(0), rtol=1e-5, atol=1e-5)
    # a single scalar: the std of all entries around the global mean (numpy's x.std())
    assert model.scale.item() == pytest.approx(float(x.astype(np.float64).std()), rel=1e-5)
    fit_normalization(model, x, "max_abs")
    assert not model.mean.any() and model.scale.item() == pytest.approx(np.abs(x).max(), rel=1e-6)


def test_initialize_gives_rq_codebooks_and_equal_preselectors(clustered):
    x = clustered(1000, D=8)
    model = QincoModel(ModelConfig(D=8, M=3, K=8, L=1, de=None, dh=8, A=2, B=2))
    initialize(model, TrainConfig(init_noise=0.0, seed=0), x)
    for step in model.steps[1:]:
        assert torch.equal(step.codebook, step.preselector)  # same tensor copied
    # f(c, x_hat) = c at init here (zero-init, no projections): the model is an RQ, whose
    # first stage is a k-means of the data and whose later stages shrink the error
    codes, _ = beam_search(model, model.normalize(torch.as_tensor(x)), A=0, B=1)
    with torch.no_grad():
        err = [mse(x, model.denormalize(model.decode(codes[:, :m])).numpy()) for m in (1, 2, 3)]
    assert err[0] > err[1] > err[2]
    assert err[0] < 0.5 * mse(x, np.broadcast_to(x.mean(0), x.shape))


@pytest.mark.parametrize("de", [None, 6])
def test_a_fresh_model_is_exactly_its_rq_initialisation(clustered, de):
    """With or without projections, right after initialisation the model encodes (greedily)
    and decodes as the stage-wise RQ of its codebooks: same codes, same MSE."""
    x = clustered(1500, D=16, seed=3)
    model = QincoModel(ModelConfig(D=16, M=3, K=16, L=1, de=de, dh=8, A=4, B=1))
    initialize(model, TrainConfig(init_noise=0.0, seed=0), x)
    with torch.no_grad():
        books = [(s.codebook * model.scale + (model.mean if m == 0 else 0)).numpy()
                 for m, s in enumerate(model.steps)]            # raw-space RQ codebooks
        codes, _ = beam_search(model, model.normalize(torch.as_tensor(x)), A=4, B=1)
        x_hat = model.denormalize(model.decode(codes)).numpy()
    r, rq_codes = x.astype(np.float32).copy(), []
    for C_KD in books:                                         # plain greedy RQ, step by step
        ids = faiss.knn(r, np.ascontiguousarray(C_KD), 1)[1][:, 0]
        rq_codes.append(ids)
        r -= C_KD[ids]
    np.testing.assert_array_equal(codes.numpy(), np.stack(rq_codes, 1))
    # float32 sums of 3 codewords in two orders: 1e-5 relative
    assert mse(x, x_hat) == pytest.approx(float((r ** 2).sum(1).mean()), rel=1e-5)


def _raw_books(model: QincoModel) -> np.ndarray:
    """The model's codebooks in raw space, ``(M, K, D)``: the sum of one codeword per step is
    the raw reconstruction while the step networks are the identity."""
    with torch.no_grad():
        return np.stack([(s.codebook * model.scale + (model.mean if m == 0 else 0)).numpy()
                         for m, s in enumerate(model.steps)])


def test_init_refine_fits_all_codebooks_to_the_greedy_codes_by_least_squares(clustered, monkeypatch):
    """One refinement round = greedy codes of the RQ, then the codebooks that minimise the
    squared error of those codes, all steps jointly, on the first REFINE_ROWS rows only.
    Checked against a dense least-squares solve (its fitted values: the codebooks themselves
    are defined up to a shift between steps)."""
    import qinco2.codec.rq_init as rq_init
    monkeypatch.setattr(rq_init, "REFINE_ROWS", 600)
    x = clustered(1000, D=8, seed=5)
    cfg = ModelConfig(D=8, M=3, K=8, L=1, de=None, dh=8, A=2, B=1)
    plain, refined = QincoModel(cfg), QincoModel(cfg)
    initialize(plain, TrainConfig(init_noise=0.0, seed=0), x)
    initialize(refined, TrainConfig(init_noise=0.0, seed=0, init_refine=1), x)
    books = _raw_books(plain)
    r, onehot = x[:600].astype(np.float64), []
    for C_KD in books:                                         # greedy RQ codes of the first rows
        ids = ((r[:, None, :] - C_KD[None]) ** 2).sum(-1).argmin(1)
        onehot.append(np.eye(8)[ids])
        r = r - C_KD[ids]
    phi = np.concatenate(onehot, 1)                            # (600, M*K) design matrix
    best = phi @ np.linalg.lstsq(phi, x[:600].astype(np.float64), rcond=None)[0]
    got = phi @ _raw_books(refined).reshape(24, 8)
    np.testing.assert_allclose(got, best, atol=1e-3 * np.abs(x).max())
    assert ((got - x[:600]) ** 2).sum() < ((phi @ books.reshape(24, 8) - x[:600]) ** 2).sum()


def test_init_refine_needs_a_power_of_two_K(clustered):
    model = QincoModel(ModelConfig(D=8, M=2, K=6, L=1, de=None, dh=8, A=2, B=1))
    with pytest.raises(ConfigError, match="power of two"):
        initialize(model, TrainConfig(init_refine=2), clustered(300, D=8))
    with pytest.raises(ConfigError, match="init_refine"):
        TrainConfig(init_refine=-1).validated()


def test_initialisation_time_counts_against_the_time_budget(data):
    x_train, x_val = data[0][:1200], data[1][:300]
    model = QincoModel(ModelConfig(D=16, M=2, K=16, L=1, de=None, dh=32, A=4, B=4))
    cfg = TrainConfig(**{k: v for k, v in FAST.items() if k not in ModelConfig.__dataclass_fields__},
                      max_epochs=5, max_time_s=60.0)
    initialize(model, cfg, x_train)
    state = fit(model, cfg, x_train, x_val, progress=False, init_s=60.0)   # the budget is spent
    assert len(state.history) == 1 and state.step == 1 and state.elapsed_s >= 60.0

def test_the_codec_charges_its_initialisation_to_the_time_budget(data, monkeypatch):
    import qinco2.codec.codec as codec_module
    real = codec_module.initialize

    def slow_initialize(*args):                                 # an initialisation of 2 s
        time.sleep(2.0)
        real(*args)
    monkeypatch.setattr(codec_module, "initialize", slow_initialize)
    x_train, x_val = data[0][:1200], data[1][:300]
    state = _codec(max_epochs=3, max_time_s=1.5).train(x_train, x_val, progress=False).train_state_
    assert len(state.history) == 1 and state.step == 1 and state.elapsed_s >= 2.0


def test_training_never_returns_a_model_worse_than_its_initialisation(data):
    """A learning rate that wrecks the model: every epoch is worse than the start, and the
    initialisation is what comes back (and what is saved)."""
    x_train, x_val = data[0][:1200], data[1][:300]
    codec = _codec(max_epochs=3, lr=5.0, grad_clip=None, codeword_reset=False, init_noise=0.0)
    codec.train(x_train, x_val, progress=False)
    state = codec.train_state_
    assert all(h["val_mse"] > state.init_mse for h in state.history)   # training made it worse
    assert state.best_epoch == -1 and state.best_mse == state.init_mse
    assert mse(x_val, codec.decode(codec.encode(x_val))) == pytest.approx(state.init_mse, rel=1e-4)


# ----------------------------------------------------------------------------- codeword reset

def _random_batch(model, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(N, model.cfg.D, generator=g)
    codes, _ = beam_search(model, u, A=model.cfg.A, B=model.cfg.B)
    return u, codes


def test_reset_splits_live_codewords_into_exactly_the_dead_rows():
    torch.manual_seed(0)
    model = QincoModel(ModelConfig(D=4, M=3, K=32, L=1, de=None, dh=4, A=2, B=2))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    u, codes = _random_batch(model, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.losses(u, codes)[0].backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        target = u - model.partial_reconstructions(codes)[0]        # entering step 1
    usage = [torch.ones(32, dtype=torch.long) for _ in range(3)]
    usage[0][[3, 10]] = 0
    usage[1][:20] = 0
    usage[2][7] = 0
    counts = reset_dead_codewords(model, usage, u, codes, torch.Generator().manual_seed(1), opt)
    assert counts == [2, 20, 1]
    after = model.state_dict()
    for m, used in enumerate(usage):
        for name in ("codebook", "preselector"):
            key = f"steps.{m}.{name}"
            if key in after:
                assert torch.equal((after[key] != before[key]).any(1), used == 0), key
    for key in after:  # nothing but codebook/pre-selector rows moved
        if not key.endswith(("codebook", "preselector")):
            assert torch.equal(after[key], before[key]), key
    # a new pre-selection row lies halfway between its donor's row and a batch vector's target
    halfway = (before["steps.1.preselector"][codes[:, 1]] + target) / 2
    new = after["steps.1.preselector"][:20]
    assert ((new[:, None] - halfway[None]) ** 2).sum(-1).min(1).values.max() < 1e-10
    # the optimizer moments of the reset rows are cleared
    state = opt.state[model.steps[1].codebook]
    assert not state["exp_avg"][:20].any() and state["exp_avg"][20:].any()


def test_reset_draws_are_seeded_and_never_touch_the_ivf_step():
    model = QincoModel(ModelConfig(D=4, M=1, K=8, L=1, de=None, dh=4, A=2, B=2, ivf_K=3),
                       torch.randn(3, 4))
    ivf = model.steps[0].codebook.clone()
    u, codes = _random_batch(model, 16)
    usage = [None, torch.zeros(8, dtype=torch.long)]
    fresh = copy.deepcopy(model)
    counts = reset_dead_codewords(model, usage, u, codes, torch.Generator().manual_seed(0))
    assert counts == [0, 8] and torch.equal(model.steps[0].codebook, ivf)
    rows = []
    for seed in (0, 0, 1):
        model.load_state_dict(fresh.state_dict())
        reset_dead_codewords(model, usage, u, codes, torch.Generator().manual_seed(seed))
        rows.append(model.steps[1].codebook.clone())
    assert torch.equal(rows[0], rows[1]) and not torch.equal(rows[0], rows[2])


def test_resets_every_n_batches_in_equal_segments_ending_with_the_epoch():
    def points(n, every):
        return [i for i in range(n) if reset_after_batch(i, n, every)]
    assert points(100, 20) == [19, 39, 59, 79, 99]
    assert points(50, 20) == [24, 49]            # never a short tail segment
    assert points(12, 20) == points(12, 0) == [11]


# ----------------------------------------------------------------------------- end-to-end fits

def _codec(**overrides):
    return QincoCodec.from_preset("qinco2-S", **{**FAST, **overrides})


def test_fit_beats_its_rq_initialisation_and_faiss_rq(data):
    x_train, x_val = data
    codec = _codec(max_epochs=6).train(x_train, x_val, progress=False)
    state = codec.train_state_
    assert len(state.history) == 6 and state.best_epoch >= 0
    final = mse(x_val, codec.decode(codec.encode(x_val)))
    assert final == pytest.approx(state.best_mse, rel=1e-4)  # best weights are kept
    assert final < 0.8 * state.init_mse  # observed ~0.6
    # faiss ResidualQuantizer with the same M and K (greedy: its beam-5 training is worse here)
    rq = faiss.ResidualQuantizer(x_train.shape[1], FAST["M"], int(math.log2(FAST["K"])))
    rq.max_beam_size = 1
    rq.train(x_train)
    rq_mse = mse(x_val, rq.decode(rq.compute_codes(x_val)))
    assert final < 0.8 * rq_mse  # observed ~0.52: implicit codebooks follow the clusters


def test_cpu_bf16_training_runs_its_steps_in_bfloat16_and_learns(data, monkeypatch):
    """``cpu_bf16``: the beam search of each training batch in bf16 (not re-scored), the losses under bfloat16
    autocast; the weights, the validation and the saved model stay float32, and the model learns
    as much as in float32 (within 5% of its validation MSE here)."""
    x_train, x_val = data
    precisions, rescored, dtypes = [], set(), set()
    real_encode = train_module.encode

    def spy(*args, precision="fp32", **kwargs):
        precisions.append(precision)
        rescored.add(kwargs.get("rescored", True))
        return real_encode(*args, precision=precision, **kwargs)
    monkeypatch.setattr(train_module, "encode", spy)
    codec = _codec(max_epochs=6, cpu_bf16=True)
    original = QincoModel.losses

    def losses(self, *args):
        dtypes.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return original(self, *args)
    monkeypatch.setattr(QincoModel, "losses", losses)
    codec.train(x_train, x_val, progress=False)
    assert set(precisions) == {"bf16"} and dtypes == {torch.bfloat16}
    assert rescored == {False}                  # the codes only: no float32 decoding of the final beams
    assert all(p.dtype == torch.float32 for p in codec.model_.parameters())
    monkeypatch.undo()
    fp32 = _codec(max_epochs=6).train(x_train, x_val, progress=False)
    bf16_mse, fp32_mse = codec.train_state_.best_mse, fp32.train_state_.best_mse
    assert bf16_mse < 0.8 * codec.train_state_.init_mse
    assert bf16_mse == pytest.approx(fp32_mse, rel=0.05)


def test_same_seed_same_model_other_seed_other_model(data):
    x_train, x_val = data[0][:1200], data[1][:300]
    runs = [_codec(max_epochs=2, seed=s).train(x_train, x_val, progress=False) for s in (5, 5, 6)]
    sd = [r.model_.state_dict() for r in runs]
    assert all(torch.equal(sd[0][k], sd[1][k]) for k in sd[0])
    assert np.array_equal(runs[0].encode(x_val), runs[1].encode(x_val))
    assert not torch.equal(sd[0]["steps.1.codebook"], sd[2]["steps.1.codebook"])


def test_train_noise_jitters_the_training_rows_only_seeded(data, monkeypatch):
    """``train_noise``: each training batch is the batch of a run without noise plus Gaussian noise
    of ``train_noise`` times the batch's spread, drawn from the seed, the epoch and the process
    (the same run draws the same); the validation (which never reaches the training's encode
    call) is that of a run without noise."""
    x_train, x_val = data[0][:1200], data[1][:300]
    seen = {}
    real_encode = train_module.encode

    def spy(model, u, **kwargs):
        seen.setdefault(key, []).append(u.clone())
        return real_encode(model, u, **kwargs)
    monkeypatch.setattr(train_module, "encode", spy)
    runs = {}
    for key, noise in (("clean", 0.0), ("noisy", 0.3), ("again", 0.3)):
        runs[key] = _codec(max_epochs=2, train_noise=noise).train(x_train, x_val, progress=False)
    assert len(seen["clean"]) == len(seen["noisy"]) == 10           # 5 batches x 2 epochs
    for clean, noisy, again in zip(seen["clean"], seen["noisy"], seen["again"]):
        spread = clean.pow(2).mean().sqrt()
        jitter = (noisy - clean) / spread
        assert float(jitter.std()) == pytest.approx(0.3, rel=0.05) and abs(float(jitter.mean())) < 0.02
        assert torch.equal(noisy, again)                            # seeded
    first_batches = [seen["noisy"][i] - seen["clean"][i] for i in (0, 5)]
    assert not torch.allclose(first_batches[0][:10], first_batches[1][:10])  # each epoch its own draw
    assert runs["noisy"].train_state_.init_mse == runs["clean"].train_state_.init_mse  # clean validation
    with pytest.raises(ConfigError, match="train_noise"):
        TrainConfig(train_noise=-0.1).validated()


def test_qinco1_preset_trains_with_adam_and_plateau(data):
    x_train, x_val = data[0][:1200], data[1][:300]
    codec = QincoCodec.from_preset("qinco1", M=2, K=16, L=1, dh=16, batch=256, lr=1e-3,
                                   max_epochs=2).train(x_train, x_val, progress=False)
    assert codec.train_config.scheduler == "plateau"
    assert codec.train_state_.best_mse < codec.train_state_.init_mse


def test_best_checkpoint_is_written_and_loads(data, tmp_path):
    x_train, x_val = data[0][:1200], data[1][:300]
    path = tmp_path / "run" / "model.pt"
    codec = _codec(max_epochs=2).train(x_train, x_val, output=path, progress=False)
    assert path.is_file()
    assert os.listdir(path.parent) == ["model.pt"]  # no temporary files left behind
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == "qinco2-model" and payload["model_config"]["D"] == 16
    assert payload["training"]["state"]["best_mse"] == codec.train_state_.best_mse
    loaded = QincoCodec.load(path)
    assert np.array_equal(loaded.encode(x_val), codec.encode(x_val))


def test_atomic_write_keeps_the_old_file_when_saving_fails(tmp_path):
    path = tmp_path / "m.pt"
    atomic_torch_save({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        atomic_torch_save({"bad": lambda: None}, path)  # lambdas cannot be pickled
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["m.pt"]


def test_one_row_last_batch_keeps_the_model_finite(data):
    x_train, x_val = data[0][:2 * 256 + 1], data[1][:100]  # each epoch ends on a 1-row batch
    codec = _codec(max_epochs=2).train(x_train, x_val, progress=False)
    for name, t in codec.model_.state_dict().items():
        assert torch.isfinite(t).all(), name


def test_max_time_stops_after_one_batch(data):
    x_train, x_val = data[0][:1200], data[1][:300]
    codec = _codec(max_epochs=5, max_time_s=1e-9).train(x_train, x_val, progress=False)
    state = codec.train_state_
    assert len(state.history) == 1 and state.step == 1  # 5 batches per epoch otherwise


def test_resume_continues_from_the_saved_epoch(data, tmp_path):
    x_train, x_val = data[0][:1200], data[1][:300]
    path = tmp_path / "model.pt"
    first = _codec(max_epochs=2).train(x_train, x_val, output=path, progress=False)
    saved = load_checkpoint(path)["training"]["state"]
    assert saved["epoch"] == first.train_state_.best_epoch + 1
    second = _codec(max_epochs=4).train(x_train, x_val, output=path, resume=True, progress=False)
    state = second.train_state_
    assert state.init_mse == saved["init_mse"]  # restored, not recomputed
    assert state.epoch > saved["epoch"] and state.step > saved["step"]
    assert len(state.history) > len(saved["history"])
    assert state.history[:len(saved["history"])] == saved["history"]
    assert state.history[len(saved["history"])]["epoch"] == saved["epoch"]
    assert state.best_mse < saved["best_mse"] and state.best_epoch >= saved["epoch"]
    # the optimizer state was restored: Adam's step counter in the new best checkpoint
    # counts the batches of both runs (one optimizer step per batch here)
    rewritten = load_checkpoint(path)["training"]
    adam_steps = {int(s["step"]) for s in rewritten["optimizer"]["state"].values()}
    assert adam_steps == {rewritten["state"]["step"]}


def test_tensorboard_writes_event_files(data, tmp_path):
    pytest.importorskip("tensorboard")
    x_train, x_val = data[0][:600], data[1][:100]
    logdir = tmp_path / "tb"
    _codec(max_epochs=1, tensorboard=str(logdir)).train(x_train, x_val, progress=False)
    events = [f for f in os.listdir(logdir) if f.startswith("events.out.tfevents")]
    assert events and os.path.getsize(logdir / events[0]) > 100


def test_time_schedule_follows_the_share_of_the_budget(monkeypatch):
    cfg = TrainConfig(lr=1.0, epochs=10, ramp_epochs=2, max_time_s=100.0, time_schedule=True).validated()
    now = [1000.0]
    monkeypatch.setattr(train_module.time, "monotonic", lambda: now[0])
    deadline = 1100.0

    state = train_module.TrainState()

    def lr():
        return train_module._lr_for(cfg, 0.0, train_module._time_spent(cfg, state, deadline, Workers(), "cpu"))

    assert lr() == pytest.approx(cfg.lr_min_factor)
    now[0] = 1000.0 + 100.0 * 1 / 12     # one epoch-equivalent into the 12 of the schedule
    assert lr() == pytest.approx(0.5)
    now[0] = 1100.0                      # budget spent: the cosine has reached its floor
    assert lr() == pytest.approx(cfg.lr_min_factor)
    # 40 s of initialisation: the schedule spans the 60 s left, warm-up first
    state.init_s, deadline = 40.0, 1060.0
    now[0] = 1000.0
    assert lr() == pytest.approx(cfg.lr_min_factor)
    now[0] = 1000.0 + 60.0 * 1 / 12
    assert lr() == pytest.approx(0.5)
    state.init_s = 150.0                 # the initialisation took the whole budget
    assert lr() == pytest.approx(cfg.lr_min_factor)
    with pytest.raises(ConfigError, match="max_time_s"):
        TrainConfig(time_schedule=True).validated()


def _collapsed_fit(reset: bool):
    """A model whose second step starts collapsed (12 of its 16 codewords far from every
    residual, as after a collapse), trained on a few tight clusters."""
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 4, (4, 16))[rng.integers(0, 4, 3600)] + rng.normal(0, 0.3, (3600, 16))).astype(np.float32)
    model = QincoModel(ModelConfig.from_preset("qinco2-S", **{k: v for k, v in FAST.items() if k in
                                                              ("M", "K", "L", "de", "dh", "A", "B")}, D=16))
    cfg = TrainConfig.from_preset("qinco2-S", **{k: v for k, v in FAST.items() if k in
                                                 ("batch", "epochs", "ramp_epochs", "lr", "seed")},
                                  max_epochs=6, codeword_reset=reset)
    initialize(model, cfg, x[:3000])
    with torch.no_grad():
        far = torch.randn(12, 16, generator=torch.Generator().manual_seed(0)) * 50
        model.steps[1].codebook[4:] = far
        model.steps[1].preselector[4:] = far
    fit(model, cfg, x[:3000], x[3000:], progress=False)
    codes, _ = beam_search(model, model.normalize(torch.from_numpy(x[3000:])), A=4, B=4)
    return code_usage(codes.numpy(), [16, 16])


def test_resets_revive_a_collapsed_step():
    used, entropy = _collapsed_fit(reset=True)
    assert used[1] >= 0.9 and entropy[1] > 3.5
    used, entropy = _collapsed_fit(reset=False)
    assert used[1] <= 0.25
