"""Defaults shared by every entry point (CLI, API, demo, benchmarks): each is defined here once and imported.

Two different fusions exist and each has its own name:
- *hybrid fusion* joins the two first-stage retrievers (BM25 and dense; `--hybrid-fusion rrf|interpolate`);
- *rerank fusion* joins the reranker's scores with the first stage's (`--fusion-weight W`, the first stage's share).
"""

from __future__ import annotations

from typing import Final

RERANK_MODES: Final = ("ql", "attn", "yesno", "cascade")  # scoring modes of `BlockReranker`
NO_RERANK: Final = "none"  # the first stage alone
SEARCH_MODES: Final = (NO_RERANK, "ql", "attn", "yesno", "cascade")  # "none" + RERANK_MODES
DEFAULT_MODE: Final = "ql"

# The first stage's share when fusing reranker and first-stage scores (per-query z-scores), chosen on the dev sets
# (best mean nDCG@10 over TREC DL 2019 BM25 top-20 and SciFact hybrid top-10 with the default ql template;
# docs/RERANKING.md) and frozen. 0 keeps the reranker's order, 1 the first stage's.
DEFAULT_FUSION_WEIGHT: Final = 0.3
DEFAULT_RERANK_DEPTH: Final = 20  # first-stage hits reranked per query
DEFAULT_K: Final = 100  # first-stage hits kept per query (eval's run depth)

DEFAULT_RETRIEVER: Final = "hybrid"  # search (demo, serve); `kvrank eval` keeps bm25, the published baseline
DEFAULT_EVAL_RETRIEVER: Final = "bm25"
DEFAULT_HYBRID_FUSION: Final = "rrf"
DEFAULT_MODEL: Final = "smollm2"  # the reranker LM: SmolLM2-135M-Instruct, installed offline from PyPI
DEFAULT_KV_FORMAT: Final = "auto"  # the model's measured recommendation (store/formats.py), or an existing store's own
