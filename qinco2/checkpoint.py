"""Self-describing model files: format tag, version, config, weights and their checksum;
atomic writes.

A model file carries ``weights_sha256``, the sha256 of its weights (each tensor's name,
dtype, shape and bytes, in name order: the digest :func:`qinco2.codec.codes_io.model_sha`
shortens); loading recomputes it, so a flipped bit in a weight is reported as a corrupt
file instead of silently changing the codes. Files written before the checksum existed
load without the check.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from .atomic import atomic_open
from .errors import InputError, ModelFileError

FORMAT_TAG = "qinco2-model"
FORMAT_VERSION = 1
WEIGHTS_SHA_KEY = "weights_sha256"


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` as a :class:`Path` if a file can be created there (its missing folders
    included), else :class:`InputError`: it is a directory, or a parent is a regular file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"cannot write the {what} to {path}: it is a directory; give the name of a "
                         "file (in that directory or elsewhere)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise InputError(f"cannot write the {what} to {path}: {parent} is a file, not a directory; "
                         "choose another path")
    return path


def atomic_torch_save(obj, path: str | os.PathLike, what: str = "output") -> None:
    """``torch.save`` to ``path`` atomically (:func:`qinco2.atomic.atomic_open`), creating
    its folder; :class:`InputError` (before writing) if ``path`` cannot be a file."""
    path = check_output_path(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        torch.save(obj, f)


def tensors_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 (hex) of named tensors in name order: each one's name, dtype, shape and bytes.
    The bytes are hashed in place (no copy of a large tensor)."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda item: item[0]):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_checkpoint(path, model_config: dict, state_dict: dict, training: dict | None = None) -> None:
    """Write a model file; ``training`` (optimizer, schedule, counters) makes it resumable."""
    payload = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "model_config": model_config,
               "state_dict": state_dict, WEIGHTS_SHA_KEY: tensors_sha256(state_dict.items())}
    if training is not None:
        payload["training"] = training
    atomic_torch_save(payload, path, "model")


def load_tagged(path, tag: str, version: int | tuple[int, ...], what: str, missing_hint: str,
                required: tuple[str, ...] = ()) -> dict:
    """Read a ``torch.save``-d dict carrying ``format == tag``, ``version`` (one of them, when a
    tuple: the newest last) and the keys ``required``; typed errors (:class:`ModelFileError`) for
    a missing, unreadable, foreign, other-version or incomplete file."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{what} file {path} is a directory, not a file; give the path of the file")
    if not path.is_file():
        raise ModelFileError(f"{what} file {path} does not exist; {missing_hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ModelFileError(f"{what} file {path} cannot be read: {exc}") from exc
    except MemoryError:
        raise
    except Exception as exc:   # torch.load raises many types on foreign or damaged bytes
        raise ModelFileError(f"{path} is not a qinco2 {what} file, or the file is corrupt (torch.load "
                             f"failed: {type(exc).__name__}: {exc}); use the file as written by qinco2, "
                             "or write it again") from exc
    if not isinstance(payload, dict) or payload.get("format") != tag:
        raise ModelFileError(f"{path} is not a qinco2 {what} file (no '{tag}' format tag); "
                             "files from other code bases must be converted first")
    versions = version if isinstance(version, tuple) else (version,)
    if payload.get("version") not in versions:
        raise ModelFileError(f"{path} has {what} format version {payload.get('version')}, this qinco2 "
                             f"reads version {' or '.join(map(str, versions))}; upgrade qinco2 or retrain")
    missing = [key for key in required if key not in payload]
    if missing:
        raise ModelFileError(f"{path} is a damaged {what} file: it lacks {missing} (it holds "
                             f"{sorted(map(str, payload))}); write it again with qinco2")
    return payload


def check_sha(path, what: str, stored, computed: str) -> None:
    """:class:`ModelFileError` if a file's stored checksum differs from the recomputed one."""
    if stored is not None and stored != computed:
        raise ModelFileError(f"{path} is corrupt: the {what} checksum stored in the file ({str(stored)[:16]}...) "
                             f"does not match its content ({computed[:16]}...); the file was damaged after "
                             "it was written (disk, copy or transfer error): copy it again or rewrite it")


def load_checkpoint(path) -> dict:
    """Read a model file written by :func:`save_checkpoint`, checking that it is ours,
    complete and (when it has a checksum) intact. ``payload["source"]`` is ``path``."""
    payload = load_tagged(path, FORMAT_TAG, FORMAT_VERSION, "model",
                          f"train one with `qinco2 task=train ... output={path}`",
                          required=("model_config", "state_dict"))
    state = payload["state_dict"]
    if not isinstance(payload["model_config"], dict) or not isinstance(state, dict):
        raise ModelFileError(f"{path} is a damaged model file: model_config and state_dict must be dicts, "
                             f"got {type(payload['model_config']).__name__} and {type(state).__name__}")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelFileError(f"{path} is a damaged model file: the weights {bad[:5]} are not named tensors")
    check_sha(path, "weights", payload.get(WEIGHTS_SHA_KEY), tensors_sha256(state.items()))
    payload["source"] = str(path)
    return payload
