"""Training: the two-pass optimisation loop, schedules, codeword resets (:mod:`.resets`),
validation, best-model checkpoints and resume; the initialisation is in :mod:`.rq_init`, the
reading of the training and validation rows in :mod:`.batches`, their augmentations in
:mod:`.augment`."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .. import threads
from ..checkpoint import save_checkpoint
from ..distributed import Workers
from ..errors import ConfigError
from ..progress import progress_bar
from .augment import add_noise, augment_generator, mix_with_neighbours, pick_neighbours, training_neighbours
from .batches import TRAIN_FIX, VAL_FIX, epoch_batches, epoch_length, gather_rows, require_rows
from .batches import validation_mse as validation_mse
from .encode import encode
from .model import QincoModel
from .resets import reset_after_batch, reset_unused_codewords
from .rq_init import fit_normalization as fit_normalization
from .rq_init import initialize as initialize
from .train_config import PRESET_TRAINING as PRESET_TRAINING
from .train_config import TrainConfig

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- schedule

def cosine_factor(t: float, cfg: TrainConfig) -> float:
    """Warm-up over ``ramp_epochs`` then a quarter cosine reaching 0 at ``ramp + epochs``."""
    f = t / cfg.ramp_epochs if t < cfg.ramp_epochs else math.cos(
        math.pi / 2 * min(1.0, (t - cfg.ramp_epochs) / cfg.epochs))
    return max(f, cfg.lr_min_factor)


def make_optimizer(model: QincoModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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
    init_s: float = 0.0             # seconds of the initialisation, charged to the time budget
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
    neighbours: np.ndarray | None = None  # (N, k) training rows' neighbours, for neighbour_mix


def _lr_for(cfg: TrainConfig, t: float, spent: float | None) -> float | None:
    """Learning rate at fractional epoch ``t``; with ``time_schedule`` the position in the
    schedule is ``spent``, the share of the time budget used, scaled to ``ramp_epochs + epochs``."""
    if cfg.scheduler != "cosine":
        return None
    if cfg.time_schedule and spent is not None:
        t = (cfg.ramp_epochs + cfg.epochs) * min(max(spent, 0.0), 1.0)
    return cfg.lr * cosine_factor(t, cfg)


def _time_spent(cfg: TrainConfig, state: TrainState, deadline: float | None, workers: Workers,
                device) -> float | None:
    """Share used of the training part of the time budget (the budget less the initialisation,
    so that the warm-up is not spent before training starts), the largest over the processes
    (so that all of them follow one schedule and stop at the same step); None without a budget."""
    if deadline is None:
        return None
    training_s = cfg.max_time_s - state.init_s
    share = 1.0 - (deadline - time.monotonic()) / training_s if training_s > 0 else 1.0
    spent = torch.tensor([share], device=device)
    return float(workers.all_reduce_(spent, "max")[0])


def _train_epoch(run: _Run, x_train, bar, deadline) -> tuple[float, list, bool]:
    """One epoch of two-pass steps on this process's batches, gradients averaged over the processes, dead
    codewords reset (:mod:`.resets`); an error in one process's step stops all (``synced``), a NaN or
    Inf loss stops the run before its gradients are used. Returns (loss, resets per step, out_of_time)."""
    model, cfg, state, opt, workers = run.model, run.cfg, run.state, run.opt, run.workers
    device, mcfg = model.mean.device, model.cfg
    rng = np.random.default_rng([cfg.seed, state.epoch])
    n_batches = bar.total
    usage = [None if s.frozen else torch.zeros(s.K, dtype=torch.long, device=device) for s in model.steps]
    amp = _amp_dtype(cfg, device)
    # the beam search that picks the codes: in bfloat16 too, without the float32 re-scoring of the
    # final beams (a quarter of the float32 search's work at B=2; the step needs only the codes)
    precision = "bf16" if amp == torch.bfloat16 else "fp32"
    losses, out_of_time, resets = [], False, [0] * len(model.steps)
    draws = augment_generator(cfg.seed, state.epoch, workers.rank, device) if _augmented(cfg) else None
    batches = epoch_batches(x_train, state.epoch, loop=cfg.loop, batch_size=cfg.batch, rng=rng, with_ids=True,
                            full_pass=cfg.full_epochs, rank=workers.rank, world_size=workers.world_size)
    for i, (batch, ids) in enumerate(batches):     # encode() calls threads.tick()
        with workers.synced(f"training on batch {i + 1} of epoch {state.epoch}"):    # no collective inside
            u = model.normalize(torch.as_tensor(np.asarray(batch, dtype=np.float32), device=device))
            if draws is not None:
                u = _augment(run, x_train, u, ids, draws)
            codes, _ = encode(model, u, A=mcfg.A, B=mcfg.B, precision=precision, rescored=False)
            for m, used in enumerate(usage):
                if used is not None:
                    used += torch.bincount(codes[:, m], minlength=used.numel())
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss_rec, loss_pre = model.losses(u, codes)
            losses.append(loss_rec.item() + loss_pre.item())
        _check_loss(run, losses[-1], i, n_batches)
        run.scaler.scale((loss_rec + loss_pre) / cfg.grad_accumulate).backward()
        spent = _time_spent(cfg, state, deadline, workers, device)
        if (i + 1) % cfg.grad_accumulate == 0 or i + 1 == n_batches:
            _optimizer_step(run, _lr_for(cfg, state.epoch + (i + 1) / n_batches, spent))
        if cfg.codeword_reset and reset_after_batch(i, n_batches, cfg.reset_every):
            reset_unused_codewords(model, usage, u, codes, resets, seed_key=[cfg.seed, state.epoch, i],
                                   opt=opt, workers=workers)
        state.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", best_val=f"{state.best_mse:.5g}", refresh=False)
        if run.writer is not None:
            run.writer.add_scalar("train/loss_rec", loss_rec.item(), state.step)
            run.writer.add_scalar("train/loss_pre", loss_pre.item(), state.step)
            run.writer.add_scalar("train/lr", opt.param_groups[0]["lr"], state.step)
        if spent is not None and spent >= 1.0:
            out_of_time = True
            break
    loss = workers.all_reduce_(torch.tensor([float(np.mean(losses)) if losses else math.nan], device=device), "mean")
    return float(loss[0]), resets, out_of_time


def _augmented(cfg: TrainConfig) -> bool:
    return bool(cfg.train_noise or cfg.neighbour_mix)


def _augment(run: _Run, x_train, u_ND: torch.Tensor, ids_N: np.ndarray, draws: torch.Generator) -> torch.Tensor:
    """The training batch ``u_ND`` (rows ``ids_N`` of ``x_train``, normalised) mixed with neighbours
    (``neighbour_mix``), then jittered (``train_noise``); :mod:`.augment`."""
    cfg, model = run.cfg, run.model
    if cfg.neighbour_mix:
        rows = gather_rows(x_train, pick_neighbours(ids_N, run.neighbours, draws))
        v_ND = model.normalize(torch.as_tensor(np.asarray(rows, dtype=np.float32), device=u_ND.device))
        u_ND = mix_with_neighbours(u_ND, v_ND, cfg.neighbour_mix, draws)
    if cfg.train_noise:
        u_ND = add_noise(u_ND, cfg.train_noise, draws)
    return u_ND


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the training steps: float16 on CUDA (``amp``), bfloat16 on the CPU
    (``cpu_bf16``), else None (float32)."""
    if device.type == "cuda":
        return torch.float16 if cfg.amp else None
    return torch.bfloat16 if cfg.cpu_bf16 and device.type == "cpu" else None


