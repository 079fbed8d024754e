"""Inverted lists: packed codes and int64 ids of each IVF list, in one buffer on a device.

The storage of indexes on CUDA and of indexes with per-list codebooks; a CPU index with
subspace codebooks keeps its lists in faiss instead (:mod:`.faiss_lists`, same interface).

List ``li`` occupies rows ``start[li] .. start[li] + capacity[li]`` of the buffers, of which the
first ``size[li]`` are used. With ``conservative=True`` every list holds exactly its vectors
(each :meth:`InvertedLists.add` rewrites the buffers); otherwise a list that overflows moves
to the end of the buffer with a power-of-two capacity, the buffer grows by doubling and is
compacted when more than half of it is holes, so repeated small adds cost amortised O(1) per
vector; :meth:`InvertedLists.shrink_to_fit` compacts them after a bulk load. Codes are stored
packed by :func:`qinco2.packing.pack_codes`.
"""

from __future__ import annotations

import contextlib

import torch

MIN_CAPACITY = 32


# ---------------------------------------------------------------------------- lists
def _used_rows(start_L: torch.Tensor, size_L: torch.Tensor) -> torch.Tensor:
    """Row numbers of every used row, list after list."""
    first_L = torch.cumsum(size_L, 0) - size_L
    return (torch.repeat_interleave(start_L - first_L, size_L)
            + torch.arange(int(size_L.sum()), dtype=torch.int64))


def pow2_capacity(n: torch.Tensor) -> torch.Tensor:
    """Power-of-two capacities >= ``n`` (at least ``MIN_CAPACITY``)."""
    n = n.clamp_min(MIN_CAPACITY).double()
    return (2 ** torch.ceil(torch.log2(n))).long()


class ListCapacity:
    """What both list storages (:class:`InvertedLists`, the CPU's faiss lists) share: sizing in
    one rewrite. Subclasses hold ``size`` and ``capacity`` (int64 per list), ``conservative``,
    and ``_relayout(capacity)``."""

    def reserve(self, counts_L: torch.Tensor) -> None:
        """Room for ``counts_L`` more vectors in each list, made in one rewrite: exact sizes for
        a conservative index, power-of-two capacities otherwise; the adds that follow then move
        nothing. Peak memory: the old buffers plus the new ones (for an empty index: the final
        index alone, instead of up to 4x with growth by doubling)."""
        need = self.size + counts_L.to(torch.int64).cpu()
        if bool((need <= self.capacity).all()):
            return
        capacity = need if self.conservative else torch.where(need > self.capacity, pow2_capacity(need), self.capacity)
        self._relayout(capacity)


