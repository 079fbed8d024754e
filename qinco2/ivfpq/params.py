"""Build-time and query-time parameters of the IVF-PQ index (cuVS names and defaults)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError

METRICS = ("sqeuclidean", "inner_product", "cosine")
CODEBOOK_KINDS = ("subspace", "cluster")
LUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}
DISTANCE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
CPU_SCANS = ("auto", "faiss", "torch")


@dataclass(frozen=True)
class IndexParams:
    """Build-time parameters (names and defaults of cuVS ``ivf_pq.IndexParams``).

    ``kmeans_trainset_fraction``: the coarse k-means trains on every ``ratio``-th vector,
    ``ratio = N // max(kmeans_trainset_fraction * N, n_lists)`` (cuVS's sampling), read from
    the dataset block by block.
    """

    n_lists: int = 1024
    metric: str = "sqeuclidean"
    kmeans_n_iters: int = 20
    kmeans_trainset_fraction: float = 0.5
    pq_bits: int = 8
    pq_dim: int = 0
    codebook_kind: str = "subspace"
    force_random_rotation: bool = False
    conservative_memory_allocation: bool = False
    add_data_on_build: bool = True
    max_train_points_per_pq_code: int = 256
    seed: int = 0

    def validated(self, dim: int) -> IndexParams:
        """These parameters with ``pq_dim`` resolved for data of dimension ``dim``, or ConfigError."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)
        need(self.metric in METRICS, f"metric must be one of {METRICS}, got {self.metric!r}")
        need(self.codebook_kind in CODEBOOK_KINDS,
             f"codebook_kind must be one of {CODEBOOK_KINDS}, got {self.codebook_kind!r}")
        need(isinstance(self.pq_bits, int) and 4 <= self.pq_bits <= 8,
             f"pq_bits must be an integer from 4 to 8, got {self.pq_bits!r}")
        need(self.n_lists >= 1, f"n_lists must be >= 1, got {self.n_lists}")
        need(self.kmeans_n_iters >= 1, f"kmeans_n_iters must be >= 1, got {self.kmeans_n_iters}")
        need(0 < self.kmeans_trainset_fraction <= 1,
             f"kmeans_trainset_fraction must be in (0, 1], got {self.kmeans_trainset_fraction}")
        need(self.max_train_points_per_pq_code >= 1,
             f"max_train_points_per_pq_code must be >= 1, got {self.max_train_points_per_pq_code}")
        pq_dim = self.pq_dim or default_pq_dim(dim)
        need(1 <= pq_dim <= dim, f"pq_dim must be from 1 to the dimension {dim} (0: automatic), got {pq_dim}")
        need(pq_dim * self.pq_bits % 8 == 0,
             f"pq_dim * pq_bits must be a multiple of 8 (whole bytes per vector), got {pq_dim} * "
             f"{self.pq_bits} = {pq_dim * self.pq_bits}; change pq_dim or pq_bits")
        return dataclasses.replace(self, pq_dim=pq_dim)


@dataclass(frozen=True)
class SearchParams:
    """Query-time parameters (names and defaults of cuVS ``ivf_pq.SearchParams``).

    ``lut_dtype``: precision of the look-up tables (``uint8``: one scale and per-sub-space
    offsets per table); ``internal_distance_dtype``: precision of the summed distances.
    ``preferred_smem_carveout`` tunes the shared memory of cuVS's GPU kernels; it is accepted
    for compatibility and has no effect here (torch kernels manage their own memory).

    ``cpu_scan`` (qinco2's own): who scores the probed lists of a CPU index. ``"auto"``:
    faiss's IVF-PQ scan where it can read the lists (CPU, ``codebook_kind="subspace"``;
    :mod:`qinco2.ivfpq.faiss_scan`), the torch scan otherwise (CUDA, per-list codebooks);
    ``"faiss"``: faiss's scan or :class:`ConfigError`; ``"torch"``: the torch scan, as on
    CUDA. faiss's tables are float32 whatever ``lut_dtype`` and ``internal_distance_dtype``
    say; the torch scan honours them.
    """

    n_probes: int = 20
    lut_dtype: str = "float32"
    internal_distance_dtype: str = "float32"
    preferred_smem_carveout: float = 1.0
    cpu_scan: str = "auto"

    def validated(self) -> SearchParams:
        """``self`` with the dtypes resolved, or :class:`ConfigError` naming the setting out of range."""
        if not isinstance(self.n_probes, (int, np.integer)) or self.n_probes < 1:
            raise ConfigError(f"n_probes must be an integer >= 1, got {self.n_probes!r}")
        lut = _dtype_name(self.lut_dtype, LUT_DTYPES, "lut_dtype")
        distance = _dtype_name(self.internal_distance_dtype, DISTANCE_DTYPES, "internal_distance_dtype")
        if not 0 <= self.preferred_smem_carveout <= 1:
            raise ConfigError(f"preferred_smem_carveout must be in [0, 1], got {self.preferred_smem_carveout}")
        if self.cpu_scan not in CPU_SCANS:
            raise ConfigError(f"cpu_scan must be one of {CPU_SCANS}, got {self.cpu_scan!r}")
        return dataclasses.replace(self, lut_dtype=lut, internal_distance_dtype=distance)


def _dtype_name(dtype, allowed: dict, key: str) -> str:
    """The name (``"float16"``) of a dtype given as a name, a numpy dtype or type (``np.float16``,
    as cuVS users pass it) or a torch dtype; ConfigError when it is not one of ``allowed``."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = None
    if name not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)} (a name, a numpy or a torch dtype), got {dtype!r}")
    return name


def default_pq_dim(dim: int) -> int:
    """cuVS's choice for ``pq_dim=0``: ``dim`` below 128 else ``dim / 2``, rounded down to a
    multiple of 32, else the largest power of two <= ``dim``."""
    r = dim if dim < 128 else dim // 2
    return r // 32 * 32 or 1 << (dim.bit_length() - 1)
