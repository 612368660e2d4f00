"""Defaults shared by every entry point (CLI, API, demo, benchmarks): each is defined here once and imported.

Two different fusions exist and each has its own name:
- *hybrid fusion* joins the two first-stage retrievers (BM25 and dense; `--hybrid-fusion rrf|interpolate`);
- *rerank fusion* joins the reranker's scores with the first stage's (`--fusion-weight W`, the first stage's share).
"""

from __future__ import annotations

RERANK_MODES = ("ql", "attn", "yesno", "cascade")  # scoring modes of `BlockReranker`
NO_RERANK = "none"  # the first stage alone
SEARCH_MODES = (NO_RERANK, *RERANK_MODES)
DEFAULT_MODE = "ql"

# The first stage's share when fusing reranker and first-stage scores (per-query z-scores), chosen on the dev sets
# (best mean nDCG@10 over TREC DL 2019 BM25 top-20 and SciFact hybrid top-10 with the default ql template;
# docs/RERANKING.md) and frozen. 0 keeps the reranker's order, 1 the first stage's.
DEFAULT_FUSION_WEIGHT = 0.3
DEFAULT_RERANK_DEPTH = 20  # first-stage hits reranked per query
DEFAULT_K = 100  # first-stage hits kept per query (eval's run depth)

DEFAULT_RETRIEVER = "hybrid"  # search (demo, serve); `kvrank eval` keeps bm25, the published baseline
DEFAULT_EVAL_RETRIEVER = "bm25"
DEFAULT_HYBRID_FUSION = "rrf"
DEFAULT_MODEL = "smollm2"  # the reranker LM: SmolLM2-135M-Instruct, installed offline from PyPI
DEFAULT_KV_FORMAT = "auto"  # the model's measured recommendation (store/formats.py), or an existing store's own
