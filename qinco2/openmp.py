"""One OpenMP runtime for torch and faiss.

The torch and faiss-cpu wheels each ship their own copy of libgomp. When torch is loaded first,
faiss's OpenMP calls bind to torch's copy (the dynamic linker looks symbols up in the global
scope, where torch put its libgomp, before faiss's own libraries), so both libraries share one
pool of threads. When faiss is loaded first, each keeps its own pool, and code that alternates
between them, a torch step then a faiss step, batch after batch, has the idle threads of one
pool spinning, waiting for work, while the other pool's threads need the cores. On 2 cores,
IVF-PQ search on the CPU (torch's coarse step, then faiss's scan; sift-photos, 1,024 lists, 1 to
200 probes) ran at 0.60-1.12x the speed of faiss's own ``IndexIVFPQ`` with two pools and
1.03-1.49x with one. (The IVF-QINCo2 multi-stage search, whose batches are larger, showed no
consistent difference.)

``import qinco2`` loads torch before faiss, so a program that imports qinco2 (or torch) before
faiss gets one pool. :func:`shared_runtime` tells whether that is so, and importing qinco2 warns
(:class:`OpenMPRuntimeWarning`) when it is not.
"""

from __future__ import annotations

import warnings

import torch

import faiss  # isort: skip  (after torch: see the module docstring)


class OpenMPRuntimeWarning(RuntimeWarning):
    """faiss and torch run separate OpenMP thread pools in this process."""


def shared_runtime() -> bool:
    """Whether torch and faiss use the same OpenMP runtime: a thread count set through torch is
    seen by faiss (the count is restored)."""
    old = torch.get_num_threads()
    probe = old + 1
    torch.set_num_threads(probe)
    try:
        return faiss.omp_get_max_threads() == probe
    finally:
        torch.set_num_threads(old)


def warn_if_separate() -> bool:
    """Warn (:class:`OpenMPRuntimeWarning`) when faiss was loaded before torch in this process;
    returns :func:`shared_runtime`."""
    shared = shared_runtime()
    if not shared:
        warnings.warn(
            "faiss was imported before torch, so the two run separate OpenMP thread pools that compete for "
            "the cores: CPU searches that alternate between them (IVF-PQ) can run up to 1.7x slower on "
            "few cores. Import qinco2 (or torch) before faiss; see qinco2.openmp.",
            OpenMPRuntimeWarning, stacklevel=3)
    return shared
