"""The faiss IVF index that gives the first, fast shortlist of the large-scale search
(spec sections 8.4-8.5).

The index is faiss' ``IVF{C}_HNSW{hnsw_M},RQ{M}x8_Nqint8``: an HNSW coarse quantizer over the
raw IVF centroids (HNSW id == list id == QINCo2 IVF code), by-residual additive codes of ``M``
bytes, and one byte per vector for the squared norm of its reconstructed residual. Nothing is
re-encoded by faiss: the residual codebooks are least-squares additive tables fitted to the
QINCo2 codes (:func:`qinco2.ivfsearch.aq.fit_additive_codebooks`), and the database is added with the
QINCo2 codes themselves.

Stored code of one vector (faiss ``AdditiveQuantizer`` with 8-bit codes and ``ST_norm_qint8``,
checked against faiss' own encoder in the tests): the ``M`` code bytes, then the byte
``clip(floor((n - norm_min) / (norm_max - norm_min) * 256), 0, 255)`` (float32 arithmetic) of
the squared norm ``n = ||sum_m T_m[i_m]||^2`` of the residual reconstruction. ``[norm_min,
norm_max]`` is the range of those norms over the training vectors (spec quirk Q5, fixed).

The ``.faissindex`` file is a plain faiss index; a sidecar ``<file>.json`` remembers the model
that made the codes, so that :func:`load_index` can refuse an index built for another model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import faiss
import numpy as np

from ..atomic import atomic_open, atomic_path
from ..errors import DatasetError, InputError
from ..packing import pack_codes
from ..progress import progress_bar
from ..validation import check_codes, check_vectors
from . import shortlist_scan
from .aq import additive_decode, fit_additive_codebooks

log = logging.getLogger(__name__)

FORMAT_TAG = "qinco2-index"
FORMAT_VERSION = 1
NBITS = 8                     # bits per step code: the factory string uses RQ{M}x8
FAISS_METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}
BUILD_HINT = ("rebuild it with `qinco2 task=build_index ivf_centroids=<centroids.npy> "
              "encoded_trainset=<train codes.npy> encoded_db=<db codes.npy> output={path}` "
              "from codes of this model and database")


def factory_string(C: int, M: int, hnsw_M: int = 32) -> str:
    """The faiss factory string of the index: IVF with an HNSW quantizer, RQ codes, 8-bit norms."""
    return f"IVF{C}_HNSW{hnsw_M},RQ{M}x{NBITS}_Nqint8"


def sidecar_path(path) -> Path:
    """The metadata file stored beside an index file."""
    path = Path(path)
    return path.with_name(path.name + ".json")


# ---------------------------------------------------------------------------- codes
def encode_norms(norms_N: np.ndarray, norm_min: float, norm_max: float) -> np.ndarray:
    """8-bit uniform codes (uint8) of squared norms, as faiss ``encode_norm`` (qint8) computes them."""
    lo, hi = np.float32(norm_min), np.float32(norm_max)
    x1 = (np.asarray(norms_N, dtype=np.float32) - lo) / (hi - lo) * np.float32(256)
    return np.clip(np.floor(x1), 0, 255).astype(np.uint8)


def list_prefix(list_nos_N: np.ndarray, coarse_size: int) -> np.ndarray:
    """The coarse code of faiss ``IndexIVF.encode_listno``: list number, little-endian bytes."""
    return np.ascontiguousarray(np.asarray(list_nos_N, dtype="<u8")[:, None]).view(np.uint8)[:, :coarse_size]


def standalone_codes(list_nos_N: np.ndarray, codes_NM: np.ndarray, norm_codes_N: np.ndarray,
                     coarse_size: int) -> np.ndarray:
    """faiss' standalone codes ``(N, coarse_size + M + 1)`` uint8 of the IVF-RQ index: the list
    number, the M step codes packed in 8 bits each, then the norm byte."""
    return np.concatenate([list_prefix(list_nos_N, coarse_size), pack_codes(codes_NM, NBITS),
                           np.asarray(norm_codes_N, np.uint8)[:, None]], axis=1)


def reconstruction_norms(codes_NM: np.ndarray, T_MKD: np.ndarray) -> np.ndarray:
    """Squared norms ``||sum_m T_m[i_m]||^2`` (float32) of the additive reconstructions."""
    r_ND = additive_decode(codes_NM, T_MKD)
    return np.einsum("nd,nd->n", r_ND, r_ND)


# ---------------------------------------------------------------------------- checks
def _check_ivf_codes(codes, C: int, M: int | None, what: str, scan: bool = True) -> np.ndarray:
    """Shape checks; with ``scan``, also the value ranges (a pass over all the codes)."""
    check_codes(codes, None, what, columns=(2, None) if M is None else 1 + M,
                columns_are="1+M columns: the IVF id, then M step codes")
    if scan:
        check_codes(codes[:, :1], C, f"{what} column 0 (IVF ids)", K_name="C",
                    fix="were these codes made with these centroids?")
        check_codes(codes[:, 1:], 1 << NBITS, f"{what} columns 1..M (step codes)",
                    fix="the RQ{M}x8 index stores 8-bit codes and needs a K=256 model")
    return codes


# ---------------------------------------------------------------------------- build stages
class Residuals:
    """The raw residuals ``x - c_ivf[i0]`` ``(N, D)`` float32 of training rows, computed for the
    row slices read (``rows[a:b]``): the AQ fit streams them instead of holding ``N x D`` floats."""

    ndim, dtype, itemsize = 2, np.dtype(np.float32), 4

    def __init__(self, x_ND, codes_NM: np.ndarray, centroids_CD: np.ndarray):
        self.x, self.codes, self.centroids = x_ND, codes_NM, centroids_CD
        self.shape = (len(codes_NM), centroids_CD.shape[1])
        self.size = self.shape[0] * self.shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        lo, hi, _ = rows.indices(len(self))
        return np.asarray(self.x[lo:hi], dtype=np.float32) - self.centroids[self.codes[lo:hi, 0]]


def fit_aq_tables(ivf_centroids_CD, train_codes, x_train_raw, *, K: int = 256, n_samples: int = 1_000_000,
                  chunk_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares AQ tables ``(M, K, D)`` on the raw residuals ``x - c_ivf[i0]`` of the first
    ``n_samples`` training vectors, and the squared norms of their AQ reconstructions. The
    vectors are read ``chunk_rows`` (and the fit's batch) rows at a time."""
    n = min(len(train_codes), n_samples)
    codes = np.asarray(train_codes[:n])
    r = Residuals(x_train_raw, codes, ivf_centroids_CD)
    T_MKD = fit_additive_codebooks(codes[:, 1:], r, K)
    norms_N, before, after = np.empty(n, dtype=np.float32), 0.0, 0.0
    for lo in range(0, n, chunk_rows):
        r_nD, a_nD = r[lo:lo + chunk_rows], additive_decode(codes[lo:lo + chunk_rows, 1:], T_MKD)
        norms_N[lo:lo + len(r_nD)] = np.einsum("nd,nd->n", a_nD, a_nD)
        before, after = before + float((r_nD ** 2).sum()), after + float(((r_nD - a_nD) ** 2).sum())
    log.info("AQ tables on %d training vectors: residual MSE %.6g -> %.6g", n, before / n, after / n)
    return T_MKD, norms_N


