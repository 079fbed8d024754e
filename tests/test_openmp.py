"""torch and faiss share one OpenMP runtime when torch is loaded first (``import qinco2`` does);
importing qinco2 after faiss-before-torch warns, with the fix in the message."""

from __future__ import annotations

import subprocess
import sys

import faiss
import torch

from qinco2 import openmp


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_this_process_shares_one_runtime_and_the_probe_restores_the_thread_count():
    before = torch.get_num_threads()
    assert openmp.shared_runtime()
    assert torch.get_num_threads() == before
    torch.set_num_threads(before + 1)          # one runtime: faiss sees what torch sets
    try:
        assert faiss.omp_get_max_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_import_qinco2_first_gives_one_runtime_without_warning():
    done = run("import warnings; warnings.simplefilter('error')\n"
               "import qinco2, faiss, torch\n"
               "torch.set_num_threads(3); assert faiss.omp_get_max_threads() == 3\n"
               "print(qinco2.openmp.shared_runtime())")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]


def test_faiss_before_torch_warns_at_import_of_qinco2():
    done = run("import faiss\nimport qinco2\nprint(qinco2.openmp.shared_runtime())")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]
    assert "OpenMPRuntimeWarning: faiss was imported before torch" in done.stderr
    assert "Import qinco2 (or torch) before faiss" in done.stderr
    assert "<string>:2" in done.stderr            # points at the caller's import line
