"""QINCo2 (ours) against vector-quantize-pytorch's ResidualVQ with implicit neural codebooks.

The peer a torch user would pick instead of qinco2: lucidrains' ``vector-quantize-pytorch``,
whose ``ResidualVQ(implicit_neural_codebook=True)`` is a QINCo(1)-style codec ("QINCo from
https://arxiv.org/abs/2401.14732" in its source) with beam search at encoding
(``eval_beam_size``). Both codecs get sift-photos at 8 bytes per vector (8 codebooks x 256
codes), the same training rows and the same wall-clock training budget on the CPU; each
appends one JSON line to ``--out`` (MSE on the database in the set's units, R@1/10/100 of an
exhaustive search of the queries over the decoded database, encode and decode µs per vector,
code usage, machine, threads, library versions, device, the exact command).

Not a dependency of qinco2 (not in requirements.txt; CI never runs this). Measured with

    pip install vector-quantize-pytorch==1.32.0   # + einops 0.8.2, einx 0.4.3, loguru 0.7.3,
                                                  #   torch-einops-utils 0.2.0; keeps torch 2.13.0

(check first with ``pip install --dry-run``: it must not replace torch).

    PYTHONPATH=. python benchmarks/bench_vqtorch.py --minutes 10 --threads 2

**Ours**: exactly ``bench_codecs.py``'s ``qinco2`` row (imported, not copied): ``qinco2-S``,
M=8, K=256, trained with A=4, B=2, lr 2e-3, batch 256, warm-up + cosine spread over
``--minutes`` (``time_schedule``), RQ initialisation, the best validation model kept
(validation = the last 10k ``learn`` rows); database encoded with A=16, B=8 (``--eval-AB``).

**Theirs** (vector-quantize-pytorch 1.32.0, API read from its source, ``residual_vq.py`` and
``vector_quantize_pytorch.py``):

* ``ResidualVQ(dim=128, num_quantizers=8, codebook_size=256, implicit_neural_codebook=True,
  kmeans_init=True, beam_size=1, eval_beam_size=B)``. ``implicit_neural_codebook=True`` gives
  every step after the first an ``MLP`` (``mlp_kwargs``: ``depth=4`` residual blocks of
  ``dim_hidden=dim``, "they used 4 layers in the paper") fed with the concatenation of the
  partial reconstruction and each of the 256 base codewords; it switches the codebooks to
  learnable parameters (``learnable_codebook=True, ema_update=False``). ``beam_size=1``:
  greedy during training (a beam multiplies the training cost by its width);
  ``eval_beam_size=B`` (``--vq-beam``, default 4): the beam used by ``forward`` in eval mode.
  Their beam ranks candidates by the *sum over steps* of the per-step commitment MSEs
  (``beam_score_quantizer_weights`` default all 1), not by the final error alone.
* ``kmeans_init=True`` (k-means of the first batch, 10 iterations; the README's
  recommendation, from SoundStream): without it the codebooks start as random
  Kaiming-uniform vectors. The first batch is ``--vq-init-rows`` rows, run once without
  gradients; it counts in the budget.
* Loss: ``F.mse_loss(quantized, x) + 10 * commit_losses.sum()`` as in their
  ``examples/autoencoder.py`` (reconstruction + alpha=10 x commitment). With the library's
  defaults (``rotation_trick=True``, ``quant_grad_frac=0``) the reconstruction term sends no
  gradient to the codebooks or MLPs: they learn from the commitment terms, the per-step
  residual errors with the earlier steps detached (QINCo1's per-step losses).
* Adam, constant lr ``--vq-lr`` 1e-3 (the QINCo paper's Adam rate; their autoencoder
  example uses 3e-4 for a conv net, too slow for the few steps a CPU budget allows), batch
  256 (as ours), random batches of the training rows until the budget is spent.
* Data normalised as a VQ user would: minus the training mean, divided by one scalar (the
  RMS of the centred training rows), so the codec's L2 error is the original one up to a
  constant; the reconstruction is mapped back before MSE and search.
* Encoding = ``forward`` in eval mode (no gradients): its ``quantized`` output is the
  decoded vector, used for MSE and search. Decoding = ``get_output_from_indices(indices)``,
  timed on the first ``--decode-rows`` database rows and checked against ``quantized``.
  With implicit codebooks both re-run the MLPs on all 256 codewords per step and vector
  (QINCo1's exhaustive cost: about 0.6 GFLOP per vector and beam, decoding included).

When ``ours`` ran first in the same command, ``theirs`` gets the wall-clock ``ours`` took
to train (initialisation and validation included), at least ``--minutes``. With
``--db-rows`` below the 100k ``base`` rows, the ground truth is recomputed by exact search of
the raw vectors over the rows kept (``gt`` in the row says which).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_codecs import environment, quality, run_qinco

from qinco2 import DataLimits, resolve_dataset
from qinco2.metrics import code_usage, knn

M, K = 8, 256


def version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def build_theirs(D: int, args):
    from vector_quantize_pytorch import ResidualVQ
    beam = args.vq_beam if args.vq_beam > 1 else None
    settings = {"dim": D, "num_quantizers": M, "codebook_size": K, "implicit_neural_codebook": True,
                "kmeans_init": True, "kmeans_iters": 10, "beam_size": 1 if beam else None,
                "eval_beam_size": beam, "mlp_kwargs": {"depth": args.vq_depth}}
    return ResidualVQ(**settings), settings


def train_theirs(rvq, xt_ND: np.ndarray, budget_s: float, args) -> dict:
    """Adam on their loss for ``budget_s`` seconds (normalisation and k-means init included)."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.from_numpy(np.ascontiguousarray(xt_ND, dtype=np.float32))
    mean = x.mean(0)
    scale = float((x - mean).pow(2).mean().sqrt())
    x = (x - mean) / scale
    n = len(x)
    rvq.train()
    init_rows = x[torch.randperm(n, generator=g)[:args.vq_init_rows]]
    with torch.no_grad():                        # kmeans_init runs on this first batch
        rvq(init_rows)
    init_s = time.perf_counter() - t0
    opt = torch.optim.Adam(rvq.parameters(), lr=args.vq_lr)
    perm, pos, steps, losses = torch.randperm(n, generator=g), 0, 0, []
    while time.perf_counter() - t0 < budget_s:
        if pos + args.vq_batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        xb = x[perm[pos:pos + args.vq_batch]]
        pos += args.vq_batch
        quantized, _, commit = rvq(xb)
        rec = F.mse_loss(quantized, xb)
        loss = rec + args.vq_alpha * commit.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        losses.append(float(rec.detach()))
        if steps & (steps - 1) == 0 or steps % 25 == 0:   # 1, 2, 4, 8, 16, 25, 32, 50, ...
            print(f"  theirs step {steps}  {time.perf_counter() - t0:.0f}/{budget_s:.0f}s  "
                  f"recon MSE (normalised) {losses[-1]:.4f}", flush=True)
    return {"mean": mean, "scale": scale, "steps": steps, "n_seen": steps * args.vq_batch,
            "init_s": init_s, "train_s": time.perf_counter() - t0,
            "recon_mse_norm_last": float(np.mean(losses[-10:])) if losses else None}


