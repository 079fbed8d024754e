"""The same short SIFT training on two versions of the code (PYTHONPATH picks the tree).

    PYTHONPATH=/path/to/old/tree python benchmarks/bench_version_ab.py 300
    PYTHONPATH=. python benchmarks/bench_version_ab.py 300

qinco2-S M=8 on all sift-photos learn rows, A=4 B=2, SECONDS of training on 1 thread, then
MSE of 10k base rows encoded with A=16 B=8, code usage/entropy. One JSON line
(results/version_ab.jsonl: 2026-11-29, both versions run at once on the 2-core VM).
"""
import json
import sys
import time

import torch  # before faiss: one OpenMP runtime for both (qinco2.openmp)

# isort: split
import faiss
import numpy as np

torch.set_num_threads(1); faiss.omp_set_num_threads(1)
import qinco2
from qinco2 import DataLimits, QincoCodec, resolve_dataset
from qinco2.metrics import code_usage, mse

seconds = float(sys.argv[1])
ds = resolve_dataset("sift-photos", data_root="/work/shared/data")
xt, xv = ds.train_val(DataLimits())
c = QincoCodec.from_preset("qinco2-S", M=8, A=4, B=2, lr=2e-3, batch=256, loop=250_000, epochs=20, ramp_epochs=1,
                           time_schedule=True, max_time_s=seconds)
t = time.time(); c.train(xt, xv, mse_scale=ds.mse_scale, progress=False); t = time.time() - t
xb = np.asarray(ds.database(DataLimits(db=10_000)), dtype=np.float32)
codes = c.encode(xb, A=16, B=8)
u, e = code_usage(codes, [256] * 8)
st = c.train_state_
print(json.dumps({"tree": qinco2.__file__, "seconds": seconds, "wall_s": round(t), "val_init": st.init_mse, "val_best": st.best_mse,
                  "epochs": st.epoch, "db10k_mse": mse(xb, c.decode(codes), ds.mse_scale),
                  "min_usage": round(float(u.min()), 3), "min_entropy": round(float(e.min()), 2)}), flush=True)
