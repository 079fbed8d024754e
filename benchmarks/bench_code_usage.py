"""Code usage and entropy per step after a short training run, on one local data set.

    python benchmarks/bench_code_usage.py NAME TRAIN_ROWS SECONDS [VALSET]

qinco2-S, M=8, K=256, trained with A=4 B=2 on 1 thread; usage (share of the 256 codewords
used) and entropy (bits) per step on the validation rows and on up to 20k training rows.
Prints one JSON line (results/code_usage.jsonl holds the 2026-11-29 runs: 2-core Intel Xeon
VM, two runs at a time on 1 thread each).
"""
import json
import sys
import time

import torch  # before faiss: one OpenMP runtime for both (qinco2.openmp)

# isort: split
import faiss
import numpy as np

torch.set_num_threads(1); faiss.omp_set_num_threads(1)
from qinco2 import DataLimits, QincoCodec, resolve_dataset
from qinco2.metrics import code_usage

name, rows, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ds = resolve_dataset(name, data_root="/work/shared/data")
xt, xv = ds.train_val(DataLimits(valset=int(sys.argv[4]) if len(sys.argv) > 4 else 2000))
xt = xt[:rows]
c = QincoCodec.from_preset("qinco2-S", M=8, A=4, B=2, lr=2e-3, batch=256, loop=50_000, epochs=20, ramp_epochs=1,
                           time_schedule=True, max_time_s=seconds)
t = time.time(); c.train(xt, xv, progress=False)
codes = c.encode(np.asarray(xv, dtype=np.float32), A=4, B=2)
u, e = code_usage(codes, [256] * 8)
tcodes = c.encode(np.asarray(xt[:20000], dtype=np.float32), A=4, B=2)
tu, te = code_usage(tcodes, [256] * 8)
st = c.train_state_
print(json.dumps({"dataset": name, "D": int(xt.shape[1]), "n_train": len(xt), "seconds": seconds, "arch": [c.model_config.L, c.model_config.E, c.model_config.dh],
                  "val_init": round(st.init_mse, 5), "val_best": round(st.best_mse, 5), "epochs": st.epoch,
                  "usage": [round(float(a), 3) for a in u], "entropy": [round(float(a), 2) for a in e],
                  "min_usage": round(float(u.min()), 3), "min_entropy": round(float(e.min()), 2),
                  "n_val": len(xv), "train_rows_coded": len(tcodes), "train_min_usage": round(float(tu.min()), 3),
                  "train_min_entropy": round(float(te.min()), 2)}), flush=True)
