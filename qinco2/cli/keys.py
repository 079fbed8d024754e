"""Which keys each task reads, the check that refuses the others, and the help texts.

``TASK_KEYS`` is derived from the task functions (and the helpers they call: ``open_dataset``
and ``data_limits`` read the data keys, ``load_codec`` the codec keys); ``tests/test_cli_help.py``
checks it against the ``args.<key>`` the task functions read. The descriptions and defaults
come from :class:`qinco2.cli.config.CliArgs`.
"""

from __future__ import annotations

from ..errors import ConfigError
from .common import format_value
from .config import ARCH_KEYS, GRID_KEYS, TRAIN_KEYS, CliArgs, default_value, key_doc

# read by the CLI's setup for every task
COMMON_KEYS = ("task", "verbose", "progress", "cpu", "threads", "adaptive_threads")
DATA_KEYS = ("db", "trainset", "queries", "queries_gt", "data_root")   # open_dataset
TRAIN_SPLIT = ("ds.valset", "ds.trainset")      # Dataset.train_val
DB_SPLIT = ("ds.db",)                           # Dataset.database, db_rows=
CODEC_KEYS = ("model", *ARCH_KEYS)  # load_codec: A and B set the beam, the others are warned about
IVFPQ_INDEX_KEYS = ("n_lists", "metric", "kmeans_n_iters", "kmeans_trainset_fraction", "pq_bits",
                    "pq_dim", "codebook_kind", "force_random_rotation", "conservative_memory_allocation",
                    "add_data_on_build", "max_train_points_per_pq_code", "seed")
IVFPQ_SEARCH_KEYS = ("lut_dtype", "internal_distance_dtype", "preferred_smem_carveout", "cpu_scan")

# task -> (one-line description, the keys it reads besides COMMON_KEYS)
TASKS_HELP: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": ("train a QINCo2 model on a data set and write it to output=",
              ("output", "resume", "overwrite", "model", "model_args", *ARCH_KEYS, *TRAIN_KEYS,
               "small_data", "ivf_centroids", *DATA_KEYS, *TRAIN_SPLIT, "ds.loop")),
    "eval": ("MSE, code usage and R@k of exhaustive search of a model on a data set",
             (*CODEC_KEYS, "precision", "metric", *DATA_KEYS, *DB_SPLIT)),
    "eval_valset": ("MSE of a model on the validation split",
                    (*CODEC_KEYS, "precision", *DATA_KEYS, *TRAIN_SPLIT)),
    "search": ("exhaustive search over the decoded database, or with index= a sweep of the "
               "IVF-QINCo2 pipeline", (*CODEC_KEYS, "precision", "metric", "index", "encoded_db", "pairwise_decoder",
                                       *GRID_KEYS, "output", "resume", *DATA_KEYS, *DB_SPLIT)),
    "ivf_centroids": ("train IVF centroids with k-means and write them to output=",
                      ("output", "ivf_K", "niter", "seed", *DATA_KEYS, *TRAIN_SPLIT)),
    "encode": ("encode the database (or the training split) with a model into output=",
               (*CODEC_KEYS, "precision", "output", "encode_trainset", "shard_rows", *DATA_KEYS, *TRAIN_SPLIT,
                *DB_SPLIT)),
    "train_pairwise_decoder": ("train the pairwise additive decoder of IVF-QINCo2 search",
                               ("output", "ivf_centroids", "encoded_trainset", "n_pairs_per_step",
                                "seed", *DATA_KEYS, *TRAIN_SPLIT)),
    "build_index": ("build the faiss IVF index of IVF-QINCo2 search from encoded codes",
                    ("output", "ivf_centroids", "encoded_trainset", "encoded_db", *DATA_KEYS, *TRAIN_SPLIT, *DB_SPLIT)),
    "ivfpq_build": ("build an IVF-PQ index of the database and write it to output=",
                    ("output", *IVFPQ_INDEX_KEYS, *DATA_KEYS, *DB_SPLIT)),
    "ivfpq_search": ("search an IVF-PQ index over n_probes values, optionally re-ranked (refine=)",
                     ("index", "n_probes", *IVFPQ_SEARCH_KEYS, "k", "refine", "refine_ratio", "model",
                      "encoded_db", "output", *DATA_KEYS, *DB_SPLIT)),
    "demo": ("train and evaluate a small QINCo2 on synthetic data, against faiss RQ", ("output",)),
    "convert": ("convert a model file of the reference QINCo release (model=) into a qinco2 model (output=)",
                ("model", "output")),
}
TASK_KEYS: dict[str, tuple[str, ...]] = {
    task: tuple(dict.fromkeys((*COMMON_KEYS, *keys))) for task, (_, keys) in TASKS_HELP.items()}


def tasks_reading(key: str) -> list[str]:
    return [task for task, keys in TASK_KEYS.items() if key in keys]


def check_task_keys(task: str, given) -> None:
    """Refuse a key given on the command line that ``task`` does not read."""
    reads = TASK_KEYS[task]
    for key in sorted(given):
        if key not in reads:
            others = ", ".join(tasks_reading(key)) or "no task"
            raise ConfigError(
                f"{task} does not read {key} (a key of: {others}); the keys it reads: "
                f"{', '.join(reads)}; see `qinco2 task={task} help`")


def task_help(task: str) -> str:
    """``qinco2 task=X help``: the task's line, then each key it reads with default and description."""
    defaults = CliArgs()
    rows = [(f"{k}={format_value(default_value(defaults, k))}", key_doc(k)) for k in TASK_KEYS[task] if k != "task"]
    width = max(len(left) for left, _ in rows)
    lines = [f"usage: qinco2 task={task} [key=value ...]", f"  {TASKS_HELP[task][0]}", "", "keys (default):"]
    lines += [f"  {left.ljust(width)}  {doc}".rstrip() for left, doc in rows]
    return "\n".join(lines)


def tasks_overview() -> str:
    """The tasks, one line each (the first part of ``qinco2 --help``)."""
    width = max(len(t) for t in TASKS_HELP)
    lines = ["tasks (`qinco2 task=<task> help` lists the keys a task reads):"]
    lines += [f"  {task.ljust(width)}  {doc}" for task, (doc, _) in TASKS_HELP.items()]
    return "\n".join(lines)
