"""Encoder: candidate pre-selection + beam search, in memory-bounded chunks.

One implementation serves every setting: ``A = 0`` evaluates all ``K`` codewords of a
conditioned step (exhaustive, QINCo1), ``A > 0`` only the ``A`` best ones according to the
step's pre-selection codebook; ``B = 1`` is greedy, ``B > 1`` beam search. Everything works
in normalised space (see :meth:`QincoModel.normalize`) and without gradients.
"""

from __future__ import annotations

import math

import torch

from .model import QincoModel, Step

DEFAULT_MAX_BYTES = 256 * 2**20      # encoder working memory per chunk on the CPU
GPU_MAX_BYTES = 4 * 2**30           # on a GPU: at most this, and a quarter of its free memory


def default_max_bytes(device: torch.device | str) -> int:
    """Working memory of one encoding chunk on ``device``: 256 MiB on the CPU (bigger chunks
    gain nothing there); on a GPU min(4 GiB, a quarter of its free memory), since small chunks
    leave it idle (H200, qinco2-S A=16 B=32: 16k vectors/s with 256 MiB, 22k with 4 GiB)."""
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_MAX_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return max(DEFAULT_MAX_BYTES, min(GPU_MAX_BYTES, free // 4))


def _sq_dists_to_codebook(r_NBD: torch.Tensor, C_KD: torch.Tensor,
                          C_sq_K: torch.Tensor | None = None) -> torch.Tensor:
    """Squared L2 distances (up to the per-row constant ||r||^2) from residuals to codewords;
    ``C_sq_K``: the codewords' squared norms when already known."""
    return ((C_KD * C_KD).sum(-1) if C_sq_K is None else C_sq_K) - 2 * r_NBD @ C_KD.T


def _candidates(step: Step, r_NBD: torch.Tensor, A: int, beams_out: int) -> torch.Tensor | None:
    """Codes to evaluate for each beam, ``(N, B, A')``; None means all K codes."""
    if A <= 0 or step.preselector is None:
        return None
    n_beams = r_NBD.shape[1]
    A_eff = min(step.K, max(A, math.ceil(beams_out / n_beams)))
    if A_eff >= step.K:
        return None
    scores = _sq_dists_to_codebook(r_NBD, step.preselector)
    return scores.topk(A_eff, dim=-1, largest=False, sorted=False).indices


def _expand_step(step: Step, u_ND, xhat_NBD, A: int, beams_out: int):
    """Score every (beam, candidate) pair: returns codes (N,B,A') and new reconstructions."""
    N, n_beams, D = xhat_NBD.shape
    r_NBD = u_ND[:, None, :] - xhat_NBD
    if step.net is None:
        # Plain residual step: exact distances to all codewords, no candidate tensor needed.
        scores_NBK = (_sq_dists_to_codebook(r_NBD, step.codebook, step.codebook_sq_norms())
                      + (r_NBD * r_NBD).sum(-1, keepdim=True))
        return None, scores_NBK, None
    cand_NBA = _candidates(step, r_NBD, A, beams_out)
    if cand_NBA is None:
        cand_NBA = torch.arange(step.K, device=u_ND.device).expand(N, n_beams, step.K)
    y_NBAD = xhat_NBD[:, :, None, :] + step.delta(cand_NBA, xhat_NBD[:, :, None, :])
    scores_NBA = ((u_ND[:, None, None, :] - y_NBAD) ** 2).sum(-1)
    return cand_NBA, scores_NBA, y_NBAD


@torch.no_grad()
def beam_search(model: QincoModel, u_ND: torch.Tensor, A: int, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode normalised vectors; returns ``codes (N, n_codes)`` int64 and ``xhat (N, D)``.

    Step by step, every surviving beam proposes candidates (all codes, or the ``A`` best by
    pre-selection), each candidate is scored by the full reconstruction error, and the
    ``B`` best (beam, candidate) pairs survive. The frozen IVF step and the last step keep
    a single beam.
    """
    N, D = u_ND.shape
    xhat_NBD = u_ND.new_zeros(N, 1, D)
    codes_NBm = torch.zeros(N, 1, 0, dtype=torch.long, device=u_ND.device)
    rows_N1 = torch.arange(N, device=u_ND.device)[:, None]
    for m, step in enumerate(model.steps):
        last = m == len(model.steps) - 1
        beams_out = 1 if (last or step.frozen) else B
        cand_NBA, scores_NBA, y_NBAD = _expand_step(step, u_ND, xhat_NBD, A, beams_out)
        flat_NX = scores_NBA.reshape(N, -1)
        n_cand = scores_NBA.shape[-1]
        top_NF = flat_NX.topk(min(beams_out, flat_NX.shape[1]), dim=1, largest=False).indices
        beam_NF, slot_NF = top_NF // n_cand, top_NF % n_cand
        if cand_NBA is None:
            code_NF = slot_NF
            xhat_NBD = xhat_NBD[rows_N1, beam_NF] + step.codebook[code_NF]
        else:
            code_NF = cand_NBA[rows_N1, beam_NF, slot_NF]
            xhat_NBD = y_NBAD[rows_N1, beam_NF, slot_NF]
        codes_NBm = torch.cat([codes_NBm[rows_N1, beam_NF], code_NF[..., None]], dim=2)
    return codes_NBm[:, 0], xhat_NBD[:, 0]


def bytes_per_vector(model: QincoModel, A: int, B: int) -> int:
    """Rough peak working memory of :func:`beam_search` per input vector (float32): each
    step scores the beams that enter it (one for the first step and after the frozen IVF
    step, ``B`` after the others) against its candidates."""
    cfg = model.cfg
    width = max(cfg.D, cfg.E, cfg.dh)
    peak, beams_in = 0, 1
    for m, step in enumerate(model.steps):
        if step.net is None:
            cells = beams_in * step.K
        else:
            n_cand = step.K if (A <= 0 or step.preselector is None) else max(A, B)
            cells = beams_in * n_cand * width * 3
        peak = max(peak, cells)
        beams_in = 1 if (step.frozen or m == len(model.steps) - 1) else B
    return 4 * peak + 4 * B * cfg.D * 4


def encode(model: QincoModel, u_ND: torch.Tensor, *, A: int, B: int,
           max_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`beam_search` over chunks of rows so that the working memory stays under ``max_bytes``
    (default: :func:`default_max_bytes` of the rows' device).

    The codes do not depend on the chunking.
    """
    max_bytes = default_max_bytes(u_ND.device) if max_bytes is None else max_bytes
    chunk = max(1, max_bytes // bytes_per_vector(model, A, B))
    if u_ND.shape[0] <= chunk:
        return beam_search(model, u_ND, A, B)
    parts = [beam_search(model, u_ND[i:i + chunk], A, B) for i in range(0, u_ND.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
