"""Defaults shared by every entry point (the Python API, CLI, HTTP API, demo, benchmarks): each is defined here
once and imported. Configs take their defaults from here; entry points pass on only what their user set.

Two different fusions exist and each has its own name:
- *hybrid fusion* joins the two first-stage retrievers (BM25 and dense; `hybrid_fusion`: rrf or interpolate);
- *rerank fusion* joins the reranker's scores with the first stage's (`fusion_weight`, the first stage's share).
"""

from __future__ import annotations

from typing import Final, Literal, get_args

# Scoring modes of the reranker (kvrank/reranker/modes.py holds what each one does).
RerankMode = Literal["ql", "attn", "yesno", "cascade"]
RERANK_MODES: Final[tuple[str, ...]] = get_args(RerankMode)
NoRerank = Literal["none"]
NO_RERANK: Final = "none"  # the first stage alone
SearchMode = Literal[NoRerank, RerankMode]  # "none" + the rerank modes
SEARCH_MODES: Final[tuple[str, ...]] = (NO_RERANK, *RERANK_MODES)
DEFAULT_MODE: Final = "ql"

# The reranker LM: SmolLM2-135M-Instruct, installed offline from PyPI (reranker/model.py).
DEFAULT_MODEL: Final = "smollm2"
DEFAULT_DEVICE: Final = "cpu"
DEFAULT_DTYPE: Final = "float32"  # compute dtype of the reranker
DEFAULT_STORAGE_DTYPE: Final = "float16"  # stored KV, before a KV format compresses it
DEFAULT_MAX_PASSAGE_TOKENS: Final = 192
DEFAULT_MAX_QUERY_TOKENS: Final = 64
DEFAULT_RERANK_BATCH_SIZE: Final = 16  # reranker rows per forward pass
# The stored passage-KV layout: `auto` is the model's measured recommendation (store/formats.py: int8 for SmolLM2),
# or an existing store's own format.
DEFAULT_KV_FORMAT: Final = "auto"
DEFAULT_CALIBRATION_PASSAGES: Final = 64  # corpus passages a fitted KV format (rank, heads) is fitted on
# The scoring head that ranks in its mode instead of rerank fusion: `auto` is the head shipped for the reranker's
# model and template, if any (reranker/head.py); `none` fuses with `fusion_weight`.
DEFAULT_HEAD: Final = "auto"

# The first stage's share when fusing reranker and first-stage scores (per-query z-scores), chosen on the dev sets
# (best mean nDCG@10 over TREC DL 2019 BM25 top-20 and SciFact hybrid top-10 with the default ql template) and
# frozen. 0 keeps the reranker's order, 1 the first stage's.
DEFAULT_FUSION_WEIGHT: Final = 0.3
DEFAULT_RERANK_DEPTH: Final = 20  # first-stage hits reranked per query
DEFAULT_K: Final = 100  # first-stage hits kept per query (eval's run depth)
DEFAULT_TOP_K: Final = 10  # hits a search returns

# First stage.
DEFAULT_RETRIEVER: Final = "hybrid"  # the Python API, `kvrank demo` and `kvrank serve`
DEFAULT_EVAL_RETRIEVER: Final = "bm25"  # `kvrank eval`: BM25, the first stage published baselines use
DEFAULT_HYBRID_FUSION: Final = "rrf"
DEFAULT_HYBRID_WEIGHT: Final = 0.5  # the dense share of `interpolate` hybrid fusion
DEFAULT_BM25_K1: Final = 1.5  # bm25s's own defaults (retriever/bm25.py)
DEFAULT_BM25_B: Final = 0.75
DEFAULT_DENSE_INDEX: Final = "flat"  # exact search; `hnsw` for large corpora
DEFAULT_ENCODE_BATCH_SIZE: Final = 64  # passages per dense-encoding batch
