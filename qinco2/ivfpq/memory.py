"""Memory footprint of an IVF-PQ index, from the formulas of the cuVS IVF-PQ documentation.

All figures in bytes. ``index_bytes`` adds to the documented formula the rotation matrix
(``4 * rot_dim * dim``), which the documentation leaves out; :meth:`Index.nbytes` gives the
real size of a built index to compare with (with ``conservative_memory_allocation=True``
lists hold exactly their vectors; otherwise list capacities round up to powers of two).
"""

from __future__ import annotations

from .params import IndexParams, SearchParams
from .scan import DEFAULT_WORKSPACE_BYTES

IDX_BYTES = 8          # int64 ids
FLOAT_BYTES = 4


def estimate_memory(n_vectors: int, dim: int, params: IndexParams = IndexParams(), *, n_queries: int = 1,
                    k: int = 10, input_itemsize: int = 4, search_params: SearchParams = SearchParams(),
                    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> dict:
    """Index, host (refinement), search-peak and build-peak bytes for ``n_vectors`` vectors
    of dimension ``dim`` (raw vectors of ``input_itemsize`` bytes per value), with the parts
    of the index under ``index_parts``."""
    p = params.validated(dim)
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
    }
    index = sum(parts.values())
    n_train = int(n_vectors * p.kmeans_trainset_fraction)
    per_query_lut = min(search_params.n_probes, C) * p.pq_dim * K * FLOAT_BYTES
    workspace = min(workspace_bytes, max(n_queries, 1) * (per_query_lut + k * 12))
    return {
        "index_bytes": index,
        "index_parts": parts,
        "host_refinement_bytes": n_vectors * dim * input_itemsize,
        "search_peak_bytes": index + n_queries * dim * FLOAT_BYTES + n_queries * k * (IDX_BYTES + FLOAT_BYTES)
        + workspace,
        "build_peak_bytes": n_train * dim * FLOAT_BYTES + n_train * 4 + C * dim * FLOAT_BYTES,
    }
