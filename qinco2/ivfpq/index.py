"""The IVF-PQ index object: learned tables, inverted lists, encoding and decoding.

A coarse k-means partition into ``n_lists`` lists; the residual of each vector to its list
centre, rotated (a random orthogonal matrix when ``dim % pq_dim != 0`` or when forced), is
product-quantized into ``pq_dim`` codes of ``pq_bits`` bits with one codebook per sub-space
(``codebook_kind="subspace"``) or one per list (``"cluster"``).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import validation
from ..kmeans import nearest
from ..packing import pack_codes, unpack_codes
from .faiss_lists import FaissInvertedLists
from .fingerprint import DataFingerprint
from .lists import InvertedLists
from .params import IndexParams

INPUT_DTYPES = (np.float32, np.float16, np.int8, np.uint8)
CHUNK_ROWS = 65_536                    # rows converted to float32 at a time
WORK_BYTES = 64 << 20                  # temporaries of assignment and encoding, per block of rows


# ---------------------------------------------------------------------------- inputs
def check_vectors(x, what: str, dim: int | None = None) -> np.ndarray:
    """:func:`qinco2.validation.check_vectors` with the index's input dtypes and dimension."""
    return validation.check_vectors(x, what, dim, dim_owner=f"the index has dim={dim}", dtypes=INPUT_DTYPES)


def float_rows(x: np.ndarray, device, normalize: bool) -> torch.Tensor:
    x_ND = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    return torch.nn.functional.normalize(x_ND, dim=1) if normalize else x_ND


