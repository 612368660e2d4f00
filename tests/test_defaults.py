"""Defaults are defined once (kvrank/defaults.py); the typed copies the API needs for its schema must agree."""

from __future__ import annotations

from typing import get_args

from kvrank.api.schemas import SearchMode
from kvrank.api.settings import RerankMode, Settings
from kvrank.defaults import (
    DEFAULT_FUSION_WEIGHT,
    DEFAULT_MODE,
    DEFAULT_RERANK_DEPTH,
    NO_RERANK,
    RERANK_MODES,
    SEARCH_MODES,
)
from kvrank.pipeline import PipelineConfig
from kvrank.reranker.reranker import MODES, RerankerConfig


def test_mode_lists_agree() -> None:
    assert get_args(RerankMode) == RERANK_MODES == MODES
    assert get_args(SearchMode) == SEARCH_MODES == (NO_RERANK, *RERANK_MODES)


def test_api_eval_and_library_share_defaults() -> None:
    settings, config = Settings(), PipelineConfig()
    assert settings.fusion_weight == config.fusion_weight == DEFAULT_FUSION_WEIGHT
    assert settings.rerank_depth == config.rerank_depth == DEFAULT_RERANK_DEPTH
    assert settings.rerank_mode == RerankerConfig().mode == DEFAULT_MODE


def test_every_face_takes_its_defaults_from_defaults_py() -> None:
    """The Python API, the pipeline config, the server's settings and the CLI's options default alike."""
    import inspect

    from kvrank import defaults
    from kvrank.cli.demo import demo
    from kvrank.cli.search import eval_cmd
    from kvrank.library import Reranker, Searcher
    from kvrank.retriever import RetrieverConfig

    settings, config, retriever = Settings(), PipelineConfig(), RetrieverConfig()
    assert settings.head == config.head == defaults.DEFAULT_HEAD
    assert settings.kv_format == RerankerConfig().kv_format == defaults.DEFAULT_KV_FORMAT
    assert config.kv_format is None  # the same as auto: the store's own format, else the recommended one
    assert settings.retriever == defaults.DEFAULT_RETRIEVER and settings.model == defaults.DEFAULT_MODEL
    assert (retriever.bm25.k1, retriever.bm25.b) == (defaults.DEFAULT_BM25_K1, defaults.DEFAULT_BM25_B)
    assert retriever.fusion.method == defaults.DEFAULT_HYBRID_FUSION
    assert retriever.fusion.weight == defaults.DEFAULT_HYBRID_WEIGHT
    assert retriever.dense.index_type == defaults.DEFAULT_DENSE_INDEX
    assert retriever.dense.batch_size == defaults.DEFAULT_ENCODE_BATCH_SIZE
    expected = {"mode": DEFAULT_MODE, "rerank": DEFAULT_MODE, "model": defaults.DEFAULT_MODEL,
                "head": defaults.DEFAULT_HEAD, "device": defaults.DEFAULT_DEVICE, "dtype": defaults.DEFAULT_DTYPE,
                "kv_format": defaults.DEFAULT_KV_FORMAT, "rerank_depth": DEFAULT_RERANK_DEPTH,
                "fusion_weight": DEFAULT_FUSION_WEIGHT, "retriever": defaults.DEFAULT_RETRIEVER,
                "bm25_k1": defaults.DEFAULT_BM25_K1, "bm25_b": defaults.DEFAULT_BM25_B,
                "hybrid_weight": defaults.DEFAULT_HYBRID_WEIGHT, "dense_index": defaults.DEFAULT_DENSE_INDEX,
                "batch_size": defaults.DEFAULT_ENCODE_BATCH_SIZE}
    # eval's first stage is BM25 on purpose (the published baselines'); None options mean "the library's default"
    overrides = {eval_cmd: {"retriever": None}}
    for face in (Reranker.__init__, Searcher.__init__, demo, eval_cmd):
        for name, param in inspect.signature(face).parameters.items():
            want = overrides.get(face, {}).get(name, expected.get(name))
            if name in expected and param.default is not None:
                assert param.default == want, f"{face.__qualname__}: {name} defaults to {param.default!r}"
