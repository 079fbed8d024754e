"""Training: initialisation (see :mod:`.rq_init`), the two-pass optimisation loop, schedules,
codeword resets, validation, best-model checkpoints and resume."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import save_checkpoint
from ..distributed import Workers
from ..errors import ConfigError
from .batches import epoch_batches, epoch_length
from .encode import encode
from .model import QincoModel
from .resets import reset_after_batch, reset_dead_codewords
from .rq_init import fit_normalization, rq_initialize

log = logging.getLogger(__name__)

PRESET_TRAINING: dict[str, dict] = {
    "qinco1": dict(optimizer="adam", lr=1e-4, weight_decay=0.0, grad_clip=None, scheduler="plateau",
                   patience=20, init_noise=0.0, codeword_reset=False, normalization="max_abs",
                   full_epochs=True),
    "qinco2-S": {}, "qinco2-M": {}, "qinco2-L": {},
}


@dataclass
class TrainConfig:
    """Optimisation settings; defaults are those of the QINCo2 presets."""

    lr: float = 8e-4
    optimizer: str = "adamw"            # "adamw" | "adam"
    weight_decay: float = 0.1
    grad_clip: float | None = 0.1       # element-wise value clipping
    batch: int = 1024
    grad_accumulate: int = 1
    epochs: int = 60                    # length of the cosine schedule
    ramp_epochs: int = 3
    lr_min_factor: float = 1e-3
    scheduler: str = "cosine"           # "cosine" | "plateau"
    patience: int = 10
    loop: int = 10_000_000              # samples per epoch (window over the training set)
    full_epochs: bool = False           # epoch = one pass over the whole training set
    init_noise: float = 0.1
    init_samples: int = 1_000_000
    codeword_reset: bool = True
    reset_every: int = 20               # batches between codeword resets (see .resets); <= 0: per epoch
    normalization: str = "mean_std"     # "mean_std" (QINCo2) | "max_abs" (QINCo1)
    amp: bool = True                    # fp16 autocast, CUDA only
    seed: int = 0
    max_time_s: float | None = None     # wall-clock budget; stops after the current batch
    time_schedule: bool = False         # spread warm-up + cosine over max_time_s, not over epochs
    max_epochs: int | None = None
    tensorboard: str | None = None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        if name not in PRESET_TRAINING:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESET_TRAINING)}")
        return cls(**{**PRESET_TRAINING[name], **overrides}).validated()

    def validated(self) -> "TrainConfig":
        if self.optimizer not in ("adamw", "adam"):
            raise ConfigError(f"optimizer must be 'adamw' or 'adam', got {self.optimizer!r}")
        if self.scheduler not in ("cosine", "plateau"):
            raise ConfigError(f"scheduler must be 'cosine' or 'plateau', got {self.scheduler!r}")
        if self.normalization not in ("mean_std", "max_abs"):
            raise ConfigError(f"normalization must be 'mean_std' or 'max_abs', got {self.normalization!r}")
        if self.time_schedule and not self.max_time_s:
            raise ConfigError("time_schedule=true needs a time budget: set max_time_s")
        if self.batch < 1 or self.grad_accumulate < 1 or self.loop < 1:
            raise ConfigError("batch, grad_accumulate and loop must be >= 1")
        return self


# ----------------------------------------------------------------------------- schedule

def cosine_factor(t: float, cfg: TrainConfig) -> float:
    """Warm-up over ``ramp_epochs`` then a quarter cosine reaching 0 at ``ramp + epochs``."""
    f = t / cfg.ramp_epochs if t < cfg.ramp_epochs else math.cos(
        math.pi / 2 * min(1.0, (t - cfg.ramp_epochs) / cfg.epochs))
    return max(f, cfg.lr_min_factor)


def make_optimizer(model: QincoModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def validation_mse(model: QincoModel, x_val: np.ndarray, *, A: int, B: int, mse_scale: float,
                   batch: int = 4096, workers: Workers = Workers()) -> float:
    """Raw-space MSE (sum over dims, mean over vectors) times ``mse_scale``; with several
    processes each takes a contiguous share of the rows and the sums are reduced."""
    device = model.mean.device
    share = -(-len(x_val) // workers.world_size)
    lo, hi = workers.rank * share, min(len(x_val), (workers.rank + 1) * share)
    total, n = 0.0, 0
    for i in range(lo, hi, batch):
        x = torch.from_numpy(np.array(x_val[i:min(i + batch, hi)], dtype=np.float32)).to(device)
        _, xhat = encode(model, model.normalize(x), A=A, B=B)
        total += ((model.denormalize(xhat) - x) ** 2).sum(dtype=torch.float64).item()
        n += len(x)
    sums = workers.all_reduce_(torch.tensor([total, n], dtype=torch.float64, device=device))
    return float(sums[0] / max(float(sums[1]), 1.0)) * mse_scale


# ----------------------------------------------------------------------------- the loop

@dataclass
class TrainState:
    """Counters that make a run resumable (stored in the checkpoint)."""

    epoch: int = 0                  # next epoch to run
    best_mse: float = math.inf
    best_epoch: int = -1
    init_mse: float | None = None
    step: int = 0
    elapsed_s: float = 0.0
    history: list = dataclasses.field(default_factory=list)


@dataclass
class _Run:
    """What one call of :func:`fit` carries from epoch to epoch."""

    model: QincoModel
    cfg: TrainConfig
    workers: Workers
    opt: torch.optim.Optimizer
    plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None
    scaler: torch.amp.GradScaler
    state: TrainState
    best_weights: dict
    writer: object | None  # a tensorboard SummaryWriter on rank 0, or None


def _lr_for(cfg: TrainConfig, t: float, spent: float | None) -> float | None:
    """Learning rate at fractional epoch ``t``; with ``time_schedule`` the position in the
    schedule is ``spent``, the share of the time budget used, scaled to ``ramp_epochs + epochs``."""
    if cfg.scheduler != "cosine":
        return None
    if cfg.time_schedule and spent is not None:
        t = (cfg.ramp_epochs + cfg.epochs) * min(max(spent, 0.0), 1.0)
    return cfg.lr * cosine_factor(t, cfg)


def _time_spent(cfg: TrainConfig, deadline: float | None, workers: Workers, device) -> float | None:
    """Share of the time budget used, the largest over the processes (so that all of them
    follow one schedule and stop at the same step); None without a budget."""
    if deadline is None:
        return None
    spent = torch.tensor([1.0 - (deadline - time.monotonic()) / cfg.max_time_s], device=device)
    return float(workers.all_reduce_(spent, "max")[0])


def _train_epoch(run: _Run, x_train, bar, deadline) -> tuple[float, list, bool]:
    """One epoch of two-pass steps on this process's batches; gradients are averaged over
    the processes; dead codewords are reset along the way (:mod:`.resets`). Returns (mean
    loss, codewords reset per step, out_of_time)."""
    model, cfg, state, opt, workers = run.model, run.cfg, run.state, run.opt, run.workers
    device, mcfg = model.mean.device, model.cfg
    rng = np.random.default_rng([cfg.seed, state.epoch])
    n_batches = bar.total
    usage = [None if s.frozen else torch.zeros(s.K, dtype=torch.long, device=device) for s in model.steps]
    use_amp = cfg.amp and device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    losses, out_of_time, resets = [], False, [0] * len(model.steps)
    batches = epoch_batches(x_train, state.epoch, loop=cfg.loop, batch_size=cfg.batch, rng=rng,
                            full_pass=cfg.full_epochs, rank=workers.rank, world_size=workers.world_size)
    for i, batch in enumerate(batches):
        u = model.normalize(torch.as_tensor(np.asarray(batch, dtype=np.float32), device=device))
        codes, _ = encode(model, u, A=mcfg.A, B=mcfg.B)
        for m, used in enumerate(usage):
            if used is not None:
                used += torch.bincount(codes[:, m], minlength=used.numel())
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            loss_rec, loss_pre = model.losses(u, codes)
        run.scaler.scale((loss_rec + loss_pre) / cfg.grad_accumulate).backward()
        spent = _time_spent(cfg, deadline, workers, device)
        if (i + 1) % cfg.grad_accumulate == 0 or i + 1 == n_batches:
            _set_lr(opt, _lr_for(cfg, state.epoch + (i + 1) / n_batches, spent))
            workers.mean_grads_(params)
            run.scaler.unscale_(opt)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_value_(model.parameters(), cfg.grad_clip)
            run.scaler.step(opt)
            run.scaler.update()
            opt.zero_grad(set_to_none=True)
        if cfg.codeword_reset and reset_after_batch(i, n_batches, cfg.reset_every):
            _reset_codewords(run, i, usage, u, codes, resets)
        state.step += 1
        losses.append(loss_rec.item() + loss_pre.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", best_val=f"{state.best_mse:.5g}")
        if run.writer is not None:
            run.writer.add_scalar("train/loss_rec", loss_rec.item(), state.step)
            run.writer.add_scalar("train/loss_pre", loss_pre.item(), state.step)
            run.writer.add_scalar("train/lr", opt.param_groups[0]["lr"], state.step)
        if spent is not None and spent >= 1.0:
            out_of_time = True
            break
    loss = workers.all_reduce_(torch.tensor([float(np.mean(losses)) if losses else math.nan], device=device), "mean")
    return float(loss[0]), resets, out_of_time


def _reset_codewords(run: _Run, i: int, usage: list, u_ND, codes_NM, resets: list) -> None:
    """Reset the codewords no process used since the last reset (the same ones, to the same
    rows, everywhere), add the counts to ``resets`` and restart the usage counts."""
    for used in usage:
        if used is not None:
            run.workers.all_reduce_(used, "sum")
    seed = np.random.SeedSequence([run.cfg.seed, run.state.epoch, i]).generate_state(1)[0]
    gen = torch.Generator().manual_seed(int(seed))
    counts = reset_dead_codewords(run.model, usage, u_ND, codes_NM, gen, run.opt, run.workers)
    for m, used in enumerate(usage):
        resets[m] += counts[m]
        if used is not None:
            used.zero_()


def _should_stop(cfg: TrainConfig, state: TrainState, finished_epoch: int) -> bool:
    if finished_epoch - state.best_epoch > cfg.patience:
        return True
    if cfg.scheduler == "cosine" and not cfg.time_schedule and finished_epoch >= cfg.epochs + cfg.patience:
        return True
    return cfg.max_epochs is not None and finished_epoch + 1 >= cfg.max_epochs


def fit(model: QincoModel, cfg: TrainConfig, x_train: np.ndarray, x_val: np.ndarray, *,
        mse_scale: float = 1.0, output=None, resume: dict | None = None,
        progress: bool = True, workers: Workers = Workers()) -> TrainState:
    """Train ``model`` in place; the best model (by validation MSE) is loaded at the end: the
    initialisation itself when no epoch beats it (``state.best_epoch == -1``).

    ``output``: after every epoch, the best weights so far and the full state of the run (the
    current weights, optimizer, schedule, counters) are written there atomically, so that a
    killed run continues with ``resume`` = the file's ``training`` part from the end of its
    last epoch; all randomness is derived from ``cfg.seed`` and the epoch number.
    ``model`` must already be initialised (:func:`initialize`) unless resuming.
    ``workers``: data-parallel processes (each runs its share of every epoch's batches;
    gradients, statistics and validation are reduced; only rank 0 writes and logs).
    """
    run = _start_run(model, cfg, resume, workers)
    state, mcfg = run.state, model.cfg
    if state.init_mse is None:
        state.init_mse = validation_mse(model, x_val, A=mcfg.A, B=mcfg.B, mse_scale=mse_scale, workers=workers)
        state.best_mse = state.init_mse                 # the initialisation is the model to beat
        _info(workers, "validation MSE after initialisation: %.6g", state.init_mse)
    start = time.monotonic() - state.elapsed_s
    deadline = start + cfg.max_time_s if cfg.max_time_s else None
    n_batches = epoch_length(len(x_train), cfg.loop, cfg.batch, world_size=workers.world_size,
                             full_pass=cfg.full_epochs)
    if n_batches == 0:
        raise ConfigError(f"an epoch of {min(len(x_train), cfg.loop)} rows in batches of {cfg.batch} gives no "
                          f"batch to each of {workers.world_size} processes; lower batch or use fewer processes")
    while True:
        _set_lr(run.opt, _lr_for(cfg, state.epoch, _time_spent(cfg, deadline, workers, model.mean.device)))
        with tqdm(total=n_batches, desc=f"epoch {state.epoch}", disable=not (progress and workers.is_main),
                  leave=False) as bar:
            loss, resets, out_of_time = _train_epoch(run, x_train, bar, deadline)
        val = validation_mse(model, x_val, A=mcfg.A, B=mcfg.B, mse_scale=mse_scale, workers=workers)
        epoch = state.epoch
        state.epoch += 1
        state.elapsed_s = time.monotonic() - start
        _end_epoch(run, epoch, loss, val, resets, output)
        if out_of_time or _should_stop(cfg, state, epoch):
            break
    model.load_state_dict(run.best_weights)
    if run.writer is not None:
        run.writer.close()
    workers.barrier()                                          # the file is complete for everyone
    return state


def _start_run(model: QincoModel, cfg: TrainConfig, resume: dict | None, workers: Workers) -> _Run:
    """Optimizer, schedule and counters of a fresh run, or of ``resume``'s run at its last epoch."""
    device = model.mean.device
    opt = make_optimizer(model, cfg)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=0.1, patience=10, threshold=1e-10, min_lr=cfg.lr * 1e-2) if cfg.scheduler == "plateau" else None
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    if resume is None:
        state = TrainState()
        workers.broadcast_module_(model)                       # one initialisation for all
        best_weights = _copy_weights(model)
    else:
        state = TrainState(**resume["state"])
        best_weights = _copy_weights(model)                    # as loaded: the best so far
        opt.load_state_dict(resume["optimizer"])
        if plateau is not None and resume.get("plateau"):
            plateau.load_state_dict(resume["plateau"])
        if resume.get("current_state_dict") is not None:     # weights at the end of the last epoch
            model.load_state_dict(resume["current_state_dict"])
    writer = None
    if cfg.tensorboard and workers.is_main:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency
        writer = SummaryWriter(cfg.tensorboard)
    return _Run(model, cfg, workers, opt, plateau, scaler, state, best_weights, writer)


