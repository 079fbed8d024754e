"""Codes at their real size: the byte layout of a packed code and a lazy view of packed codes.

A code of ``n_codes`` integers (for an IVF model: the IVF id, then the ``M`` step codes) is
stored as ``code_size`` bytes, little-endian, like faiss's ``sa_encode``:

* the IVF id (IVF models only) as the smallest unsigned integer type that holds ``ivf_K - 1``
  (1, 2, 4 bytes);
* then each step code as the smallest unsigned type that holds ``K - 1`` (1 byte for
  ``K <= 256``).

So an 8-step ``K=256`` code takes 8 bytes; with an IVF id, 10 bytes for ``ivf_K <= 2**16`` and
12 bytes up to ``2**32`` lists (``ivf_K = 2**20`` included). :class:`PackedCodes` wraps a
``(N, code_size)`` uint8 array (a memory map of a codes file) and unpacks only the rows asked
for, so a search over 10^9 codes reads the candidates' bytes, never all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

_WIDTHS = (1, 2, 4)


def int_width(n_values: int) -> int:
    """Bytes of the smallest unsigned integer type holding ``0 .. n_values - 1``."""
    for w in _WIDTHS:
        if n_values <= 1 << (8 * w):
            return w
    raise InputError(f"{n_values} code values do not fit in 32 bits")


@dataclass(frozen=True)
class CodeLayout:
    """Byte layout of one packed code: ``M`` steps of ``K`` values, after an IVF id when ``ivf_K``."""

    M: int
    K: int
    ivf_K: int = 0

    @property
    def ivf_bytes(self) -> int:
        return int_width(self.ivf_K) if self.ivf_K else 0

    @property
    def step_bytes(self) -> int:
        return int_width(self.K)

    @property
    def n_codes(self) -> int:
        return self.M + (1 if self.ivf_K else 0)

    @property
    def code_size(self) -> int:
        """Bytes per vector."""
        return self.ivf_bytes + self.M * self.step_bytes

    def pack(self, codes_Nm: np.ndarray) -> np.ndarray:
        """``(N, code_size)`` uint8 of integer codes ``(N, n_codes)`` (values already checked)."""
        codes_Nm = np.asarray(codes_Nm)
        if codes_Nm.ndim != 2 or codes_Nm.shape[1] != self.n_codes:
            raise InputError(f"codes to pack must have shape (N, {self.n_codes}), got {codes_Nm.shape}")
        parts, first = [], 0
        if self.ivf_K:
            parts.append(_as_bytes(codes_Nm[:, :1], self.ivf_bytes))
            first = 1
        parts.append(_as_bytes(codes_Nm[:, first:], self.step_bytes))
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def unpack(self, packed_NC: np.ndarray) -> np.ndarray:
        """Integer codes ``(N, n_codes)`` int32 of packed codes ``(N, code_size)`` uint8."""
        packed_NC = np.asarray(packed_NC)
        if packed_NC.ndim != 2 or packed_NC.shape[1] != self.code_size or packed_NC.dtype != np.uint8:
            raise InputError(f"packed codes must be uint8 of shape (N, {self.code_size}) (code_size of "
                             f"M={self.M}, K={self.K}, ivf_K={self.ivf_K}), got {packed_NC.dtype} "
                             f"{packed_NC.shape}")
        out = np.empty((len(packed_NC), self.n_codes), dtype=np.int32)
        w = self.ivf_bytes
        if self.ivf_K:
            out[:, 0] = _from_bytes(packed_NC[:, :w], w)[:, 0]
        out[:, 1 if self.ivf_K else 0:] = _from_bytes(packed_NC[:, w:], self.step_bytes)
        return out

    def to_dict(self) -> dict:
        return {"M": self.M, "K": self.K, "ivf_K": self.ivf_K, "code_size": self.code_size,
                "ivf_bytes": self.ivf_bytes, "step_bytes": self.step_bytes}


def _as_bytes(values_NS: np.ndarray, width: int) -> np.ndarray:
    """``(N, S * width)`` uint8: each value as ``width`` little-endian bytes."""
    le = np.ascontiguousarray(values_NS, dtype=f"<u{width}")
    return le.view(np.uint8).reshape(len(le), -1)


def _from_bytes(bytes_NB: np.ndarray, width: int) -> np.ndarray:
    """``(N, B // width)`` int32 of little-endian ``width``-byte unsigned values."""
    return np.ascontiguousarray(bytes_NB).view(f"<u{width}").astype(np.int32)


class PackedCodes:
    """Integer codes ``(N, n_codes)`` backed by packed bytes ``(N, code_size)`` (often a memory map).

    Behaves like a read-only int32 array where it matters: ``len``, ``shape``, ``dtype``,
    ``ndim``; ``codes[i:j]`` is another lazy view (no bytes read), ``codes[ids]`` (an integer
    or an index array) and ``np.asarray(codes[i:j])`` unpack just those rows.
    """

    dtype = np.dtype(np.int32)
    ndim = 2

    def __init__(self, packed_NC: np.ndarray, layout: CodeLayout):
        if packed_NC.ndim != 2 or packed_NC.shape[1] != layout.code_size:
            raise InputError(f"packed codes must have shape (N, {layout.code_size}), got {packed_NC.shape}")
        self.packed, self.layout = packed_NC, layout

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.packed), self.layout.n_codes)

    def __len__(self) -> int:
        return len(self.packed)

    def __getitem__(self, key):
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if isinstance(rows, slice) and cols == slice(None):
            return PackedCodes(self.packed[rows], self.layout)
        if isinstance(rows, (int, np.integer)):
            return self.layout.unpack(self.packed[rows][None])[0][cols]
        return self.layout.unpack(self.packed[rows])[:, cols]

    def __array__(self, dtype=None, copy=None):
        out = self.layout.unpack(self.packed)
        return out if dtype is None else out.astype(dtype, copy=False)

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return np.asarray(self).astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"PackedCodes(shape={self.shape}, code_size={self.layout.code_size})"
