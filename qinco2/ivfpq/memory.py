"""Memory footprint of an IVF-PQ index, from the formulas of the cuVS IVF-PQ documentation.

All figures in bytes. ``index_bytes`` adds to the documented formula the rotation matrix
(``4 * rot_dim * dim``), which the documentation leaves out; :meth:`Index.nbytes` gives the
real size of a built index to compare with (with ``conservative_memory_allocation=True``
lists hold exactly their vectors; otherwise list capacities round up to powers of two).
``search_workspace_bytes`` is the search's own working memory, at most ``workspace_bytes``
whatever the list sizes (:mod:`qinco2.ivfpq.scan`); ``build_peak_bytes`` the training's
working memory, which no longer grows with a float32 copy of the k-means sample
(:mod:`qinco2.ivfpq.builder`).

A CPU index with ``codebook_kind="subspace"`` keeps its lists in faiss (:mod:`.faiss_lists`):
``index_parts["list_headers"]`` counts its two vectors per list; ``cpu_scan_bytes`` is what
faiss's scan keeps once the index has been searched (:mod:`.faiss_scan`: a copy of the
rotated centres and codebooks, and for ``sqeuclidean`` the precomputed table; see
:func:`~qinco2.ivfpq.faiss_scan.scan_bytes`), part of
``search_peak_bytes``. Both are 0 for other indexes (``device="cuda"``, per-list codebooks).
"""

from __future__ import annotations

import torch

from ..kmeans import KMEANS_MAX_BYTES
from .faiss_lists import VECTOR_HEADER_BYTES
from .faiss_scan import scan_bytes
from .index import CHUNK_ROWS, WORK_BYTES
from .params import IndexParams, SearchParams
from .scan import DEFAULT_WORKSPACE_BYTES, search_workspace_bytes

IDX_BYTES = 8          # int64 ids
FLOAT_BYTES = 4


def _build_peak(n_vectors: int, dim: int, p: IndexParams, rot_dim: int, input_itemsize: int) -> int:
    """Training working set: the sample's normalised float16 copy (cosine only), one k-means
    block, the int32 labels and their sort (cluster codebooks), a codebook's training residuals,
    one chunk of converted rows with its assignment temporaries, and the centroids."""
    ratio = max(1, n_vectors // max(int(p.kmeans_trainset_fraction * n_vectors), p.n_lists))
    n_train = n_vectors // ratio
    cap = min(n_train, (1 << p.pq_bits) * p.max_train_points_per_pq_code)
    cosine_copy = n_train * dim * 2 if p.metric == "cosine" else 0
    kmeans_block = min(KMEANS_MAX_BYTES, n_train * FLOAT_BYTES * (5 * dim + 6))
    labels = n_train * (4 + IDX_BYTES) if p.codebook_kind == "cluster" else 0
    residuals = 2 * cap * rot_dim * FLOAT_BYTES
    chunk = min(CHUNK_ROWS, n_vectors) * dim * (input_itemsize + 2 * FLOAT_BYTES) + WORK_BYTES
    return cosine_copy + kmeans_block + labels + residuals + chunk + p.n_lists * dim * FLOAT_BYTES


def estimate_memory(n_vectors: int, dim: int, params: IndexParams | None = None, *, n_queries: int = 1,
                    k: int = 10, input_itemsize: int = 4, search_params: SearchParams | None = None,
                    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, device: str = "cpu") -> dict:
    """Index, host (refinement), search-workspace, search-peak and build-peak bytes for
    ``n_vectors`` vectors of dimension ``dim`` (raw vectors of ``input_itemsize`` bytes per
    value; default ``IndexParams()`` and ``SearchParams()``) on ``device``, with the parts of
    the index under ``index_parts``, and ``cpu_scan_bytes`` (see the module)."""
    p = (params or IndexParams()).validated(dim)
    faiss_lists = torch.device(device).type == "cpu" and p.codebook_kind == "subspace"
    C, K = p.n_lists, 1 << p.pq_bits
    rot_dim = p.pq_dim * -(-dim // p.pq_dim)
    pq_len = rot_dim // p.pq_dim
    books = (p.pq_dim if p.codebook_kind == "subspace" else C) * pq_len * K * FLOAT_BYTES
    parts = {
        "list_pointers": C * 4,
        "indices": n_vectors * IDX_BYTES,
        "codes": n_vectors * p.pq_dim * p.pq_bits // 8,
        "codebooks": books,
        "extras": C * (20 + 8 * dim),
        "rotation_matrix": FLOAT_BYTES * rot_dim * dim,
        "list_headers": 2 * VECTOR_HEADER_BYTES * C if faiss_lists else 0,
    }
    scan_tables = scan_bytes(C, rot_dim, p.pq_dim, p.pq_bits, p.metric) if faiss_lists else 0
    index = sum(parts.values())
    workspace = search_workspace_bytes((search_params or SearchParams()).validated(), k, n_queries=n_queries, n_lists=C,
                                       pq_dim=p.pq_dim, pq_bits=p.pq_bits, rot_dim=rot_dim,
                                       list_rows=-(-n_vectors // C), workspace_bytes=workspace_bytes)
    return {
        "index_bytes": index,
        "index_parts": parts,
        "host_refinement_bytes": n_vectors * dim * input_itemsize,
        "search_workspace_bytes": workspace,
        "cpu_scan_bytes": scan_tables,
        "search_peak_bytes": index + n_queries * dim * FLOAT_BYTES + n_queries * k * (IDX_BYTES + FLOAT_BYTES)
        + workspace + scan_tables,
        "build_peak_bytes": _build_peak(n_vectors, dim, p, rot_dim, input_itemsize),
    }
