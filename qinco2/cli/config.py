"""The keys of the command line: the :class:`CliArgs` dataclass and :func:`parse_args`.

Arguments are ``key=value`` pairs (dotted keys for the data limits, ``ds.valset=10_000``);
values are read as YAML scalars, so ``100_000``, ``8e-4``, ``true``/``false`` and ``null``
work; the search grid keys also take lists (``nprobe=[1,4,16]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import ConfigError


@dataclass
class DataArgs:
    """``ds.*``: row limits of the data splits (see :class:`qinco2.datasets.DataLimits`)."""

    valset: int = 10_000
    trainset: Optional[int] = None
    db: Optional[int] = None
    loop: int = 10_000_000


@dataclass
class CliArgs:
    """Every key the command line accepts, with its default."""

    task: Optional[str] = None
    output: Optional[str] = None       # the file a task writes; never one of its inputs
    # task=train refuses an existing output= unless resume=true (continue its training) or
    # overwrite=true (train a new model in its place); task=search resume=true continues a log
    resume: bool = False
    overwrite: bool = False
    model: Optional[str] = None
    model_args: Optional[str] = None
    L: Optional[int] = None
    dh: Optional[int] = None
    M: Optional[int] = None
    K: Optional[int] = None
    A: Optional[int] = None
    B: Optional[int] = None
    de: Optional[int] = None
    db: Optional[str] = None
    trainset: Optional[str] = None
    queries: Optional[str] = None
    queries_gt: Optional[str] = None
    ivf_centroids: Optional[str] = None
    ivf_K: Optional[int] = None
    niter: int = 100                   # task=ivf_centroids: k-means iterations
    encoded_trainset: Optional[str] = None
    encoded_db: Optional[str] = None
    encode_trainset: bool = False
    shard_rows: int = 65_536
    index: Optional[str] = None
    pairwise_decoder: Optional[str] = None
    n_pairs_per_step: float = 2
    nprobe: Any = None
    quantizer_efSearch: Any = None
    nshort: Any = None
    nmid_short: Any = None
    # metric: eval/search rank decoded vectors by l2 or ip (null = the data set's metric);
    # task=ivfpq_* take the cuVS names sqeuclidean, inner_product, cosine (null = sqeuclidean)
    metric: Optional[str] = None
    # IVF-PQ keys: null = the default of qinco2.ivfpq.IndexParams / SearchParams (cuVS's)
    n_lists: Optional[int] = None
    kmeans_n_iters: Optional[int] = None
    kmeans_trainset_fraction: Optional[float] = None
    pq_bits: Optional[int] = None
    pq_dim: Optional[int] = None
    codebook_kind: Optional[str] = None
    force_random_rotation: Optional[bool] = None
    conservative_memory_allocation: Optional[bool] = None
    add_data_on_build: Optional[bool] = None
    max_train_points_per_pq_code: Optional[int] = None
    n_probes: Any = None
    lut_dtype: Optional[str] = None
    internal_distance_dtype: Optional[str] = None
    preferred_smem_carveout: Optional[float] = None
    k: int = 10
    refine: Optional[str] = None
    refine_ratio: float = 1.0
    ds: DataArgs = field(default_factory=DataArgs)
    lr: float = 0.0008
    batch: int = 1024
    epochs: int = 60
    max_epochs: Optional[int] = None
    grad_accumulate: int = 1
    grad_clip: Optional[float] = 0.1
    verbose: bool = True
    tensorboard: Optional[str] = None
    cpu: bool = False
    seed: int = 0
    max_time_s: Optional[float] = None
    time_schedule: bool = False
    small_data: str = "adapt"          # adapt | keep: shrink the network for a small training set
    threads: Optional[int] = None
    data_root: Optional[str] = None


DEMO_OUTPUT = "qinco2-demo.pt"      # task=demo without output=
ARCH_KEYS = ("L", "dh", "M", "K", "A", "B", "de")
TRAIN_KEYS = ("lr", "batch", "epochs", "max_epochs", "grad_accumulate", "grad_clip", "seed",
              "max_time_s", "time_schedule", "tensorboard")
GRID_KEYS = ("nprobe", "quantizer_efSearch", "nshort", "nmid_short")  # one value or a list


def leaf_keys(cls=CliArgs, prefix: str = "") -> list[str]:
    """Dotted names of every leaf key: ``task``, ..., ``ds.valset``, ..."""
    keys = []
    for name, kind in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(kind):
            keys += leaf_keys(kind, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def default_value(args: CliArgs, dotted: str):
    """The value of a dotted key as the command line writes it (``true``, ``null``, ...)."""
    value = args
    for part in dotted.split("."):
        value = getattr(value, part)
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else value


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_args(argv: list[str]) -> tuple[CliArgs, set[str]]:
    """The parsed arguments and the set of keys given explicitly on the command line."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    valid = leaf_keys()
    given = set()
    for arg in argv:
        key, eq, _ = arg.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"cannot read argument {arg!r}: expected key=value, e.g. task=train")
        if key not in valid:
            raise ConfigError(f"unknown argument {key!r}{did_you_mean(key, valid)} "
                              f"(valid keys: {', '.join(valid)})")
        given.add(key)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(CliArgs), OmegaConf.from_dotlist(argv))
        return OmegaConf.to_object(merged), given
    except OmegaConfBaseException as exc:
        where = getattr(exc, "full_key", None) or "an argument"
        raise ConfigError(f"bad value for {where}: {str(exc).splitlines()[0]}") from None
