"""IVF search benchmark: the multi-stage IVF-QINCo2 pipeline against faiss IVF indexes.

Stages (each cached under ``--work``, so a re-run continues where the last one stopped):
IVF centroids -> IVF-QINCo2 training -> encoding of a training slice and of the database ->
pairwise decoder -> IVF-AQ shortlist index -> parameter sweeps with and without the pairwise
decoder. Training and encoding run on ``--device`` (logged in ``stages.json``); every search
runs on the CPU. Then the faiss baselines of ``--baselines`` (default all, see
``FAISS_FACTORIES``) are built with the same number of lists and searched over ``nprobe``,
RaBitQ's query bits ``qb`` and the refinement's ``k_factor``, all with the same threads.
Every operating point becomes one JSON line of ``--out`` with its true ``bytes_per_vector``
(codes in the inverted lists plus the refinement codes; the IVF list id is counted on
neither side); the Pareto fronts are drawn together in ``--plot``. ``--faiss-only`` runs
the baselines alone.

    python benchmarks/bench_ivf_search.py --ivf-K 2048 --M 8 --qinco-minutes 35
    python benchmarks/bench_ivf_search.py --faiss-only --baselines rabitq rabitq-sq8 pqfs-pq
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch  # before faiss: one OpenMP runtime for both (qinco2.openmp)

# isort: split
import faiss
import numpy as np
from bench_codecs import QINCO_SETTINGS, environment

from qinco2 import DataLimits, QincoCodec, resolve_dataset
from qinco2.codec.codes_io import encode_to_file, load_encoded, model_sha
from qinco2.ivf import train_ivf_centroids
from qinco2.ivfsearch.multistage import load_runs, pareto_front, plot_pareto, sweep
from qinco2.ivfsearch.pairwise import PairwiseDecoder
from qinco2.ivfsearch.shortlist import build_index, factory_string, load_index, save_index
from qinco2.metrics import knn, mse, recall_at

log = logging.getLogger("bench_ivf_search")

OUR_GRID = {"nprobe": [1, 2, 4, 8, 16, 32, 64], "quantizer_efSearch": [16, 32, 64, 128],
            "nshort": [1, 2, 5, 10, 20, 50, 100, 200], "nmid_short": [2, 4, 8, 16]}
# name -> faiss factory string. {C}: lists, {M}: --M, {M2}: 2M, {H}: M // 2, {RB}: RaBitQ bits per
# dimension whose code size is closest to M bytes ("" for 1 bit: at D=128 the 1-bit code is
# D/8 = 16 bytes + 8 bytes of per-vector factors, more than M = 8 or 16 bytes already).
FAISS_FACTORIES = {
    "pq": "IVF{C},PQ{M}x8",                                  # M bytes
    "rq": "IVF{C},RQ{M}x8_Nqint8",                           # M + 1 bytes (8-bit norm)
    "pqfs": "IVF{C},PQ{M2}x4fsr",                            # M bytes, fast-scan, no refinement
    "rabitq": "IVF{C},RaBitQ{RB}",                           # D/8 + 8 bytes (1 bit)
    "rabitqfs": "IVF{C},RaBitQfs{RB}",                       # the same codes, fast-scan
    "rabitq-sq8": "IVF{C},RaBitQ{RB},Refine(SQ8)",           # + D bytes of 8-bit scalar codes
    "rabitq-flat": "IVF{C},RaBitQ{RB},RFlat",                # + 4D bytes of raw floats
    "pqfs-pq": "IVF{C},PQ{M}x4fsr,Refine(PQ{H}x8)",          # M/2 + M/2 = M bytes in all
    "pqfs-sq8": "IVF{C},PQ{M2}x4fsr,Refine(SQ8)",            # M + D bytes
    "pqfs-flat": "IVF{C},PQ{M2}x4fsr,RFlat",                 # M + 4D bytes
}
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RABITQ_QB = (4, 8)          # query bits; qb=0 (float queries) is ~40x slower on IndexIVFRaBitQ
K_FACTORS = (1, 2, 4, 8)    # refinement: k_factor * 100 candidates re-ranked


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def stage_log(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_stage_log(path: Path, info: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, path)


def train_stage(args, ds, xt_raw, xv_raw, centroids, info: dict, info_path: Path) -> QincoCodec:
    """The IVF-QINCo2 model (trained on ``args.device`` unless cached), loaded on ``args.device``."""
    model_path = Path(args.work) / "model.pt"
    if "train_s" not in info:
        preset, overrides, _ = QINCO_SETTINGS["qinco2"]
        overrides = {**overrides, **{k: v for k, v in (("batch", args.batch), ("lr", args.lr)) if v is not None}}
        codec = QincoCodec.from_preset(preset, device=args.device,
                                       **{**overrides, "M": args.M, "max_time_s": args.qinco_minutes * 60})
        _, info["train_s"] = timed(codec.train, xt_raw, xv_raw, mse_scale=ds.mse_scale, output=model_path,
                                   resume=True, ivf_centroids=centroids, progress=False)
        st = codec.train_state_
        info.update(epochs_run=st.epoch, val_mse_init=st.init_mse, val_mse_best=st.best_mse,
                    preset=preset, overrides={**overrides, "M": args.M}, train_device=args.device)
        save_stage_log(info_path, info)
    return QincoCodec.load(model_path, device=args.device)     # encode_to_file encodes on codec.device


def encode_stage(args, codec: QincoCodec, xt_raw, xb, info: dict, info_path: Path):
    """Codes of the first ``--n-encode-train`` training rows (all of them for 0 or -1) and of
    the database, encoded on the codec's device unless cached."""
    work = Path(args.work)
    A, B = args.eval_AB
    n_train = None if args.n_encode_train <= 0 else args.n_encode_train
    for name, x in (("train", xt_raw[:n_train]), ("db", xb)):
        path = work / f"codes_{name}.npy"
        if not path.is_file():
            _, info[f"encode_{name}_s"] = timed(encode_to_file, codec, x, path, A=A, B=B, batch=4096)
            info[f"encode_{name}_us"] = 1e6 * info[f"encode_{name}_s"] / len(x)
            info[f"encode_{name}_device"] = str(codec.device)
            save_stage_log(info_path, info)
    return (load_encoded(work / "codes_train.npy", require_ivf=True)["codes"],
            load_encoded(work / "codes_db.npy", require_ivf=True)["codes"])


