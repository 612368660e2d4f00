"""kvrank: retrieve-then-rerank search with a block-attention reranker over stored, reused passage KV.

    >>> import kvrank
    >>> hits = kvrank.Reranker().rank("largest planet", ["Paris is in France.", "Jupiter is the largest planet."])
    >>> hits[0]["corpus_id"]
    1

`Reranker` ranks the documents you give it, `Searcher` retrieves from a corpus and then reranks (kvrank/library.py);
both load torch and the models on first use, so `import kvrank` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvrank.errors import KvrankError
from kvrank.types import Dataset, Passage, Query

if TYPE_CHECKING:
    from kvrank.library import Hit, Reranker, Searcher

__version__ = "0.1.0"
__all__ = ["Dataset", "Hit", "KvrankError", "Passage", "Query", "Reranker", "Searcher", "__version__"]
_LIBRARY = ("Hit", "Reranker", "Searcher")


def __getattr__(name: str) -> Any:
    if name in _LIBRARY:
        from kvrank import library

        return getattr(library, name)
    raise AttributeError(f"module 'kvrank' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
