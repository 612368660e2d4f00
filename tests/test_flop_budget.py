"""Query-time FLOPs per candidate of `ql`, `yesno` and `attn` equal a budget derived from the model's shapes.

FLOP counts are deterministic, so a change that makes a query-time pass do more arithmetic (a longer template part,
logits nobody reads, a second copy of shared tokens, a matmul to sum probabilities) fails here until the budget in
tests/flop_budget.py is consciously raised.
"""

from __future__ import annotations

import pytest
from conftest_models import tiny_lm
from flop_budget import TOLERANCE, measured

from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.reranker.templates import TEMPLATES
from kvrank.store.kv import MemoryKVStore
from kvrank.types import Passage

# equal byte lengths (byte-level tokenizer): every block has the same number of tokens, so no row holds padding
PASSAGES = [Passage(f"d{i}", "", text) for i, text in enumerate(
    ("The cat sat on the warm mat.", "Paris is the capital, France", "Plants turn light into sugar"))]
QUERY = "capital of France?"


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


@pytest.mark.parametrize("mode,template", [("ql", "ql-passage-query"), ("ql", "ql-claim"),
                                           ("yesno", "yesno-basic"), ("attn", "ql-passage-query"),
                                           ("attn", "ql-claim")])
def test_query_time_flops_equal_the_shape_budget(lm, mode, template):
    rr = BlockReranker(RerankerConfig(kv_format="none",
                                      mode=mode, template=TEMPLATES[template], yes_token="y", no_token="n"),
                       store=MemoryKVStore(), lm=lm)
    flops, budget, per_op = measured(rr, QUERY, PASSAGES)
    assert abs(flops - budget) <= TOLERANCE * budget, (mode, template, flops, budget, per_op)


def test_attn_budget_without_calibration_has_no_second_query(lm):
    rr = BlockReranker(RerankerConfig(kv_format="none", mode="attn", calibrate=False), store=MemoryKVStore(), lm=lm)
    flops, budget, _ = measured(rr, QUERY, PASSAGES)
    assert abs(flops - budget) <= TOLERANCE * budget
