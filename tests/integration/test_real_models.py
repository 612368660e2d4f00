"""Parity on the real offline models: SmolLM2-135M (Llama, 9 query / 3 KV heads) and Gemma-3 270M (1 KV head,
head_dim 256, sliding-window layers, BOS). The first run dequantises each GGUF once (~1 min for SmolLM2, a few
minutes for Gemma-3) into ~/.cache/kvrank/models; later runs load in about a second."""

from __future__ import annotations

import pytest
import torch
from test_reranker_parity import fresh_attention_features, plain_ql

from kvrank.reranker.model import GEMMA3, SMOLLM2, load_lm
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.store.kv import MemoryKVStore
from kvrank.types import Passage

pytestmark = pytest.mark.integration

PASSAGES = [
    Passage("d1", "Vitamin D", "Vitamin D supplementation did not reduce fracture risk in older adults in a large "
                               "randomised trial."),
    Passage("d2", "Paris", "Paris is the capital and most populous city of France."),
    Passage("d3", "", "Photosynthesis converts light energy into chemical energy stored in glucose."),
]
QUERY = "does vitamin d prevent fractures"


@pytest.fixture(scope="module", params=[SMOLLM2, GEMMA3])
def lm(request):
    return load_lm(request.param)


def rr(lm, **kw) -> BlockReranker:
    kw = {"kv_format": "none", "storage_dtype": "float32", **kw}
    return BlockReranker(RerankerConfig(**kw), store=MemoryKVStore(), lm=lm)


def test_real_ql_equals_plain_forward(lm):
    r = rr(lm, mode="ql")
    scores = r.score(QUERY, PASSAGES)
    for passage, score in zip(PASSAGES, scores):
        assert abs(score - plain_ql(r, passage, QUERY)) <= 1e-4
    assert max(scores) == scores[0]  # the vitamin D passage explains the query best


def test_real_attn_equals_fresh_block_masked_forward(lm):
    r = rr(lm, mode="attn", calibrate=False)
    stored = r.attention_features(QUERY, r.passage_kv(PASSAGES)[0])
    fresh = fresh_attention_features(r, QUERY, "parallel", passages=PASSAGES)
    assert (stored - fresh).abs().max().item() <= 1e-4


def test_real_fp16_storage_error_bound(lm):
    """Documented bound (docs/concepts/reranking.md): fp16 storage moves ql scores (mean log-prob) by at most 0.01."""
    exact = rr(lm, mode="ql").score(QUERY, PASSAGES)
    half = rr(lm, mode="ql", storage_dtype="float16").score(QUERY, PASSAGES)
    diff = max(abs(a - b) for a, b in zip(exact, half))
    assert diff <= 1e-2, diff


def test_smollm2_ships_distilled_attn_weights():
    r = BlockReranker(RerankerConfig(kv_format="none", mode="attn"), lm=load_lm(SMOLLM2))
    weights = r.attn_weight_matrix((r.lm.num_layers, r.lm.config.num_attention_heads))
    assert weights.shape == (30, 9) and weights.std() > 0  # fitted, not the uniform fallback
    uncalibrated = BlockReranker(RerankerConfig(kv_format="none", mode="attn", calibrate=False), lm=r.lm)
    assert torch.all(uncalibrated.attn_weight_matrix((30, 9)) == 1 / 270)  # fitted on calibrated features only


def test_smollm2_gets_the_shipped_scoring_head_and_ranks_with_it():
    """`--head auto` must find the shipped head for the real model: if a dependency changed the model's
    fingerprint, the default would silently fall back to fusion."""
    from kvrank.pipeline import PipelineConfig, build
    from kvrank.reranker import head as heads
    from kvrank.types import Dataset, Query

    dataset = Dataset("mini", {p.doc_id: p for p in PASSAGES}, {}, source="test")
    pipeline = build(PipelineConfig(retriever="bm25", reranker=RerankerConfig(mode="ql"), kv_format="none",
                                    head="auto"), dataset, lm=load_lm(SMOLLM2))
    assert pipeline.head is not None
    assert pipeline.head.card == heads.read_card(heads.PACKAGED / "smollm2-ql-claim")
    result = pipeline.search([Query("q", QUERY)], k=3, depth=3)[0]
    assert result.hits[0].doc_id == "d1" and "head" in result.timings
