"""Reading the rows of training: epoch batches and the validation MSE.

:func:`epoch_batches` yields one process's batches of one epoch (wrapping windows over the
training set, or full permutations), read from a (possibly memory-mapped) training array
block by block; :func:`epoch_length` says how many there are; :func:`validation_mse` reads
the validation rows batch by batch. The rows are checked for NaN/Inf as they are read
(:func:`check_rows_finite`), never by a scan of the whole file upfront: the error names the
array, its row and, for a memory map, the file and the row there.
"""

from __future__ import annotations

import itertools
import math
import mmap
from typing import Iterator

import numpy as np
import torch

from ..distributed import Workers
from ..errors import InputError
from ..validation import first_nonfinite
from .encode import encode
from .model import QincoModel

TRAIN_FIX = "pass at least one training vector"
VAL_FIX = "pass at least one validation vector (from the command line: ds.valset >= 1)"


def row_source(x) -> tuple[str, int | None] | None:
    """``(file, row of the file that is row 0 of x)`` for a memory-mapped array (a slice of
    an ``np.memmap``, as :func:`qinco2.formats.open_vectors` gives), the row None when it
    cannot be told; None for arrays in memory."""
    filename = getattr(x, "filename", None)
    if filename is None:
        return None
    try:                                     # byte distance from the start of the mapped data
        base = np.frombuffer(x._mmap, dtype=np.uint8).ctypes.data
        start = base + x.offset % mmap.ALLOCATIONGRANULARITY
        row, _ = divmod(x.ctypes.data - start, x.strides[0])
        return str(filename), (int(row) if x.strides[0] > 0 and row >= 0 else None)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return str(filename), None


def describe(what: str, source: tuple[str, int | None] | None) -> str:
    """``what``, with its file when it is read from one."""
    return what if source is None else f"{what} (file {source[0]})"


def nonfinite_error(what: str, row: int, source: tuple[str, int | None] | None) -> InputError:
    """The error for NaN/Inf in row ``row`` of the array ``what`` (read from ``source``)."""
    where = ""
    if source is not None:
        where = f" (file {source[0]})" if source[1] is None else f" (row {source[1] + row} of file {source[0]})"
    return InputError(f"{what} holds NaN or Inf values in row {row}{where}; clean or drop those rows first")


def require_rows(x, what: str, fix: str) -> None:
    """:class:`InputError` when ``x`` has no rows (``fix``: how to give it some)."""
    if len(x) == 0:
        raise InputError(f"{describe(what, row_source(x))} has no rows; {fix}")


def check_rows_finite(x_nD: np.ndarray, what: str, source=None, *, first_row: int = 0,
                      row_ids=None) -> None:
    """:class:`InputError` (:func:`nonfinite_error`) when ``x_nD``, the rows ``first_row..``
    (or ``row_ids``) of the array ``what``, holds NaN or Inf."""
    bad = first_nonfinite(x_nD)
    if bad is not None:
        row = int(row_ids[bad]) if row_ids is not None else first_row + bad
        raise nonfinite_error(what, row, source)


def _check_epoch_args(
    loop: int, batch_size: int, block_rows: int, rank: int, world_size: int
) -> None:
    if min(loop, batch_size, block_rows, world_size) < 1:
        raise InputError(
            f"loop={loop}, batch_size={batch_size}, block_rows={block_rows} and "
            f"world_size={world_size} must all be >= 1"
        )
    if not 0 <= rank < world_size:
        raise InputError(f"rank={rank}: expected 0 <= rank < world_size={world_size}")