def make_empty_index(ivf_centroids_CD: np.ndarray, T_MKD: np.ndarray, norm_min: float, norm_max: float,
                     *, hnsw_M: int = 32, ef_construction: int = 20, metric: str = "l2") -> faiss.Index:
    """A trained, empty ``IndexIVFResidualQuantizer`` holding the centroids, tables and norm range.

    ``metric="ip"``: faiss' inner-product variant (the HNSW quantizer probes the lists of the
    largest ``<q, c>``, the lists are scanned by ``<q, c + sum_m T_m[i_m]>``; the norm byte
    is stored but unused)."""
    C, D = ivf_centroids_CD.shape
    M, K, _ = T_MKD.shape
    if metric not in FAISS_METRICS:
        raise InputError(f"metric must be one of {sorted(FAISS_METRICS)}, got {metric!r}")
    index = faiss.index_factory(D, factory_string(C, M, hnsw_M), FAISS_METRICS[metric])
    assert isinstance(index, faiss.IndexIVFResidualQuantizer) and index.by_residual
    quantizer = faiss.downcast_index(index.quantizer)
    assert isinstance(quantizer, faiss.IndexHNSW)
    quantizer.hnsw.efConstruction = ef_construction
    quantizer.add(np.ascontiguousarray(ivf_centroids_CD, dtype=np.float32))   # ids 0..C-1 in order
    rq = index.rq
    assert rq.code_size == M + 1 and rq.search_type == faiss.AdditiveQuantizer.ST_norm_qint8
    assert list(faiss.vector_to_array(rq.codebook_offsets)) == [m * K for m in range(M + 1)]
    faiss.copy_array_to_vector(np.ascontiguousarray(T_MKD, dtype=np.float32).ravel(), rq.codebooks)
    rq.compute_codebook_tables()          # tables derived from the codebooks (used by faiss' encoder)
    rq.norm_min, rq.norm_max = float(norm_min), float(norm_max)
    rq.is_trained = True
    index.is_trained = True
    return index


