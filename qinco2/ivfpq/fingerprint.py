"""What an IVF-PQ index knows of the database its ids point into: its row count and a
fingerprint, so that refinement with raw vectors refuses another database.

Ids are database rows: refinement reads row ``id`` of the dataset it is given. The index
records ``rows``, the largest id plus one, and the digests of the vectors added under the
sampled ids: 0, the powers of two (about log2(N) rows, whatever the order of the adds) and
the largest id. :func:`~qinco2.ivfpq.builder.extend` updates them; checking a dataset reads
those rows only. A row's digest is the sha256 of its values as little-endian float32, so
the same data read as uint8, float16 or float32 matches.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..errors import InputError


def row_digest(row) -> str:
    """16 hex digits of the sha256 of one row's values as little-endian float32."""
    return hashlib.sha256(np.ascontiguousarray(row, dtype="<f4").tobytes()).hexdigest()[:16]


class DataFingerprint:
    """``rows`` (largest id + 1, 0 when empty), ``samples`` ``{id: digest}`` of the ids 0 and
    powers of two, ``last`` ``(id, digest)`` of the largest id."""

    def __init__(self, rows: int = 0, samples: dict | None = None, last: tuple[int, str] | None = None):
        self.rows, self.samples, self.last = rows, dict(samples or {}), last

    def update(self, vectors, ids_N: np.ndarray) -> None:
        """Record the rows ``vectors`` added under the (non-negative, int64) ``ids_N``; an id
        added twice keeps the digest of its first vector."""
        if not len(ids_N):
            return
        for i in np.flatnonzero((ids_N & (ids_N - 1)) == 0):       # 0 and the powers of two
            self.samples.setdefault(int(ids_N[i]), row_digest(vectors[i]))
        top = int(np.argmax(ids_N))
        if int(ids_N[top]) >= self.rows:
            self.rows = int(ids_N[top]) + 1
            self.last = (int(ids_N[top]), row_digest(vectors[top]))

    def expected(self) -> dict[int, str]:
        """``{id: digest}`` of every sampled id."""
        return {**self.samples, **({self.last[0]: self.last[1]} if self.last else {})}

    def digest(self) -> str:
        """16 hex digits summarising the row count and the sampled digests."""
        text = f"{self.rows};" + ";".join(f"{i}:{d}" for i, d in sorted(self.expected().items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def check(self, dataset) -> None:
        """:class:`InputError` unless ``dataset`` has ``rows`` rows whose sampled rows match."""
        n, what = len(dataset), f"the index was built from {self.rows} rows with fingerprint {self.digest()}"
        fix = "pass the database the index was built from (the same file, and the same row limit)"
        if n != self.rows:
            raise InputError(f"{what}, but the dataset given has {n} rows; {fix}")
        expected = self.expected()
        got = {i: row_digest(dataset[i]) for i in sorted(expected)}
        bad = [i for i in got if got[i] != expected[i]]
        if bad:
            other = DataFingerprint(n, {i: got[i] for i in self.samples},
                                    (self.last[0], got[self.last[0]]) if self.last else None)
            raise InputError(f"{what}, but the dataset given has {n} rows with fingerprint {other.digest()} "
                             f"(row {bad[0]} differs from the vector added under id {bad[0]}); {fix}")

    def state_dict(self) -> dict:
        last = None if self.last is None else list(self.last)
        return {"rows": self.rows, "samples": dict(self.samples), "last": last}

    @classmethod
    def from_state(cls, state) -> DataFingerprint:
        """The fingerprint of :meth:`state_dict`; ValueError when ``state`` is malformed."""
        try:
            rows, samples, last = state["rows"], state["samples"], state["last"]
            ok = (isinstance(rows, int) and rows >= 0 and isinstance(samples, dict)
                  and all(isinstance(i, int) and isinstance(d, str) for i, d in samples.items())
                  and (last is None or (isinstance(last[0], int) and isinstance(last[1], str))))
        except (TypeError, KeyError, IndexError) as exc:
            raise ValueError(f"malformed data fingerprint: {exc!r}") from exc
        if not ok:
            raise ValueError(f"malformed data fingerprint {state!r}")
        return cls(rows, samples, None if last is None else (last[0], last[1]))
