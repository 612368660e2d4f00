"""The search pipeline's merge contract as `kvrank eval` sees it: what the reranker gets, how its scores are merged
with the first stage, the metrics and latency of the report, and the refusal of a run for another dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrank.errors import KvrankError
from kvrank.eval.data import load_dataset, write_run
from kvrank.eval.runner import run_eval
from kvrank.pipeline import PipelineConfig, SearchPipeline, build
from kvrank.reranker.reranker import RerankerConfig, ScoredLists, StageTimings
from kvrank.retriever.candidates import CandidatesRetriever
from kvrank.store.kv import MemoryKVStore
from kvrank.types import Dataset, ScoredDoc

CANDIDATES = {
    "1": [
        ScoredDoc("1", d, s) for d, s in [("d4", 4.0), ("d3", 3.0), ("ghost", 2.5), ("d1", 2.0), ("d2", 1.0)]
    ],
    "2": [ScoredDoc("2", d, s) for d, s in [("d6", 2.0), ("d5", 1.0), ("d7", 0.5)]],
}


class ReverseReranker:
    """Scores each candidate by its position (so the last one ranks first) and reports a per-call scoring time:
    the stand-in for a model, with what `SearchPipeline` reads from a `BlockReranker`."""

    def __init__(self, scores_per_list: int | None = None) -> None:
        self.config = RerankerConfig(kv_format="none", mode="ql")
        self.template = self.config.prompt
        self.store = MemoryKVStore()
        self.prefills = 0
        self.adapter = None  # no query-side adapter
        self.calls: list[list[tuple[str, list[str]]]] = []
        self.scores_per_list = scores_per_list  # None: one score per candidate (the contract)

    def score_many(self, queries, candidates) -> ScoredLists:
        self.calls.append([(q, [p.doc_id for p in cands]) for q, cands in zip(queries, candidates)])
        n = sum(len(c) for c in candidates)
        scores = [[float(i) for i in range(len(c) if self.scores_per_list is None else self.scores_per_list)]
                  for c in candidates]
        timings = StageTimings(kv_lookup=1.0, prefill=0.0, scoring=100.0 if len(self.calls) == 1 else 5.0 + n)
        return ScoredLists(scores, [len(c) for c in candidates], [0] * len(candidates), timings)


def pipeline_over(dataset: Dataset, reranker=None, run=CANDIDATES, **config) -> SearchPipeline:
    """A pipeline whose first stage is the fixed `run` and whose reranker is the stand-in (or none)."""
    settings = PipelineConfig(retriever=None, candidates=Path("fixed.trec"),
                              reranker=RerankerConfig() if reranker else None, **config)
    return SearchPipeline(settings, dataset.corpus, CandidatesRetriever(run, "candidates:fixed"), reranker)


def test_rerank_merge_contract(tiny_beir: Path) -> None:
    dataset = load_dataset(tiny_beir)
    reranker = ReverseReranker()
    pipeline = pipeline_over(dataset, reranker, k=100, rerank_depth=3, fusion_weight=None)
    report = run_eval(dataset, pipeline, max_queries=2)
    # The reranker sees the top 3 first-stage docs that exist in the corpus ("ghost" does not), one query a call.
    texts = {q.query_id: q.text for q in dataset.queries.values()}
    assert reranker.calls == [[(texts["1"], ["d4", "d3"])], [(texts["2"], ["d6", "d5", "d7"])]]
    # Reranked docs first (by the reranker's scores), then unrankable and below-depth docs, first-stage order.
    assert [d.doc_id for d in report.run["1"]] == ["d3", "d4", "ghost", "d1", "d2"]
    scores = [d.score for d in report.run["1"]]
    assert all(a > b for a, b in zip(scores, scores[1:]))  # strictly decreasing: every evaluator sees this order
    assert [d.doc_id for d in report.run["2"]] == ["d7", "d5", "d6"]
    scores = [d.score for d in report.run["2"]]
    assert all(a > b for a, b in zip(scores, scores[1:]))
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
    assert {"rerank", "kv_lookup", "prefill", "scoring", "total"} == report.latency_ms.keys()
    assert "retrieve" not in report.latency_ms  # a precomputed run has no retrieval to time
    assert report.queries == 2 and report.settings["rerank_depth"] == 3 and report.settings["rerank"] is True
    assert report.retriever == "candidates:fixed"


def test_search_below_depth_and_unrankable_docs_follow_the_head(tiny_beir: Path) -> None:
    """One `search` call over both queries: each query's own head is reranked, the rest keeps first-stage order."""
    dataset = load_dataset(tiny_beir)
    reranker = ReverseReranker()
    queries = dataset.sorted_queries(2)
    results = pipeline_over(dataset, reranker, rerank_depth=2, fusion_weight=None).search(queries)
    assert len(reranker.calls) == 1  # the queries of one call are scored together
    assert [docs for _, docs in reranker.calls[0]] == [["d4", "d3"], ["d6", "d5"]]
    assert [d.doc_id for d in results[0].hits] == ["d3", "d4", "ghost", "d1", "d2"]
    assert [d.doc_id for d in results[1].hits] == ["d5", "d6", "d7"]
    assert [r.reranked for r in results] == [2, 2] and [r.kv_hits for r in results] == [2, 2]
    for result in results:
        scores = [d.score for d in result.hits]
        assert all(a > b for a, b in zip(scores, scores[1:]))
        assert result.first_stage == CANDIDATES[result.query.query_id]


