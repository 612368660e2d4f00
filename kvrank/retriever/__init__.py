"""First-stage retrieval: the `Retriever` protocol, BM25, dense (sentence-transformers + FAISS), hybrid."""

from kvrank.retriever.base import Retriever, cache_root, corpus_fingerprint
from kvrank.retriever.bm25 import BM25Config, BM25Retriever
from kvrank.retriever.dense import DenseConfig, DenseRetriever, Encoder, load_encoder
from kvrank.retriever.factory import KINDS, RetrieverConfig, build_or_load
from kvrank.retriever.hybrid import FusionConfig, HybridRetriever

__all__ = [
    "KINDS",
    "BM25Config",
    "BM25Retriever",
    "DenseConfig",
    "DenseRetriever",
    "Encoder",
    "FusionConfig",
    "HybridRetriever",
    "Retriever",
    "RetrieverConfig",
    "build_or_load",
    "cache_root",
    "corpus_fingerprint",
    "load_encoder",
]
