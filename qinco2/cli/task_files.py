"""The files of each task, checked by :func:`check_task_files` before the task starts: every
file the task will write can be created (not a folder, not under a regular file, a folder that
accepts files), none of them is one of the task's inputs, and ``task=train`` replaces an
existing model only with ``resume=true`` (continue it) or ``overwrite=true`` (start over).

Nothing is read or computed before these checks, so a bad ``output=`` fails at once instead of
after an epoch of training or a k-means. Imports only :mod:`qinco2.cli.common` and the config.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError, QincoError
from .common import open_dataset
from .config import DEMO_OUTPUT, CliArgs

DATA_KEYS = ("db", "trainset", "queries", "queries_gt")

# The keys naming files each task reads (data-set names are resolved to their files).
TASK_INPUTS = {
    "train": ("model", "ivf_centroids", *DATA_KEYS),
    "demo": (),
    "ivf_centroids": DATA_KEYS,
    "encode": ("model", *DATA_KEYS),
    "convert": ("model",),
    "train_pairwise_decoder": ("ivf_centroids", "encoded_trainset", *DATA_KEYS),
    "build_index": ("ivf_centroids", "encoded_trainset", "encoded_db", *DATA_KEYS),
    "search": ("model", "index", "encoded_db", "pairwise_decoder", *DATA_KEYS),
    "ivfpq_build": DATA_KEYS,
    "ivfpq_search": ("index", "model", "encoded_db", *DATA_KEYS),
}
SIDECAR_KEYS = ("encoded_trainset", "encoded_db", "index")  # read with their <path>.json
OUTPUT = "the output file (output=)"


def task_outputs(args: CliArgs) -> list[tuple[str, Path]]:
    """``(description, path)`` of every file the task writes; ``[]`` when it writes none."""
    task, output = args.task, args.output
    if task == "demo":
        return [(OUTPUT, Path(output or DEMO_OUTPUT))]
    if output is None or task not in TASK_INPUTS or (task == "search" and args.index is None):
        return []               # a missing output= is reported by the task; exhaustive search writes none
    path = Path(output)
    files = [(OUTPUT, path)]
    if task in ("encode", "build_index"):
        files.append(("the sidecar of output=", Path(f"{output}.json")))
    if task == "search":
        files.append(("the Pareto plot of output=", path.with_suffix(".png")))
    return files


def task_inputs(args: CliArgs) -> list[tuple[str, Path]]:
    """``(key, path)`` of every file the task reads, as far as it is known before it starts."""
    files = []
    for key in TASK_INPUTS.get(args.task, ()):
        value = getattr(args, key)
        if value is None or (key == "db" and _is_dataset_name(value)):
            continue
        files.append((f"{key}=", Path(value)))
        if key in SIDECAR_KEYS:
            files.append((f"the sidecar of {key}=", Path(f"{value}.json")))
    if "db" in TASK_INPUTS.get(args.task, ()) and args.db is not None and _is_dataset_name(args.db):
        files += _named_dataset_files(args)
    return files


def _is_dataset_name(db: str) -> bool:
    from ..datasets import DATASETS, SYNTHETIC

    return str(db) in DATASETS or str(db) == SYNTHETIC


def _named_dataset_files(args: CliArgs) -> list[tuple[str, Path]]:
    """The files of the named data set ``db=``; none when it cannot be opened (the task says why)."""
    from ..datasets import SYNTHETIC

    if str(args.db) == SYNTHETIC:
        return []               # generated in a cache folder of its own
    try:
        ds = open_dataset(args)
    except QincoError:
        return []
    return [(f"a file of db={args.db}", Path(p)) for p in (ds.trainset, ds.db, ds.queries, ds.groundtruth)
            if p is not None]


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: :func:`os.path.samefile` when both exist (links, other
    spellings), else the same resolved path."""
    a, b = a.expanduser(), b.expanduser()
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_task_files(args: CliArgs) -> None:
    """Refuse, before any work, outputs that are inputs, outputs that cannot be written, and
    a ``task=train`` over an existing file without ``resume=true`` or ``overwrite=true``."""
    from ..atomic import check_writable

    outputs = task_outputs(args)
    inputs = task_inputs(args)
    for what, out in outputs:
        for key, path in inputs:
            if same_file(out, path):
                raise ConfigError(
                    f"{what} {out} is {key} ({path}), a file task={args.task} reads: writing it "
                    "would destroy that input; choose another output= path")
    for what, out in outputs:
        check_writable(out, what)
    if args.task == "train":
        _check_train_output(args)


def _check_train_output(args: CliArgs) -> None:
    if args.resume and args.overwrite:
        raise ConfigError("resume=true continues the training saved in output=, overwrite=true "
                          "replaces it by a new one: give only one of them")
    if args.output is not None and Path(args.output).exists() and not (args.resume or args.overwrite):
        raise ConfigError(
            f"output={args.output} already exists: task=train would replace it by a new model after "
            "its first epoch. Add resume=true to continue its training, overwrite=true to start a "
            "new model in its place, or choose another output= path")
