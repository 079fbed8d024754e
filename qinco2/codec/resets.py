"""Dead-codeword resets during training, in the manner of k-means cluster splitting.

A codeword of a trained step that no training vector chose since the last reset is dead.
It is replaced by a split of a live codeword: a training vector of the current batch is
drawn with probability proportional to its squared error after that step (as in k-means++)
times the usage of its codeword (so that popular codewords are split first), and the dead
row becomes its codeword (the donor) moved part of the way towards the vector's target (the
residual ``u - x_hat`` entering the step). The pre-selection row moves the same
way from the donor's, so the pre-selector proposes the new codeword for that vector and its
neighbours, and the encoder then prefers it to the donor. The optimizer moments of the reset
rows are cleared so that the dead rows' history does not steer the new ones.

Random draws like these from the per-dimension statistics of the residuals land, in high
dimension and on anisotropic data (e.g. unit-norm text embeddings), far from every
residual: the pre-selector never proposes them and they die again.
"""

from __future__ import annotations

import numpy as np
import torch

from ..distributed import Workers
from .model import QincoModel

SPLIT = 0.5      # share of the way from the donor's reconstruction to the drawn vector's target


def reset_after_batch(i: int, n_batches: int, every: int) -> bool:
    """Whether to reset after batch ``i`` of an epoch of ``n_batches``: the epoch is cut into
    ``max(1, n_batches // every)`` equal segments (each of at least ``every`` batches unless
    the epoch is shorter), ending with the epoch; ``every <= 0`` means once per epoch."""
    n_seg = max(1, n_batches // every) if every > 0 else 1
    return (i + 1) * n_seg // n_batches > i * n_seg // n_batches


def reset_unused_codewords(model: QincoModel, usage: list[torch.Tensor | None], u_ND: torch.Tensor,
                           codes_NM: torch.Tensor, resets: list[int], *, seed_key: list[int],
                           opt: torch.optim.Optimizer | None = None, workers: Workers = Workers()) -> None:
    """Reset the codewords no process used since the last reset (the same ones, to the same
    rows, everywhere; draws seeded by ``seed_key``), add the counts to ``resets`` and restart
    the usage counts."""
    for used in usage:
        if used is not None:
            workers.all_reduce_(used, "sum")
    seed = np.random.SeedSequence(seed_key).generate_state(1)[0]
    gen = torch.Generator().manual_seed(int(seed))
    counts = reset_dead_codewords(model, usage, u_ND, codes_NM, gen, opt, workers)
    for m, used in enumerate(usage):
        resets[m] += counts[m]
        if used is not None:
            used.zero_()


@torch.no_grad()
def reset_dead_codewords(model: QincoModel, usage: list[torch.Tensor | None], u_ND: torch.Tensor,
                         codes_NM: torch.Tensor, gen: torch.Generator,
                         opt: torch.optim.Optimizer | None = None,
                         workers: Workers = Workers()) -> list[int]:
    """Split live codewords into the dead ones (``usage[m] == 0``) of every trained step.

    ``usage[m]``: how often each code of step ``m`` was chosen since the last reset, summed
    over the processes (None for the frozen IVF step). ``u_ND``, ``codes_NM``: a normalised
    training batch and its codes, whose vectors are drawn; with several processes rank 0's
    new rows are given to all. At most ``N`` rows per step are reset at a time.
    Returns the number of codewords reset per step.
    """
    xhat_list = model.partial_reconstructions(codes_NM)
    prev_ND = torch.zeros_like(u_ND)
    counts = []
    for m, (step, used_K) in enumerate(zip(model.steps, usage)):
        xhat_ND = xhat_list[m]
        dead = (used_K == 0).nonzero()[:, 0] if used_K is not None else used_K
        if dead is None or dead.numel() == 0:
            counts.append(0)
            prev_ND = xhat_ND
            continue
        err_N = ((u_ND - xhat_ND) ** 2).sum(1) * used_K[codes_NM[:, m]]   # popular, poorly served
        err_N = err_N.double().cpu() + 1e-12
        pick = torch.multinomial(err_N, min(dead.numel(), len(err_N)), generator=gen).to(u_ND.device)
        dead = dead[:len(pick)]
        donor = codes_NM[pick, m]
        target_ND = u_ND[pick] - prev_ND[pick]
        delta_ND = xhat_ND[pick] - prev_ND[pick]                 # what the donor gives now
        rows = [step.codebook[donor] + SPLIT * (target_ND - delta_ND)]
        if step.preselector is not None:
            pre = step.preselector[donor]
            rows.append(pre + SPLIT * (target_ND - pre))
        for param, new in zip((step.codebook, step.preselector), rows):
            if workers.distributed:                              # rank 0's rows for everyone
                new = workers.all_reduce_(new if workers.is_main else torch.zeros_like(new), "sum")
            param[dead] = new
            _clear_moments(opt, param, dead)
        counts.append(int(dead.numel()))
        prev_ND = xhat_ND
    return counts


def _clear_moments(opt: torch.optim.Optimizer | None, param: torch.Tensor, rows: torch.Tensor) -> None:
    """Adam(W): zero first moments of ``rows``; second moments set to the other rows' mean,
    so that the new rows take steps of the usual size."""
    state = opt.state.get(param) if opt is not None else None
    if not state or "exp_avg" not in state:
        return
    state["exp_avg"][rows] = 0
    keep = torch.ones(param.shape[0], dtype=torch.bool, device=param.device)
    keep[rows] = False
    sq = state["exp_avg_sq"]
    sq[rows] = sq[keep].mean(0) if keep.any() else 0