def prepare(args, ds, xt_raw, xv_raw, xb, xq, gt) -> dict:
    """The cached pipeline files under ``args.work``; returns the stage timings and figures."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info_path = work / "stages.json"
    info = stage_log(info_path)
    centroids_path = work / f"centroids{args.ivf_K}.npy"
    if not centroids_path.is_file():
        x = np.ascontiguousarray(xt_raw, dtype=np.float32)
        c, info["centroids_s"] = timed(train_ivf_centroids, x, args.ivf_K)
        np.save(centroids_path, c)
        save_stage_log(info_path, info)
    centroids = np.load(centroids_path)

    codec = train_stage(args, ds, xt_raw, xv_raw, centroids, info, info_path)
    train_codes, db_codes = encode_stage(args, codec, xt_raw, xb, info, info_path)
    if args.stop_after == "encode":
        return info
    x_enc = np.asarray(xt_raw[:len(train_codes)], dtype=np.float32)

    if "exhaustive" not in info:         # the codec alone: exact search over the decoded database
        xr = codec.decode(db_codes)
        info["exhaustive"] = {"mse": mse(xb, xr, ds.mse_scale),
                              **{f"R@{k}": v for k, v in recall_at(knn(xq, xr, 100), gt).items()}}
        save_stage_log(info_path, info)

    pairwise_path = work / "pairwise.pt"
    if not pairwise_path.is_file():
        dec = PairwiseDecoder(n_pairs_per_step=args.n_pairs_per_step, K=codec.model_config.K)
        _, info["pairwise_train_s"] = timed(dec.train, train_codes, x_enc, centroids, progress=False)
        n_hold = dec.n_holdout(len(train_codes))
        info.update(pairwise_n_train=len(train_codes), pairwise_n_holdout=n_hold, pairwise_tables=len(dec.pairs_),
                    pairwise_shrinkage=[float(v) for v in dec.shrinkage_])
        info["pairwise_mse_holdout"] = mse(x_enc[:n_hold], dec.decode(train_codes[:n_hold]), ds.mse_scale)
        info["additive_mse_holdout"] = dec.additive_baseline_mse(train_codes, x_enc) * ds.mse_scale
        info["centroids_mse_db"] = mse(xb, centroids[db_codes[:, 0]], ds.mse_scale)
        info["pairwise_mse_db"] = mse(xb, dec.decode(db_codes), ds.mse_scale)
        dec.save(pairwise_path)
        save_stage_log(info_path, info)

    index_path = work / "index.faissindex"
    if not index_path.is_file():
        index, info["index_build_s"] = timed(build_index, centroids, train_codes, x_enc, db_codes,
                                             K=codec.model_config.K, progress=False)
        save_index(index, index_path, model_sha=model_sha(codec))
        save_stage_log(info_path, info)
    info["factory"] = factory_string(args.ivf_K, args.M)
    return info


def run_ours(args, work: Path, xq, gt) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Our sweeps (resumed from their logs under ``work``) and, per curve, how many of its runs
    came from the log (``sweep`` returns those first)."""
    codec = QincoCodec.load(work / "model.pt")
    db_codes = load_encoded(work / "codes_db.npy", require_ivf=True)["codes"]
    index = load_index(work / "index.faissindex", model_sha=model_sha(codec), n_db=len(db_codes))
    pairwise = PairwiseDecoder.load(work / "pairwise.pt")
    out, cached = {}, {}
    bf16 = args.decode_precision == "bf16"
    for label, pw in (("IVF-QINCo2", None), ("IVF-QINCo2 + pairwise", pairwise)):
        log_path = work / f"sweep_{'pairwise' if pw else 'plain'}{'_bf16' if bf16 else ''}.json"
        grid = dict(OUR_GRID, nprobe=[p for p in OUR_GRID["nprobe"] if p <= args.ivf_K])
        label += ", bf16 decoding" if bf16 else ""
        cached[label] = len(load_runs(log_path)) if log_path.is_file() else 0
        out[label] = sweep(index, codec, db_codes, xq, gt, grid, pairwise=pw, log_path=log_path,
                           resume=True, threads=args.threads, progress=True, decode_precision=args.decode_precision)
    return out, cached