def _set_lr(opt: torch.optim.Optimizer, lr: float | None) -> None:
    if lr is not None:
        for g in opt.param_groups:
            g["lr"] = lr


def _end_epoch(run: _Run, epoch: int, loss: float, val: float, resets: list, output) -> None:
    """After epoch ``epoch``: keep the best weights, step the plateau schedule, record the
    history (with the codewords reset per step) and write the checkpoint (rank 0)."""
    model, cfg, state = run.model, run.cfg, run.state
    if val < state.best_mse - 1e-6:
        state.best_mse, state.best_epoch = val, epoch
        run.best_weights = _copy_weights(model)
    if run.plateau is not None:
        run.plateau.step(val)
    state.history.append(dict(epoch=epoch, train_loss=loss, val_mse=val, best_mse=state.best_mse,
                              lr=run.opt.param_groups[0]["lr"], resets=resets,
                              elapsed_s=round(state.elapsed_s, 2)))
    if output is not None and run.workers.is_main:
        training = {"config": dataclasses.asdict(cfg), "state": dataclasses.asdict(state),
                    "optimizer": run.opt.state_dict(),
                    "plateau": run.plateau.state_dict() if run.plateau else None,
                    "current_state_dict": model.state_dict()}
        save_checkpoint(output, model.cfg.to_dict(), run.best_weights, training)
    _info(run.workers, "epoch %d: loss %.5f  val MSE %.6g  best %.6g  resets %s", epoch, loss, val,
          state.best_mse, sum(resets))
    if run.writer is not None:
        run.writer.add_scalar("val/mse", val, epoch)


def _copy_weights(model: QincoModel) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _info(workers: Workers, msg: str, *args) -> None:
    if workers.is_main:
        log.info(msg, *args)


def initialize(model: QincoModel, cfg: TrainConfig, x_train: np.ndarray) -> None:
    """Fresh-run initialisation: normalisation statistics, then RQ codebooks."""
    x_init = np.asarray(x_train[:cfg.init_samples], dtype=np.float32)
    fit_normalization(model, x_init, cfg.normalization)
    if model.steps[0].frozen:
        ivf = model.steps[0].codebook
        ivf.copy_((ivf - model.mean) / model.scale)
    rq_initialize(model, x_init, cfg.init_noise, cfg.seed)
