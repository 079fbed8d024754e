"""IVF-PQ index with the cuVS parameter set, in torch (CPU and CUDA alike); on the CPU, an
index with subspace codebooks keeps its lists in faiss and is searched by faiss's IVF-PQ scan
(:mod:`.faiss_scan`, ``SearchParams(cpu_scan=...)``).

    >>> from qinco2 import ivfpq
    >>> index = ivfpq.build(ivfpq.IndexParams(n_lists=1024, pq_dim=32), x_ND)          # doctest: +SKIP
    >>> distances, neighbors = ivfpq.search(ivfpq.SearchParams(n_probes=20), index, q_QD, 10)  # doctest: +SKIP

Interface after ``cuvs.neighbors.ivf_pq``: :class:`IndexParams`, :class:`SearchParams`,
:func:`build`, :func:`extend`, :func:`search`, :func:`save`, :func:`load`, :func:`refine`;
plus :func:`search_and_refine` (raw vectors or a QINCo2 codec), :func:`refine_with_codec`,
:func:`estimate_memory`, and :func:`to_faiss` / :func:`from_faiss` (``faiss.IndexIVFPQ``).
"""

from ..rerank import refine, refine_with_codec
from .builder import build, extend
from .faiss_export import from_faiss, to_faiss
from .files import load, save
from .index import Index
from .memory import estimate_memory
from .params import IndexParams, SearchParams, default_pq_dim
from .scan import search, search_and_refine

__all__ = ["Index", "IndexParams", "SearchParams", "build", "default_pq_dim", "estimate_memory", "extend", "from_faiss",
           "load", "refine", "refine_with_codec", "save", "search", "search_and_refine", "to_faiss"]
