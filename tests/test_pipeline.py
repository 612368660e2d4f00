"""The eval pipeline's reranking hook: what the reranker gets, how its output is merged, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrank.errors import KvrankError
from kvrank.eval.data import load_dataset
from kvrank.eval.pipeline import run_eval
from kvrank.types import Query, ScoredDoc

CANDIDATES = {
    "1": [
        ScoredDoc("1", d, s) for d, s in [("d4", 4.0), ("d3", 3.0), ("ghost", 2.5), ("d1", 2.0), ("d2", 1.0)]
    ],
    "2": [ScoredDoc("2", d, s) for d, s in [("d6", 2.0), ("d5", 1.0), ("d7", 0.5)]],
}


class ReverseReranker:
    """Reverses the candidate order and reports a per-call timing: the stand-in for a model."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, query, candidates, corpus):
        self.calls.append((query.query_id, [d.doc_id for d in candidates]))
        assert all(d.doc_id in corpus for d in candidates)
        n = len(candidates)
        reranked = [ScoredDoc(query.query_id, d.doc_id, float(i)) for i, d in enumerate(candidates)]
        return reranked[::-1], {"scoring": 100.0 if len(self.calls) == 1 else 5.0 + n}


def test_rerank_hook_contract(tiny_beir: Path) -> None:
    dataset = load_dataset(tiny_beir)
    reranker = ReverseReranker()
    report = run_eval(dataset, CANDIDATES, k=100, max_queries=2, rerank_fn=reranker, rerank_depth=3)
    # The reranker sees the top 3 first-stage docs that exist in the corpus ("ghost" does not).
    assert reranker.calls == [("1", ["d4", "d3"]), ("2", ["d6", "d5", "d7"])]
    # Reranked docs first (by the reranker's scores), then unrankable and below-depth docs, first-stage order.
    assert [d.doc_id for d in report.run["1"]] == ["d3", "d4", "ghost", "d1", "d2"]
    scores = [d.score for d in report.run["1"]]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert [d.doc_id for d in report.run["2"]] == ["d7", "d5", "d6"]
    assert report.first_stage_run == {q: CANDIDATES[q] for q in ("1", "2")}
    # Query 1: first stage d3 at rank 2 -> nDCG 1/log2(3) = 0.6309; reranked rank 1 -> 1.0.
    # Query 2: first stage d5 at rank 2 -> 0.6309; reranked d5 stays at rank 2 -> 0.6309.
    assert report.first_stage_metrics["nDCG@10"] == pytest.approx(0.6309298, abs=1e-6)
    assert report.metrics["nDCG@10"] == pytest.approx((1.0 + 0.6309298) / 2, abs=1e-6)
    assert report.metrics["RR@10"] == pytest.approx(0.75)
    # Reranker stage timings are merged; the first (warm-up) query is excluded from the stats.
    assert (
        report.latency_ms["scoring"]["p50"] == pytest.approx(8.0) and report.latency_ms["scoring"]["n"] == 1
    )
    assert {"rerank", "total"} <= report.latency_ms.keys() and "retrieve" not in report.latency_ms
    assert report.queries == 2 and report.settings["rerank_depth"] == 3


def test_reranker_must_return_its_candidates(tiny_beir: Path) -> None:
    def drops_one(query: Query, candidates, corpus):
        return candidates[1:], {}

    with pytest.raises(ValueError, match="must return exactly the 2 candidates"):
        run_eval(load_dataset(tiny_beir), CANDIDATES, max_queries=1, rerank_fn=drops_one, rerank_depth=3)


def test_report_json_merges_extra(tiny_beir: Path, tmp_path: Path) -> None:
    report = run_eval(load_dataset(tiny_beir), CANDIDATES, max_queries=2)
    assert report.metrics == report.first_stage_metrics and report.run == report.first_stage_run
    report.extra["kv_cache"] = {"hits": 3, "misses": 1}
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["kv_cache"] == {"hits": 3, "misses": 1} and data["queries"] == 2
    assert data["latency_ms"]["total"]["n"] == 1
    report.extra["metrics"] = {}
    with pytest.raises(ValueError, match=r"\['metrics'\] would overwrite"):
        report.to_dict()


def test_candidates_for_another_dataset_refused(tiny_beir: Path) -> None:
    with pytest.raises(KvrankError, match="names none of the 4 test queries"):
        run_eval(load_dataset(tiny_beir), {"zzz": [ScoredDoc("zzz", "d1", 1.0)]})
