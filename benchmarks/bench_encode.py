"""Encode roofline: a model's FLOPs per vector, the GFLOP/s its encoder reaches in each
precision, and the GFLOP/s of the machine's own matrix products on the step network's shapes.

For a model (``--preset`` at ``--D``, RQ-initialised on the data, its networks given random
weights of std ``--net-std`` so that they are not the identity; or a trained ``--model``) and
``--A``/``--B``, each ``--precisions`` entry (:mod:`qinco2.codec.precision`) times
:meth:`QincoCodec.encode` (numpy in, codes out) on rows chosen to take about ``--target-s``,
median of ``--repeats`` after a warm-up, and compares its codes with fp32 ones on the first
``--check-rows`` rows (MSE ratio, fraction of equal codes; random deep networks are chaotic,
so that any rounding changes most codes: judge quality with a trained ``--model``; H200,
qinco2-L at random weights: bf16 MSE x1.012, codes equal 0%). FLOPs per vector come from
``bench_gpu.encode_flops_per_vector`` (checked against torch's FlopCounterMode by
``tests/test_gpu_check.py``); achieved GFLOP/s = FLOPs per vector x vectors/s.

GEMM peak: ``torch.mm`` into a preallocated output (as ``F.linear``: rows x in @ (out x in)^T)
on the shapes the step network runs per chunk of candidates (``rows = chunk vectors x B x A``,
at most 65 536): ``E -> d_h`` and ``d_h -> E`` of the residual blocks and ``E -> D`` of the
output projection, each for ``--gemm-s`` seconds, in the dtype of each precision (tf32: float32
with TF32 allowed). ``gemm_gflops_per_s`` is their mix weighted by the network's FLOPs (the rate
the networks would run at if they were nothing but these products), ``fraction_of_gemm`` the
encoder's achieved rate over it.

One JSON line per GEMM shape (``what="gemm"``) and per precision (``what="encode"``) is
appended to ``--out`` with the CPU model, its AMX / AVX512-BF16 flags, threads, versions, GPU,
command and date.

    PYTHONPATH=. python benchmarks/bench_encode.py --preset qinco2-S --D 128 --A 16 --B 8 --threads 2
    PYTHONPATH=. python benchmarks/bench_encode.py --model runs/bench/qinco2-wordnet-minilm-8x8.pt \\
        --db wordnet-minilm --data-root /work/shared/data --A 16 --B 8
    PYTHONPATH=. python benchmarks/bench_encode.py --device cuda --A 16 --B 32 --precisions fp32 tf32 bf16 fp16
    PYTHONPATH=. python benchmarks/bench_encode.py --D 32 --M 4 --K 16 --A 4 --B 4 --target-s 0.2 \\
        --gemm-s 0.05 --check-rows 64 --out /tmp/encode_smoke.jsonl      # a smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_codecs import environment
from bench_gpu import Mixture, Scale, device_info, encode_flops_per_vector, make_model, timed

from qinco2 import DataLimits, QincoCodec, resolve_dataset
from qinco2.codec.encode import bytes_per_vector, default_max_bytes
from qinco2.codec.precision import PRECISIONS, check_precision, compute_dtype, matmul_precision
from qinco2.errors import InputError

GEMM_ROWS_MAX = 65_536


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qinco2-S", help="architecture preset of the random-weight model")
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--M", type=int, default=8)
    p.add_argument("--K", type=int, default=256)
    p.add_argument("--net-std", type=float, default=0.03, help="std of the random network weights added")
    p.add_argument("--model", default=None, help="a trained model file instead of --preset")
    p.add_argument("--db", default=None, help="data set name or vectors file (default: synthetic clusters)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--A", type=int, default=16)
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["fp32", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    p.add_argument("--max-bytes", type=int, default=None, help="encoder chunk memory (default: the library's)")
    p.add_argument("--target-s", type=float, default=3.0, help="seconds of one timed encode")
    p.add_argument("--rows-max", type=int, default=262_144)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check-rows", type=int, default=1024, help="rows whose codes are compared with fp32")
    p.add_argument("--gemm-s", type=float, default=1.0, help="seconds per GEMM shape and precision")
    p.add_argument("--n-init", type=int, default=4096, help="rows of the RQ initialisation of --preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/encode.jsonl")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- model and data

def load_data(args, D: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(rows for the RQ initialisation, rows to encode), float32."""
    if args.db is None:
        mix = Mixture(D or args.D, seed=args.seed)
        return mix.draw(args.n_init), mix.draw(args.rows_max)
    ds = resolve_dataset(args.db, data_root=args.data_root)
    x_enc = np.asarray(ds.database(DataLimits(db=args.rows_max)), dtype=np.float32)
    x_init = x_enc[:args.n_init] if args.model else \
        np.asarray(ds.train_val(DataLimits(valset=1, trainset=args.n_init))[0], dtype=np.float32)
    return x_init, x_enc