def rabitq_bits(d: int, M: int) -> str:
    """The RaBitQ bits per dimension (1..9) whose code size at dimension ``d`` is closest to
    ``M`` bytes, as the factory string writes them ("" for 1 bit)."""
    sizes = {nb: faiss.RaBitQuantizer(d, faiss.METRIC_L2, nb).code_size for nb in range(1, 10)}
    nb = min(sizes, key=lambda b: (abs(sizes[b] - M), b))
    return "" if nb == 1 else str(nb)


def faiss_bytes(index) -> dict:
    """Bytes per vector of a faiss IVF index: its codes (``code_size``, the IVF list id not
    counted), the refinement stage's codes, their sum, and what the inverted lists hold on
    average (fast-scan lists are padded to blocks of 32 codes)."""
    ivf = faiss.extract_index_ivf(index)
    refine = index.refine_index.sa_code_size() if isinstance(index, faiss.IndexRefine) else 0
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    if hasattr(invlists, "n_per_block"):
        stored = sum(-(-invlists.list_size(i) // invlists.n_per_block) * invlists.block_size
                     for i in range(ivf.nlist))
    else:
        stored = ivf.ntotal * ivf.code_size
    return {"code_bytes": ivf.code_size, "refine_bytes": refine, "bytes_per_vector": ivf.code_size + refine,
            "stored_bytes_per_vector": stored / max(ivf.ntotal, 1) + refine}


def faiss_grid(index, C: int) -> list[dict]:
    """The search settings: ``nprobe``, times RaBitQ's ``qb``, times the refinement's ``k_factor``."""
    grid = [{"nprobe": p} for p in NPROBES if p <= C]
    if hasattr(faiss.downcast_index(faiss.extract_index_ivf(index)), "rabitq"):
        grid = [{**g, "qb": qb} for g in grid for qb in RABITQ_QB]
    if isinstance(index, faiss.IndexRefine):
        grid = [{**g, "k_factor": kf} for g in grid for kf in K_FACTORS]
    return grid


def search_params(setting: dict):
    """The faiss search parameters of one setting of :func:`faiss_grid`."""
    if "qb" in setting:
        ivf = faiss.IVFRaBitQSearchParameters(nprobe=setting["nprobe"], qb=setting["qb"])
    else:
        ivf = faiss.SearchParametersIVF(nprobe=setting["nprobe"])
    if "k_factor" in setting:
        return faiss.IndexRefineSearchParameters(k_factor=setting["k_factor"], base_index_params=ivf)
    return ivf


def build_faiss(name: str, args, xt, xb) -> tuple[faiss.Index, dict]:
    d = xb.shape[1]
    key = FAISS_FACTORIES[name].format(C=args.ivf_K, M=args.M, M2=2 * args.M, H=args.M // 2,
                                       RB=rabitq_bits(d, args.M))
    index = faiss.index_factory(d, key)
    _, t_train = timed(index.train, xt[:args.faiss_train])
    _, t_add = timed(index.add, xb)
    meta = {"factory": key, "baseline": name, "train_s": t_train, "add_s": t_add, "build_s": t_train + t_add,
            "n_train": min(len(xt), args.faiss_train), **faiss_bytes(index)}
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if hasattr(ivf, "rabitq"):
        meta["rabitq_nb_bits"] = ivf.rabitq.nb_bits
    return index, meta


def run_faiss(name: str, args, xt, xb, xq, gt) -> tuple[list[dict], dict]:
    index, meta = build_faiss(name, args, xt, xb)
    log.info("%s: %d bytes per vector (%d code + %d refinement), built in %.1f s", meta["factory"],
             meta["bytes_per_vector"], meta["code_bytes"], meta["refine_bytes"], meta["build_s"])
    runs = []
    index.search(xq[:8], 100)                                       # warm-up
    for setting in faiss_grid(index, args.ivf_K):
        params = search_params(setting)
        reps, t_total = 0, 0.0
        while reps < 3 or t_total < args.search_min_s:             # fast settings: average repeats
            (_, ids), t = timed(index.search, xq, 100, params=params)
            reps, t_total = reps + 1, t_total + t
        recalls = {str(k): v for k, v in recall_at(ids, gt).items()}
        runs.append({"parameters": setting, "recalls": recalls, "n_queries": len(xq),
                     "t_total": t_total / reps, "qps": len(xq) * reps / t_total, "repeats": reps})
        log.info("%s %s R@1=%.4f %.0f QPS", meta["factory"], setting, recalls["1"], runs[-1]["qps"])
    return runs, meta


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="sift-photos")
    p.add_argument("--valset", type=int, default=10_000,
                   help="validation rows held out at the end of the training file (siftsmall: <= 5000)")
    p.add_argument("--ivf-K", type=int, default=2048)
    p.add_argument("--M", type=int, default=8, help="QINCo2 steps after the IVF step = bytes per vector")
    p.add_argument("--qinco-minutes", type=float, default=35.0)
    p.add_argument("--device", default="cpu",
                   help="torch device of QINCo2 training and encoding (cpu, cuda, cuda:1); searches run on the CPU")
    p.add_argument("--eval-AB", type=int, nargs=2, default=(16, 8), metavar=("A", "B"))
    p.add_argument("--n-encode-train", type=int, default=50_000,
                   help="training rows encoded to fit the AQ tables and the pairwise decoder; 0 or -1: all of them")
    p.add_argument("--n-pairs-per-step", type=float, default=2)
    p.add_argument("--faiss-train", type=int, default=100_000)
    p.add_argument("--baselines", nargs="*", default=list(FAISS_FACTORIES), choices=list(FAISS_FACTORIES),
                   metavar="NAME", help=f"faiss baselines to run (default all: {' '.join(FAISS_FACTORIES)})")
    p.add_argument("--faiss-only", action="store_true", help="skip the QINCo2 pipeline, run the faiss baselines")
    p.add_argument("--add-runs", default=None, metavar="JSONL",
                   help="also plot and print the curves of this file (lines of an earlier run, e.g. --faiss-only)")
    p.add_argument("--search-min-s", type=float, default=0.5,
                   help="each setting is searched at least 3 times and for at least this many seconds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-precision", choices=["fp32", "bf16"], default="fp32",
                   help="arithmetic of the QINCo2 decoding in the re-rank (curves labelled ', bf16 decoding')")
    p.add_argument("--stages-only", action="store_true", help="build the pipeline files, search nothing")
    p.add_argument("--stop-after", choices=["encode"], default=None,
                   help="encode: stop once the model and the codes exist (e.g. made on a GPU; the rest on the CPU)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: bench_codecs' QINCO_SETTINGS)")
    p.add_argument("--lr", type=float, default=None, help="training learning rate (default: QINCO_SETTINGS)")
    p.add_argument("--work", default="runs/ivf_bench")
    p.add_argument("--out", default="benchmarks/results/ivf_search.jsonl")
    p.add_argument("--plot", default="benchmarks/results/ivf_search.png")
    return p.parse_args()


