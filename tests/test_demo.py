"""The embedded demo: a self-written corpus with judged queries, indexed and searched without any download."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from kvrank.cli import app
from kvrank.defaults import DEFAULT_RERANK_DEPTH
from kvrank.demo import DEMO_QUERIES, demo_dataset, demo_passages, run_demo
from kvrank.pipeline import PipelineConfig, build
from kvrank.retriever import RetrieverConfig


def test_demo_corpus_is_consistent() -> None:
    passages = demo_passages()
    dataset = demo_dataset()
    assert len(passages) >= 300 and len(dataset.corpus) == len(passages)  # ids are unique
    topics = Counter(p.doc_id.split("-")[0] for p in passages)
    assert len(topics) >= 6 and min(topics.values()) >= 10
    assert all(p.text.strip() for p in passages)
    assert len(dataset.queries) == len(DEMO_QUERIES) >= 10
    assert {q.doc_id for q in dataset.qrels} <= dataset.corpus.keys()
    assert all(any(q.relevance == 2 and q.query_id == qid for q in dataset.qrels) for qid in dataset.queries)


def test_bm25_demo_finds_the_answers() -> None:
    out = io.StringIO()
    dataset = demo_dataset()
    config = PipelineConfig(retriever="bm25", retriever_config=RetrieverConfig(show_progress=False), reranker=None)
    with build(config, dataset) as pipeline:
        report = run_demo(Console(file=out, width=120), pipeline, dataset, k=3)
    text = out.getvalue()
    assert "q01: What is the capital of Japan?" in text and "country-japan-1" in text
    answers = {qid: [d for d, rel in judged.items() if rel == 2] for qid, _, judged in DEMO_QUERIES}
    at_one = sum(report.run[qid][0].doc_id in docs for qid, docs in answers.items())
    assert at_one >= len(answers) - 2, report.run
    assert report.metrics["nDCG@10"] > 0.8


def test_demo_command_runs_hybrid_by_default(minilm) -> None:
    result = CliRunner().invoke(app, ["demo", "--k", "3", "--rerank", "none"])
    assert result.exit_code == 0, result.output
    text = result.output.replace("\n", " ")
    assert "12 queries, hybrid(bm25 + dense:all-MiniLM-L6-v2; rrf k=60" in text  # the first stage, named
    assert "reranking" not in text and "KV reuse" not in text
    assert "nDCG@10" in result.output and "retrieve" in result.output  # metrics and latency tables
    assert "* country-japan-1" in result.output


def test_demo_reranks_the_default_depth_and_reuses_passage_kv(tiny_checkpoint: Path) -> None:
    """With a reranker, the demo reranks the top DEFAULT_RERANK_DEPTH (20, as eval and the API) and runs every query
    again from stored KV: nothing is prefilled twice and the rankings are the same (a tiny model: fast)."""
    assert DEFAULT_RERANK_DEPTH == 20
    result = CliRunner().invoke(app, ["demo", "--k", "3", "--retriever", "bm25", "--model", str(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    text = result.output.replace("\n", " ")
    assert "reranking the top 20 (ql)" in text and "reranked (ql, top 20)" in text
    assert "in the first pass, 0 in the second" in text
    assert "rankings of the second pass are identical" in text


@pytest.mark.integration
def test_demo_reranks_with_smollm2_and_reuses_passage_kv(minilm) -> None:
    """The default demo reranks with the offline SmolLM2, then runs every query again without any prefill."""
    result = CliRunner().invoke(app, ["demo", "--k", "3", "--rerank-depth", "5"])
    assert result.exit_code == 0, result.output
    assert "reranked (ql, top 5)" in result.output.replace("\n", " ")
    assert "in the first pass, 0 in the second" in result.output.replace("\n", " ")
    assert "rankings of the second pass are identical" in result.output.replace("\n", " ")
