"""Training and encoding throughput on an idle machine and with another process busy on one
core, under each thread setting.

With 2 torch threads on 2 cores, a second busy process makes OpenMP threads that spin while
waiting for each other lose most of their time slices. This benchmark measures, in a fresh
process per cell (OpenMP reads its variables when it starts): `qinco2-S` training steps/s (M=8,
batch 256, A=4 B=2, on the embedded synthetic set, D=64) and encoding vectors/s (A=16 B=8),
under each setting of ``--settings`` (``default``: nothing set, so qinco2 adapts its thread count
to the free cores (:mod:`qinco2.threads`) and libgomp spins about 300,000 times before it sleeps;
``QINCO2_ADAPTIVE_THREADS=0``: a fixed thread count; ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads
sleep at once; ``GOMP_SPINCOUNT=n``: spin n times; several ``NAME=VALUE`` joined by commas), each
with and without a competing busy-loop process; ``--kinds search`` adds IVF-PQ searches of 200
queries at one probe (256 lists, PQ16). ``--repeats`` runs the whole grid again, interleaved.
JSON lines to ``--out`` (with the thread changes qinco2 made and its last choice).

    python benchmarks/bench_busy_core.py --threads 2 --seconds 8 --repeats 3
    python benchmarks/bench_busy_core.py --settings default GOMP_SPINCOUNT=10000 GOMP_SPINCOUNT=1000
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("default", "QINCO2_ADAPTIVE_THREADS=0", "OMP_WAIT_POLICY=PASSIVE")
ENV_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "QINCO2_ADAPTIVE_THREADS")


def _rate(fn, probe: int, seconds: float) -> tuple[float, int]:
    """Calls ``fn(n)`` once with ``probe`` units to size a run of about ``seconds``, then times it;
    ``fn`` returns the units it really did (an epoch is capped by the training rows)."""
    t0 = time.perf_counter()
    done = fn(probe)
    n = max(probe, int(done * seconds / max(time.perf_counter() - t0, 1e-3)))
    t0 = time.perf_counter()
    done = fn(n)
    return done / (time.perf_counter() - t0), done


def worker(kind: str, threads: int, seconds: float) -> dict:
    import dataclasses

    import numpy as np
    import torch

    from qinco2 import DataLimits, QincoCodec, make_synthetic
    from qinco2.codec.train import fit

    torch.set_num_threads(threads)
    ds = make_synthetic()
    x_train, x_val = ds.train_val(DataLimits(valset=256))     # 59,744 rows: 233 batches per epoch
    x_train = np.ascontiguousarray(x_train, dtype=np.float32)
    if kind == "search":                    # torch's coarse step, then faiss's scan, per batch
        from qinco2 import ivfpq

        index = ivfpq.build(ivfpq.IndexParams(n_lists=256, pq_dim=16), x_train)
        q = np.ascontiguousarray(x_val[:200])
        sp = ivfpq.SearchParams(n_probes=1)

        def batches(n):
            for _ in range(n):
                ivfpq.search(sp, index, q, 10)
            return n
        rate, n = _rate(batches, 20, seconds)
        return {"what": "ivfpq_search", "queries_per_s": rate * len(q), "queries": n * len(q), "n_probes": 1,
                "batch": len(q)}
    codec = QincoCodec.from_preset("qinco2-S", M=8, A=4, B=2, batch=256, loop=256, max_epochs=1, seed=0)
    codec.train(x_train[:20_000], x_val, progress=False)     # RQ initialisation and one step
    if kind == "train":
        def steps(n):
            cfg = dataclasses.replace(codec.train_config, loop=256 * n, max_epochs=1)
            return fit(codec.model_, cfg, x_train, x_val, progress=False).step
        rate, n = _rate(steps, 4, seconds)
        return {"what": "train", "steps_per_s": rate, "steps": n, "batch": 256}
    x = np.ascontiguousarray(x_train[:20_000])
    rate, n = _rate(lambda n: len(codec.encode(x[:n], A=16, B=8)), 64, seconds)
    return {"what": "encode", "vectors_per_s": rate, "rows": n, "A": 16, "B": 8}


def governor_overhead(n_ticks: int = 200_000, n_samples: int = 2_000) -> dict:
    """What the thread adaptation costs an idle machine: µs per ``tick()`` between measures and per
    measure (a read of ``/proc/stat``, once a second), so the share of a second it takes at one
    tick per encoded batch step."""
    from qinco2.threads import PERIOD_S, Governor, read_sample

    g = Governor(enabled=True, set_threads=lambda n: None)
    with g.adaptive():
        g.next_s = float("inf")                         # never due: the cost of a plain tick
        t0 = time.perf_counter()
        for _ in range(n_ticks):
            g.tick()
        tick_us = (time.perf_counter() - t0) / n_ticks * 1e6
    t0 = time.perf_counter()
    for _ in range(n_samples):
        read_sample()
    sample_us = (time.perf_counter() - t0) / n_samples * 1e6
    return {"what": "governor_overhead", "tick_us": tick_us, "sample_us": sample_us, "period_s": PERIOD_S,
            "share_at_1000_ticks_per_s": (1000 * tick_us + sample_us / PERIOD_S) / 1e6}


def setting_env(setting: str) -> dict[str, str]:
    """The OpenMP variables of a ``--settings`` value: ``default`` or ``NAME=VALUE[,NAME=VALUE]``."""
    if setting == "default":
        return {}
    pairs = [item.split("=", 1) for item in setting.split(",")]
    if any(len(pair) != 2 or pair[0] not in ENV_VARIABLES for pair in pairs):
        raise SystemExit(f"--settings {setting!r}: use 'default' or NAME=VALUE pairs joined by commas, "
                         f"NAME one of {', '.join(ENV_VARIABLES)}")
    return dict(pairs)


def run_cell(kind: str, setting: str, loaded: bool, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARIABLES}
    env.update(PYTHONPATH=str(ROOT), **setting_env(setting))
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", kind, "--threads", str(args.threads),
                               "--seconds", str(args.seconds)], env=env, capture_output=True, text=True)
    finally:
        if load is not None:
            load.kill()
            load.wait()
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    omp = setting_env(setting)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "omp_setting": setting,
            "omp_wait_policy": omp.get("OMP_WAIT_POLICY", "default"), "other_busy_process": loaded}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--repeats", type=int, default=1, help="the whole grid this many times, interleaved")
    p.add_argument("--loads", nargs="+", default=["idle", "busy"], choices=["idle", "busy"],
                   help="without / with the other busy process")
    p.add_argument("--kinds", nargs="+", default=["train", "encode"], choices=["train", "encode", "search"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS),
                   help="OpenMP settings, one process each: 'default' or NAME=VALUE[,NAME=VALUE]")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "busy_core.jsonl"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    for setting in args.settings:
        setting_env(setting)
    if args.worker:
        from qinco2 import threads

        row = worker(args.worker, args.threads, args.seconds)
        print(json.dumps({**row, "thread_changes": threads.GOVERNOR.changes,
                          "threads_at_end": threads.GOVERNOR.decision}))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_codecs import environment

    env = environment(args.threads)
    with open(args.out, "a") as f:
        overhead = {"bench": "busy_core", **governor_overhead(), **env}
        f.write(json.dumps(overhead) + "\n")
        print(f"thread adaptation: {overhead['tick_us']:.2f} µs per tick, {overhead['sample_us']:.1f} µs per "
              f"measure: {overhead['share_at_1000_ticks_per_s']:.4%} of the time at 1,000 ticks/s", flush=True)
        loads = [load == "busy" for load in args.loads]
        for repeat, kind, loaded, setting in itertools.product(range(args.repeats), args.kinds, loads,
                                                                args.settings):
            row = {"bench": "busy_core", **run_cell(kind, setting, loaded, args), "repeat": repeat, **env}
            f.write(json.dumps(row) + "\n")
            f.flush()
            rate = row.get("steps_per_s") or row.get("vectors_per_s") or row.get("queries_per_s")
            print(f"{kind:6s} {setting:28s} other busy process={loaded!s:5s}: {rate:,.1f}/s "
                  f"(thread changes {row['thread_changes']}, at the end {row['threads_at_end']})", flush=True)


if __name__ == "__main__":
    main()