def add_codes(index: faiss.Index, T_MKD: np.ndarray, db_codes, *, start_id: int = 0,
              batch: int = 1_000_000, progress: bool = True) -> None:
    """Append database codes ``(Nb, 1+M)`` to the inverted lists, with ids ``start_id + row``,
    ``batch`` rows at a time (norm bytes computed from the tables, nothing re-encoded)."""
    rq = index.rq
    coarse = index.coarse_code_size()
    for i in progress_bar(range(0, len(db_codes), batch), desc="add", disable=not progress, leave=False):
        codes = _check_ivf_codes(np.asarray(db_codes[i:i + batch]), index.nlist, rq.M, "db_codes")
        norm_codes = encode_norms(reconstruction_norms(codes[:, 1:], T_MKD), rq.norm_min, rq.norm_max)
        sa_codes = standalone_codes(codes[:, 0], codes[:, 1:], norm_codes, coarse)
        ids = np.arange(start_id + i, start_id + i + len(codes), dtype=np.int64)
        index.add_sa_codes(np.ascontiguousarray(sa_codes), ids)
    shortlist_scan.invalidate(index)       # lists reallocated, even where ntotal ends as it was (reset + add)


def train_shortlist(ivf_centroids_CD, train_codes, x_train_raw, *, K: int = 256,
                    aq_training_samples: int = 1_000_000, hnsw_M: int = 32, ef_construction: int = 20,
                    metric: str = "l2") -> tuple[faiss.Index, np.ndarray]:
    """The trained, empty IVF-AQ faiss index (:func:`make_empty_index`) and its AQ tables
    ``(M, K, D)``, fitted on the first ``aq_training_samples`` training codes ``(N, 1+M)`` and
    raw vectors ``(N, D)`` (row slices of them are read; memory-mapped arrays work)."""
    centroids = check_vectors(ivf_centroids_CD, what="ivf_centroids")
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    C, D = centroids.shape
    if K != 1 << NBITS:
        raise InputError(f"the RQ{{M}}x8 index stores 8-bit codes: K must be 256, got K={K}")
    train_codes = _check_ivf_codes(train_codes, C, None, "train_codes", scan=False)
    if aq_training_samples < 1 or len(train_codes) == 0:
        raise InputError(f"need at least one training vector and aq_training_samples >= 1, got "
                         f"{len(train_codes)} and {aq_training_samples}")
    _check_ivf_codes(np.asarray(train_codes[:aq_training_samples]), C, None, "train_codes")
    shape = getattr(x_train_raw, "shape", type(x_train_raw).__name__)
    if shape != (len(train_codes), D):
        raise InputError(f"x_train_raw must have shape (N, D) = ({len(train_codes)}, {D}) to match the "
                         f"training codes and centroids, got {shape}")
    T_MKD, norms_N = fit_aq_tables(centroids, train_codes, x_train_raw, K=K, n_samples=aq_training_samples)
    lo, hi = float(norms_N.min()), float(norms_N.max())
    hi = hi if hi > lo else lo + max(abs(lo), 1.0)        # one distinct norm: any non-empty range
    index = make_empty_index(centroids, T_MKD, lo, hi, hnsw_M=hnsw_M, ef_construction=ef_construction,
                             metric=metric)
    return index, T_MKD


