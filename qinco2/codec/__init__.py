"""The QINCo2 / QINCo1 codec: model, encoder, training, the numpy codec object, evaluation,
streaming encoding to code files and the export to faiss.

Imports point down only: this package uses the shared layer (``qinco2.formats``,
``qinco2.kmeans``, ...) and nothing from ``qinco2.ivfsearch``, ``qinco2.ivfpq`` or ``qinco2.cli``.
"""

from .code_layout import CodeLayout, PackedCodes
from .codec import QincoCodec
from .codes_io import convert_codes, encode_to_file, load_encoded
from .model import PRESETS, ModelConfig, QincoModel
from .train import TrainConfig

__all__ = ["QincoCodec", "ModelConfig", "QincoModel", "TrainConfig", "PRESETS", "encode_to_file",
           "load_encoded", "convert_codes", "CodeLayout", "PackedCodes"]
