"""qinco2: neural vector compression (QINCo2 / QINCo1 codecs) and nearest-neighbour search."""

from .codec import QincoCodec
from .datasets import DataLimits, Dataset, make_synthetic, resolve_dataset
from .encoding_io import encode_to_npz, load_encoded
from .errors import (ConfigError, DatasetError, InputError, ModelFileError, NotTrainedError,
                     QincoError, VectorFileError)
from .formats import count_vectors, open_vectors, read_vectors, write_vectors
from .ivf import assign_to_centroids, train_ivf_centroids
from .model import PRESETS, ModelConfig
from .train import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "QincoCodec", "ModelConfig", "TrainConfig", "PRESETS",
    "Dataset", "DataLimits", "resolve_dataset", "make_synthetic",
    "open_vectors", "read_vectors", "write_vectors", "count_vectors",
    "train_ivf_centroids", "assign_to_centroids", "encode_to_npz", "load_encoded",
    "QincoError", "ConfigError", "DatasetError", "InputError", "ModelFileError",
    "NotTrainedError", "VectorFileError", "__version__",
]
