"""Helpers every task module of the command line uses: required keys, the data set and its
limits, loading a codec, the launched workers, and printing (aligned tables, the ``RESULT``
line). Imports no task module and not :mod:`qinco2.cli.main`; the library is imported lazily.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .config import ARCH_KEYS, CliArgs

log = logging.getLogger(__name__)


def require(args: CliArgs, key: str, what: str):
    """The value of ``key``; a :class:`ConfigError` naming it when it was not given."""
    value = getattr(args, key)
    if value is None:
        raise ConfigError(f"task={args.task} needs {key}=<{what}>")
    return value


def open_dataset(args: CliArgs):
    """The :class:`qinco2.datasets.Dataset` named by ``db=`` (and its split keys)."""
    from ..datasets import resolve_dataset

    return resolve_dataset(args.db, trainset=args.trainset, queries=args.queries,
                           queries_gt=args.queries_gt, data_root=args.data_root)


def data_limits(args: CliArgs):
    """The ``ds.*`` keys as a :class:`qinco2.datasets.DataLimits`."""
    from ..datasets import DataLimits

    return DataLimits(args.ds.valset, args.ds.trainset, args.ds.db, args.ds.loop)


def arch_overrides(args: CliArgs, given: set[str]) -> dict:
    """Architecture keys given on the command line; ``de``/``A``/``B`` = 0 or null disable
    the projection, the pre-selection and the beam (de = D, A = 0, B = 1)."""
    out = {k: getattr(args, k) for k in ARCH_KEYS if k in given}
    if "de" in out and not out["de"]:
        out["de"] = None
    if "A" in out and not out["A"]:
        out["A"] = 0
    if "B" in out and not out["B"]:
        out["B"] = 1
    return out


def load_codec(args: CliArgs, given: set[str], device: str):
    """The codec of ``model=``, with the beam keys ``A``/``B`` given on the command line."""
    from ..codec.codec import QincoCodec

    path = require(args, "model", "path of a trained model file")
    arch = arch_overrides(args, given)
    beam = {k: v for k, v in arch.items() if k in ("A", "B")}
    ignored = sorted(set(arch) - set(beam))
    if ignored:
        log.warning("the architecture is read from %s; ignoring %s", path, ", ".join(ignored))
    return QincoCodec.load(path, device=device, **beam)


def launched_workers(args: CliArgs):
    """The :class:`qinco2.distributed.Workers` of a launched job (one worker otherwise)."""
    from ..distributed import Workers

    return Workers.from_environment(cpu=args.cpu)[0]


def launched_rank() -> int:
    """This process's rank in a launched job; 0 when not launched."""
    return int(os.environ.get("RANK", "0"))


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def print_table(rows: list[list], header: list[str] | None = None, file=None) -> None:
    """Print rows as left-aligned columns."""
    lines = ([header] if header else []) + [[format_value(v) for v in row] for row in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    for n, line in enumerate(lines):
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip(), file=file)
        if header and n == 0:
            print("  ".join("-" * w for w in widths), file=file)


def json_safe(value):
    """``value`` with the types of strict JSON: NumPy scalars and arrays as Python numbers and
    lists, tuples as lists, paths as strings, and NaN or infinite floats as ``None``."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def print_result(result: dict) -> None:
    """The one ``RESULT {json}`` line scripts read: strict JSON (``null`` for a NaN or an
    infinity, never ``NaN``/``Infinity``, which JSON parsers other than Python's refuse)."""
    print("RESULT " + json.dumps(json_safe(result), default=str, allow_nan=False), flush=True)