def _optimizer_step(run: _Run, lr: float | None) -> None:
    """Average the gradients over the processes, clip them and take one optimizer step."""
    _set_lr(run.opt, lr)
    run.workers.mean_grads_([p for p in run.model.parameters() if p.requires_grad])
    run.scaler.unscale_(run.opt)
    if run.cfg.grad_clip:
        torch.nn.utils.clip_grad_value_(run.model.parameters(), run.cfg.grad_clip)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)


def _check_loss(run: _Run, loss: float, i: int, n_batches: int) -> None:
    """:func:`_diverged` when the loss of batch ``i`` is NaN or Inf on any process."""
    bad = not math.isfinite(loss)
    if run.workers.distributed:
        flag = torch.tensor([float(bad)], device=run.model.mean.device)
        bad = float(run.workers.all_reduce_(flag, "max")[0]) > 0
    if bad:
        raise _diverged(run, f"the training loss is {loss} at epoch {run.state.epoch}, step {run.state.step} "
                             f"(batch {i + 1} of {n_batches})")


def _diverged(run: _Run, what: str) -> ConfigError:
    """The error that stops a diverged run, once the model holds its best weights so far
    (the model file, written after each epoch only, keeps the best model written)."""
    run.model.load_state_dict(run.best_weights)
    if run.writer is not None:
        run.writer.close()
    state, lr = run.state, run.cfg.lr
    best = "the initialisation" if state.best_epoch < 0 else f"epoch {state.best_epoch}"
    return ConfigError(f"training diverged: {what}. The model was reset to its best weights so far ({best}, "
                       f"validation MSE {state.best_mse:.6g}); a model file keeps the last best model written; "
                       f"retrain with a lower learning rate (lr={lr:g} now, try lr={lr / 10:g}) or look for "
                       "extreme values in the data")