def build_codec(args) -> tuple[QincoCodec, np.ndarray, dict]:
    """The codec, the rows to encode and the model's description."""
    if args.model:
        codec = QincoCodec.load(args.model, device=args.device)
        _, x_enc = load_data(args, codec.dim)
        return codec, x_enc, {"model": args.model}
    x_init, x_enc = load_data(args, None)
    D = x_enc.shape[1]
    sc = Scale(D=D, M=args.M, K=args.K, A=args.A, B=args.B, n_init=len(x_init))
    codec, init_s = make_model(args.preset, sc, x_init, args.device, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for step in codec.model_.steps:
            for p in (step.net.parameters() if step.net is not None else ()):
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * args.net_std)
    return codec, x_enc, {"model": args.preset, "net_std": args.net_std, "init_s": init_s}


def arch(codec: QincoCodec) -> dict:
    cfg = codec.model_.cfg
    return {"D": cfg.D, "M": cfg.M, "K": cfg.K, "L": cfg.L, "de": cfg.E, "dh": cfg.dh, "ivf_K": cfg.ivf_K}


# ----------------------------------------------------------------------------- GEMM peak

def gemm_shapes(codec: QincoCodec, A: int, B: int, chunk: int) -> list[tuple[int, int, int, int]]:
    """``(rows, in, out, weight)``: the step network's per-candidate products, ``weight`` = how
    many of them one candidate runs (``L`` of each block product, one output projection)."""
    cfg = codec.model_.cfg
    rows = min(GEMM_ROWS_MAX, max(1, chunk * B * max(A, 1)))
    shapes = [(rows, cfg.E, cfg.dh, cfg.L), (rows, cfg.dh, cfg.E, cfg.L)]
    if cfg.E != cfg.D:
        shapes.append((rows, cfg.E, cfg.D, 1))
    return [s for s in shapes if s[3] > 0]


def gemm_rate(device: torch.device, precision: str, rows: int, n_in: int, n_out: int, seconds: float) -> float:
    """GFLOP/s of ``out = x @ w.T`` (as F.linear) in the dtype of ``precision``, run for ``seconds``."""
    dtype = compute_dtype(precision, torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, n_in, device=device, generator=g).to(dtype)
    w = torch.randn(n_out, n_in, device=device, generator=g).to(dtype)
    out = torch.empty(rows, n_out, device=device, dtype=dtype)
    with matmul_precision(precision):
        for _ in range(3):
            torch.mm(x, w.t(), out=out)
        sync(device)
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(4):
                torch.mm(x, w.t(), out=out)
            calls += 4
            sync(device)
        elapsed = time.perf_counter() - t0
    return 2 * rows * n_in * n_out * calls / elapsed / 1e9


def measure_gemm(args, precision: str, shapes, emit) -> tuple[float, float]:
    """(FLOP-weighted mix, best) GFLOP/s of the shapes in ``precision``; one line per shape."""
    flops, seconds, best = 0.0, 0.0, 0.0
    for rows, n_in, n_out, weight in shapes:
        rate = gemm_rate(args.device, precision, rows, n_in, n_out, args.gemm_s)
        f = 2 * n_in * n_out * weight                      # per candidate
        flops, seconds, best = flops + f, seconds + f / rate, max(best, rate)
        emit({"what": "gemm", "precision": precision, "rows": rows, "in": n_in, "out": n_out,
              "gflops_per_s": rate}, f"gemm {precision} ({rows} x {n_in}) @ ({n_in} x {n_out}): {rate:,.0f} GFLOP/s")
    return flops / seconds, best


# ----------------------------------------------------------------------------- encoding