# ---------------------------------------------------------------------------- the index
class Index:
    """A built IVF-PQ index: learned tables (torch tensors on ``device``) and inverted lists.

    Properties follow cuVS: ``n_lists``, ``dim``, ``pq_dim``, ``pq_len``, ``pq_bits``,
    ``rot_dim``, ``centers`` ``(n_lists, dim)``, ``pq_centers`` (``(pq_dim, 2^pq_bits,
    pq_len)`` per sub-space or ``(n_lists, 2^pq_bits, pq_len)`` per list),
    ``rotation_matrix`` ``(rot_dim, dim)``, ``list_sizes``; :meth:`list_codes` and
    :meth:`list_ids` read one list (codes unpacked); ``fingerprint``: the row count and
    fingerprint of the database the ids point into (:mod:`.fingerprint`).

    ``lists``: the inverted lists (:func:`make_lists`): held by faiss for a CPU index with
    ``codebook_kind="subspace"`` (so faiss's scan reads them in place), by torch otherwise.
    """

    def __init__(self, params: IndexParams, dim: int, centers, rotation_matrix, pq_centers, device):
        self.params, self.dim, self.device = params, dim, torch.device(device)
        self.centers = centers.to(self.device)
        self.rotation_matrix = rotation_matrix.to(self.device)
        self.pq_centers = pq_centers.to(self.device)
        self.centers_rot = self.rotate(self.centers)
        self.lists = make_lists(params, self.code_bytes, self.device)
        # rows and fingerprint of the database the ids point into; None: unknown (an index
        # file written before qinco2 recorded them)
        self.fingerprint: DataFingerprint | None = DataFingerprint()

    n_lists = property(lambda self: self.params.n_lists, doc="Number of inverted lists (coarse clusters).")
    pq_dim = property(lambda self: self.params.pq_dim, doc="Sub-vectors per code (bytes per code at 8 bits).")
    pq_bits = property(lambda self: self.params.pq_bits, doc="Bits per sub-vector code (4 to 8).")
    metric = property(lambda self: self.params.metric, doc="sqeuclidean, inner_product or cosine.")
    rot_dim = property(lambda self: self.rotation_matrix.shape[0], doc="Dimension after the rotation.")
    pq_len = property(lambda self: self.rot_dim // self.pq_dim, doc="Dimension of one sub-vector.")
    pq_book_size = property(lambda self: 1 << self.pq_bits, doc="Codewords per PQ codebook (2^pq_bits).")
    code_bytes = property(lambda self: self.params.pq_dim * self.params.pq_bits // 8,
                          doc="Bytes of one packed PQ code.")
    size = property(lambda self: self.lists.ntotal, doc="Number of vectors in the index.")
    list_sizes = property(lambda self: self.lists.size.numpy().copy(), doc="Vectors per list, ``(n_lists,)`` int.")

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (f"Index(n_lists={self.n_lists}, dim={self.dim}, pq_dim={self.pq_dim}, pq_bits={self.pq_bits}, "
                f"metric={self.metric!r}, codebook_kind={self.params.codebook_kind!r}, size={self.size}, "
                f"device={self.device})")

    def list_codes(self, list_no: int) -> np.ndarray:
        """Codes ``(size, pq_dim)`` of list ``list_no``, unpacked."""
        return unpack_codes(self.lists.list_codes(list_no), self.pq_dim, self.pq_bits).cpu().numpy()

    def list_ids(self, list_no: int) -> np.ndarray:
        """Ids ``(size,)`` int64 of the vectors in list ``list_no`` (a copy)."""
        return self.lists.list_ids(list_no).cpu().numpy().copy()

    def nbytes(self) -> int:
        """Bytes held by the index: lists, centres (raw and rotated), rotation, codebooks; for
        lists held by faiss, also the tables of the faiss scan once it has run (:mod:`.faiss_scan`)."""
        tables = (self.centers, self.centers_rot, self.rotation_matrix, self.pq_centers)
        return self.lists.nbytes() + sum(t.nbytes for t in tables)

    # ------------------------------------------------------------------ maths
    def rotate(self, x_ND: torch.Tensor) -> torch.Tensor:
        """``x_ND`` in the rotated space ``(N, rot_dim)`` of the codes."""
        if self.rot_dim == self.dim and not self.params.force_random_rotation:
            return x_ND                                     # identity rotation
        return x_ND @ self.rotation_matrix.T

    def coarse_scores(self, x_ND: torch.Tensor) -> torch.Tensor:
        """``(N, n_lists)`` scores, smaller is closer (negated inner products for IP/cosine)."""
        if self.metric == "sqeuclidean":
            c_sq = (self.centers ** 2).sum(1)  # |x|^2 left out: the same for every list
            return torch.addmm(c_sq, x_ND, self.centers.T, alpha=-2)
        return -(x_ND @ self.centers.T)

    def assign(self, x_ND: torch.Tensor) -> torch.Tensor:
        """List number ``(N,)`` of each (float, normalised for cosine) row."""
        return _by_rows(lambda x: self.coarse_scores(x).argmin(1), self.n_lists * 4, x_ND)

    def encode(self, x_ND: torch.Tensor, list_nos_N: torch.Tensor) -> torch.Tensor:
        """Packed PQ codes of the rotated residuals ``(N, code_bytes)``."""
        S, L, K = self.pq_dim, self.pq_len, self.pq_book_size
        subspace = self.params.codebook_kind == "subspace"

        def codes(x, li):
            r_NSL = (self.rotate(x) - self.centers_rot[li]).view(len(x), S, L)
            if subspace:
                return nearest(r_NSL.transpose(0, 1), self.pq_centers)[1].T
            return (torch.cdist(r_NSL, self.pq_centers[li]) ** 2).argmin(-1)   # one codebook per row's list

        row_bytes = S * K * 4 * (1 if subspace else 2) + (0 if subspace else K * L * 4)
        return pack_codes(_by_rows(codes, row_bytes, x_ND, list_nos_N), self.pq_bits)

    def residuals(self, codes_NS: torch.Tensor, list_nos_N: torch.Tensor) -> torch.Tensor:
        """Decoded rotated residuals ``(N, rot_dim)`` of unpacked codes (int64, on ``device``)."""
        K = self.pq_book_size
        if self.params.codebook_kind == "subspace":
            offset = torch.arange(self.pq_dim, device=self.device) * K
        else:
            offset = list_nos_N[:, None] * K
        books = self.pq_centers.reshape(-1, self.pq_len)
        return torch.nn.functional.embedding(codes_NS + offset, books).reshape(len(codes_NS), self.rot_dim)

    def decode(self, list_nos_N, codes_NS) -> np.ndarray:
        """Reconstructions ``(N, dim)`` (in the normalised space for cosine) of unpacked codes."""
        l_N = torch.as_tensor(np.asarray(list_nos_N), dtype=torch.int64, device=self.device)
        c_NS = torch.as_tensor(np.asarray(codes_NS), dtype=torch.int64, device=self.device)
        x_rot = self.centers_rot[l_N] + self.residuals(c_NS, l_N)
        if self.rot_dim == self.dim and not self.params.force_random_rotation:
            return x_rot.cpu().numpy()
        return (x_rot @ self.rotation_matrix).cpu().numpy()


def make_lists(params: IndexParams, code_bytes: int, device: torch.device):
    """Empty inverted lists for an index: a faiss ``ArrayInvertedLists`` on the CPU with
    subspace codebooks (:class:`FaissInvertedLists`, what faiss's IVF-PQ scan reads), torch
    buffers on ``device`` otherwise (:class:`InvertedLists`: CUDA, per-list codebooks)."""
    conservative = params.conservative_memory_allocation
    if device.type == "cpu" and params.codebook_kind == "subspace":
        return FaissInvertedLists(params.n_lists, code_bytes, conservative)
    return InvertedLists(params.n_lists, code_bytes, device, conservative)


def _by_rows(fn, row_bytes: int, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to row blocks of ``tensors`` whose temporaries (``row_bytes`` per row)
    stay under ``WORK_BYTES``, the results concatenated."""
    rows = max(1, WORK_BYTES // max(row_bytes, 1))
    n = len(tensors[0])
    if n <= rows:
        return fn(*tensors)
    return torch.cat([fn(*(t[i:i + rows] for t in tensors)) for i in range(0, n, rows)])