def _stop_reason(cfg: TrainConfig, state: TrainState, finished_epoch: int) -> str | None:
    """Why the run ends after epoch ``finished_epoch``; None: it goes on."""
    if cfg.max_epochs is not None and finished_epoch + 1 >= cfg.max_epochs:
        return f"it reached max_epochs={cfg.max_epochs}; raise max_epochs to train more"
    if finished_epoch - state.best_epoch > cfg.patience:
        return (f"it stopped early: no better validation MSE for patience={cfg.patience} epochs after "
                f"epoch {state.best_epoch}; raise patience to train more")
    if cfg.scheduler == "cosine" and not cfg.time_schedule and finished_epoch >= cfg.epochs + cfg.patience:
        return (f"its cosine schedule is over (epochs={cfg.epochs} plus patience={cfg.patience}); "
                "raise epochs to train more")
    if cfg.max_time_s and state.elapsed_s >= cfg.max_time_s:
        return f"its time budget max_time_s={cfg.max_time_s:g} is spent; raise max_time_s to train more"
    return None


@threads.adapting     # fewer CPU threads while other processes keep cores busy
def fit(model: QincoModel, cfg: TrainConfig, x_train: np.ndarray, x_val: np.ndarray, *,
        mse_scale: float = 1.0, output=None, resume: dict | None = None,
        progress: bool = True, workers: Workers = Workers(), init_s: float = 0.0) -> TrainState:
    """Train ``model`` in place; the best model (by validation MSE) is loaded at the end: the
    initialisation itself when no epoch beats it (``state.best_epoch == -1``).

    ``output``: after every epoch, the best weights so far and the full state of the run (the
    current weights, optimizer, schedule, counters) are written there atomically, so that a
    killed run continues with ``resume`` = the file's ``training`` part from the end of its
    last epoch; all randomness is derived from ``cfg.seed`` and the epoch number. A resumed
    run that had already finished (max_epochs, early stop, time budget) trains nothing more.
    ``model`` must already be initialised (:func:`initialize`) unless resuming; ``init_s``,
    the seconds that took, count against ``cfg.max_time_s`` (a fresh run starts with them spent).
    ``workers``: data-parallel processes (each runs its share of every epoch's batches;
    gradients, statistics and validation are reduced; only rank 0 writes and logs).

    Empty sets and NaN/Inf rows (checked as they are read) raise :class:`InputError`; a NaN
    or Inf loss or validation MSE a :class:`ConfigError`, the model holding its best weights
    so far and ``output`` its last best model."""
    cfg.validated()
    require_rows(x_train, "x_train", TRAIN_FIX)
    require_rows(x_val, "x_val", VAL_FIX)
    run = _start_run(model, cfg, resume, workers)
    state, mcfg = run.state, model.cfg
    done = _stop_reason(cfg, state, state.epoch - 1) if resume is not None and state.epoch > 0 else None
    if done is not None:
        if workers.is_main:
            log.warning("nothing more was trained: the resumed run had already ended after epoch %d, as %s",
                        state.epoch - 1, done)
        return _finish(run)
    if state.init_mse is None:
        state.elapsed_s = state.init_s = init_s
        state.init_mse = validation_mse(model, x_val, A=mcfg.A, B=mcfg.B, mse_scale=mse_scale, workers=workers)
        state.best_mse = state.init_mse                 # the initialisation is the model to beat
        _info(workers, "validation MSE after initialisation: %.6g", state.init_mse)
        if not math.isfinite(state.init_mse):
            raise _diverged(run, f"the validation MSE of the initialisation is {state.init_mse}")
    start = time.monotonic() - state.elapsed_s
    deadline = start + cfg.max_time_s if cfg.max_time_s else None
    run.neighbours = _neighbours(model, cfg, x_train)       # its time counts against the budget
    n_batches = epoch_length(len(x_train), cfg.loop, cfg.batch, world_size=workers.world_size,
                             full_pass=cfg.full_epochs)
    if n_batches == 0:
        raise ConfigError(f"an epoch of {min(len(x_train), cfg.loop)} rows in batches of {cfg.batch} gives no "
                          f"batch to each of {workers.world_size} processes; lower batch or use fewer processes")
    while True:
        _set_lr(run.opt, _lr_for(cfg, state.epoch, _time_spent(cfg, state, deadline, workers, model.mean.device)))
        with progress_bar(total=n_batches, desc=f"epoch {state.epoch}", enabled=progress and workers.is_main,
                          leave=False) as bar:
            loss, resets, out_of_time = _train_epoch(run, x_train, bar, deadline)
        val = validation_mse(model, x_val, A=mcfg.A, B=mcfg.B, mse_scale=mse_scale, workers=workers)
        if not math.isfinite(val):
            raise _diverged(run, f"the validation MSE is {val} after epoch {state.epoch}")
        epoch = state.epoch
        state.epoch += 1
        state.elapsed_s = time.monotonic() - start
        _end_epoch(run, epoch, loss, val, resets, output)
        if out_of_time or _stop_reason(cfg, state, epoch):
            break
    return _finish(run)