@torch.no_grad()
def encode_theirs(rvq, xb_ND: np.ndarray, mean, scale, args):
    """Codes and reconstructions (original units) of ``xb_ND`` with the eval beam."""
    rvq.eval()
    chunk = max(16, args.vq_chunk // max(1, args.vq_beam))
    codes = np.empty((len(xb_ND), M), dtype=np.int64)
    xr = np.empty(xb_ND.shape, dtype=np.float32)
    t0 = time.perf_counter()
    for i in range(0, len(xb_ND), chunk):
        u = (torch.from_numpy(xb_ND[i:i + chunk]) - mean) / scale
        q, idx, _ = rvq(u)
        codes[i:i + len(u)] = idx.numpy()
        xr[i:i + len(u)] = (q * scale + mean).numpy()
        if i == 0 or (i // chunk) % 20 == 0:
            done = i + len(u)
            el = time.perf_counter() - t0
            print(f"  theirs encode {done}/{len(xb_ND)}  {el:.0f}s, about "
                  f"{el / done * (len(xb_ND) - done):.0f}s left", flush=True)
    return codes, xr, time.perf_counter() - t0


@torch.no_grad()
def decode_theirs(rvq, codes: np.ndarray, mean, scale, args):
    rvq.eval()
    out = np.empty((len(codes), mean.shape[0]), dtype=np.float32)
    t0 = time.perf_counter()
    for i in range(0, len(codes), args.vq_chunk):
        y = rvq.get_output_from_indices(torch.from_numpy(codes[i:i + args.vq_chunk]))
        out[i:i + len(y)] = (y * scale + mean).numpy()
    return out, time.perf_counter() - t0


def run_theirs(xt_raw, xb, xq, gt, mse_scale, metric, budget_s: float, args) -> dict:
    torch.manual_seed(args.seed)
    rvq, settings = build_theirs(xb.shape[1], args)
    n_params = sum(p.numel() for p in rvq.parameters())
    st = train_theirs(rvq, xt_raw, budget_s, args)
    codes, xr, t_enc = encode_theirs(rvq, xb, st["mean"], st["scale"], args)
    nd = min(args.decode_rows, len(xb))
    xd, t_dec = decode_theirs(rvq, codes[:nd], st["mean"], st["scale"], args)
    decode_err = float(np.abs(xd - xr[:nd]).max())
    usage, entropy = code_usage(codes, [K] * M)
    if args.model_dir:
        path = os.path.join(args.model_dir, f"vqtorch-{args.dataset}-{M}x8.pt")
        torch.save({"settings": settings, "state_dict": rvq.state_dict(), "mean": st["mean"],
                    "scale": st["scale"]}, path)
    label = f"vector-quantize-pytorch ResidualVQ implicit (beam {max(1, args.vq_beam)})"
    return {"codec": label, "settings": settings,
            "optimizer": {"name": "Adam", "lr": args.vq_lr, "batch": args.vq_batch, "alpha": args.vq_alpha,
                          "init_rows": args.vq_init_rows},
            "n_params": n_params, "n_train": len(xt_raw), "steps": st["steps"], "n_seen": st["n_seen"],
            "budget_s": budget_s, "init_s": st["init_s"], "train_s": st["train_s"],
            "recon_mse_norm_last": st["recon_mse_norm_last"], "norm_scale": st["scale"],
            "encode_us": 1e6 * t_enc / len(xb), "decode_us": 1e6 * t_dec / nd, "decode_rows": nd,
            "decode_max_abs_diff": decode_err,
            "usage_per_step": [round(float(u), 3) for u in usage],
            "entropy_per_step": [round(float(e), 2) for e in entropy],
            **quality(xb, xr, xq, gt, mse_scale, metric)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="sift-photos")
    p.add_argument("--codecs", nargs="+", choices=["ours", "theirs"], default=["ours", "theirs"])
    p.add_argument("--minutes", type=float, default=10.0, help="training budget of each codec")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-rows", type=int, default=None, help="first rows of the training split only")
    p.add_argument("--db-rows", type=int, default=None, help="first database rows only (ground truth recomputed)")
    p.add_argument("--eval-AB", type=int, nargs=2, default=None, metavar=("A", "B"),
                   help="ours: A and B used to encode the database (default 16 8, as bench_codecs.py)")
    p.add_argument("--vq-beam", type=int, default=4, help="theirs: eval_beam_size used to encode (1: greedy)")
    p.add_argument("--vq-depth", type=int, default=4, help="theirs: MLP residual blocks (library default 4)")
    p.add_argument("--vq-lr", type=float, default=1e-3)
    p.add_argument("--vq-batch", type=int, default=256)
    p.add_argument("--vq-alpha", type=float, default=10.0, help="theirs: weight of the commitment losses")
    p.add_argument("--vq-init-rows", type=int, default=2048, help="theirs: rows of the k-means init batch")
    p.add_argument("--vq-chunk", type=int, default=1024, help="theirs: rows per encode/decode call (/ beam)")
    p.add_argument("--decode-rows", type=int, default=2000, help="theirs: database rows whose decoding is timed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default="runs/bench_vqtorch")
    p.add_argument("--out", default="benchmarks/results/vqtorch.jsonl")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    import faiss
    faiss.omp_set_num_threads(args.threads)
    if args.model_dir:
        os.makedirs(args.model_dir, exist_ok=True)
    ds = resolve_dataset(args.dataset)
    xt_raw, xv_raw = ds.train_val(DataLimits())
    xt_raw = xt_raw[:args.train_rows] if args.train_rows else xt_raw
    xb_all = ds.database(DataLimits())
    xb = np.ascontiguousarray(xb_all[:args.db_rows] if args.db_rows else xb_all, dtype=np.float32)
    xq, gt = ds.query_vectors(), ds.ground_truth()
    gt_kind = "file"
    if len(xb) < len(xb_all):
        gt, gt_kind = knn(xq, xb, 100, metric=ds.metric), f"recomputed on the first {len(xb)} base rows"
    env = {**environment(args.threads), "qinco2": version("qinco2"),
           "vector_quantize_pytorch": version("vector-quantize-pytorch"),
           "einops": version("einops"), "einx": version("einx")}
    budget_s = args.minutes * 60
    base = {"bench": "vqtorch", "dataset": args.dataset, "bytes": M, "M": M, "K": K, "mse_scale": ds.mse_scale,
            "n_db": len(xb), "n_queries": len(xq), "gt": gt_kind, "minutes": args.minutes}
    ours_train_s = None
    for name in args.codecs:
        if name == "ours":
            ns = SimpleNamespace(qinco_minutes=args.minutes, eval_AB=args.eval_AB,
                                 model_dir=args.model_dir or "runs/bench_vqtorch", dataset=args.dataset)
            os.makedirs(ns.model_dir, exist_ok=True)
            row = run_qinco("qinco2", M, xt_raw, xv_raw, xb, xq, gt, ds.mse_scale, ds.metric, ns)
            row["budget_s"] = budget_s
            ours_train_s = row["train_s"]
        else:
            b = max(budget_s, ours_train_s) if ours_train_s is not None else budget_s
            row = run_theirs(xt_raw, xb, xq, gt, ds.mse_scale, ds.metric, b, args)
        row = {**base, **row, **env}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['codec']:52s} MSE {row['mse']:.4f}  R@1 {row['R@1']:.3f}  R@10 {row['R@10']:.3f}  "
              f"train {row['train_s']:.0f}s  enc {row['encode_us']:.1f}us  dec {row['decode_us']:.1f}us",
              flush=True)


if __name__ == "__main__":
    main()
