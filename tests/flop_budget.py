"""The query-time FLOP budget of each scoring mode, derived from the model's shapes and the prompt's token counts
(shared by the tiny-model test and the SmolLM2 integration test)."""

from __future__ import annotations

from collections.abc import Sequence

from kvrank.flops import ModelShapes, count_flops, pass_budget
from kvrank.reranker.reranker import BlockReranker
from kvrank.types import Passage

TOLERANCE = 0.01  # the counts are exact; this only absorbs a budget term of a few FLOPs nobody should chase


def budget(rr: BlockReranker, query: str, blocks: Sequence[int]) -> int:
    """FLOPs `rr.score(query, ...)` must cost over blocks of these token counts (one forward per mode here: tests
    use at most `batch_size` candidates of equal length, so no row holds padding)."""
    shapes = ModelShapes.of(rr.lm.config)
    p = len(rr.prefix_ids)
    ids, start, end = rr.query_ids(query)
    mode = rr.config.mode
    if mode == "ql":  # every candidate: the query part over its block; logits where a query token is predicted
        return pass_budget(shapes, [(len(ids), p + t + len(ids)) for t in blocks], logits=len(blocks) * (end - start))
    if mode == "yesno":  # logits at the last position only
        return pass_budget(shapes, [(len(ids), p + t + len(ids)) for t in blocks], logits=len(blocks))
    assert mode == "attn", mode
    # one row: the template text before the query once, the query's own tokens, the content-free query's own
    # tokens; no template text after the query, no logits
    _, free_start, free_end = rr.query_ids(rr.config.calibration_query)
    tokens = start + (end - start) + ((free_end - free_start) if rr.config.calibrate else 0)
    return pass_budget(shapes, [(tokens, p + sum(blocks) + tokens)], logits=0)


def measured(rr: BlockReranker, query: str, passages: Sequence[Passage]) -> tuple[int, int, dict[str, int]]:
    """(FLOPs of one warm `score` call, its budget, FLOPs per operator)."""
    blocks, _ = rr.passage_kv(passages)  # stored first: the counted call is query-time work only
    rr.score(query, passages)  # and the shared prefix's KV, computed once per template, is cached
    _, flops, per_op = count_flops(lambda: rr.score(query, passages))
    return flops, budget(rr, query, [kv.num_tokens for kv in blocks]), per_op
