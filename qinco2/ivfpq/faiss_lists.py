"""Inverted lists stored by faiss: the lists of a CPU index with one PQ codebook per sub-space.

A ``faiss.ArrayInvertedLists`` (one vector of packed codes and one of int64 ids per list) is the
only copy of the lists, so faiss's IVF-PQ scan (:mod:`.faiss_scan`) reads them where they are,
and our readers (:meth:`Index.list_codes` / :meth:`Index.list_ids`, save, ``to_faiss``, the torch
scan) read them through zero-copy numpy views of a list (``faiss.rev_swig_ptr``), copying only
what they return; extend appends with ``add_entries``.
A view is valid until the next add: nothing here hands one out (and an add must not run while
another thread searches the same index).

The interface and the allocation policy are those of :class:`~qinco2.ivfpq.lists.InvertedLists`
(sizes and capacities on the host; ``conservative=True``: every list holds exactly its
vectors; otherwise a list that overflows grows to a power-of-two capacity, so repeated adds
cost amortised O(1) per vector); a list's capacity is set by resizing its vectors up to it and
back down to the used rows (a vector keeps its capacity when it shrinks), and :meth:`_relayout`
rewrites every list into a new ``ArrayInvertedLists`` with the requested capacities (peak: the
old lists plus the new ones, as the torch storage's rewrite).
"""

from __future__ import annotations

import contextlib

import faiss
import numpy as np
import torch

from .lists import MIN_CAPACITY, ListCapacity, pow2_capacity

VECTOR_HEADER_BYTES = 96      # a faiss::MaybeOwnedVector (80 bytes) and its allocation's overhead; two per list


