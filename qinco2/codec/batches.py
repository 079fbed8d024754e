"""Training epochs as batches: wrapping windows over the training set, or full permutations.

:func:`epoch_batches` yields one process's batches of one epoch, read from a
(possibly memory-mapped) training array block by block; :func:`epoch_length`
says how many there are.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np

from ..errors import InputError


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
    train: np.ndarray, epoch: int, loop: int, block_rows: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Blocks of ``block_rows`` consecutive rows of the epoch's wrapping window, each permuted."""
    n = len(train)
    start = (epoch * loop) % n
    for offset in range(0, loop, block_rows):
        first = (start + offset) % n
        stop = first + min(block_rows, loop - offset)
        if stop <= n:
            block = np.asarray(train[first:stop])
        else:
            block = np.concatenate([train[first:], train[: stop - n]])
        yield block[rng.permutation(len(block))]


def _permuted_blocks(
    train: np.ndarray, block_rows: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """The whole training set in one random order, gathered ``block_rows`` rows at a time."""
    order = rng.permutation(len(train))
    for i in range(0, len(order), block_rows):
        idx = order[i : i + block_rows]
        sort = np.argsort(idx)  # read the file in increasing row order
        block = np.empty((len(idx), *train.shape[1:]), dtype=train.dtype)
        block[sort] = train[idx[sort]]
        yield block


def _cut(blocks: Iterator[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Cut a stream of row blocks into consecutive batches (only the last may be short)."""
    carry: np.ndarray | None = None  # the start of a batch that spans two blocks
    for block in blocks:
        if carry is not None:
            need = batch_size - len(carry)
            carry, block = np.concatenate([carry, block[:need]]), block[need:]
            if len(carry) < batch_size:
                continue
            yield carry
            carry = None
        n_full = len(block) // batch_size * batch_size
        for i in range(0, n_full, batch_size):
            yield block[i : i + batch_size]
        if n_full < len(block):
            carry = block[n_full:]
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
) -> Iterator[np.ndarray]:
    """The training batches of one epoch for process ``rank``, in the file's dtype.

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
    """
    _check_epoch_args(loop, batch_size, block_rows, rank, world_size)
    if len(train) == 0:
        raise InputError("the training set is empty; expected at least one row")
    if full_pass or len(train) <= loop:
        blocks = _permuted_blocks(train, block_rows, rng)
    else:
        blocks = _window_blocks(train, epoch, loop, block_rows, rng)
    n_batches = epoch_length(len(train), loop, batch_size, world_size=world_size,
                             full_pass=full_pass)
    batches = itertools.islice(_cut(blocks, batch_size), n_batches * world_size)
    return (batch for i, batch in enumerate(batches) if i % world_size == rank)
