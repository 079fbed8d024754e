"""Export an IVF-PQ :class:`~qinco2.ivfpq.index.Index` to ``faiss.IndexIVFPQ`` and import one back.

The mapping: the list centres go into the coarse quantizer (``IndexFlatL2`` or
``IndexFlatIP``), ``pq_centers`` ``(pq_dim, 2^pq_bits, pq_len)`` into ``pq.centroids`` (``M x
ksub x dsub``, the same layout), the inverted lists (packed codes, the layout of faiss' PQ codes
for every ``pq_bits``, and int64 ids) into an ``ArrayInvertedLists``; ``by_residual=True``.

Supported: ``codebook_kind="subspace"``, metrics ``"sqeuclidean"`` and ``"inner_product"``,
``pq_bits`` 4 to 8. An index with a rotation (``rot_dim != dim`` or
``force_random_rotation=True``) becomes a ``faiss.IndexPreTransform`` whose
``LinearTransform`` holds the rotation, over an ``IndexIVFPQ`` in the rotated space (centres
rotated): since the rotation has orthonormal columns, coarse scores and residuals are those
of our index. :func:`from_faiss` accepts both shapes (a pre-transform must be one
``LinearTransform`` or ``RandomRotationMatrix`` without bias and with orthonormal columns).
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
from faiss.contrib.inspect_tools import get_invlist

from ..errors import InputError
from .index import Index
from .params import IndexParams

METRICS = {"sqeuclidean": faiss.METRIC_L2, "inner_product": faiss.METRIC_INNER_PRODUCT}
ORTHO_TOL = 1e-4          # |R^T R - I| and |R c - c_rot| allowed, relative


def _numpy(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().float().numpy())


def _identity_rotation(index: Index) -> bool:
    return index.rot_dim == index.dim and not index.params.force_random_rotation


def _check_exportable(index: Index) -> None:
    if index.params.codebook_kind != "subspace":
        raise InputError(f"faiss.IndexIVFPQ has one PQ codebook per sub-space; this index has "
                         f"codebook_kind={index.params.codebook_kind!r}: rebuild it with codebook_kind='subspace'")
    if index.metric not in METRICS:
        raise InputError(f"faiss export supports metric 'sqeuclidean' or 'inner_product', got "
                         f"metric={index.metric!r}: rebuild with metric='inner_product' on normalised vectors")


def _fill_lists(ivf, index: Index) -> None:
    """Copy every list's packed codes and ids into the (empty) inverted lists of ``ivf``."""
    lists = index.lists
    for li in range(index.n_lists):
        n = int(lists.size[li])
        if not n:
            continue
        ids = np.ascontiguousarray(lists.list_ids(li).cpu().numpy(), dtype=np.int64)
        codes = np.ascontiguousarray(lists.list_codes(li).cpu().numpy(), dtype=np.uint8)
        ivf.invlists.add_entries(li, n, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    ivf.ntotal = index.size


def to_faiss(index: Index) -> faiss.Index:
    """A ``faiss.IndexIVFPQ`` (``IndexPreTransform`` around one for a rotated index) holding the
    centres, codebooks and lists of ``index``: ``search`` with ``nprobe = n_probes`` returns our
    neighbours (up to float rounding and ties). InputError for what faiss cannot hold."""
    _check_exportable(index)
    metric = METRICS[index.metric]
    d = index.rot_dim
    quantizer = faiss.IndexFlatL2(d) if metric == faiss.METRIC_L2 else faiss.IndexFlatIP(d)
    quantizer.add(_numpy(index.centers_rot))
    ivf = faiss.IndexIVFPQ(quantizer, d, index.n_lists, index.pq_dim, index.pq_bits, metric)
    ivf.by_residual = True
    faiss.copy_array_to_vector(_numpy(index.pq_centers).ravel(), ivf.pq.centroids)
    ivf.is_trained = True
    _fill_lists(ivf, index)
    if _identity_rotation(index):
        return ivf
    rotation = faiss.LinearTransform(index.dim, index.rot_dim, False)
    faiss.copy_array_to_vector(_numpy(index.rotation_matrix).ravel(), rotation.A)
    rotation.is_trained = True
    rotation.is_orthonormal = True                     # orthonormal columns: A^T undoes A on its range
    return faiss.IndexPreTransform(rotation, ivf)


# ---------------------------------------------------------------------------- import
def _split(faiss_index):
    """``(rotation (rot_dim, dim) float32 or None, IndexIVFPQ)`` of a faiss index."""
    faiss_index = faiss.downcast_index(faiss_index)
    rotation = None
    if isinstance(faiss_index, faiss.IndexPreTransform):
        if faiss_index.chain.size() != 1:
            raise InputError(f"from_faiss accepts one LinearTransform before the IndexIVFPQ, got a chain of "
                             f"{faiss_index.chain.size()} transforms")
        vt = faiss.downcast_VectorTransform(faiss_index.chain.at(0))
        if not isinstance(vt, faiss.LinearTransform):
            raise InputError(f"from_faiss accepts a LinearTransform (rotation) before the IndexIVFPQ, "
                             f"got {type(vt).__name__}")
        rotation = _rotation(vt)
        faiss_index = faiss.downcast_index(faiss_index.index)
    if type(faiss_index) is not faiss.IndexIVFPQ:
        raise InputError(f"from_faiss needs a faiss.IndexIVFPQ (optionally in an IndexPreTransform), "
                         f"got {type(faiss_index).__name__}")
    return rotation, faiss_index


def _rotation(vt) -> np.ndarray:
    A = faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in)
    if vt.have_bias and np.any(faiss.vector_to_array(vt.b) != 0):
        raise InputError("the faiss LinearTransform has a bias; our rotation has none (export without a bias)")
    if vt.d_out < vt.d_in or not np.allclose(A.T @ A, np.eye(vt.d_in), atol=ORTHO_TOL):
        raise InputError(f"the faiss LinearTransform ({vt.d_in} -> {vt.d_out}) is not a rotation (orthonormal "
                         "columns); only a rotation can be carried over")
    return A.astype(np.float32)


