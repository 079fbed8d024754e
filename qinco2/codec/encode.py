"""Encoder: candidate pre-selection + beam search, in memory-bounded chunks.

One implementation serves every setting: ``A = 0`` evaluates all ``K`` codewords of a
conditioned step (exhaustive, QINCo1), ``A > 0`` only the ``A`` best ones according to the
step's pre-selection codebook; ``B = 1`` is greedy, ``B > 1`` beam search. Everything works
in normalised space (see :meth:`QincoModel.normalize`) and without gradients.

The part of a step network that sees only the codeword, ``(I + W_z) P_in c``
(:meth:`StepNetwork.embed_codeword`), is computed once per call for the ``K`` codewords of
each step (:func:`prepare_steps`); the network then runs from that ``(K, E)`` table on every
(vector, beam, candidate) (:meth:`StepNetwork.from_embedding`), which saves the input
projection and the codeword half of the fusion layer per candidate.

``precision`` (:mod:`.precision`) runs the step networks in bfloat16, float16 or TF32;
distances and scores stay in float32, and the ``min(B, RESCORED_BEAMS)`` best final beams
are decoded again in float32 and the one of least float32 error is returned
(:func:`rescore`), so the codes are never worse than the reduced-precision choice and the
returned reconstruction is the float32 decoding of the returned code.
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass

import torch

from .. import threads
from .model import QincoModel, Step, StepNetwork
from .precision import check_precision, compute_dtype, matmul_precision

DEFAULT_MAX_BYTES = 32 * 2**20      # encoder working memory per chunk on the CPU
GPU_MIN_BYTES = 256 * 2**20         # on a GPU: at least this,
GPU_MAX_BYTES = 4 * 2**30           # at most this, and a quarter of its free memory
RESCORED_BEAMS = 4                  # reduced precision: final beams decoded again in float32


def default_max_bytes(device: torch.device | str) -> int:
    """Working memory of one encoding chunk on ``device``. On the CPU 32 MiB: each of the
    chunk's big tensors then stays near 10 MB, under glibc's 32 MiB limit above which every
    allocation is a fresh memory map that the kernel zero-fills (qinco2-S at A=16 B=8, one
    thread: 256 MiB chunks took twice the time of 32 MiB ones). On a GPU min(4 GiB, a quarter
    of its free memory), at least 256 MiB, since small chunks leave it idle (H200, qinco2-S
    A=16 B=32: 16k vectors/s with 256 MiB, 22k with 4 GiB)."""
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_MAX_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return max(GPU_MIN_BYTES, min(GPU_MAX_BYTES, free // 4))


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


@dataclass(frozen=True)
class StepRunner:
    """A conditioned step's network as the encoder runs it: ``net`` in the compute dtype and
    ``emb_KE``, the step's codeword embeddings (:meth:`StepNetwork.embed_codeword`) computed
    once in the model's dtype, then cast to the compute dtype."""

    net: StepNetwork
    emb_KE: torch.Tensor
    precision: str

    def delta(self, codebook_KD: torch.Tensor, cand_NBA: torch.Tensor, xhat_NB1D: torch.Tensor) -> torch.Tensor:
        """``f(C[cand], x_hat)`` (``N, B, A, D``; the codeword skip is added in the model's dtype)."""
        with matmul_precision(self.precision):
            return self.net.from_embedding(self.emb_KE[cand_NBA], codebook_KD[cand_NBA],
                                           xhat_NB1D.to(self.emb_KE.dtype))


_CAST_NETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()    # StepNetwork -> {(dtype, device): copy}


def _net_in(net: StepNetwork, dtype: torch.dtype) -> StepNetwork:
    """``net`` with its weights as they are now, in ``dtype``: one copy kept per network and
    dtype, its weights overwritten in place at each call (a deep copy per call was 6 ms of a
    1,024-row bf16 training step on 2 cores). A runner built earlier sees the new weights."""
    copies = _CAST_NETS.setdefault(net, {})
    key = (dtype, next(net.parameters()).device)
    cast = copies.get(key)
    if cast is None:
        cast = copies[key] = copy.deepcopy(net).to(dtype).requires_grad_(False)
    else:
        for dst, src in zip(cast.parameters(), net.parameters()):
            dst.copy_(src)
    return cast


