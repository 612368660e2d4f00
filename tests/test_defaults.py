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
