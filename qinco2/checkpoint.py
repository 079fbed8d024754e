"""Self-describing model files: format tag, version, config, weights; atomic writes."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from .atomic import atomic_open
from .errors import ModelFileError

FORMAT_TAG = "qinco2-model"
FORMAT_VERSION = 1


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (:func:`qinco2.atomic.atomic_open`), creating
    its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        torch.save(obj, f)


def save_checkpoint(path, model_config: dict, state_dict: dict, training: dict | None = None) -> None:
    """Write a model file; ``training`` (optimizer, schedule, counters) makes it resumable."""
    payload = {"format": FORMAT_TAG, "version": FORMAT_VERSION,
               "model_config": model_config, "state_dict": state_dict}
    if training is not None:
        payload["training"] = training
    atomic_torch_save(payload, path)


def load_tagged(path, tag: str, version: int, what: str, missing_hint: str) -> dict:
    """Read a ``torch.save``-d dict carrying ``format == tag`` and ``version``; typed errors
    (:class:`ModelFileError`) for a missing, unreadable, foreign or other-version file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{what} file {path} does not exist; {missing_hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise ModelFileError(f"{path} is not a qinco2 {what} file (torch.load failed: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != tag:
        raise ModelFileError(f"{path} is not a qinco2 {what} file (no '{tag}' format tag); "
                             "files from other code bases must be converted first")
    if payload.get("version") != version:
        raise ModelFileError(f"{path} has {what} format version {payload.get('version')}, this qinco2 "
                             f"reads version {version}; upgrade qinco2 or retrain")
    return payload


def load_checkpoint(path) -> dict:
    """Read a model file written by :func:`save_checkpoint`, checking that it is ours."""
    return load_tagged(path, FORMAT_TAG, FORMAT_VERSION, "model",
                       f"train one with `qinco2 task=train ... output={path}`")
