"""IVF-QINCo2 search as one object, used like a faiss index: :class:`IVFQincoIndex`.

    >>> index = IVFQincoIndex(codec, metric="l2").train(x_train)        # doctest: +SKIP
    >>> index.add(x_db)                                                 # doctest: +SKIP
    >>> D, I = index.search(queries, 10, SearchParams(nprobe=32, nshort=200))   # doctest: +SKIP

It holds the trained IVF QINCo2 codec, the faiss IVF-AQ shortlist index
(:mod:`qinco2.ivfsearch.shortlist`), an optional pairwise decoder, the packed QINCo2 codes of
the database (``code_size`` bytes per vector, looked up by row at search time) and the user ids.
The search is :func:`qinco2.ivfsearch.multistage.multistage_knn`, the same stages as the
file-based pipeline. faiss stores row numbers as ids; :attr:`ids` maps rows to user ids.

Metrics (``metric=``; the returned ``D`` follows faiss: smallest first for ``l2``, largest first
for the others):

* ``"l2"``: squared L2 distance to the decoded vectors.
* ``"ip"``: inner product with the decoded vectors. The shortlist is faiss' inner-product
  variant of the same index: the lists of the largest ``<q, c>`` are probed (faiss' usual
  IVF-IP heuristic; the codec still files each vector under its L2-nearest centroid) and
  scanned by ``<q, c + sum_m T_m[i_m]>``; the pairwise stage and the final re-rank order by the
  inner product of the decoded vectors.
* ``"cosine"``: queries and database (and training) rows are L2-normalised first, so the codec
  should be trained on unit vectors. The shortlist stays the L2 index: on unit vectors
  ``||q - x||^2 = 2 - 2 cos(q, x)`` orders as the cosine does, and L2 probing matches the L2
  assignment of the IVF step, which probing by ``<q, c>`` would not (the centroids' norms
  differ). The final re-rank orders by the cosine of the decoded vectors (normalising them
  removes the quantisation's error on the norm); ``D`` holds cosine similarities.

Scale: :meth:`add` encodes ``chunk_rows`` rows at a time (no ``(N, D)`` float copy); the codes
and ids live in arrays that double their capacity as they grow (a saved index memory-maps its
codes; the first :meth:`add` after :meth:`load` copies them into memory).
"""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np

from ..codec.code_layout import PackedCodes
from ..codec.codec import QincoCodec
from ..codec.codes_io import load_encoded, model_sha
from ..errors import ConfigError, InputError, NotTrainedError
from ..progress import progress_bar
from ..tensor_io import accepts_tensors
from ..validation import check_codes, check_vectors
from . import index_files as files
from .multistage import SearchParams, multistage_knn, sweep
from .pairwise import PairwiseDecoder
from .shortlist import BUILD_HINT, NBITS, add_codes, aq_tables, load_index, save_index, train_shortlist
from .storage import GrowingRows, UnitRows, check_ids, unit_rows

log = logging.getLogger(__name__)

METRICS = ("l2", "ip", "cosine")
RERANK_METRIC = {"l2": "sqeuclidean", "ip": "inner_product", "cosine": "cosine"}
CHUNK_ROWS = 65_536          # rows encoded (add, train) or added at a time