def time_encode(codec: QincoCodec, x: np.ndarray, args, precision: str) -> tuple[np.ndarray, int, list[float]]:
    """Codes of the timed rows, their number and the seconds of each repeat (after a warm-up
    that also sizes the rows to about ``--target-s``)."""
    dev = codec.device
    opts = {"A": args.A, "B": args.B, "max_bytes": args.max_bytes, "precision": precision}
    rows = min(len(x), 64)
    timed(dev, codec.encode, x[:rows], **opts)
    for _ in range(2):          # small batches under-use a GPU: size twice, each run a warm-up
        _, probe_s = timed(dev, codec.encode, x[:rows], **opts)
        rows = int(min(len(x), max(rows, rows / probe_s * args.target_s)))
    times, codes = [], None
    for _ in range(args.repeats):
        codes, seconds = timed(dev, codec.encode, x[:rows], **opts)
        times.append(seconds)
    return codes, rows, times


def sq_errors(codec: QincoCodec, x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return ((codec.decode(codes) - x) ** 2).sum(1)


def bench_precision(codec, x, args, precision, ref_codes, gemm, emit) -> None:
    codes, rows, times = time_encode(codec, x, args, precision)
    seconds = statistics.median(times)
    rate = rows / seconds
    chunk = min(rows, max(1, args.max_bytes // bytes_per_vector(codec.model_, args.A, args.B)))
    flops = encode_flops_per_vector(codec.model_.cfg, args.A, args.B, rows=chunk, precision=precision)
    rescore_flops = flops - encode_flops_per_vector(codec.model_.cfg, args.A, args.B, rows=chunk)
    n = min(rows, len(ref_codes))
    err, err32 = sq_errors(codec, x[:n], codes[:n]), sq_errors(codec, x[:n], ref_codes[:n])
    achieved = flops * rate / 1e9
    row = {"what": "encode", "precision": precision, "A": args.A, "B": args.B, "max_bytes": args.max_bytes,
           "chunk_rows": chunk, "rows": rows, "repeats": len(times), "seconds": seconds, "seconds_all": times,
           "vectors_per_s": rate, "us_per_vector": 1e6 / rate, "flops_per_vector_est": flops,
           "rescore_flops_per_vector_est": rescore_flops,
           "gflops_per_s_est": achieved, "gemm_gflops_per_s": gemm[0], "gemm_peak_gflops_per_s": gemm[1],
           "fraction_of_gemm": achieved / gemm[0], "check_rows": n, "mse": float(err.mean()),
           "mse_ratio_vs_fp32": float(err.mean() / err32.mean()),
           "codes_equal_fraction_vs_fp32": float((codes[:n] == ref_codes[:n]).all(1).mean())}
    emit(row, f"encode {precision}: {rate:,.1f} vec/s ({1e6 / rate:,.0f} us/vec), {flops / 1e6:,.1f} MFLOP/vec -> "
              f"{achieved:,.1f} GFLOP/s = {row['fraction_of_gemm']:.0%} of the GEMM mix ({gemm[0]:,.0f}); "
              f"MSE x{row['mse_ratio_vs_fp32']:.4f} of fp32, codes equal {row['codes_equal_fraction_vs_fp32']:.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    codec, x, model_info = build_codec(args)
    args.max_bytes = args.max_bytes or default_max_bytes(args.device)
    common = {"bench": "encode", **model_info, **arch(codec), **environment(args.threads),
              "device": str(args.device), **device_info(args.device)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def emit(row: dict, summary: str) -> None:
        with open(args.out, "a") as f:
            f.write(json.dumps({**row, **common}) + "\n")
        print(summary, flush=True)

    ref_codes = codec.encode(x[:args.check_rows], A=args.A, B=args.B, max_bytes=args.max_bytes)
    chunk = min(len(x), max(1, args.max_bytes // bytes_per_vector(codec.model_, args.A, args.B)))
    shapes = gemm_shapes(codec, args.A, args.B, chunk)
    for precision in args.precisions:
        try:
            check_precision(precision, args.device)
        except InputError as exc:
            print(f"skipping {precision}: {exc}", file=sys.stderr)
            continue
        gemm = measure_gemm(args, precision, shapes, emit)
        bench_precision(codec, x, args, precision, ref_codes, gemm, emit)
    print(f"results appended to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