class InvertedLists(ListCapacity):
    """Packed codes ``(rows, code_bytes)`` uint8 and ids ``(rows,)`` int64 of ``n_lists`` lists."""

    def __init__(self, n_lists: int, code_bytes: int, device, conservative: bool = False):
        self.n_lists, self.code_bytes, self.conservative = n_lists, code_bytes, conservative
        self.device = torch.device(device)
        self.codes = torch.empty(0, code_bytes, dtype=torch.uint8, device=self.device)
        self.ids = torch.empty(0, dtype=torch.int64, device=self.device)
        self.start = torch.zeros(n_lists, dtype=torch.int64)       # bookkeeping on the host
        self.size = torch.zeros(n_lists, dtype=torch.int64)
        self.capacity = torch.zeros(n_lists, dtype=torch.int64)
        self.end = 0                                                # first row never allocated

    @property
    def ntotal(self) -> int:
        return int(self.size.sum())

    def nbytes(self) -> int:
        """Bytes held: the code and id buffers plus the list bookkeeping."""
        return (self.codes.nbytes + self.ids.nbytes + self.start.nbytes + self.size.nbytes
                + self.capacity.nbytes)

    def allocated_rows(self) -> int:
        """Rows of the buffers (used, reserved for a list, or holes)."""
        return len(self.ids)

    def list_rows(self, li: int) -> slice:
        return slice(int(self.start[li]), int(self.start[li] + self.size[li]))

    def list_codes(self, li: int) -> torch.Tensor:
        """Packed codes ``(size, code_bytes)`` of list ``li`` (a view of the buffer)."""
        return self.codes[self.list_rows(li)]

    def list_ids(self, li: int) -> torch.Tensor:
        """Ids ``(size,)`` of list ``li`` (a view of the buffer)."""
        return self.ids[self.list_rows(li)]

    def gather(self, lists: torch.Tensor, lo: int, hi: int):
        """Packed codes, ids and list numbers (on the device) of rows ``lo .. hi`` of ``lists``
        read one after the other."""
        size = self.size[lists]
        first = torch.cumsum(size, 0) - size
        n_in = (torch.clamp(first + size, max=hi) - torch.clamp(first, min=lo)).clamp_min(0)
        rows = (torch.repeat_interleave(self.start[lists] - first, n_in) + torch.arange(lo, hi)).to(self.device)
        return self.codes[rows], self.ids[rows], torch.repeat_interleave(lists, n_in).to(self.device)

    def add(self, list_nos_N: torch.Tensor, packed_NB: torch.Tensor, ids_N: torch.Tensor) -> None:
        """Append vectors (their list numbers, packed codes and ids) to their lists."""
        list_nos_N = list_nos_N.to(self.device, torch.int64)
        order = torch.argsort(list_nos_N, stable=True)
        counts = torch.bincount(list_nos_N, minlength=self.n_lists).cpu()
        need = self.size + counts
        if self.conservative:
            self._relayout(need)
        else:
            grow = need > self.capacity
            if grow.any():
                self._relocate(grow.nonzero()[:, 0], pow2_capacity(need[grow]))
        sorted_lists = list_nos_N[order]
        first = torch.cumsum(counts, 0) - counts                         # first sorted row per list
        base = (self.start + self.size - first).to(self.device)
        rows = base[sorted_lists] + torch.arange(len(order), device=self.device)
        self.codes[rows] = packed_NB.to(self.device)[order]
        self.ids[rows] = ids_N.to(self.device, torch.int64)[order]
        self.size = need

    @contextlib.contextmanager
    def bulk_add(self):
        """Adds inside grow lists by doubling (amortised O(1) per vector, also for a
        conservative index); at the end a conservative index is rewritten once with every
        list at its exact size, instead of once per added chunk (O(N^2) for a large load)."""
        conservative, self.conservative = self.conservative, False
        try:
            yield self
        finally:
            self.conservative = conservative
            if conservative and not (torch.equal(self.capacity, self.size) and self.end == self.ntotal):
                self._relayout(self.size.clone())

    def _relocate(self, lists: torch.Tensor, capacity: torch.Tensor) -> None:
        """Move ``lists`` to new regions of ``capacity`` rows at the end of the buffers."""
        total = int(capacity.sum())
        new_capacity = self.capacity.clone()
        new_capacity[lists] = capacity
        if self.end + total > 2 * int(new_capacity.sum()):            # over half holes: compact
            self._relayout(new_capacity)
            return
        self._reserve(self.end + total)
        new_start = self.end + torch.cumsum(capacity, 0) - capacity
        for li, s in zip(lists.tolist(), new_start.tolist()):
            a, n = int(self.start[li]), int(self.size[li])
            self.codes[s:s + n] = self.codes[a:a + n]
            self.ids[s:s + n] = self.ids[a:a + n]
        self.start[lists] = new_start
        self.capacity[lists] = capacity
        self.end += total

    def _reserve(self, rows: int) -> None:
        if rows <= len(self.ids):
            return
        rows = rows if self.conservative else max(rows, 2 * len(self.ids))
        codes = torch.empty(rows, self.code_bytes, dtype=torch.uint8, device=self.device)
        ids = torch.full((rows,), -1, dtype=torch.int64, device=self.device)
        codes[:self.end], ids[:self.end] = self.codes[:self.end], self.ids[:self.end]
        self.codes, self.ids = codes, ids

    def _relayout(self, capacity: torch.Tensor) -> None:
        """Rewrite the buffers with lists back to back, of the given capacities."""
        total = int(capacity.sum())
        start = torch.cumsum(capacity, 0) - capacity
        src = _used_rows(self.start, self.size).to(self.device)
        dst = _used_rows(start, self.size).to(self.device)
        codes = torch.empty(total, self.code_bytes, dtype=torch.uint8, device=self.device)
        ids = torch.full((total,), -1, dtype=torch.int64, device=self.device)
        codes[dst], ids[dst] = self.codes[src], self.ids[src]
        self.codes, self.ids = codes, ids
        self.start, self.capacity, self.end = start, capacity.clone(), total

    def shrink_to_fit(self) -> None:
        """Rewrite the buffers with each list's capacity rounded up to ``MIN_CAPACITY`` rows
        (after a bulk load: an index filled once stays compact)."""
        self._relayout(-(-self.size // MIN_CAPACITY) * MIN_CAPACITY)

    def state_dict(self) -> dict:
        """The used rows only, list after list, with the list sizes."""
        rows = _used_rows(self.start, self.size).to(self.device)
        return {"sizes": self.size.clone(), "codes": self.codes[rows].cpu(), "ids": self.ids[rows].cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Fill empty lists from :meth:`state_dict`, allocating their final capacities once."""
        sizes = state["sizes"].long()
        self._relayout(sizes if self.conservative else -(-sizes // MIN_CAPACITY) * MIN_CAPACITY)
        self.add(torch.repeat_interleave(torch.arange(self.n_lists), sizes), state["codes"], state["ids"])
