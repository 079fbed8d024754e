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


def _key(default, doc: str):
    """A key with its default and its one-line description (``qinco2 task=X help`` prints it)."""
    return field(default=default, metadata={"doc": doc})


@dataclass
class DataArgs:
    """``ds.*``: row limits of the data splits (see :class:`qinco2.datasets.DataLimits`)."""

    valset: int = _key(10_000, "validation rows, taken from the training split")
    trainset: Optional[int] = _key(None, "training rows (null = all the rest)")
    db: Optional[int] = _key(None, "database rows (null = all)")
    loop: int = _key(10_000_000, "training rows per epoch (a window moving over the training set)")


@dataclass
class CliArgs:
    """Every key the command line accepts, with its default and its description."""

    task: Optional[str] = _key(None, "the task to run (`qinco2 --help` lists them)")
    output: Optional[str] = _key(None, "the file the task writes; never one of its inputs")
    resume: bool = _key(False, "train: continue the training saved in output=; search: continue its log")
    overwrite: bool = _key(False, "train: replace an existing output= by a new model")
    model: Optional[str] = _key(None, "a trained QINCo2 model file (train: start from it; convert: "
                                      "a file of the reference QINCo release)")
    model_args: Optional[str] = _key(None, "the architecture preset, e.g. qinco2-S (null = qinco2-S)")
    L: Optional[int] = _key(None, "residual blocks per step (null = the preset's)")
    dh: Optional[int] = _key(None, "hidden dimension of the residual blocks (null = the preset's)")
    M: Optional[int] = _key(None, "codes per vector (null = the preset's)")
    K: Optional[int] = _key(None, "codebook size of each step (null = the preset's)")
    A: Optional[int] = _key(None, "encoding: candidates pre-selected per step (0 = no pre-selection)")
    B: Optional[int] = _key(None, "encoding: beam size (1 = greedy)")
    precision: str = _key("fp32", "encoding (and the re-rank's decoding in task=search with index=): arithmetic "
                                  "of the step networks: fp32, bf16 (CPU with AMX/AVX512-BF16, GPU), fp16 or tf32 "
                                  "(GPU only)")
    de: Optional[int] = _key(None, "embedding dimension (0 or null = D, no projection)")
    db: Optional[str] = _key(None, "the data set: a name (sift-photos, synthetic, ...) or a database vectors file")
    trainset: Optional[str] = _key(None, "a training vectors file (null = the data set's)")
    queries: Optional[str] = _key(None, "a query vectors file (null = the data set's)")
    queries_gt: Optional[str] = _key(None, "the queries' ground-truth neighbours file (null = the data set's)")
    ivf_centroids: Optional[str] = _key(None, "IVF centroids file, from task=ivf_centroids")
    ivf_K: Optional[int] = _key(None, "number of IVF centroids")
    niter: int = _key(100, "k-means iterations")
    encoded_trainset: Optional[str] = _key(None, "codes of the training split, from task=encode encode_trainset=true")
    encoded_db: Optional[str] = _key(None, "codes of the database, from task=encode")
    encode_trainset: bool = _key(False, "encode the training split (training then validation rows), not the database")
    shard_rows: int = _key(65_536, "rows encoded per shard of the codes file")
    index: Optional[str] = _key(None, "index file (search: from task=build_index; ivfpq_search: from ivfpq_build)")
    pairwise_decoder: Optional[str] = _key(None, "pairwise decoder file, from task=train_pairwise_decoder")
    n_pairs_per_step: float = _key(2, "pairwise decoder: code-table pairs added per step")
    nprobe: Any = _key(None, "IVF lists scanned per query; one value or a list (null = the pipeline's grid)")
    quantizer_efSearch: Any = _key(None, "HNSW breadth of the coarse quantizer; one value or a list")
    nshort: Any = _key(None, "candidates decoded with QINCo2 and re-ranked; one value or a list")
    nmid_short: Any = _key(None, "pairwise-decoder stage keeps nmid_short * nshort candidates; value or list")
    metric: Optional[str] = _key(None, "eval/search: l2 or ip (null = the data set's); ivfpq_build: "
                                       "sqeuclidean, inner_product or cosine (null = sqeuclidean)")
    # IVF-PQ keys: null = the default of qinco2.ivfpq.IndexParams / SearchParams (cuVS's)
    n_lists: Optional[int] = _key(None, "IVF lists of the index (null = cuVS's default)")
    kmeans_n_iters: Optional[int] = _key(None, "k-means iterations of the IVF lists (null = cuVS's default)")
    kmeans_trainset_fraction: Optional[float] = _key(None, "fraction of the database k-means trains on")
    pq_bits: Optional[int] = _key(None, "bits per PQ code (null = cuVS's default)")
    pq_dim: Optional[int] = _key(None, "PQ codes per vector (null = cuVS's choice)")
    codebook_kind: Optional[str] = _key(None, "subspace | cluster: one PQ codebook per subspace or per list")
    force_random_rotation: Optional[bool] = _key(None, "rotate the vectors randomly before PQ")
    conservative_memory_allocation: Optional[bool] = _key(None, "cuVS: grow the lists in small steps")
    add_data_on_build: Optional[bool] = _key(None, "add the database to the index when building it")
    max_train_points_per_pq_code: Optional[int] = _key(None, "PQ training rows per code (null = cuVS's default)")
    n_probes: Any = _key(None, "IVF lists scanned per query; one value or a list (null = cuVS's default)")
    lut_dtype: Optional[str] = _key(None, "dtype of the lookup tables (null = cuVS's default)")
    cpu_scan: Optional[str] = _key(None, "CPU scan of IVF-PQ: auto (faiss's where it can), faiss or torch")
    internal_distance_dtype: Optional[str] = _key(None, "dtype of the distances (null = cuVS's default)")
    preferred_smem_carveout: Optional[float] = _key(None, "cuVS: shared-memory carveout fraction")
    k: int = _key(10, "neighbours returned per query")
    refine: Optional[str] = _key(None, "re-rank the candidates: raw (exact vectors) or codec (model= and encoded_db=)")
    refine_ratio: float = _key(1.0, "candidates re-ranked per neighbour (needs refine=)")
    ds: DataArgs = field(default_factory=DataArgs)
    lr: float = _key(0.0008, "learning rate")
    weight_decay: float = _key(0.1, "weight decay of the optimizer (AdamW: decoupled, on every trained value)")
    batch: int = _key(1024, "training batch size")
    epochs: int = _key(60, "length of the learning-rate schedule, in epochs")
    max_epochs: Optional[int] = _key(None, "stop after this many epochs (null = epochs)")
    grad_accumulate: int = _key(1, "batches accumulated per optimizer step")
    grad_clip: Optional[float] = _key(0.1, "element-wise gradient clipping (null = none)")
    verbose: bool = _key(True, "log each stage and training epoch (false: warnings and results only)")
    progress: bool = _key(True, "progress bars: redrawn on a terminal, one line per 30 s in a redirected log")
    tensorboard: Optional[str] = _key(None, "folder of TensorBoard logs (null = none)")
    cpu: bool = _key(False, "run on the CPU even when a GPU is there")
    seed: int = _key(0, "random seed")
    max_time_s: Optional[float] = _key(None, "wall-clock budget of the training, seconds (initialisation included)")
    time_schedule: bool = _key(False, "spread warm-up and cosine schedule over max_time_s, not over epochs")
    cpu_bf16: bool = _key(False, "train in bfloat16 on the CPU (1.3-1.7x on CPUs with bfloat16 units)")
    init_refine: int = _key(0, "rounds of joint least-squares refinement of the RQ codebooks before training")
    train_noise: float = _key(0.0, "Gaussian noise added to each training row, std relative to the rows' spread "
                              "(a regulariser for small training sets)")
    neighbour_mix: float = _key(0.0, "move each training row a random share, up to this, of the way to one of its "
                                "nearest training rows (a regulariser for small training sets)")
    neighbour_k: int = _key(10, "nearest training rows neighbour_mix draws from")
    small_data: str = _key("adapt", "adapt | keep: shrink the network and mix training rows with their "
                           "neighbours (neighbour_mix) for a small training set")
    threads: Optional[int] = _key(None, "CPU threads of torch and faiss (null = their default)")
    adaptive_threads: bool = _key(True, "use fewer CPU threads while other processes keep cores busy "
                                  "(false, or QINCO2_ADAPTIVE_THREADS=0: never)")
    data_root: Optional[str] = _key(None, "folder of the named data sets (null = $QINCO2_DATA, ./data, ...)")


DEMO_OUTPUT = "qinco2-demo.pt"      # task=demo without output=
ARCH_KEYS = ("L", "dh", "M", "K", "A", "B", "de")
TRAIN_KEYS = ("lr", "weight_decay", "batch", "epochs", "max_epochs", "grad_accumulate", "grad_clip", "seed",
              "max_time_s", "time_schedule", "cpu_bf16", "init_refine", "train_noise",
              "neighbour_mix", "neighbour_k", "tensorboard")
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


def key_doc(dotted: str, cls=CliArgs) -> str:
    """The one-line description of a dotted key, from the field metadata of :class:`CliArgs`."""
    head, _, rest = dotted.partition(".")
    f = {f.name: f for f in dataclasses.fields(cls)}[head]
    return key_doc(rest, typing.get_type_hints(cls)[head]) if rest else f.metadata.get("doc", "")


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