def _params(ivf, dim: int, rotated: bool) -> IndexParams:
    metric = {faiss.METRIC_L2: "sqeuclidean", faiss.METRIC_INNER_PRODUCT: "inner_product"}.get(ivf.metric_type)
    if metric is None:
        raise InputError(f"from_faiss supports METRIC_L2 and METRIC_INNER_PRODUCT, got metric_type={ivf.metric_type}")
    if not ivf.by_residual:
        raise InputError("from_faiss needs by_residual=True (our lists hold PQ codes of residuals)")
    if not 4 <= ivf.pq.nbits <= 8:
        raise InputError(f"from_faiss supports pq.nbits from 4 to 8 (pq_bits), got {ivf.pq.nbits}")
    rot_dim = ivf.pq.M * -(-dim // ivf.pq.M)
    if rot_dim != ivf.d:
        raise InputError(f"the IndexIVFPQ works in dimension {ivf.d}; with pq_dim={ivf.pq.M} on {dim}-d vectors "
                         f"our index rotates to {rot_dim} dimensions")
    return IndexParams(n_lists=ivf.nlist, metric=metric, pq_bits=ivf.pq.nbits, pq_dim=ivf.pq.M,
                       codebook_kind="subspace", force_random_rotation=rotated and rot_dim == dim).validated(dim)


def _lists(ivf) -> dict:
    ids, codes = zip(*(get_invlist(ivf.invlists, li) for li in range(ivf.nlist)))
    ids_n = np.concatenate(ids).astype(np.int64)
    if len(ids_n) and ids_n.min() < 0:
        raise InputError(f"the faiss index holds a negative id ({int(ids_n.min())}); ids must be in [0, 2**63)")
    return {"sizes": torch.tensor([len(i) for i in ids], dtype=torch.int64),
            "codes": torch.from_numpy(np.concatenate(codes).reshape(len(ids_n), ivf.code_size)),
            "ids": torch.from_numpy(ids_n)}


def from_faiss(faiss_index, *, device=None) -> Index:
    """An :class:`Index` (on ``device``, default CPU) with the tables and lists of a
    ``faiss.IndexIVFPQ`` (or an ``IndexPreTransform`` of one rotation around one), trained, with
    ``by_residual=True``. The database fingerprint is unknown (``None``). InputError naming
    what cannot be carried over."""
    rotation, ivf = _split(faiss_index)
    if not ivf.is_trained:
        raise InputError("the faiss index is not trained; train it (and add vectors) first")
    dim = ivf.d if rotation is None else rotation.shape[1]
    params = _params(ivf, dim, rotation is not None)
    centers_rot = ivf.quantizer.reconstruct_n(0, ivf.nlist).astype(np.float32)
    pq_centers = faiss.vector_to_array(ivf.pq.centroids).reshape(ivf.pq.M, ivf.pq.ksub, ivf.pq.dsub)
    if rotation is None:
        rotation, centers = np.eye(dim, dtype=np.float32), centers_rot
    else:
        centers = centers_rot @ rotation                       # back to the input space
        scale = max(float(np.abs(centers_rot).max()), 1.0)
        if not np.allclose(centers @ rotation.T, centers_rot, atol=ORTHO_TOL * scale):
            raise InputError("the faiss coarse centroids lie outside the range of the rotation; they cannot "
                             "be carried over to the input space")
    index = Index(params, dim, torch.from_numpy(centers), torch.from_numpy(rotation),
                  torch.from_numpy(pq_centers.copy()), torch.device("cpu" if device is None else device))
    index.lists.load_state_dict(_lists(ivf))
    index.fingerprint = None                                     # the database is unknown
    return index