class FaissInvertedLists(ListCapacity):
    """Packed codes (``code_bytes`` per vector) and int64 ids of ``n_lists`` lists, held by
    ``self.invlists`` (a ``faiss.ArrayInvertedLists``); ``view``: the faiss index that scans
    them (:mod:`.faiss_scan`), dropped whenever the lists move to a new ``ArrayInvertedLists``."""

    def __init__(self, n_lists: int, code_bytes: int, conservative: bool = False):
        self.n_lists, self.code_bytes, self.conservative = n_lists, code_bytes, conservative
        self.device = torch.device("cpu")
        self.invlists = faiss.ArrayInvertedLists(n_lists, code_bytes)
        self.size = torch.zeros(n_lists, dtype=torch.int64)
        self.capacity = torch.zeros(n_lists, dtype=torch.int64)
        self.view = None

    @property
    def ntotal(self) -> int:
        return int(self.size.sum())

    def nbytes(self) -> int:
        """Bytes held: the allocated rows (codes and ids), the faiss vectors' headers and our
        bookkeeping, plus the tables of the faiss scan once built (:mod:`.faiss_scan`)."""
        rows = int(self.capacity.sum()) * (self.code_bytes + 8)
        bookkeeping = self.size.nbytes + self.capacity.nbytes + 2 * VECTOR_HEADER_BYTES * self.n_lists
        return rows + bookkeeping + (self.view.nbytes if self.view is not None else 0)

    def allocated_rows(self) -> int:
        """Rows the lists have room for (used or not)."""
        return int(self.capacity.sum())

    # ------------------------------------------------------------------ reading
    def _views(self, li: int) -> tuple[np.ndarray, np.ndarray]:
        """Zero-copy views ``(size, code_bytes)`` uint8 and ``(size,)`` int64 of list ``li``."""
        n = int(self.size[li])
        if n == 0:
            return np.zeros((0, self.code_bytes), np.uint8), np.zeros(0, np.int64)
        codes = faiss.rev_swig_ptr(self.invlists.get_codes(li), n * self.code_bytes).reshape(n, self.code_bytes)
        return codes, faiss.rev_swig_ptr(self.invlists.get_ids(li), n)

    def list_codes(self, li: int) -> torch.Tensor:
        """Packed codes ``(size, code_bytes)`` of list ``li`` (a copy)."""
        return torch.from_numpy(self._views(li)[0].copy())

    def list_ids(self, li: int) -> torch.Tensor:
        """Ids ``(size,)`` of list ``li`` (a copy)."""
        return torch.from_numpy(self._views(li)[1].copy())

    def gather(self, lists: torch.Tensor, lo: int, hi: int):
        """Packed codes, ids and list numbers of rows ``lo .. hi`` of ``lists`` read one after
        the other (copies of those rows only)."""
        codes, ids, n_in, first = [], [], [], 0
        for li, n in zip(lists.tolist(), self.size[lists].tolist()):
            a, b = max(lo - first, 0), min(hi - first, n)
            n_in.append(max(b - a, 0))
            if b > a:
                c, i = self._views(li)
                codes.append(c[a:b])
                ids.append(i[a:b])
            first += n
        if not codes:
            return (torch.zeros(0, self.code_bytes, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64),
                    torch.zeros(0, dtype=torch.int64))
        lists_n = torch.repeat_interleave(lists, torch.tensor(n_in, dtype=torch.int64))
        return torch.from_numpy(np.concatenate(codes)), torch.from_numpy(np.concatenate(ids)), lists_n

    # ------------------------------------------------------------------ adding
    def add(self, list_nos_N: torch.Tensor, packed_NB: torch.Tensor, ids_N: torch.Tensor) -> None:
        """Append vectors (their list numbers, packed codes and ids) to their lists."""
        list_nos_N = list_nos_N.cpu().to(torch.int64)
        order = torch.argsort(list_nos_N, stable=True)
        counts = torch.bincount(list_nos_N, minlength=self.n_lists)
        need = self.size + counts
        if self.conservative:
            if not torch.equal(need, self.capacity):
                self._relayout(need)
        else:
            grow = need > self.capacity
            if grow.any():
                self._relocate(grow.nonzero()[:, 0], pow2_capacity(need[grow]))
        codes = np.ascontiguousarray(packed_NB.cpu()[order].numpy(), dtype=np.uint8)
        ids = np.ascontiguousarray(ids_N.cpu()[order].numpy(), dtype=np.int64)
        first = (torch.cumsum(counts, 0) - counts).tolist()
        for li in counts.nonzero()[:, 0].tolist():          # within capacity: no reallocation
            a, n = first[li], int(counts[li])
            self.invlists.add_entries(li, n, faiss.swig_ptr(ids[a:a + n]), faiss.swig_ptr(codes[a:a + n]))
        self.size = need

    @contextlib.contextmanager
    def bulk_add(self):
        """As :meth:`InvertedLists.bulk_add`: adds inside grow lists by doubling; at the end a
        conservative index is rewritten once with every list at its exact size."""
        conservative, self.conservative = self.conservative, False
        try:
            yield self
        finally:
            self.conservative = conservative
            if conservative and not torch.equal(self.capacity, self.size):
                self._relayout(self.size.clone())

    def _relocate(self, lists: torch.Tensor, capacity: torch.Tensor) -> None:
        """Give ``lists`` a larger capacity, keeping their rows: ``capacity``, or twice their
        size if more (a vector that grows by less than its size reallocates to twice it)."""
        capacity = torch.maximum(capacity, 2 * self.size[lists])
        for li, cap in zip(lists.tolist(), capacity.tolist()):
            self.invlists.resize(li, cap)
            self.invlists.resize(li, int(self.size[li]))
        self.capacity[lists] = capacity

    def _relayout(self, capacity: torch.Tensor) -> None:
        """Move every list into a new ``ArrayInvertedLists`` with the given capacities."""
        new = faiss.ArrayInvertedLists(self.n_lists, self.code_bytes)
        for li, (cap, n) in enumerate(zip(capacity.tolist(), self.size.tolist())):
            if cap:
                new.resize(li, cap)
            if n:
                new.update_entries(li, 0, n, self.invlists.get_ids(li), self.invlists.get_codes(li))
            new.resize(li, n)
        self.invlists, self.capacity, self.view = new, capacity.clone(), None

    def shrink_to_fit(self) -> None:
        """Rewrite the lists with each capacity rounded up to ``MIN_CAPACITY`` rows."""
        self._relayout(-(-self.size // MIN_CAPACITY) * MIN_CAPACITY)

    # ------------------------------------------------------------------ files
    def state_dict(self) -> dict:
        """The used rows, list after list, with the list sizes (as :class:`InvertedLists`)."""
        codes = np.empty((self.ntotal, self.code_bytes), dtype=np.uint8)
        ids = np.empty(self.ntotal, dtype=np.int64)
        a = 0
        for li in range(self.n_lists):
            c, i = self._views(li)
            codes[a:a + len(i)], ids[a:a + len(i)] = c, i
            a += len(i)
        return {"sizes": self.size.clone(), "codes": torch.from_numpy(codes), "ids": torch.from_numpy(ids)}

    def __getstate__(self) -> dict:          # pickle / deepcopy: the used rows (faiss objects do not pickle)
        return {"n_lists": self.n_lists, "code_bytes": self.code_bytes, "conservative": self.conservative,
                "lists": self.state_dict()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["n_lists"], state["code_bytes"], state["conservative"])
        self.load_state_dict(state["lists"])

    def load_state_dict(self, state: dict) -> None:
        """Fill empty lists from :meth:`state_dict`, allocating their final capacities once."""
        sizes = state["sizes"].long()
        self._relayout(sizes if self.conservative else -(-sizes // MIN_CAPACITY) * MIN_CAPACITY)
        self.add(torch.repeat_interleave(torch.arange(self.n_lists), sizes), state["codes"], state["ids"])
