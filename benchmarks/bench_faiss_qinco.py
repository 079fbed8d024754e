"""QINCo1-mode exhaustive greedy encoding: qinco2 (torch) against faiss's C++ IndexQINCo,
on the same weights and the same normalised vectors. Also reports how many codes agree and
the decode difference.

    PYTHONPATH=. python benchmarks/bench_faiss_qinco.py --model runs/bench/qinco1-sift-photos-8x8.pt
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch  # before faiss: one OpenMP runtime for both (qinco2.openmp)

# isort: split
import faiss
import numpy as np
from bench_codecs import environment

from qinco2 import DataLimits, QincoCodec, resolve_dataset
from qinco2.codec.encode import encode
from qinco2.codec.faiss_export import to_faiss_index_qinco


def median_time(fn, repeats: int) -> float:
    fn()                                            # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a QINCo1-architecture model file (preset qinco1)")
    p.add_argument("--dataset", default="sift-photos")
    p.add_argument("--n", type=int, default=2000, help="database vectors to encode")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/faiss_qinco.jsonl")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    codec = QincoCodec.load(args.model)
    model = codec.model_.eval()
    x = np.ascontiguousarray(resolve_dataset(args.dataset).database(DataLimits(db=args.n)), dtype=np.float32)
    with torch.no_grad():
        u = model.normalize(torch.from_numpy(x))
    u_np = np.ascontiguousarray(u.numpy())
    index = to_faiss_index_qinco(model)

    def ours():
        with torch.no_grad():
            return encode(model, u, A=0, B=1)[0]

    t_ours = median_time(ours, args.repeats)
    t_faiss = median_time(lambda: index.sa_encode(u_np), args.repeats)
    codes_ours = ours().numpy()
    packed = index.sa_encode(u_np)               # K = 256: one byte per code
    codes_faiss = packed.reshape(len(u_np), -1).astype(np.int64)
    with torch.no_grad():
        dec_ours = model.decode(torch.from_numpy(codes_faiss)).numpy()
    dec_faiss = index.sa_decode(packed)
    decode_diff = float(np.abs(dec_faiss - dec_ours).max() / (np.abs(dec_ours).max() + 1e-12))
    row = {"bench": "faiss_qinco", "dataset": args.dataset, "model": args.model, "n": args.n,
           "M": model.cfg.M, "K": model.cfg.K, "L": model.cfg.L, "dh": model.cfg.dh,
           "ours_encode_us": 1e6 * t_ours / args.n, "faiss_encode_us": 1e6 * t_faiss / args.n,
           "speed_ratio_ours_over_faiss": t_faiss / t_ours,
           "codes_equal_fraction": float((codes_ours == codes_faiss).all(1).mean()),
           "decode_max_rel_diff": decode_diff, **environment(args.threads)}
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