def _neighbours(model: QincoModel, cfg: TrainConfig, x_train) -> np.ndarray | None:
    """The training rows' neighbours for ``neighbour_mix`` (None without it), by the distance of the
    normalised rows; found anew when a run resumes (seeded, so the same)."""
    @torch.no_grad()
    def normalize(x_nD: np.ndarray) -> torch.Tensor:
        return model.normalize(torch.from_numpy(x_nD).to(model.mean.device))
    if not cfg.neighbour_mix:
        return None
    return training_neighbours(x_train, cfg.neighbour_k, normalize=normalize, seed=cfg.seed)


def _finish(run: _Run) -> TrainState:
    """Load the best weights, close the log, wait until the file is complete for everyone."""
    run.model.load_state_dict(run.best_weights)
    if run.writer is not None:
        run.writer.close()
    run.workers.barrier()
    return run.state


def _start_run(model: QincoModel, cfg: TrainConfig, resume: dict | None, workers: Workers) -> _Run:
    """Optimizer, schedule and counters of a fresh run, or of ``resume``'s run at its last epoch."""
    device = model.mean.device
    opt = make_optimizer(model, cfg)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=0.1, patience=10, threshold=1e-10, min_lr=cfg.lr * 1e-2) if cfg.scheduler == "plateau" else None
    scaler = torch.amp.GradScaler(device.type, enabled=_amp_dtype(cfg, device) == torch.float16)
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
