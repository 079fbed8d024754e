"""IVF-QINCo2 search on faiss: additive shortlist codebooks, the pairwise decoder, the faiss
IVF index filled with QINCo2 codes, the multi-stage search with its parameter sweep, and the
index object :class:`IVFQincoIndex` that puts them together.

Parameter names follow faiss (``nprobe``, ``quantizer_efSearch``, ...). Imports point down
only: the codec (``qinco2.codec``) and the shared layer.
"""

from .index import IVFQincoIndex
from .multistage import SearchParams, multistage_knn, multistage_search
from .pairwise import PairwiseDecoder

__all__ = ["IVFQincoIndex", "SearchParams", "multistage_search", "multistage_knn", "PairwiseDecoder"]
