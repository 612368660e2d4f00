"""kvrank: retrieve-then-rerank search with a block-attention reranker over stored, reused passage KV."""

from kvrank.errors import KvrankError
from kvrank.types import Dataset, Passage, Query

__version__ = "0.1.0"
__all__ = ["Dataset", "KvrankError", "Passage", "Query", "__version__"]
