"""qinco2: neural vector compression (QINCo2 / QINCo1 codecs) and nearest-neighbour search.

Layers (imports point down only)::

    cli/                      the ``qinco2 task=...`` command line
    ivfsearch/   ivfpq/       product lines: IVF-QINCo2 search on faiss; IVF-PQ in torch
    codec/                    the QINCo2 / QINCo1 codec (ivfsearch builds on it)
    errors, validation, formats, datasets, kmeans, ivf, rerank, openmp, threads, ...   the shared layer
"""

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

from .openmp import warn_if_separate as _warn_if_separate  # first: torch, then faiss (one OpenMP runtime)

# isort: split
from .codec import PRESETS, ModelConfig, QincoCodec, TrainConfig, convert_codes, encode_to_file, load_encoded
from .codec.faiss_export import to_faiss_index_qinco
from .datasets import DataLimits, Dataset, make_synthetic, resolve_dataset
from .errors import ConfigError, DatasetError, InputError, ModelFileError, NotTrainedError, QincoError, VectorFileError
from .formats import count_vectors, open_vectors, read_vectors, verify_vectors, write_vectors
from .ivf import assign_to_centroids, train_ivf_centroids
from .ivfsearch import IVFQincoIndex

_warn_if_separate()

__all__ = [
    "QincoCodec", "ModelConfig", "TrainConfig", "PRESETS",
    "Dataset", "DataLimits", "resolve_dataset", "make_synthetic",
    "open_vectors", "read_vectors", "write_vectors", "count_vectors", "verify_vectors",
    "train_ivf_centroids", "assign_to_centroids", "encode_to_file", "load_encoded", "convert_codes",
    "to_faiss_index_qinco", "IVFQincoIndex",
    "QincoError", "ConfigError", "DatasetError", "InputError", "ModelFileError",
    "NotTrainedError", "VectorFileError", "__version__",
]