class IVFQincoIndex:
    """A search index over an IVF QINCo2 codec (``ivf_K > 0``, ``K = 256``); see the module doc.

    Build-time parameters: ``metric`` (``l2``, ``ip``, ``cosine``), ``hnsw_M`` and
    ``ef_construction`` of the HNSW quantizer over the codec's IVF centroids. Learned state:
    ``shortlist_`` (the faiss index, None until :meth:`train`), ``pairwise_`` (a
    :class:`~qinco2.ivfsearch.pairwise.PairwiseDecoder` or None); :attr:`ntotal` vectors added.
    """

    def __init__(self, codec: QincoCodec, metric: str = "l2", *, hnsw_M: int = 32, ef_construction: int = 20):
        if metric not in METRICS:
            raise ConfigError(f"metric must be one of {METRICS}, got {metric!r}")
        if not isinstance(codec, QincoCodec):
            raise InputError(f"codec must be a trained QincoCodec, got {type(codec).__name__}")
        self.model_sha = model_sha(codec)              # NotTrainedError for an untrained codec
        cfg = codec.model_config
        if not cfg.ivf_K or cfg.K != 1 << NBITS:
            raise InputError(f"IVFQincoIndex needs an IVF codec with K=256 (faiss stores 8-bit codes), got "
                             f"ivf_K={cfg.ivf_K}, K={cfg.K}; train one with K=256 and ivf_centroids=<centroids> "
                             "(from `qinco2 task=ivf_centroids`)")
        self.codec, self.metric, self.hnsw_M, self.ef_construction = codec, metric, hnsw_M, ef_construction
        self.layout = codec.code_layout
        self.shortlist_: faiss.Index | None = None
        self.pairwise_: PairwiseDecoder | None = None
        self._codes = GrowingRows(np.empty((0, self.layout.code_size), dtype=np.uint8))
        self._ids: GrowingRows | None = None           # None: the ids are the rows 0..ntotal-1

    # ------------------------------------------------------------------ state
    d = property(lambda self: self.codec.dim, doc="Dimension of the vectors (faiss's ``d``).")
    nlist = property(lambda self: self.layout.ivf_K, doc="Number of IVF lists (the codec's ``ivf_K``).")
    ntotal = property(lambda self: len(self._codes), doc="Number of vectors added.")
    is_trained = property(lambda self: self.shortlist_ is not None, doc="Whether :meth:`train` has run.")

    @property
    def ids(self) -> np.ndarray:
        """User id of each stored vector ``(ntotal,)`` int64."""
        return np.arange(self.ntotal, dtype=np.int64) if self._ids is None else self._ids.rows

    @property
    def codes(self) -> PackedCodes:
        """The database codes ``(ntotal, n_codes)``, unpacked on access from the packed bytes."""
        return PackedCodes(self._codes.rows, self.layout)

    @property
    def ivf_centroids(self) -> np.ndarray:
        """The codec's IVF centroids ``(C, D)`` in raw space (its decoding of each IVF code alone)."""
        return self.codec.decode(np.arange(self.nlist, dtype=np.int32)[:, None])

    def __repr__(self) -> str:
        return (f"IVFQincoIndex(metric={self.metric!r}, d={self.d}, nlist={self.nlist}, M={self.layout.M}, "
                f"ntotal={self.ntotal}, trained={self.is_trained}, pairwise={self.pairwise_ is not None})")

    def _trained(self) -> None:
        if self.shortlist_ is None:
            raise NotTrainedError("this IVFQincoIndex is not trained: call index.train(x_train) first "
                                  "(or IVFQincoIndex.load(path))")

    def reset(self) -> None:
        """Remove every vector (the trained tables and decoder stay)."""
        if self.shortlist_ is not None:
            self.shortlist_.reset()
        self._codes = GrowingRows(np.empty((0, self.layout.code_size), dtype=np.uint8))
        self._ids = None

    # ------------------------------------------------------------------ codes in
    def _rows(self, x, what: str):
        """Vectors checked against the codec (NaN/Inf: a chunked pass), normalised for cosine."""
        x = check_vectors(x, what, self.d, dim_owner=f"the codec was trained on D={self.d}",
                          fix=f"pass vectors of dimension {self.d}")
        return UnitRows(x) if self.metric == "cosine" else x

    def _code_source(self, codes, what: str):
        """``(rows, packed)`` of codes given as :func:`~qinco2.codec.codes_io.load_encoded`'s dict,
        :class:`PackedCodes`, packed ``(N, code_size)`` uint8, or integer ``(N, 1+M)`` codes."""
        if isinstance(codes, dict) and "codes" in codes:
            files.check_same_model(codes.get("model_sha"), self.model_sha, f"the {what}",
                                   "encode them with this codec (`qinco2 task=encode model=<its model>`)")
            codes = codes["codes"]
        if isinstance(codes, PackedCodes):
            if codes.layout != self.layout:
                raise InputError(f"the {what} have the layout {codes.layout} but the codec's is {self.layout}; "
                                 "pass codes made by this codec")
            return codes.packed, True
        packed = getattr(codes, "dtype", None) == np.uint8 and getattr(codes, "ndim", 0) == 2 \
            and codes.shape[1] == self.layout.code_size
        cols = self.layout.code_size if packed else self.layout.n_codes
        check_codes(codes, None, what, columns=cols, columns_are=(
            f"packed: code_size={self.layout.code_size} bytes per vector, or 1+M={self.layout.n_codes} integer "
            "codes"), fix="pass codec.encode(x, packed=True) of this codec")
        return codes, packed

    def _code_chunk(self, rows, packed: bool, lo: int, hi: int, what: str):
        """Rows ``lo:hi`` as (packed bytes, int32 codes), values checked against the codec."""
        block = np.asarray(rows[lo:hi])
        codes = self.layout.unpack(block) if packed else block
        check_codes(codes, [self.nlist] + [self.layout.K] * self.layout.M, f"{what} (rows {lo}..{hi})",
                    fix="pass codes made by this codec")
        return (np.ascontiguousarray(block, dtype=np.uint8) if packed else self.layout.pack(codes)), codes

    # ------------------------------------------------------------------ training
    @accepts_tensors
    def train(self, x_train, *, train_codes=None, pairwise: bool | PairwiseDecoder = False,
              aq_training_samples: int = 1_000_000, progress: bool = True) -> IVFQincoIndex:
        """Fit the shortlist's additive tables (and with ``pairwise``, a pairwise decoder) on
        the training vectors ``(N, D)`` and their codes; the IVF centroids are the codec's.

        ``train_codes``: the codes of ``x_train`` in the same row order (as :meth:`add_codes`
        takes them), else ``x_train`` is encoded ``CHUNK_ROWS`` rows at a time. The tables are
        fitted on the first ``aq_training_samples`` rows, the pairwise decoder on all of them.
        ``pairwise``: True (a default :class:`PairwiseDecoder`), a decoder to train, or a trained
        one (checked to fit). Only an empty index can be trained (:meth:`reset` empties it).
        With ``metric="cosine"`` the rows are normalised as they are read (``train_codes`` must
        then be codes of the normalised rows).
        """
        if self.ntotal:
            raise InputError(f"the index holds {self.ntotal} vectors whose shortlist codes depend on the "
                             "tables: train before adding, or call index.reset() first")
        dec = PairwiseDecoder(K=self.layout.K) if pairwise is True else (pairwise or None)
        if dec is not None and not isinstance(dec, PairwiseDecoder):
            raise ConfigError(f"pairwise must be True, False or a PairwiseDecoder, got {type(dec).__name__}")
        if dec is not None and dec.tables_ is not None:
            files.check_pairwise(dec, self.codec, self.nlist)
        x = self._rows(x_train, "x_train")
        codes = self._train_codes(x, train_codes, progress)
        centroids = self.ivf_centroids
        shortlist, _ = train_shortlist(centroids, codes, x, aq_training_samples=aq_training_samples,
                                       hnsw_M=self.hnsw_M, ef_construction=self.ef_construction,
                                       metric="ip" if self.metric == "ip" else "l2")
        if dec is not None and dec.tables_ is None:
            dec.train(codes, x, centroids, progress=progress)
        self.shortlist_, self.pairwise_ = shortlist, dec
        return self

    def _train_codes(self, x, train_codes, progress: bool):
        """The training rows' codes (lazily unpacked), given or encoded chunk by chunk."""
        if train_codes is not None:
            rows, packed = self._code_source(train_codes, "train_codes")
            if len(rows) != len(x):
                raise InputError(f"train_codes has {len(rows)} rows but x_train has {len(x)}; pass the codes "
                                 "of exactly these training rows, in the same order")
            return PackedCodes(rows, self.layout) if packed else rows
        out = np.empty((len(x), self.layout.code_size), dtype=np.uint8)
        for lo in progress_bar(range(0, len(x), CHUNK_ROWS), desc="encode x_train", disable=not progress, leave=False):
            out[lo:lo + CHUNK_ROWS] = self.codec.encode(np.asarray(x[lo:lo + CHUNK_ROWS]), packed=True)
        return PackedCodes(out, self.layout)

    # ------------------------------------------------------------------ adding
    @accepts_tensors
    def add(self, x, ids=None, *, progress: bool = True) -> None:
        """Encode vectors ``(N, D)`` with the codec, ``CHUNK_ROWS`` at a time, and add them
        (:meth:`add_codes`). ``ids``: int64 user ids ``(N,)``, default the row numbers."""
        self._trained()
        x = self._rows(x, "x")                             # all rows checked before any is added
        ids = None if ids is None else check_ids(ids, len(x))
        for lo in progress_bar(range(0, len(x), CHUNK_ROWS), desc="add", disable=not progress, leave=False):
            packed = self.codec.encode(np.asarray(x[lo:lo + CHUNK_ROWS]), packed=True)
            self._append(packed, self.layout.unpack(packed), None if ids is None else ids[lo:lo + CHUNK_ROWS])

    @accepts_tensors
    def add_codes(self, codes, ids=None, *, progress: bool = True) -> None:
        """Add encoded vectors: :func:`qinco2.load_encoded`'s dict (its model digest checked),
        a :class:`PackedCodes`, ``codec.encode(x, packed=True)`` ``(N, code_size)`` uint8, or
        integer codes ``(N, 1+M)``. ``ids`` as in :meth:`add`. Every value is checked (a pass
        over the codes) before any row is added."""
        self._trained()
        rows, packed = self._code_source(codes, "codes")
        ids = None if ids is None else check_ids(ids, len(rows))
        for lo in range(0, len(rows), CHUNK_ROWS):
            self._code_chunk(rows, packed, lo, lo + CHUNK_ROWS, "codes")
        for lo in progress_bar(range(0, len(rows), CHUNK_ROWS), desc="add", disable=not progress, leave=False):
            block, ints = self._code_chunk(rows, packed, lo, lo + CHUNK_ROWS, "codes")
            self._append(block, ints, None if ids is None else ids[lo:lo + CHUNK_ROWS])

    def _append(self, packed_nC: np.ndarray, codes_nm: np.ndarray, ids_n: np.ndarray | None) -> None:
        n0 = self.ntotal
        add_codes(self.shortlist_, aq_tables(self.shortlist_), codes_nm, start_id=n0, progress=False)
        self._codes.append(packed_nC)
        if ids_n is not None and self._ids is None:
            self._ids = GrowingRows(np.arange(n0, dtype=np.int64))
        if self._ids is not None:
            self._ids.append(np.arange(n0, n0 + len(packed_nC)) if ids_n is None else ids_n)

    # ------------------------------------------------------------------ search
    def _queries(self, queries) -> np.ndarray:
        self._trained()
        q = check_vectors(queries, "queries", self.d, dim_owner=f"the index has d={self.d}")
        return unit_rows(q) if self.metric == "cosine" else np.ascontiguousarray(q, dtype=np.float32)

    @accepts_tensors
    def search(self, queries, k: int, params: SearchParams | None = None, *,
               batch_rows: int = 65_536, decode_precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
        """``(D, I)``, each ``(Q, k)``: the metric to the QINCo2-decoded vectors (see the module
        doc; with ``nshort=1`` nothing is decoded and ``D`` is that of the shortlist stage) and
        the user ids, -1 (and D = +-inf) where fewer results. At most ``params.nshort``
        results are found: the default params take ``nshort = max(100, k)``. ``decode_precision``:
        the arithmetic of the QINCo2 decoding (:func:`~qinco2.ivfsearch.multistage.multistage_search`)."""
        q = self._queries(queries)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be an integer >= 1, got {k!r}")
        params = SearchParams(nshort=max(100, int(k))) if params is None else params
        if not isinstance(params, SearchParams):
            raise ConfigError(f"params must be a SearchParams, got {type(params).__name__}")
        largest = self.metric != "l2"
        if self.ntotal == 0:
            return (np.full((len(q), k), -np.inf if largest else np.inf, dtype=np.float32),
                    np.full((len(q), k), -1, dtype=np.int64))
        dist, rows, _ = multistage_knn(self.shortlist_, self.codec, self.codes, q, params, pairwise=self.pairwise_,
                                       k=int(k), batch_rows=batch_rows, metric=RERANK_METRIC[self.metric],
                                       decode_precision=decode_precision)
        if self.metric == "cosine":
            dist = (1 - dist).astype(np.float32)          # 1 - cosine distance: the similarity
        return dist, self._user_ids(rows)

    def _user_ids(self, rows: np.ndarray) -> np.ndarray:
        if self._ids is None:
            return rows
        return np.where(rows >= 0, self._ids.rows[np.maximum(rows, 0)], -1)

    def _rows_of(self, ids) -> np.ndarray:
        """Rows of user ids (-2, never a result, for ids not in the index; a duplicated id: one row)."""
        ids = np.asarray(ids)
        if self._ids is None:
            return ids
        order = np.argsort(self._ids.rows, kind="stable")
        sorted_ids = self._ids.rows[order]
        pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        return np.where(sorted_ids[pos] == ids, order[pos], -2)

    def sweep(self, queries, gt, grid: dict, **kwargs) -> list[dict]:
        """:func:`qinco2.ivfsearch.multistage.sweep` of this index over ``grid`` (``nprobe``
        values clipped to ``nlist``); ``gt``: the true nearest neighbours as user ids; ``kwargs``:
        those of :func:`~qinco2.ivfsearch.multistage.sweep` (``log_path``, ``resume``, ...)."""
        q = self._queries(queries)
        if self.ntotal == 0:
            raise InputError("the index is empty: add vectors (index.add(x)) before a search sweep")
        grid = dict(grid)
        if "nprobe" in grid:
            grid["nprobe"] = [min(v, self.nlist) if isinstance(v, int) else v for v in grid["nprobe"]]
        return sweep(self.shortlist_, self.codec, self.codes, q, self._rows_of(gt), grid, pairwise=self.pairwise_,
                     metric=RERANK_METRIC[self.metric], **kwargs)

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Write the index to the folder ``path`` (see :mod:`qinco2.ivfsearch.index_files`),
        with the codec's model, so that :meth:`load` needs nothing else."""
        self._trained()
        folder = files.start_saving(path)
        self.codec.save(folder / files.MODEL)
        save_index(self.shortlist_, folder / files.SHORTLIST, model_sha=self.model_sha)
        files.write_array(folder / files.CODES, self._codes.rows)
        files.write_array(folder / files.IDS, None if self._ids is None else self._ids.rows)
        if self.pairwise_ is not None:
            self.pairwise_.save(folder / files.PAIRWISE)
        else:
            (folder / files.PAIRWISE).unlink(missing_ok=True)
        files.finish_saving(folder, {
            "metric": self.metric, "model_sha": self.model_sha, "ntotal": self.ntotal, "layout": {
                "M": self.layout.M, "K": self.layout.K, "ivf_K": self.layout.ivf_K},
            "hnsw_M": self.hnsw_M, "ef_construction": self.ef_construction,
            "has_ids": self._ids is not None, "has_pairwise": self.pairwise_ is not None})

    @classmethod
    def load(cls, path, codec: QincoCodec | None = None, *, device=None) -> IVFQincoIndex:
        """An index saved by :meth:`save`. ``codec``: the codec to search with, refused unless
        it is the model the index was built with; None: the model saved in the folder (on
        ``device``). The codes and ids are memory-mapped."""
        folder, meta = Path(path), files.read_meta(path)
        codec = QincoCodec.load(folder / files.MODEL, device=device) if codec is None else codec
        if model_sha(codec) != meta["model_sha"]:
            raise InputError(f"the index in {folder} was built with model {meta['model_sha']}, but the codec given "
                             f"is model {model_sha(codec)}; pass the codec the index was built with, or load it "
                             "without codec= to use the model saved with the index")
        index = cls(codec, meta["metric"], hnsw_M=meta.get("hnsw_M", 32),
                    ef_construction=meta.get("ef_construction", 20))
        if meta["layout"] != index.layout:
            raise InputError(f"{folder} holds codes of layout {meta['layout']}, the codec's is {index.layout}")
        n = meta["ntotal"]
        shortlist = load_index(folder / files.SHORTLIST, model_sha=meta["model_sha"], n_db=n)
        want = faiss.METRIC_INNER_PRODUCT if meta["metric"] == "ip" else faiss.METRIC_L2
        if shortlist.metric_type != want:
            raise InputError(f"{folder / files.SHORTLIST} does not have the metric of a {meta['metric']} index; "
                             f"{files.SAVE_HINT}")
        index._codes = GrowingRows(files.read_array(folder / files.CODES, (n, index.layout.code_size), np.uint8))
        if meta.get("has_ids"):
            index._ids = GrowingRows(files.read_array(folder / files.IDS, (n,), np.int64))
        if meta.get("has_pairwise"):
            index.pairwise_ = files.load_pairwise_for(folder / files.PAIRWISE, codec, index.nlist)
        index.shortlist_ = shortlist
        return index

    @classmethod
    def from_files(cls, codec: QincoCodec, index_path, encoded_db, *, pairwise_decoder=None,
                   db_rows: int | None = None) -> IVFQincoIndex:
        """An ``l2`` index over the files of the command line: the faiss index of ``task=build_index``,
        the first ``db_rows`` (default all) codes of the codes file it was built from (memory-mapped)
        and an optional pairwise decoder file, each checked to belong to ``codec``."""
        db = load_encoded(encoded_db, require_ivf=True)
        sha = model_sha(codec)
        files.check_same_model(db["model_sha"], sha, f"the codes in {encoded_db}",
                               files.ENCODE_DB_HINT.format(model="<model.pt>", path=encoded_db))
        index = cls(codec, "l2")
        db_codes = db["codes"][:db_rows]
        shortlist = load_index(index_path, model_sha=sha, n_db=len(db_codes))
        if shortlist.nlist != index.nlist or shortlist.metric_type != faiss.METRIC_L2:
            raise InputError(f"{index_path} is an index of {shortlist.nlist} lists (metric {shortlist.metric_type}) "
                             f"but the codec has ivf_K={index.nlist} (L2); {BUILD_HINT.format(path=index_path)}")
        index.shortlist_ = shortlist
        packed = db_codes.packed if isinstance(db_codes, PackedCodes) else index.layout.pack(db_codes)
        index._codes = GrowingRows(packed)
        if pairwise_decoder:
            index.pairwise_ = files.load_pairwise_for(pairwise_decoder, codec, index.shortlist_.nlist)
        return index