def draw(args, curves: dict, meta: dict, n_db: int) -> None:
    """The Pareto fronts of ``curves`` in ``--plot``, each labelled with its bytes per vector."""
    labelled = {f"{label} ({meta[label]['bytes_per_vector']:g} B)": runs for label, runs in curves.items()}
    plot_pareto(labelled, args.plot, title=f"{args.dataset}: {n_db:,} vectors, {args.M} bytes, "
                                           f"{args.ivf_K} lists, {args.threads} threads")


def write_results(args, curves: dict, meta: dict, common: dict, n_db: int, cached: dict[str, int]) -> None:
    """Append the operating points measured by this run to ``--out`` (the first ``cached[label]``
    runs of a curve came from a resumed sweep's log: the run that measured them wrote them, with
    its date; the index's ``meta``, e.g. the pipeline's stage log, on its first row), draw the
    Pareto fronts of all, print them."""
    with open(args.out, "a") as f:
        for label, runs in curves.items():
            front = {id(r) for r in pareto_front(runs)}
            for i, r in enumerate(runs[cached.get(label, 0):]):
                row = {**common, "index": label, "pareto": id(r) in front, **r,
                       "bytes_per_vector": meta[label]["bytes_per_vector"], **({"meta": meta[label]} if i == 0 else {})}
                f.write(json.dumps(row) + "\n")
    draw(args, curves, meta, n_db)
    for label, runs in curves.items():
        print(f"{label}  ({meta[label]['bytes_per_vector']:g} bytes per vector)")
        for r in pareto_front(runs):
            print(f"   {r['parameters']}  R@1 {r['recalls']['1']:.3f}  R@10 {r['recalls']['10']:.3f}  "
                  f"{r['qps']:.0f} QPS")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    ds = resolve_dataset(args.dataset)
    xt_raw, xv_raw = ds.train_val(DataLimits(valset=args.valset))
    xb = np.ascontiguousarray(ds.database(DataLimits()), dtype=np.float32)
    xq, gt = ds.query_vectors(), ds.ground_truth()
    env = environment(args.threads)
    curves, meta, cached = {}, {}, {}
    if not args.faiss_only:
        info = prepare(args, ds, xt_raw, xv_raw, xb, xq, gt)
        print(json.dumps(info, indent=1))
        if args.stages_only or args.stop_after:
            return
        curves, cached = run_ours(args, Path(args.work), xq, gt)
        # the shortlist index holds the M code bytes + 1 byte of norm; re-ranking decodes the same codes
        meta = {label: {"pipeline": info, "code_bytes": args.M, "shortlist_code_bytes": args.M + 1,
                        "bytes_per_vector": args.M + 1} for label in curves}
    xt = np.ascontiguousarray(xt_raw[:args.faiss_train], dtype=np.float32)
    for name in args.baselines:
        runs, m = run_faiss(name, args, xt, xb, xq, gt)
        curves[m["factory"]], meta[m["factory"]] = runs, m
    common = {"bench": "ivf_search", "dataset": args.dataset, "ivf_K": args.ivf_K, "M": args.M,
              "n_db": len(xb), "n_queries": len(xq), **env}
    if curves:
        write_results(args, curves, meta, common, len(xb), cached)
    if args.add_runs:
        add_earlier_runs(args, curves, meta, len(xb))


def add_earlier_runs(args, curves: dict, meta: dict, n_db: int) -> None:
    """Redraw ``--plot`` with the curves of ``--add-runs`` (lines of one earlier run) beside these
    (an index of this run hides the earlier lines of the same index)."""
    earlier, sizes = {}, {}
    for row in map(json.loads, Path(args.add_runs).read_text().splitlines()):
        earlier.setdefault(row["index"], []).append(row)
        sizes[row["index"]] = row["bytes_per_vector"]
    for label, runs in earlier.items():
        if label not in curves:
            curves[label], meta[label] = runs, {"bytes_per_vector": sizes[label]}
    draw(args, curves, meta, n_db)


if __name__ == "__main__":
    main()