def aq_tables(index: faiss.Index) -> np.ndarray:
    """The AQ tables ``(M, K, D)`` float32 held by an index of :func:`make_empty_index`."""
    rq = index.rq
    return faiss.vector_to_array(rq.codebooks).reshape(rq.M, 1 << NBITS, index.d)


def build_index(ivf_centroids_CD, train_codes, x_train_raw, db_codes, *, K: int = 256,
                aq_training_samples: int = 1_000_000, hnsw_M: int = 32, ef_construction: int = 20,
                progress: bool = True) -> faiss.Index:
    """The IVF-AQ faiss index of a database encoded by an IVF QINCo2 model.

    ``ivf_centroids_CD``: raw-space IVF centroids ``(C, D)``; ``train_codes`` ``(N, 1+M)`` and
    ``x_train_raw`` ``(N, D)``: encoded training vectors and the vectors themselves (the AQ
    tables are fitted on the first ``aq_training_samples``, :func:`train_shortlist`);
    ``db_codes`` ``(Nb, 1+M)``: the encoded database, whose row numbers become the ids. Arrays
    may be memory-mapped.
    """
    M = _check_ivf_codes(train_codes, 0, None, "train_codes", scan=False).shape[1] - 1
    _check_ivf_codes(db_codes, 0, M, "db_codes", scan=False)   # shapes before the fit; values: block by block
    index, T_MKD = train_shortlist(ivf_centroids_CD, train_codes, x_train_raw, K=K,
                                   aq_training_samples=aq_training_samples, hnsw_M=hnsw_M,
                                   ef_construction=ef_construction)
    add_codes(index, T_MKD, db_codes, progress=progress)
    log.info("built %s with %d vectors", factory_string(index.nlist, index.rq.M, hnsw_M), index.ntotal)
    return index


# ---------------------------------------------------------------------------- files
def save_index(index: faiss.Index, path, *, model_sha: str | None = None) -> None:
    """Write ``index`` to ``path`` (faiss format) and its sidecar ``<path>.json``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "model_sha": model_sha,
            "n_db": int(index.ntotal), "nlist": int(index.nlist), "d": int(index.d),
            "code_size": int(index.code_size)}

    with atomic_path(path) as tmp:
        faiss.write_index(index, tmp)
    with atomic_open(sidecar_path(path)) as f:
        f.write(json.dumps(meta, indent=1).encode())


def load_index(path, model_sha: str | None = None, n_db: int | None = None) -> faiss.Index:
    """Read an index written by :func:`save_index`. ``model_sha``: the digest of the model
    whose codes the search will decode (:func:`qinco2.codec.codes_io.model_sha`); ``n_db``: the
    number of database codes; a mismatch with the index raises :class:`InputError`."""
    path = Path(path)
    hint = BUILD_HINT.format(path=path)
    if not path.is_file():
        raise DatasetError(f"index file {path} does not exist; {hint}")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise DatasetError(f"cannot read faiss index {path} ({reason}); {hint}") from None
    if not isinstance(index, faiss.IndexIVFAdditiveQuantizer):
        raise DatasetError(f"{path} is a {type(index).__name__}, not an IVF additive-quantizer index; {hint}")
    meta = {}
    side = sidecar_path(path)
    if side.is_file():
        meta = json.loads(side.read_text())
        if (meta.get("format") != FORMAT_TAG
                or (meta.get("n_db"), meta.get("nlist")) != (index.ntotal, index.nlist)):
            raise InputError(f"{side} does not describe {path} (it was written for another index); {hint}")
    if n_db is not None and n_db != index.ntotal:
        raise InputError(f"{path} holds {index.ntotal} database vectors but the database has {n_db}; {hint}")
    if model_sha is not None:
        if not meta.get("model_sha"):
            log.warning("%s records no model digest: cannot check that it matches the model", path)
        elif meta["model_sha"] != model_sha:
            raise InputError(f"{path} was built from codes of model {meta['model_sha']}, but the model "
                             f"given is {model_sha}; {hint}")
    return index
