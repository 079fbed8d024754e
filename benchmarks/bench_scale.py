"""Cost per vector and peak memory of every large-scale stage, from 10^5 to 10^7 vectors.

Data: the synthetic SIFT-like distribution (uint8, D=64) streamed to one ``.npy`` file of
``max(--sizes)`` rows; size N uses its first N rows (a memory map), queries and training rows
are other streams of the same distribution. Every stage runs in its own process, sampled every
20 ms for its resident memory (``peak_rss_mb``: all resident pages, file pages of the memory
maps included; ``peak_anon_mb``: the process's own memory, what a stage allocates).

Stages (one JSON line each per N):

* ``read``: open the file, read N rows block by block;
* ``ivf_kmeans``: IVF k-means (1024 centroids, on at most 256 rows each) and the assignment of N rows;
* ``ivfpq``: IVF-PQ build on 0.9 N rows, extend by 0.1 N, search at fixed ``n_probes`` (and the
  recall it reaches);
* ``qinco_encode``: streaming encoding of N rows with a small IVF-QINCo2 model (1024 lists) to a
  packed codes file;
* ``qinco_index``: the faiss IVF-AQ index built from those codes, and the multi-stage search;
* ``encode_kivf`` (once): encoding throughput of qinco2-S at A=16 B=32 with 2^16 and 2^20 IVF
  lists (on a sample).

    python benchmarks/bench_scale.py --sizes 100000 1000000 10000000 --threads 2 \
        --work runs/scale --out benchmarks/results/scale.jsonl --plot benchmarks/results/scale.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

N_LISTS = 1024
N_QUERIES = 500
K = 10
TRAIN_ROWS = 100_000           # IVF-QINCo2 model training rows (stream 3)
STAGES = ("read", "ivf_kmeans", "ivfpq", "qinco_encode", "qinco_index")


# ---------------------------------------------------------------------------- measuring
class PeakMemory:
    """Samples /proc/self/status every ``period`` s: peaks of VmRSS and RssAnon in MB."""

    def __init__(self, period: float = 0.02):
        self.period, self.rss, self.anon, self._stop = period, 0.0, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        mb = {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "VmHWM")}
        self.rss, self.anon = max(self.rss, mb["VmRSS"], mb["VmHWM"]), max(self.anon, mb["RssAnon"])

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------- data
def data_paths(work: Path) -> dict:
    return {"base": work / "base.npy", "queries": work / "queries.npy", "train": work / "train.npy"}


def prepare_data(work: Path, n_max: int) -> None:
    from qinco2.synthetic import write_synthetic

    paths = data_paths(work)
    for name, n, stream in (("base", n_max, 1), ("queries", N_QUERIES, 2), ("train", TRAIN_ROWS, 3)):
        p = paths[name]
        if not p.is_file() or np.load(p, mmap_mode="r").shape[0] < n:
            print(f"writing {n} rows to {p}", file=sys.stderr)
            write_synthetic(p, n, stream=stream)


def ground_truth(work: Path, n: int) -> np.ndarray:
    """Exact L2 top-K of the queries over the first n rows, block by block (cached)."""
    import faiss

    path = work / f"gt-{n}.npy"
    if path.is_file():
        return np.load(path)
    x = np.load(data_paths(work)["base"], mmap_mode="r")
    q = np.load(data_paths(work)["queries"]).astype(np.float32)
    best_d, best_i = np.full((len(q), K), np.inf, np.float32), np.zeros((len(q), K), np.int64)
    for lo in range(0, n, 1 << 20):
        d, i = faiss.knn(q, np.asarray(x[lo:min(n, lo + (1 << 20))], np.float32), K)
        d_all, i_all = np.concatenate([best_d, d], 1), np.concatenate([best_i, i + lo], 1)
        order = np.argsort(d_all, axis=1, kind="stable")[:, :K]
        best_d, best_i = np.take_along_axis(d_all, order, 1), np.take_along_axis(i_all, order, 1)
    np.save(path, best_i)
    return best_i


# ---------------------------------------------------------------------------- stages
def stage_read(work: Path, n: int) -> dict:
    from qinco2 import open_vectors, read_vectors

    path = data_paths(work)["base"]
    x, t_open = timed(open_vectors, path)
    t0, total = time.perf_counter(), 0
    for lo in range(0, n, 1 << 20):
        total += int(read_vectors(path, lo, min(n, lo + (1 << 20)))[:, 0].sum())
    return {"open_s": t_open, "read_s": time.perf_counter() - t0, "us_per_vector": 1e6 * (time.perf_counter() - t0) / n}


def stage_ivf_kmeans(work: Path, n: int) -> dict:
    from qinco2 import assign_to_centroids, open_vectors, train_ivf_centroids

    x = open_vectors(data_paths(work)["base"])[:n]
    c, t_train = timed(train_ivf_centroids, x, N_LISTS, niter=20, progress=False)
    ids, t_assign = timed(assign_to_centroids, x, c)
    np.save(work / f"centroids-{n}.npy", c)
    return {"train_s": t_train, "assign_s": t_assign, "us_per_vector": 1e6 * t_assign / n,
            "list_size_max": int(np.bincount(ids, minlength=N_LISTS).max())}


def stage_ivfpq(work: Path, n: int) -> dict:
    from qinco2 import ivfpq, open_vectors
    from qinco2.metrics import neighbor_recall

    x = open_vectors(data_paths(work)["base"])[:n]
    q = np.load(data_paths(work)["queries"]).astype(np.float32)
    gt = ground_truth(work, n)
    n0 = int(0.9 * n)
    params = ivfpq.IndexParams(n_lists=N_LISTS, pq_dim=32, pq_bits=8, kmeans_n_iters=10, add_data_on_build=False,
                               conservative_memory_allocation=True)   # lists at their exact sizes
    index, t_train = timed(ivfpq.build, params, x[:n0])          # k-means on a sample: not per vector
    _, t_add = timed(ivfpq.extend, index, x[:n0], np.arange(n0))
    _, t_extend = timed(ivfpq.extend, index, x[n0:], np.arange(n0, n))
    out = {"train_s": t_train, "add_s": t_add, "extend_s": t_extend, "us_per_vector": 1e6 * t_add / n0,
           "extend_us_per_vector": 1e6 * t_extend / (n - n0), "index_mb": index.nbytes() / 2**20}
    for n_probes in (16, 64):
        (_, ids), t = timed(ivfpq.search, ivfpq.SearchParams(n_probes=n_probes), index, q, K)
        scanned = len(q) * n * n_probes / N_LISTS
        out[f"search_p{n_probes}"] = {"recall": neighbor_recall(ids, gt, K), "ms_per_query": 1e3 * t / len(q),
                                      "ns_per_scanned_code": 1e9 * t / scanned}
    return out


def _small_ivf_codec(work: Path):
    """A small IVF-QINCo2 (1024 lists, M=8 bytes) trained once on the training stream (cached)."""
    from qinco2 import QincoCodec, train_ivf_centroids

    path = work / "ivf_small.pt"
    if path.is_file():
        return QincoCodec.load(path)
    x = np.load(data_paths(work)["train"]).astype(np.float32)
    c = train_ivf_centroids(x, N_LISTS, niter=20, progress=False)
    codec = QincoCodec.from_preset("qinco2-S", M=8, K=256, L=1, de=32, dh=64, A=4, B=2, loop=50_000,
                                   epochs=2, max_epochs=2, small_data="keep")
    codec.train(x[:-5000], x[-5000:], ivf_centroids=c, progress=False)
    codec.save(path)
    return codec


def stage_qinco_encode(work: Path, n: int) -> dict:
    from qinco2 import encode_to_file, open_vectors

    codec = _small_ivf_codec(work)
    x = open_vectors(data_paths(work)["base"])[:n]
    out = work / f"codes-{n}.npy"
    r, t = timed(encode_to_file, codec, x, out, progress=False)
    return {"encode_s": t, "us_per_vector": 1e6 * t / n, "code_size": r["code_size"],
            "codes_mb": out.stat().st_size / 2**20}


def stage_qinco_index(work: Path, n: int) -> dict:
    from qinco2 import encode_to_file, load_encoded
    from qinco2.ivfsearch.multistage import SearchParams, multistage_search
    from qinco2.ivfsearch.shortlist import build_index
    from qinco2.metrics import recall_at

    codec = _small_ivf_codec(work)
    x_train = np.load(data_paths(work)["train"], mmap_mode="r")
    train_codes = work / "codes-train.npy"
    if not train_codes.is_file():
        encode_to_file(codec, x_train, train_codes, progress=False)
    model = codec._model()                                        # the frozen IVF step, back in raw space
    centroids = model.denormalize(model.steps[0].codebook.detach()).cpu().numpy()
    db = load_encoded(work / f"codes-{n}.npy")["codes"]
    index, t_build = timed(build_index, centroids, load_encoded(train_codes)["codes"], x_train, db,
                           aq_training_samples=TRAIN_ROWS, progress=False)
    q, gt = np.load(data_paths(work)["queries"]).astype(np.float32), ground_truth(work, n)
    out = {"build_s": t_build, "us_per_vector": 1e6 * t_build / n, "index_mb": index.ntotal * index.code_size / 2**20}
    for nprobe in (16, 64):
        p = SearchParams(nprobe=nprobe, quantizer_efSearch=128, nshort=100)
        (ids, _), t = timed(multistage_search, index, codec, db, q, p, k=K)
        out[f"search_p{nprobe}"] = {"R@1": recall_at(ids, gt[:, :1], [1])[1], "ms_per_query": 1e3 * t / len(q),
                                    "ns_per_scanned_code": 1e9 * t / (len(q) * n * nprobe / N_LISTS)}
    return out


def stage_encode_kivf(work: Path, n: int) -> list[dict]:
    """qinco2-S, A=16 B=32, random weights, IVF tables of 2^16 and 2^20 rows: µs per vector."""
    import torch

    from qinco2 import QincoCodec
    from qinco2.codec.encode import bytes_per_vector
    from qinco2.codec.model import ModelConfig, QincoModel
    from qinco2.synthetic import stream_synthetic

    x = np.load(data_paths(work)["queries"]).astype(np.float32)[:n or 256]
    rows = []
    for log2 in (16, 20):
        table = np.concatenate(list(stream_synthetic(1 << log2, stream=4, chunk_rows=1 << 18))).astype(np.float32)
        cfg = ModelConfig.from_preset("qinco2-S", D=64, ivf_K=1 << log2)
        codec = QincoCodec(cfg)
        codec.model_ = QincoModel(cfg, torch.from_numpy(table)).eval()
        codec.model_config = cfg
        codec.encode(x[:8])                                       # warm-up
        _, t = timed(codec.encode, x)
        rows.append({"ivf_K": 1 << log2, "n": len(x), "us_per_vector": 1e6 * t / len(x),
                     "bytes_per_vector_charged": bytes_per_vector(codec._model(), 16, 32)})
    return rows


# ---------------------------------------------------------------------------- driver
def run_stage(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    fn = globals()[f"stage_{args.stage}"]
    with PeakMemory() as mem:
        result, wall = timed(fn, Path(args.work), args.n)
    print(json.dumps({"result": result, "wall_s": wall, "peak_rss_mb": mem.rss, "peak_anon_mb": mem.anon}))


def drive(args) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_codecs import environment

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prepare_data(work, max(args.sizes))
    if {"qinco_encode", "qinco_index"} & set(args.stages):
        _small_ivf_codec(work)                                    # trained once, before any timing
    if args.prepare_only:
        return
    jobs = [(s, n) for n in sorted(args.sizes) for s in args.stages if s != "encode_kivf"]
    if "encode_kivf" in args.stages:
        jobs.append(("encode_kivf", args.kivf_sample))
    for stage, n in jobs:
        cmd = [sys.executable, __file__, "--stage", stage, "--n", str(n), "--work", str(work),
               "--threads", str(args.threads)]
        print(f"{stage} N={n} ...", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            row = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
        else:
            row = json.loads(done.stdout.strip().splitlines()[-1])
        line = {"bench": "scale", "stage": stage, "N": n, "D": 64, **row, **environment(args.threads)}
        print(json.dumps({k: line[k] for k in ("stage", "N") if k in line} | {"result": row.get("result")}),
              file=sys.stderr, flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")
    if args.plot:
        plot(args.out, args.plot)


def plot(jsonl, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    latest = {(r["stage"], r["N"]): r for r in rows
              if r.get("bench") == "scale" and r.get("result") and r["stage"] in STAGES}   # later lines win
    rows = list(latest.values())
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in STAGES:
        pts = sorted((r["N"], r["result"]["us_per_vector"], r["peak_anon_mb"]) for r in rows if r["stage"] == stage)
        if pts:
            n, t, m = zip(*pts, strict=True)
            ax_t.loglog(n, t, "o-", label=stage)
            ax_m.loglog(n, m, "o-", label=stage)
    ax_t.set(xlabel="N vectors", ylabel="µs per vector", title="time per vector")
    ax_m.set(xlabel="N vectors", ylabel="MB (process-owned, peak)", title="peak memory")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--stages", nargs="+", default=[*STAGES, "encode_kivf"])
    ap.add_argument("--kivf-sample", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/scale")
    ap.add_argument("--out", default="benchmarks/results/scale.jsonl")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--prepare-only", action="store_true", help="write the data and train the model, run nothing")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    run_stage(args) if args.stage else drive(args)


if __name__ == "__main__":
    main()
