"""Scale-out benchmark: encoding throughput of ``task=encode`` on 1 and 2 processes.

Each configuration runs the CLI through ``scripts/launch.sh`` (or plain ``python -m qinco2``
for one process) on the first ``--rows`` database rows and is timed from the outside (wall
time, process start-up included) and from the inside (the encode call alone is the job's
"wall" minus start-up, so both are reported). One JSON line per configuration.

    python benchmarks/bench_scaleout.py --model runs/bench/qinco2-sift-photos-8x8.pt --rows 20000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_codecs import environment

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default="sift-photos")
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--shard-rows", type=int, default=2_000)
    p.add_argument("--AB", type=int, nargs=2, default=(16, 8))
    p.add_argument("--work", default="runs/scaleout")
    p.add_argument("--out", default="benchmarks/results/scaleout.jsonl")
    args = p.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    task = ["task=encode", f"model={args.model}", f"db={args.dataset}", f"ds.db={args.rows}", "cpu=true",
            "verbose=false", f"shard_rows={args.shard_rows}", f"A={args.AB[0]}", f"B={args.AB[1]}"]
    startup = run([sys.executable, "-c", "import qinco2.cli.main, torch, faiss"], 1)
    configs = [("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1)]
    for label, n_proc, threads in configs:
        out = Path(args.work) / f"codes-{n_proc}x{threads}.npy"
        out.unlink(missing_ok=True)
        argv = [*task, f"threads={threads}", f"output={out}"]
        cmd = (["bash", str(ROOT / "scripts" / "launch.sh"), "-n", str(n_proc), *argv] if n_proc > 1
               else [sys.executable, "-m", "qinco2", *argv])
        wall = run(cmd, threads)
        row = {"bench": "scaleout", "task": "encode", "config": label, "processes": n_proc,
               "threads_per_process": threads, "rows": args.rows, "A": args.AB[0], "B": args.AB[1],
               "wall_s": wall, "startup_s": startup, "vectors_per_s": args.rows / wall,
               "vectors_per_s_after_startup": args.rows / max(wall - startup, 1e-9),
               **environment(n_proc * threads)}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{label:24s} {wall:7.1f} s  {row['vectors_per_s']:7.1f} vec/s "
              f"({row['vectors_per_s_after_startup']:.1f} after {startup:.1f} s start-up)", flush=True)


if __name__ == "__main__":
    main()