def epoch_length(
    n_train: int, loop: int, batch_size: int, *, world_size: int = 1, full_pass: bool = False
) -> int:
    """Number of batches one process gets from :func:`epoch_batches` per epoch."""
    rows = n_train if (full_pass or n_train <= loop) else loop
    n_batches = -(-rows // batch_size)  # the last batch may be short
    return n_batches // world_size if world_size > 1 else n_batches


def _window_blocks(
    train: np.ndarray, epoch: int, loop: int, block_rows: int, rng: np.random.Generator, check
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks of ``block_rows`` consecutive rows of the epoch's wrapping window, each permuted,
    with their row numbers: ``(rows, ids)``; ``check(rows, first_row=...)`` is called on the rows
    as they are read."""
    n = len(train)
    start = (epoch * loop) % n
    for offset in range(0, loop, block_rows):
        first = (start + offset) % n
        stop = first + min(block_rows, loop - offset)
        spans = [(first, stop)] if stop <= n else [(first, n), (0, stop - n)]
        parts = [np.asarray(train[a:b]) for a, b in spans]
        for (a, _), part in zip(spans, parts):
            check(part, first_row=a)
        block = parts[0] if len(parts) == 1 else np.concatenate(parts)
        ids = np.concatenate([np.arange(a, b) for a, b in spans])
        shuffle = rng.permutation(len(block))
        yield block[shuffle], ids[shuffle]


def _permuted_blocks(
    train: np.ndarray, block_rows: int, rng: np.random.Generator, check
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The whole training set in one random order, gathered ``block_rows`` rows at a time, with
    their row numbers: ``(rows, ids)``; ``check(rows, row_ids=...)`` is called on the rows as they
    are read."""
    order = rng.permutation(len(train))
    for i in range(0, len(order), block_rows):
        idx = order[i : i + block_rows]
        yield gather_rows(train, idx, check), idx


def gather_rows(train: np.ndarray, ids: np.ndarray, check=None) -> np.ndarray:
    """Rows ``ids`` of ``train``, in that order and ``train``'s dtype, read in increasing row order
    (a memory map is read forwards); ``check(rows, row_ids=...)``, if given, is called on the rows
    as they are read."""
    sort = np.argsort(ids)
    rows = np.asarray(train[ids[sort]])
    if check is not None:
        check(rows, row_ids=ids[sort])
    out = np.empty((len(ids), *train.shape[1:]), dtype=train.dtype)
    out[sort] = rows
    return out


def _cut(blocks: Iterator[tuple[np.ndarray, np.ndarray]], batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Cut a stream of ``(rows, ids)`` blocks into consecutive batches (only the last may be short)."""
    carry: tuple | None = None  # the start of a batch that spans two blocks
    for block in blocks:
        if carry is not None:
            need = batch_size - len(carry[0])
            carry = tuple(np.concatenate([c, b[:need]]) for c, b in zip(carry, block))
            block = tuple(b[need:] for b in block)
            if len(carry[0]) < batch_size:
                continue
            yield carry
            carry = None
        n_full = len(block[0]) // batch_size * batch_size
        for i in range(0, n_full, batch_size):
            yield tuple(b[i : i + batch_size] for b in block)
        if n_full < len(block[0]):
            carry = tuple(b[n_full:] for b in block)
    if carry is not None:
        yield carry


def epoch_batches(
    train: np.ndarray,
    epoch: int,
    *,
    loop: int,
    batch_size: int,
    block_rows: int = 2_000_000,
    rng: np.random.Generator,
    rank: int = 0,
    world_size: int = 1,
    full_pass: bool = False,
    what: str = "x_train",
    with_ids: bool = False,
) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, np.ndarray]]:
    """The training batches of one epoch for process ``rank``, in the file's dtype; with
    ``with_ids``, ``(rows, ids)`` pairs, ``ids`` the rows' numbers in ``train`` (the same
    batches in the same order).

    If the training set has more than ``loop`` rows (and not ``full_pass``),
    epoch ``e`` covers rows ``(e * loop + j) mod n_train`` for ``j < loop``: a
    wrapping window, so successive epochs walk through the file. The window is
    read in blocks of ``block_rows`` consecutive rows and each block is shuffled
    by ``rng`` when loaded (no shuffling across blocks). Otherwise the epoch is
    one random permutation of the whole training set.

    The epoch's rows are cut, in that order, into batches of ``batch_size``;
    the last batch may be shorter (at least one row) and is kept. Batch ``i``
    goes to process ``i % world_size``; with several processes only the first
    ``world_size * (n_batches // world_size)`` batches are used, so that every
    process takes the same number of steps (:func:`epoch_length`). All
    processes must pass identically seeded generators. The batches are fresh
    arrays, never views of the file.

    Every row read is checked for NaN/Inf (an :class:`InputError` naming ``what``, the row
    of ``train`` and, for a memory map, the file and its row), so a bad row stops the epoch
    that reads it; all processes read the same rows and stop at the same step.
    """
    _check_epoch_args(loop, batch_size, block_rows, rank, world_size)
    if len(train) == 0:
        raise InputError("the training set is empty; expected at least one row")
    source = row_source(train)

    def check(rows, **where):
        check_rows_finite(rows, what, source, **where)

    if full_pass or len(train) <= loop:
        blocks = _permuted_blocks(train, block_rows, rng, check)
    else:
        blocks = _window_blocks(train, epoch, loop, block_rows, rng, check)
    n_batches = epoch_length(len(train), loop, batch_size, world_size=world_size,
                             full_pass=full_pass)
    batches = iter(itertools.islice(_cut(blocks, batch_size), n_batches * world_size))
    # each process takes whole rounds of world_size batches, so that all of them have read the
    # same rows (and meet a bad row in the same round) before the collectives of a step
    rounds = iter(lambda: list(itertools.islice(batches, world_size)), [])
    return (batches_W[rank] if with_ids else batches_W[rank][0] for batches_W in rounds)


@torch.no_grad()
def validation_mse(model: QincoModel, x_val: np.ndarray, *, A: int, B: int, mse_scale: float,
                   batch: int = 4096, workers: Workers = Workers()) -> float:
    """Raw-space MSE (sum over dims, mean over vectors) times ``mse_scale``; with several
    processes each takes a contiguous share of the rows and the sums are reduced.

    The rows are checked for NaN/Inf as they are read (after the cast to float32): an
    :class:`InputError` names the row of ``x_val`` (the first bad row any process met, so
    all of them raise the same error); an empty ``x_val`` is refused."""
    require_rows(x_val, "x_val", VAL_FIX)
    device = model.mean.device
    share = -(-len(x_val) // workers.world_size)
    lo, hi = workers.rank * share, min(len(x_val), (workers.rank + 1) * share)
    total, n, bad = 0.0, 0, math.inf
    for i in range(lo, hi, batch):
        with np.errstate(over="ignore"):                  # overflow gives Inf, caught below
            x_nD = np.array(x_val[i:min(i + batch, hi)], dtype=np.float32)
        row = first_nonfinite(x_nD)
        if row is not None:
            bad = i + row
            break
        x = torch.from_numpy(x_nD).to(device)
        _, xhat = encode(model, model.normalize(x), A=A, B=B)
        total += ((model.denormalize(xhat) - x) ** 2).sum(dtype=torch.float64).item()
        n += len(x)
    first_bad = -float(workers.all_reduce_(torch.tensor([-bad], dtype=torch.float64, device=device), "max")[0])
    if math.isfinite(first_bad):
        raise nonfinite_error("x_val", int(first_bad), row_source(x_val))
    sums = workers.all_reduce_(torch.tensor([total, n], dtype=torch.float64, device=device))
    return float(sums[0] / max(float(sums[1]), 1.0)) * mse_scale