@torch.no_grad()
def prepare_steps(model: QincoModel, precision: str = "fp32") -> list[StepRunner | None]:
    """One :class:`StepRunner` per conditioned step (None for a plain step), for one encoding
    call: the weights as they are now, in the dtype of ``precision``."""
    runners = []
    for step in model.steps:
        if step.net is None:
            runners.append(None)
            continue
        dtype = compute_dtype(precision, step.codebook.dtype)
        net = step.net if dtype == step.codebook.dtype else _net_in(step.net, dtype)
        runners.append(StepRunner(net, step.net.embed_codeword(step.codebook).to(dtype), precision))
    return runners


@torch.no_grad()
def decode_prepared(model: QincoModel, runners: list[StepRunner | None], codes_NM: torch.Tensor) -> torch.Tensor:
    """:meth:`QincoModel.decode` by the steps of :func:`prepare_steps`: the codeword embeddings
    looked up instead of computed per vector, the networks in the runners' dtype, the
    reconstruction summed in the model's dtype (fp32 runners: the same values as ``model.decode``
    up to float rounding)."""
    xhat_ND = torch.zeros(codes_NM.shape[0], model.cfg.D, device=codes_NM.device,
                          dtype=model.steps[0].codebook.dtype)
    for m in range(codes_NM.shape[1]):
        step, runner, c_N = model.steps[m], runners[m], codes_NM[:, m]
        delta = step.codebook[c_N] if runner is None else runner.delta(step.codebook, c_N, xhat_ND)
        xhat_ND = xhat_ND + delta.to(xhat_ND.dtype)
    return xhat_ND


def _expand_step(step: Step, runner: StepRunner | None, u_ND, xhat_NBD, A: int, beams_out: int):
    """Score every (beam, candidate) pair: returns codes ``(N, B, A')`` (None: all K), the
    squared errors and the errors ``x_hat' - u`` of the candidates' reconstructions."""
    N, n_beams, D = xhat_NBD.shape
    r_NBD = u_ND[:, None, :] - xhat_NBD
    if runner is None:
        # Plain residual step: exact distances to all codewords, no candidate tensor needed.
        scores_NBK = (_sq_dists_to_codebook(r_NBD, step.codebook, step.codebook_sq_norms())
                      + (r_NBD * r_NBD).sum(-1, keepdim=True))
        return None, scores_NBK, None
    cand_NBA = _candidates(step, r_NBD, A, beams_out)
    if cand_NBA is None:
        cand_NBA = torch.arange(step.K, device=u_ND.device).expand(N, n_beams, step.K)
    # the error of each candidate, x_hat + f - u = f - r, in place on the network's fresh output
    err_NBAD = runner.delta(step.codebook, cand_NBA, xhat_NBD[:, :, None, :]).to(u_ND.dtype)
    err_NBAD.sub_(r_NBD[:, :, None, :])
    return cand_NBA, torch.linalg.vecdot(err_NBAD, err_NBAD), err_NBAD


