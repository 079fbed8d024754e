"""The GPU readiness check (benchmarks/gpu_check.sh, benchmarks/bench_gpu.py) without a GPU:
the script parses, its CPU dry run writes the expected JSON lines, the FLOP estimate of the
encoder matches torch's count of its matrix products."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from qinco2 import ModelConfig
from qinco2.codec.encode import beam_search
from qinco2.codec.model import QincoModel

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
COMMON = ("bench", "what", "device", "gpu", "cuda", "scale", "machine", "cores", "threads", "python", "torch",
          "faiss", "numpy", "command", "date")
FIGURES = {
    "cuda_tests": ("rc", "tests", "failures", "errors", "skipped", "cases"),
    "encode": ("model", "A", "B", "tf32", "precision", "max_bytes", "rows", "seconds", "vectors_per_s",
               "flops_per_vector_est", "gflops_per_s_est"),
    "train": ("model", "batch", "steps", "seconds", "steps_per_s", "flops_per_step_est", "gflops_per_s_est", "amp"),
    "ivfpq_build": ("n_db", "dim", "n_lists", "pq_dim", "build_s", "index_bytes"),
    "ivfpq_search": ("n_probes", "k", "n_queries", "qps", "10-recall@10", "R@1"),
}


def _env(**extra) -> dict:
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_help_and_unknown_argument():
    done = subprocess.run(["bash", str(SCRIPT), "--help"], check=False, capture_output=True, text=True)
    assert done.returncode == 0 and "--dry-run" in done.stdout
    done = subprocess.run(["bash", str(SCRIPT), "--no-such-flag"], check=False, capture_output=True, text=True)
    assert done.returncode == 64 and "unknown argument" in done.stderr


def test_dry_run_writes_the_expected_json_lines(tmp_path):
    out = tmp_path / "results" / "gpu_check.jsonl"
    t0 = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], check=False, cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert seconds < 150, f"the dry run took {seconds:.0f} s"             # ~40 s on 2 busy cores
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["what"] for r in rows} == set(FIGURES)
    assert rows[0]["what"] == "cuda_tests"
    for r in rows:
        missing = [k for k in COMMON + FIGURES[r["what"]] if k not in r]
        assert not missing, f"{r['what']} lacks {missing}"
        assert r["bench"] == "gpu" and r["device"] == "cpu" and r["gpu"] is None and r["scale"] == "tiny"
    tests = rows[0]
    assert tests["rc"] == 0 and tests["tests"] >= 3 and tests["skipped"] == tests["tests"]  # no CUDA here
    assert all("cuda" in c["name"] for c in tests["cases"])
    encode = [r for r in rows if r["what"] == "encode"]
    fp32 = [r for r in encode if r["precision"] == "fp32"]
    assert {(r["model"], r["tf32"]) for r in fp32} == {(m, t) for m in ("qinco2-S", "qinco2-L") for t in (0, 1)}
    assert {(r["model"], r["tf32"]) for r in encode if r["precision"] == "bf16"} == {("qinco2-S", 0), ("qinco2-L", 0)}
    for r in encode:
        assert r["vectors_per_s"] > 0 and r["gflops_per_s_est"] > 0
    assert all(r["cpu_check"]["codes_equal_fraction"] == 1 for r in fp32)
    L = next(r for r in encode if r["model"] == "qinco2-L")
    S = next(r for r in encode if r["model"] == "qinco2-S")
    assert L["L"] > S["L"] and L["flops_per_vector_est"] > S["flops_per_vector_est"]
    assert all(r["steps_per_s"] > 0 and r["steps"] >= 3 for r in rows if r["what"] == "train")
    for r in (r for r in rows if r["what"] == "ivfpq_search"):
        assert r["qps"] > 0 and 0.3 <= r["10-recall@10"] <= 1
    assert "CUDA tests: status 0" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_the_real_check_stops_with_a_message(tmp_path):
    out = tmp_path / "never.jsonl"
    done = subprocess.run(["bash", str(SCRIPT), "--out", str(out)], check=False, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 3 and "no CUDA device" in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("fields", [
    {"D": 32, "M": 4, "K": 16, "L": 2, "de": 16, "dh": 32, "A": 4, "B": 4},      # projections, pre-selection
    {"D": 16, "M": 3, "K": 16, "L": 1, "de": None, "dh": 24, "A": 4, "B": 8},    # no projections
    {"D": 16, "M": 3, "K": 16, "L": 2, "de": 8, "dh": 8, "A": 0, "B": 2},        # exhaustive (A=0)
    {"D": 24, "M": 5, "K": 32, "L": 3, "de": 12, "dh": 20, "A": 3, "B": 8},      # wider pre-selection
    {"D": 16, "M": 3, "K": 16, "L": 1, "de": 8, "dh": 16, "A": 4, "B": 4, "ivf_K": 64},   # IVF first step
    {"D": 32, "M": 4, "K": 16, "L": 2, "de": 16, "dh": 32, "A": 4, "B": 8, "precision": "bf16"},  # + re-scoring
])
def test_flop_estimate_matches_the_encoders_matrix_products(fields):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_gpu import encode_flops_per_vector
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    fields = dict(fields)
    precision = fields.pop("precision", "fp32")
    cfg = ModelConfig(**fields).validated()
    model, n = QincoModel(cfg), 10
    with FlopCounterMode(display=False) as counter:
        beam_search(model, torch.randn(n, cfg.D), cfg.A, cfg.B, precision=precision)
    counted = counter.get_total_flops() / n
    est = encode_flops_per_vector(cfg, cfg.A, cfg.B, rows=n, precision=precision)
    # the estimate adds the element-wise scoring, 3 D per candidate: up to 6% of these tiny networks
    assert counted <= est <= 1.07 * counted
