"""GPU benchmark: QINCo2-S/-L encoding and training speed, IVF-PQ build and search at 10^6.

Run by ``benchmarks/gpu_check.sh`` (which also runs the CUDA tests) or by hand. Each result
is one JSON line appended to ``--out`` as soon as it is measured (so a run cut short by a
time limit keeps what it measured), with ``bench="gpu"``, ``what`` (``cuda_tests``,
``encode``, ``train``, ``ivfpq_build``, ``ivfpq_search``), the device and GPU name, and the
machine, threads, library versions, exact command and date as the other benchmarks write.

* ``encode``: vectors/s of :meth:`QincoCodec.encode` (host arrays in, codes out: transfers
  included) of an RQ-initialised, untrained model at A=16 B=32 (the networks start as the
  identity on their codeword, which costs the same FLOPs as trained weights; the RQ tables
  are fitted once, by faiss on the CPU, and shared by the models), for each ``--max-bytes``
  (the encoder's working-memory bound, which sets its chunk of rows), after a warm-up; the
  timed rows are chosen to take about the scale's target seconds. Also the estimated FLOPs
  per vector (:func:`encode_flops_per_vector`), the achieved GFLOP/s and, for the first
  setting, the agreement of the codes with the same model on the CPU (``cpu_check``).
* ``train``: optimiser steps/s of :func:`qinco2.codec.train.fit` (the real loop: beam-search
  encoding of the batch, losses under AMP on CUDA, backward, AdamW, codeword resets) for one
  epoch of ``steps`` batches, after a short warm-up; validation time is subtracted.
* ``--tf32 both`` (the default on CUDA) times encode and train with torch's default float32
  matrix products and again with TF32 tensor cores allowed (``tf32`` field).
  ``--encode-precisions`` (default ``fp32 bf16``) adds an encode row per reduced precision of
  the step networks (``precision`` field; :mod:`qinco2.codec.precision`), at the largest
  ``--max-bytes``, TF32 off.
* ``ivfpq_build`` / ``ivfpq_search``: :func:`qinco2.ivfpq.build` of N synthetic clustered
  vectors, then queries/s (median of ``repeats`` runs after a warm-up) and 10-recall@10
  against exact faiss ground truth for each ``n_probes``.

Scales: ``full`` (the GPU check: D=128, M=8, K=256, A=16, B=32, IVF-PQ at N=10^6 with
1024 lists, pq_dim=64), ``small`` (the same models, smaller counts: a CPU reference),
``tiny`` (seconds on a CPU: the dry run of ``gpu_check.sh --dry-run``).

    PYTHONPATH=. python benchmarks/bench_gpu.py --device cuda --out benchmarks/results/gpu_check.jsonl
    PYTHONPATH=. python benchmarks/bench_gpu.py --device cpu --scale tiny --out /tmp/gpu_dry.jsonl
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import torch  # before faiss: one OpenMP runtime for both (qinco2.openmp)

# isort: split
import faiss
import numpy as np
from bench_codecs import environment

from qinco2 import ModelConfig, QincoCodec, TrainConfig, ivfpq
from qinco2.codec.encode import DEFAULT_MAX_BYTES, GPU_MIN_BYTES, RESCORED_BEAMS, bytes_per_vector
from qinco2.codec.model import QincoModel
from qinco2.codec.precision import PRECISIONS
from qinco2.codec.train import fit, initialize, validation_mse
from qinco2.metrics import neighbor_recall, recall_at

PARTS = ("encode", "train", "ivfpq")
GPU_MAX_BYTES = 4 << 30            # a second encoder memory bound on CUDA: chunks of ~1000 rows


@dataclass(frozen=True)
class Scale:
    D: int
    M: int
    K: int
    A: int
    B: int
    arch: dict = field(default_factory=dict)        # overrides of every preset's architecture
    n_init: int = 4096                              # rows of the RQ initialisation (faiss, CPU)
    encode_warm: dict = field(default_factory=dict)  # preset -> warm-up rows (also the rate probe)
    encode_target_s: float = 5.0
    encode_rows_max: int = 262_144
    check_rows: dict = field(default_factory=dict)   # preset -> rows encoded on the CPU too
    train_batch: int = 1024
    train_target_s: float = 8.0
    train_steps_max: int = 64
    n_val: int = 256
    ivf_N: int = 1_000_000
    ivf_D: int = 128
    n_lists: int = 1024
    pq_dim: int = 64
    probes: tuple = (8, 32, 128)
    n_queries: int = 1000
    k: int = 10
    repeats: int = 3
    kmeans_n_iters: int = 20


SCALES = {
    "full": Scale(D=128, M=8, K=256, A=16, B=32, n_init=4096, encode_warm={"qinco2-S": 2048, "qinco2-L": 256},
                  check_rows={"qinco2-S": 256, "qinco2-L": 16}),
    "small": Scale(D=128, M=8, K=256, A=16, B=32, n_init=4096, encode_warm={"qinco2-S": 16, "qinco2-L": 2},
                   encode_target_s=3.0, encode_rows_max=4096, check_rows={"qinco2-S": 8, "qinco2-L": 1}, train_batch=64,
                   train_target_s=5.0, train_steps_max=16, n_val=32, ivf_N=100_000, n_lists=256,
                   probes=(8, 32), n_queries=200, repeats=2),
    "tiny": Scale(D=32, M=4, K=16, A=4, B=4, arch={"de": 16, "dh": 32}, n_init=1000, encode_warm={},
                  encode_target_s=0.3, encode_rows_max=2048, check_rows={"qinco2-S": 16, "qinco2-L": 16},
                  train_batch=64,
                  train_target_s=0.3, train_steps_max=6, n_val=32, ivf_N=4000, ivf_D=32, n_lists=16,
                  pq_dim=8, probes=(2, 4), n_queries=50, repeats=2, kmeans_n_iters=5),
}


# ----------------------------------------------------------------------------- FLOP estimates

def _net_flops(cfg: ModelConfig) -> tuple[int, int, int]:
    """FLOPs (a multiply-add counts 2) of one step network: per candidate, per beam, per codeword.

    Per candidate: ``4 L E d_h`` (``L`` residual blocks ``E -> d_h -> E``) + ``2 E D`` (output
    projection, when ``E != D``) + ``3 D`` (score ``|u - y|^2``). Per beam: ``2 D E`` (fusion,
    the ``x_hat`` half). Per codeword: ``2 D E`` (input projection, when ``E != D``) + ``2 E^2``
    (fusion, the codeword half): the encoder computes these once per call for the ``K``
    codewords (:meth:`qinco2.codec.model.StepNetwork.embed_codeword`), training and decoding
    once per vector."""
    D, E, H = cfg.D, cfg.E, cfg.dh
    proj = 2 * D * E if E != D else 0
    return 4 * cfg.L * E * H + proj + 3 * D, 2 * D * E, proj + 2 * E * E


def encode_flops_per_vector(cfg: ModelConfig, A: int, B: int, rows: int | None = None,
                            precision: str = "fp32") -> int:
    """Estimated FLOPs to encode one vector by :func:`qinco2.codec.encode.beam_search`.

    With ``b_m`` beams entering conditioned step ``m`` (1 after the frozen IVF step, else
    ``min(B, K)`` after the plain first step) and ``o_m`` leaving it (``B``, 1 at the last
    step): the first step scores all its codewords (``2 K D``, ``K = ivf_K`` for an IVF
    model); a conditioned step pre-selects ``a_m = min(K, max(A, ceil(o_m / b_m)))``
    candidates per beam among ``K`` (``2 b_m K D``, none when ``a_m = K`` or ``A = 0``) and
    runs the step network on every (beam, candidate) pair, ``b_m (a_m f_c + f_b)`` with
    ``f_c``, ``f_b`` of :func:`_net_flops`; then ``b_{m+1} = min(o_m, b_m a_m)``. ``rows``:
    vectors per call, which share the codeword tables (``K f_k`` per step; None: not counted).
    A reduced ``precision`` adds the float32 decoding of ``min(B, RESCORED_BEAMS)`` final
    beams. For ``M`` steps at ``B = 32``, ``A = 16`` this is dominated by
    ``(M - 1) B A 4 L E d_h``. Top-k selections, gathers and transfers are not counted."""
    f_c, f_b, f_k = _net_flops(cfg)
    D, K = cfg.D, cfg.K
    n_net = cfg.M if cfg.ivf_K else cfg.M - 1
    total, beams = 2 * (cfg.ivf_K or K) * D, 1 if cfg.ivf_K else min(B, K)
    for m in range(n_net):
        out = 1 if m == n_net - 1 else B
        a = K if A <= 0 else min(K, max(A, math.ceil(out / beams)))
        total += (2 * beams * K * D if a < K else 0) + beams * (a * f_c + f_b)
        beams = min(out, beams * a)
    if rows:
        total += n_net * K * f_k / rows
    if precision != "fp32":
        total += min(B, RESCORED_BEAMS) * n_net * (f_c + f_b + f_k)
    return int(total)


def train_flops_per_step(cfg: ModelConfig, batch: int) -> int:
    """Estimated FLOPs of one training step: the batch's beam-search encoding at the model's
    A, B plus forward and backward (about 3x a forward) of the chosen codes' path,
    ``3 (M - 1) (f_c + f_b + f_k)`` per vector."""
    f_c, f_b, f_k = _net_flops(cfg)
    return batch * (encode_flops_per_vector(cfg, cfg.A, cfg.B, rows=batch) + 3 * (cfg.M - 1) * (f_c + f_b + f_k))


# ----------------------------------------------------------------------------- helpers

class Mixture:
    """Gaussian clusters sharing a random rotation, per-axis spread decaying like ``i^-0.5``."""

    def __init__(self, D: int, n_clusters: int = 256, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        self.centres = torch.randn(n_clusters, D, generator=self.g) * 2.0
        self.rotation = torch.linalg.qr(torch.randn(D, D, generator=self.g))[0]
        self.scales = torch.arange(1, D + 1, dtype=torch.float32) ** -0.5

    def draw(self, n: int, block: int = 1 << 18) -> np.ndarray:
        out = np.empty((n, len(self.scales)), dtype=np.float32)
        for i in range(0, n, block):
            rows = min(block, n - i)
            labels = torch.randint(len(self.centres), (rows,), generator=self.g)
            z = torch.randn(rows, len(self.scales), generator=self.g) * self.scales
            out[i:i + rows] = (self.centres[labels] + z @ self.rotation.T).numpy()
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(dev: torch.device, fn, /, *args, **kwargs):
    """``(fn(*args, **kwargs), seconds)``, the device ``dev`` synchronised before and after."""
    sync(dev)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(dev)
    return out, time.perf_counter() - t0


def peak_memory(device: torch.device, reset: bool = False) -> float | None:
    if device.type != "cuda":
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"gpu": None, "cuda": torch.version.cuda}
    props = torch.cuda.get_device_properties(device)
    return {"gpu": torch.cuda.get_device_name(device), "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_capability": f"{props.major}.{props.minor}", "gpu_sms": props.multi_processor_count,
            "cuda": torch.version.cuda}


class Recorder:
    """Appends one JSON line per result (common fields first) and prints a short summary."""

    def __init__(self, path: str, common: dict):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path, self.common = path, common

    def __call__(self, row: dict, summary: str) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"bench": "gpu", **row, **self.common}) + "\n")
        print(f"[{row['what']}] {summary}", flush=True)


# ----------------------------------------------------------------------------- parts

def record_tests(junit: str | None, rc: int, emit: Recorder) -> None:
    """One ``cuda_tests`` line from pytest's JUnit XML (counts and each test's outcome)."""
    row = {"what": "cuda_tests", "rc": rc, "tests": 0, "failures": 0, "errors": 0, "skipped": 0, "cases": []}
    if junit and Path(junit).is_file():
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for s in suites:
            for key in ("tests", "failures", "errors", "skipped"):
                row[key] += int(s.get(key, 0))
            for case in s.iter("testcase"):
                outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
                row["cases"].append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                                     "time_s": float(case.get("time", 0))})
    passed = row["tests"] - row["failures"] - row["errors"] - row["skipped"]
    emit(row, f"rc={rc} passed={passed} failed={row['failures']} errors={row['errors']} skipped={row['skipped']}")


def _rq_tables(model: QincoModel) -> list[torch.Tensor]:
    """The tensors :func:`initialize` sets: normalisation, codebooks and pre-selectors."""
    out = [model.mean, model.scale]
    for step in model.steps:
        out += [step.codebook] + ([step.preselector] if step.preselector is not None else [])
    return out


def make_model(preset: str, sc: Scale, x_init: np.ndarray, device: torch.device, seed: int,
               rq_init: list[torch.Tensor] | None = None):
    """An RQ-initialised (untrained) model of ``preset`` at the scale's D, M, K, A, B, and the
    seconds :func:`initialize` took. ``rq_init``: the RQ tables of an earlier model (the same D,
    M, K; from :func:`_rq_tables`) to reuse instead (faiss's RQ training is CPU-bound)."""
    cfg = ModelConfig.from_preset(preset, D=sc.D, M=sc.M, K=sc.K, A=sc.A, B=sc.B, **sc.arch)
    tcfg = TrainConfig.from_preset(preset, seed=seed)
    torch.manual_seed(seed)
    model = QincoModel(cfg).to(device)
    if rq_init is None:
        _, init_s = timed(device, initialize, model, tcfg, x_init)
    else:
        with torch.no_grad():
            for dst, src in zip(_rq_tables(model), rq_init, strict=True):
                dst.copy_(src)
        init_s = None
    codec = QincoCodec(cfg, tcfg, device=device)
    codec.model_ = model
    return codec, init_s


def arch_fields(cfg: ModelConfig) -> dict:
    return {"D": cfg.D, "M": cfg.M, "K": cfg.K, "L": cfg.L, "de": cfg.E, "dh": cfg.dh}


def cpu_agreement(codec: QincoCodec, x: np.ndarray, A: int, B: int) -> dict:
    """Codes and MSE of the same model encoding ``x`` on the CPU and on the codec's device."""
    cpu = QincoCodec(codec.model_config, codec.train_config, device="cpu")
    cpu.model_ = copy.deepcopy(codec.model_).cpu()
    c_dev, c_cpu = codec.encode(x, A=A, B=B), cpu.encode(x, A=A, B=B)
    mse_dev = float(((codec.decode(c_dev) - x) ** 2).sum(1).mean())
    mse_cpu = float(((cpu.decode(c_cpu) - x) ** 2).sum(1).mean())
    return {"rows": len(x), "codes_equal_fraction": float((c_dev == c_cpu).all(1).mean()),
            "mse_device": mse_dev, "mse_cpu": mse_cpu}


def set_tf32(device: torch.device, on: bool) -> None:
    """Allow (or forbid, torch's default) TF32 tensor-core matrix products on CUDA."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


def bench_encode(codec: QincoCodec, preset: str, x: np.ndarray, sc: Scale, args, emit: Recorder,
                 init_s: float | None, tf32: bool) -> None:
    device, cfg = codec.device, codec.model_config
    warm = sc.encode_warm.get(preset, 64)
    # fp32 at each memory bound; the reduced precisions (their own networks' dtype, so
    # independent of the TF32 switch) once, at the largest bound
    settings = [(b, "fp32") for b in args.max_bytes]
    settings += [(max(args.max_bytes), p) for p in args.encode_precisions if p != "fp32" and not tf32]
    for j, (max_bytes, precision) in enumerate(settings):
        peak_memory(device, reset=True)
        flops = encode_flops_per_vector(cfg, sc.A, sc.B, precision=precision)
        opts = {"A": sc.A, "B": sc.B, "max_bytes": max_bytes, "precision": precision}
        timed(device, codec.encode, x[:warm], **opts)                  # kernels, allocator, cuBLAS
        _, probe_s = timed(device, codec.encode, x[:warm], **opts)
        rows = int(min(sc.encode_rows_max, max(warm, warm / probe_s * sc.encode_target_s)))
        _, seconds = timed(device, codec.encode, x[:rows], **opts)
        rate = rows / seconds
        row = {"what": "encode", "model": preset, **arch_fields(cfg), "A": sc.A, "B": sc.B, "tf32": tf32,
               "precision": precision,
               "max_bytes": max_bytes, "chunk_rows": max(1, max_bytes // bytes_per_vector(codec.model_, sc.A, sc.B)),
               "rows": rows, "seconds": seconds, "vectors_per_s": rate, "us_per_vector": 1e6 / rate,
               "flops_per_vector_est": flops, "gflops_per_s_est": flops * rate / 1e9, "init_s": init_s,
               "warmup_rows": warm, "peak_mem_gib": peak_memory(device)}
        n_check = sc.check_rows.get(preset, 0)
        if j == 0 and n_check:
            row["cpu_check"] = cpu_agreement(codec, x[:n_check], sc.A, sc.B)
        emit(row, f"{preset} A={sc.A} B={sc.B} tf32={tf32:d} {precision} max_bytes={max_bytes >> 20} MiB: "
                  f"{rate:,.0f} vec/s "
                  f"({rows} rows in {seconds:.2f} s), {flops / 1e9:.3g} GFLOP/vec est -> "
                  f"{row['gflops_per_s_est']:,.0f} GFLOP/s"
                  + (f", codes equal to CPU {row['cpu_check']['codes_equal_fraction']:.3f}" if "cpu_check" in row
                     else ""))


def bench_train(codec: QincoCodec, preset: str, data: Mixture, sc: Scale, emit: Recorder, tf32: bool) -> None:
    """Steps/s of :func:`fit` over one epoch of about ``train_target_s`` (at least 3 steps), after
    a 1-step warm-up and a 2-step run that measures the step time."""
    model, device, cfg = codec.model_, codec.device, codec.model_config
    batch = sc.train_batch
    x_train, x_val = data.draw(batch * sc.train_steps_max), data.draw(sc.n_val)
    _, val_s = timed(device, validation_mse, model, x_val, A=cfg.A, B=cfg.B, mse_scale=1.0)
    tcfg = dataclasses.replace(codec.train_config, batch=batch, loop=2 * batch, max_epochs=1)

    def epoch(cfg_: TrainConfig):
        state, wall = timed(device, fit, model, cfg_, x_train, x_val, progress=False)
        return state, max(state.history[-1]["elapsed_s"] - val_s, 1e-3), wall
    epoch(dataclasses.replace(tcfg, loop=batch))                     # warm-up: 1 step
    state, warm_s, _ = epoch(tcfg)                                   # 2 steps: the step time
    steps = int(min(sc.train_steps_max, max(3, round(sc.train_target_s * state.step / warm_s))))
    peak_memory(device, reset=True)
    state, train_s, wall = epoch(dataclasses.replace(tcfg, loop=steps * batch))
    flops = train_flops_per_step(cfg, batch)
    rate = state.step / train_s
    row = {"what": "train", "model": preset, **arch_fields(cfg), "A": cfg.A, "B": cfg.B, "tf32": tf32, "batch": batch,
           "steps": state.step, "seconds": train_s, "fit_wall_s": wall, "val_s": val_s, "n_val": sc.n_val,
           "steps_per_s": rate, "vectors_per_s": rate * batch,
           "amp": bool(codec.train_config.amp and device.type == "cuda"), "optimizer": codec.train_config.optimizer,
           "flops_per_step_est": flops, "gflops_per_s_est": flops * rate / 1e9, "peak_mem_gib": peak_memory(device)}
    emit(row, f"{preset} tf32={tf32:d} batch={batch}: {rate:.2f} steps/s ({state.step} steps in {train_s:.2f} s), "
              f"{row['gflops_per_s_est']:,.0f} GFLOP/s est")


def bench_ivfpq(device: torch.device, sc: Scale, seed: int, emit: Recorder) -> None:
    mix = Mixture(sc.ivf_D, n_clusters=max(4, sc.n_lists // 16), seed=seed + 1)  # a cluster spans ~16 lists
    t0 = time.perf_counter()
    xb, xq = mix.draw(sc.ivf_N), mix.draw(sc.n_queries)
    datagen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    gt = faiss.knn(xq, xb, sc.k)[1]
    gt_s = time.perf_counter() - t0
    params = ivfpq.IndexParams(n_lists=sc.n_lists, pq_dim=sc.pq_dim, pq_bits=8, kmeans_n_iters=sc.kmeans_n_iters)
    peak_memory(device, reset=True)
    index, build_s = timed(device, ivfpq.build, params, xb, device=device)
    common = {"n_db": sc.ivf_N, "dim": sc.ivf_D, "n_lists": sc.n_lists, "pq_dim": sc.pq_dim, "pq_bits": 8}
    emit({"what": "ivfpq_build", **common, "tf32": False, "build_s": build_s, "index_bytes": index.nbytes(),
          "kmeans_n_iters": params.kmeans_n_iters, "datagen_s": datagen_s, "ground_truth_s": gt_s,
          "peak_mem_gib": peak_memory(device)},
         f"N={sc.ivf_N} D={sc.ivf_D} IVF{sc.n_lists},PQ{sc.pq_dim}x8 built in {build_s:.2f} s")
    for n_probes in sc.probes:
        sp = ivfpq.SearchParams(n_probes=n_probes)
        ivfpq.search(sp, index, xq[:min(100, len(xq))], sc.k)       # warm-up
        times, ids = [], None
        for _ in range(sc.repeats):
            (_, ids), t = timed(device, ivfpq.search, sp, index, xq, sc.k)
            times.append(t)
        t = statistics.median(times)
        r = recall_at(ids, gt, (1, 10))
        row = {"what": "ivfpq_search", **common, "tf32": False, "n_probes": n_probes, "k": sc.k, "n_queries": len(xq),
               "search_s": t, "qps": len(xq) / t, f"{sc.k}-recall@{sc.k}": neighbor_recall(ids, gt, sc.k),
               "R@1": r[1], "R@10": r[10], "repeats": sc.repeats}
        emit(row, f"n_probes={n_probes}: {row['qps']:,.0f} QPS, {sc.k}-recall@{sc.k} "
                  f"{row[f'{sc.k}-recall@{sc.k}']:.3f}")


# ----------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS))
    p.add_argument("--models", nargs="+", default=["qinco2-S", "qinco2-L"])
    p.add_argument("--max-bytes", type=int, nargs="+", default=None,
                   help="encoder working-memory bounds to time (default: the library's, plus 4 GiB on CUDA)")
    p.add_argument("--encode-precisions", nargs="+", choices=PRECISIONS, default=["fp32", "bf16"],
                   help="encoder precisions to time (qinco2.codec.precision; fp16 and tf32 need CUDA)")
    p.add_argument("--tf32", choices=("off", "on", "both"), default=None,
                   help="TF32 matrix products for encode/train on CUDA (default: both on CUDA, off on CPU)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    p.add_argument("--budget-s", type=float, default=None, help="skip the parts not started within this time")
    p.add_argument("--tests-junit", default=None, help="JUnit XML of the CUDA tests to record first")
    p.add_argument("--tests-rc", type=int, default=None, help="exit status of the CUDA tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/gpu_check.jsonl")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device} but torch {torch.__version__} sees no CUDA device "
                f"(built for CUDA {torch.version.cuda})")
    if args.device.type == "cuda" and args.device.index is None:       # set_device needs an index
        args.device = torch.device("cuda", torch.cuda.current_device())
    if args.tf32 is None:
        args.tf32 = "both" if args.device.type == "cuda" else "off"
    if args.max_bytes is None:
        args.max_bytes = [GPU_MIN_BYTES, GPU_MAX_BYTES] if args.device.type == "cuda" else [DEFAULT_MAX_BYTES]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    if args.device.type == "cuda":
        torch.cuda.set_device(args.device)
    sc = SCALES[args.scale]
    env = {**environment(args.threads), "device": str(args.device), **device_info(args.device),
           "scale": args.scale}
    emit = Recorder(args.out, env)
    if args.tests_junit is not None or args.tests_rc is not None:
        record_tests(args.tests_junit, -1 if args.tests_rc is None else args.tests_rc, emit)

    def in_budget(what: str) -> bool:
        if args.budget_s is None or time.monotonic() - t_start < args.budget_s:
            return True
        print(f"[{what}] skipped: the {args.budget_s:.0f} s budget is spent", flush=True)
        return False

    if {"encode", "train"} & set(args.parts):
        data = Mixture(sc.D, seed=args.seed)
        x_init = data.draw(sc.n_init)
        x_enc = data.draw(sc.encode_rows_max) if "encode" in args.parts else None
        rq_init = None                                      # the RQ tables, computed once
        for preset in args.models:
            if not in_budget(preset):
                continue
            codec, init_s = make_model(preset, sc, x_init, args.device, args.seed, rq_init)
            if rq_init is None:
                rq_init = [t.detach().clone() for t in _rq_tables(codec.model_)]
            for tf32 in {"off": [False], "on": [True], "both": [False, True]}[args.tf32]:
                set_tf32(args.device, tf32)
                if "encode" in args.parts and in_budget(f"encode {preset}"):
                    bench_encode(codec, preset, x_enc, sc, args, emit, init_s, tf32)
                if "train" in args.parts and in_budget(f"train {preset}"):
                    bench_train(codec, preset, data, sc, emit, tf32)
            set_tf32(args.device, False)
            del codec
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
    if "ivfpq" in args.parts and in_budget("ivfpq"):
        bench_ivfpq(args.device, sc, args.seed, emit)
    print(f"results appended to {args.out} in {time.monotonic() - t_start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
