"""Save and load an IVF-PQ :class:`~qinco2.ivfpq.index.Index`: one ``torch.save`` file with
a format tag and version, written atomically.

The file holds the parameters, the learned tables, the inverted lists, the data fingerprint
(:mod:`.fingerprint`) and ``sha256``, a checksum of all of them: :func:`load` recomputes it
(about a second per GB of lists) and checks every table's shape and type, so a damaged file
raises :class:`~qinco2.errors.ModelFileError` naming what is wrong instead of a KeyError,
a shape error or silently wrong results. Files written before the checksum and the
fingerprint existed still load (without those checks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

from ..checkpoint import atomic_torch_save, check_sha, load_tagged, tensors_sha256
from ..errors import ConfigError, ModelFileError
from .fingerprint import DataFingerprint
from .index import Index
from .params import IndexParams

FORMAT_TAG, FORMAT_VERSION = "qinco2-ivfpq", 1
TABLES = ("centers", "rotation_matrix", "pq_centers")
LIST_KEYS = ("sizes", "codes", "ids")
WHAT = "IVF-PQ index"


def _checksum(payload: dict) -> str:
    """sha256 of the parameters, dimension, fingerprint, tables and lists of a payload."""
    meta = json.dumps({k: payload.get(k) for k in ("params", "dim", "data")}, sort_keys=True, default=str)
    named = [(k, payload[k]) for k in TABLES] + [(f"lists.{k}", payload["lists"][k]) for k in LIST_KEYS]
    return hashlib.sha256((meta + tensors_sha256(named)).encode()).hexdigest()


def save(filename, index: Index) -> None:
    """Write ``index`` to one file (format tag, version and checksum inside; atomic).
    :class:`~qinco2.errors.InputError` before writing if ``filename`` is a directory or lies
    under a regular file."""
    payload = {"format": FORMAT_TAG, "version": FORMAT_VERSION,
               "params": dataclasses.asdict(index.params), "dim": index.dim,
               "centers": index.centers.cpu(), "rotation_matrix": index.rotation_matrix.cpu(),
               "pq_centers": index.pq_centers.cpu(), "lists": index.lists.state_dict()}
    if index.fingerprint is not None:
        payload["data"] = index.fingerprint.state_dict()
    payload["sha256"] = _checksum(payload)
    atomic_torch_save(payload, filename, WHAT)


def _damaged(filename, problem: str) -> ModelFileError:
    return ModelFileError(f"{filename} is a damaged {WHAT} file: {problem}; rebuild the index "
                          "(`qinco2 task=ivfpq_build ...`) or use another copy")


def _check_types(filename, payload: dict) -> None:
    """Every entry of the right Python or torch type."""
    if not isinstance(payload["params"], dict):
        raise _damaged(filename, f"params is a {type(payload['params']).__name__}, not a dict")
    if not isinstance(payload["dim"], int) or payload["dim"] < 1:
        raise _damaged(filename, f"dim must be a positive integer, got {payload['dim']!r}")
    lists = payload["lists"]
    if not isinstance(lists, dict) or set(lists) != set(LIST_KEYS):
        raise _damaged(filename, f"lists must hold {list(LIST_KEYS)}, got "
                                 f"{sorted(lists) if isinstance(lists, dict) else type(lists).__name__}")
    for name, value in [(k, payload[k]) for k in TABLES] + [(f"lists.{k}", lists[k]) for k in LIST_KEYS]:
        if not isinstance(value, torch.Tensor):
            raise _damaged(filename, f"{name} is a {type(value).__name__}, not a tensor")


def _params(filename, payload: dict) -> IndexParams:
    try:
        return IndexParams(**payload["params"]).validated(payload["dim"])
    except TypeError as exc:
        raise _damaged(filename, f"unknown index parameters ({exc})") from exc
    except ConfigError as exc:
        raise _damaged(filename, f"invalid index parameters ({exc})") from exc


def _check_shapes(filename, payload: dict, p: IndexParams, dim: int) -> None:
    """The tables and lists of the shapes and dtypes ``p`` and ``dim`` call for."""
    rot_dim = p.pq_dim * -(-dim // p.pq_dim)
    books = p.pq_dim if p.codebook_kind == "subspace" else p.n_lists
    sizes = payload["lists"]["sizes"]
    n = int(sizes.sum()) if sizes.dim() == 1 and sizes.dtype == torch.int64 else -1
    want = {"centers": ((p.n_lists, dim), torch.float32),
            "rotation_matrix": ((rot_dim, dim), torch.float32),
            "pq_centers": ((books, 1 << p.pq_bits, rot_dim // p.pq_dim), torch.float32),
            "lists.sizes": ((p.n_lists,), torch.int64),
            "lists.codes": ((n, p.pq_dim * p.pq_bits // 8), torch.uint8),
            "lists.ids": ((n,), torch.int64)}
    got = {**{k: payload[k] for k in TABLES}, **{f"lists.{k}": v for k, v in payload["lists"].items()}}
    for name, (shape, dtype) in want.items():
        t = got[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise _damaged(filename, f"{name} has shape {tuple(t.shape)} and dtype {t.dtype}, the index "
                                     f"parameters call for {shape} and {dtype}")
    if len(sizes) and int(sizes.min()) < 0:
        raise _damaged(filename, f"a list size is negative ({int(sizes.min())})")
    ids = payload["lists"]["ids"]
    if len(ids) and int(ids.min()) < 0:
        raise _damaged(filename, f"an id is negative ({int(ids.min())})")


def _fingerprint(filename, payload: dict) -> DataFingerprint | None:
    if "data" not in payload:
        return None                          # written before the fingerprint existed
    try:
        return DataFingerprint.from_state(payload["data"])
    except ValueError as exc:
        raise _damaged(filename, str(exc)) from exc


def load(filename, *, device=None) -> Index:
    """An index written by :func:`save`, on ``device`` (default CPU); ModelFileError (naming
    the file and the problem) for a missing, foreign, damaged or corrupt file."""
    payload = load_tagged(filename, FORMAT_TAG, FORMAT_VERSION, WHAT,
                          "build one with `qinco2 task=ivfpq_build db=<vectors> output=<index file>`",
                          required=("params", "dim", *TABLES, "lists"))
    _check_types(filename, payload)
    if "sha256" in payload:
        check_sha(filename, "index", payload["sha256"], _checksum(payload))
    params = _params(filename, payload)
    _check_shapes(filename, payload, params, payload["dim"])
    fingerprint = _fingerprint(filename, payload)
    index = Index(params, payload["dim"], payload["centers"], payload["rotation_matrix"], payload["pq_centers"],
                  torch.device("cpu" if device is None else device))
    index.lists.load_state_dict(payload["lists"])
    index.fingerprint = fingerprint
    return index