def test_reranker_must_score_each_of_its_candidates(tiny_beir: Path) -> None:
    dataset = load_dataset(tiny_beir)
    pipeline = pipeline_over(dataset, ReverseReranker(scores_per_list=1), rerank_depth=3, fusion_weight=None)
    with pytest.raises(ValueError, match="must score exactly the 2 candidates"):
        run_eval(dataset, pipeline, max_queries=1)


def test_report_json_merges_extra(tiny_beir: Path, tmp_path: Path) -> None:
    dataset = load_dataset(tiny_beir)
    report = run_eval(dataset, pipeline_over(dataset), max_queries=2)
    assert report.metrics == report.first_stage_metrics and report.run == report.first_stage_run
    assert report.settings["rerank"] is False and report.settings["rerank_depth"] is None
    report.extra["kv_cache"] = {"hits": 3, "misses": 1}
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["kv_cache"] == {"hits": 3, "misses": 1} and data["queries"] == 2
    assert data["latency_ms"]["total"]["n"] == 1
    report.extra["metrics"] = {}
    with pytest.raises(ValueError, match=r"\['metrics'\] would overwrite"):
        report.to_dict()


def test_candidates_run_file_through_build(tiny_beir: Path, tmp_path: Path) -> None:
    """`build` reads a candidates run as the first stage, like `kvrank eval --candidates`."""
    dataset = load_dataset(tiny_beir)
    run = tmp_path / "cands.trec"
    write_run(CANDIDATES, run, tag="bm25")
    with build(PipelineConfig(retriever=None, candidates=run, reranker=None), dataset) as pipeline:
        report = run_eval(dataset, pipeline, max_queries=2)
    assert report.retriever == "candidates:cands.trec" and report.first_stage_run == CANDIDATES
    assert report.metrics["nDCG@10"] == pytest.approx(0.6309298, abs=1e-6)


def test_candidates_for_another_dataset_refused(tiny_beir: Path, tmp_path: Path) -> None:
    run = tmp_path / "other.trec"
    write_run({"zzz": [ScoredDoc("zzz", "d1", 1.0)]}, run)
    with pytest.raises(KvrankError, match="names none of the 4 test queries"):
        build(PipelineConfig(retriever=None, candidates=run, reranker=None), load_dataset(tiny_beir))


def test_config_refuses_bad_search_settings() -> None:
    with pytest.raises(KvrankError, match="alternatives"):
        PipelineConfig(retriever="bm25", candidates=Path("r.trec"))
    assert PipelineConfig(candidates=Path("r.trec")).retriever is None  # the run is the first stage
    with pytest.raises(KvrankError, match="^rerank_depth must be >= 1, got 0"):
        PipelineConfig(rerank_depth=0)
    with pytest.raises(KvrankError, match=r"^fusion_weight must be in \[0, 1\], got 2"):
        PipelineConfig(fusion_weight=2.0)
