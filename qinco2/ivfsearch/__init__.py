"""IVF-QINCo2 search on faiss: additive shortlist codebooks, the pairwise decoder, the faiss
IVF index filled with QINCo2 codes, and the multi-stage search with its parameter sweep.

Parameter names follow faiss (``nprobe``, ``quantizer_efSearch``, ...). Imports point down
only: the codec (``qinco2.codec``) and the shared layer.
"""

from .multistage import SearchParams, multistage_search
from .pairwise import PairwiseDecoder

__all__ = ["SearchParams", "multistage_search", "PairwiseDecoder"]