def _search_beams(model: QincoModel, runners: list[StepRunner | None], u_ND: torch.Tensor, A: int, B: int,
                  n_final: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The beam search proper: codes ``(N, F, n_codes)`` and reconstructions ``(N, F, D)`` of
    the ``F = n_final`` best final beams (fewer when there are fewer), best first."""
    N, D = u_ND.shape
    xhat_NBD = u_ND.new_zeros(N, 1, D)
    codes_NBm = torch.zeros(N, 1, 0, dtype=torch.long, device=u_ND.device)
    rows_N1 = torch.arange(N, device=u_ND.device)[:, None]
    for m, step in enumerate(model.steps):
        threads.tick()
        last = m == len(model.steps) - 1
        beams_out = 1 if (last or step.frozen) else B
        cand_NBA, scores_NBA, err_NBAD = _expand_step(step, runners[m], u_ND, xhat_NBD, A, beams_out)
        flat_NX = scores_NBA.reshape(N, -1)
        n_cand = scores_NBA.shape[-1]
        keep = n_final if last else beams_out
        top_NF = flat_NX.topk(min(keep, flat_NX.shape[1]), dim=1, largest=False).indices
        beam_NF, slot_NF = top_NF // n_cand, top_NF % n_cand
        if cand_NBA is None:
            code_NF = slot_NF
            xhat_NBD = xhat_NBD[rows_N1, beam_NF] + step.codebook[code_NF]
        else:
            code_NF = cand_NBA[rows_N1, beam_NF, slot_NF]
            xhat_NBD = u_ND[:, None, :] + err_NBAD[rows_N1, beam_NF, slot_NF]
        codes_NBm = torch.cat([codes_NBm[rows_N1, beam_NF], code_NF[..., None]], dim=2)
    return codes_NBm, xhat_NBD


@torch.no_grad()
def rescore(model: QincoModel, u_ND: torch.Tensor, codes_NFm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Of ``F`` candidate codes per vector, the one whose decoding in the model's dtype is
    nearest to ``u``: codes ``(N, n_codes)`` and that decoding ``(N, D)``. Ties go to the
    earlier candidate."""
    N, F, n_codes = codes_NFm.shape
    xhat_NFD = model.decode(codes_NFm.reshape(N * F, n_codes)).reshape(N, F, -1)
    best_N = ((u_ND[:, None, :] - xhat_NFD) ** 2).sum(-1).argmin(1)
    rows_N = torch.arange(N, device=u_ND.device)
    return codes_NFm[rows_N, best_N], xhat_NFD[rows_N, best_N]


def _beam_search(model: QincoModel, runners: list[StepRunner | None], u_ND: torch.Tensor, A: int, B: int,
                 precision: str, rescored: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    if precision == "fp32" or not rescored:
        codes_NFm, xhat_NFD = _search_beams(model, runners, u_ND, A, B, 1)
        return codes_NFm[:, 0], xhat_NFD[:, 0]
    codes_NFm, _ = _search_beams(model, runners, u_ND, A, B, min(B, RESCORED_BEAMS))
    return rescore(model, u_ND, codes_NFm)


@torch.no_grad()
def beam_search(model: QincoModel, u_ND: torch.Tensor, A: int, B: int, *,
                precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Encode normalised vectors; returns ``codes (N, n_codes)`` int64 and ``xhat (N, D)``.

    Step by step, every surviving beam proposes candidates (all codes, or the ``A`` best by
    pre-selection), each candidate is scored by the full reconstruction error, and the
    ``B`` best (beam, candidate) pairs survive. The frozen IVF step and the last step keep
    a single beam (a reduced ``precision`` keeps ``min(B, RESCORED_BEAMS)`` at the last step
    and returns the best of them by float32 error, see :func:`rescore`).
    """
    check_precision(precision, u_ND.device)
    return _beam_search(model, prepare_steps(model, precision), u_ND, A, B, precision)


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


@torch.no_grad()
@threads.adapting     # fewer CPU threads while other processes keep cores busy
def encode(model: QincoModel, u_ND: torch.Tensor, *, A: int, B: int, max_bytes: int | None = None,
           precision: str = "fp32", rescored: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`beam_search` over chunks of rows so that the working memory stays under ``max_bytes``
    (default: :func:`default_max_bytes` of the rows' device); the step tables
    (:func:`prepare_steps`) are computed once for all chunks.

    ``rescored=False`` (training steps, which use only the codes) skips the float32 re-scoring of
    a reduced ``precision``: the codes of the best beam by reduced-precision scores, and their
    reconstruction as the search computed it. The codes do not depend on the chunking.
    """
    check_precision(precision, u_ND.device)
    max_bytes = default_max_bytes(u_ND.device) if max_bytes is None else max_bytes
    chunk = max(1, max_bytes // bytes_per_vector(model, A, B))
    runners = prepare_steps(model, precision)
    if u_ND.shape[0] <= chunk:
        return _beam_search(model, runners, u_ND, A, B, precision, rescored)
    parts = [_beam_search(model, runners, u_ND[i:i + chunk], A, B, precision, rescored)
             for i in range(0, u_ND.shape[0], chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
