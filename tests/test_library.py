"""The Python API (`kvrank.Reranker`, `kvrank.Searcher`) on a tiny random Llama: the CrossEncoder.rank contract,
errors in the library's words, a store shared across processes, and the same rankings as the HTTP API's routes
over the same settings. tests/integration/test_entry_points.py compares the real defaults of every face."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import API_DATASET, TINY_CORPUS
from fastapi.testclient import TestClient

import kvrank
from kvrank.api.app import create_app
from kvrank.api.settings import Settings
from kvrank.pipeline import PipelineConfig, build
from kvrank.reranker.reranker import RerankerConfig

DOCS = ["Paris is the capital of France.", "Jupiter is the largest planet.", "Cats purr when they are content.",
        "Rust is a memory safe programming language."]
QUERY = "largest planet"


@pytest.fixture(scope="module")
def reranker(tiny_llama):
    with kvrank.Reranker(tiny_llama, kv_format="none", head="none") as r:
        yield r


def test_rank_follows_the_cross_encoder_contract(reranker):
    scores = reranker.score(QUERY, DOCS)
    assert len(scores) == len(DOCS) and all(isinstance(s, float) for s in scores)
    hits = reranker.rank(QUERY, DOCS)
    assert [h["corpus_id"] for h in hits] == sorted(range(len(DOCS)), key=lambda i: -scores[i])
    assert [h["score"] for h in hits] == sorted(scores, reverse=True)
    assert set(hits[0]) == {"corpus_id", "score"}
    top = reranker.rank(QUERY, DOCS, top_k=2, return_documents=True)
    assert top == [{**h, "text": DOCS[h["corpus_id"]]} for h in hits[:2]]
    assert reranker.rank(QUERY, []) == [] and reranker.score(QUERY, []) == []


def test_dict_documents_keep_their_id_and_title_and_rank_with_the_title(reranker):
    docs = [{"id": "a", "title": "Planets", "text": DOCS[1]}, {"text": DOCS[0]}]
    hits = reranker.rank(QUERY, docs, return_documents=True)
    by_index = {h["corpus_id"]: h for h in hits}
    assert by_index[0]["id"] == "a" and by_index[0]["title"] == "Planets" and by_index[0]["text"] == DOCS[1]
    assert set(by_index[1]) == {"corpus_id", "score", "text"}
    # the title is part of the passage the model reads
    assert by_index[0]["score"] != reranker.score(QUERY, [DOCS[1]])[0]
    assert by_index[1]["score"] == reranker.score(QUERY, [DOCS[0]])[0]


@pytest.mark.parametrize(("call", "param", "words"), [
    (lambda r: r.rank("  ", DOCS), "query", "query is empty"),
    (lambda r: r.rank(QUERY, [{"title": "no text"}]), "documents", "documents[0] has no 'text'"),
    (lambda r: r.rank(QUERY, [DOCS[0], 7]), "documents", "documents[1] is a int"),
    (lambda r: r.rank(QUERY, "one string"), "documents", "must be a list"),
    (lambda r: r.rank(QUERY, DOCS, top_k=0), "top_k", "top_k must be an integer >= 1"),
    (lambda r: r.rank(QUERY, [{"text": "t", "score": "high"}]), "documents", "['score'] must be a finite number"),
])
def test_bad_input_is_a_kvrank_error_naming_the_argument(reranker, call, param, words):
    with pytest.raises(kvrank.KvrankError) as err:
        call(reranker)
    assert err.value.param == param and words in str(err.value)
    assert "--" not in str(err.value)  # the library's words, not a CLI flag


def test_a_wrong_mode_is_refused_before_any_model_work():
    with pytest.raises(kvrank.KvrankError, match="mode 'bm42' is not one of ql, attn") as err:
        kvrank.Reranker(mode="bm42")
    assert err.value.param == "mode"
    with pytest.raises(kvrank.KvrankError, match="mode 'rerank' is not one of none, ql") as err:
        kvrank.Searcher(["a text"], mode="rerank")


def test_rank_equals_the_v1_rerank_route(tiny_llama):
    """`Reranker.rank` and `POST /v1/rerank` of a server with the same settings give the same order and scores."""
    with kvrank.Reranker(tiny_llama, kv_format="none", head="none") as reranker:
        hits = reranker.rank(QUERY, DOCS)
    pipeline = build(PipelineConfig(retriever="bm25", reranker=RerankerConfig(), kv_format="none", head="none"),
                     API_DATASET, lm=tiny_llama)
    with TestClient(create_app(pipeline, Settings())) as client:
        body = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}).json()
    assert [r["index"] for r in body["results"]] == [h["corpus_id"] for h in hits]
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx([h["score"] for h in hits], abs=1e-6)


def test_search_equals_the_v1_search_route(tiny_llama):
    docs = [{"id": r["_id"], "title": r.get("title", ""), "text": r["text"]} for r in TINY_CORPUS]
    with kvrank.Searcher(docs, retriever="bm25", model=tiny_llama, kv_format="none", head="none") as searcher:
        hits = searcher.search("largest planet", top_k=3)
        assert len(hits) == 3 and all(isinstance(h, kvrank.Hit) for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        corpus = {d["id"]: d for d in docs}
        assert all(h.text == corpus[h.doc_id]["text"] and h.title == corpus[h.doc_id]["title"] for h in hits)
        with TestClient(create_app(searcher.pipeline, Settings())) as client:
            body = client.post("/v1/search", json={"query": "largest planet", "top_k": 3}).json()
        assert [h["doc_id"] for h in body["hits"]] == [h.doc_id for h in hits]
        assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in hits], abs=1e-6)
        batched = searcher.search_many(["largest planet", "cats that purr"], top_k=3)[0]  # rows share a forward
        assert [h.doc_id for h in batched] == [h.doc_id for h in hits]
        assert [h.score for h in batched] == pytest.approx([h.score for h in hits], abs=1e-4)


def test_searcher_reads_a_beir_folder(tiny_beir, tiny_llama):
    with kvrank.Searcher(tiny_beir, retriever="bm25", mode="none", model=tiny_llama) as searcher:
        hits = searcher.search("capital of France", top_k=2)
    assert hits[0].doc_id == "d3" and len(hits) == 2


@pytest.mark.parametrize(("data", "words"), [
    (["same", {"id": "0", "text": "again"}], "repeats the id '0'"),
    ([], "holds no documents"),
    (42, "data must be a BEIR folder"),
])
def test_bad_data_is_refused_by_name(data, words):
    with pytest.raises(kvrank.KvrankError, match=words) as err:
        kvrank.Searcher(data, mode="none")
    assert err.value.param == "data"


def test_searcher_top_k_and_queries_are_checked(tiny_llama):
    with kvrank.Searcher(["one text", "another text"], retriever="bm25", mode="none") as searcher:
        for call, param in [(lambda: searcher.search("text", top_k=0), "top_k"),
                            (lambda: searcher.search(""), "query"),
                            (lambda: searcher.search_many("text"), "queries")]:
            with pytest.raises(kvrank.KvrankError) as err:
                call()
            assert err.value.param == param


RANK_IN_A_PROCESS = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [{tests!r}, {root!r}]
    from conftest_models import tiny_lm
    import kvrank
    with kvrank.Reranker(tiny_lm("llama"), store=sys.argv[1], kv_format="int8", head="none") as reranker:
        scores = reranker.score({query!r}, {docs!r})
        print(json.dumps({{"scores": scores, "prefills": reranker.prefills}}))
""")


def test_a_store_folder_saves_the_prefill_of_a_repeated_document_across_processes(tmp_path):
    script = tmp_path / "rank.py"
    tests = Path(__file__).parent
    script.write_text(RANK_IN_A_PROCESS.format(tests=str(tests), root=str(tests.parent), query=QUERY, docs=DOCS))

    def run() -> dict:
        out = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["prefills"] == len(DOCS) and second["prefills"] == 0
    assert second["scores"] == first["scores"]


def test_hits_below_the_reranked_ones_have_no_final_score_as_in_v1_search(tiny_llama):
    docs = [r["text"] for r in TINY_CORPUS]
    with kvrank.Searcher(docs, retriever="bm25", model=tiny_llama, kv_format="none", head="none",
                         rerank_depth=2) as searcher:
        hits = searcher.search("largest planet", top_k=4)
        with TestClient(create_app(searcher.pipeline, Settings(rerank_depth=2))) as client:
            body = client.post("/v1/search", json={"query": "largest planet", "top_k": 4}).json()
    assert len(hits) >= 3  # the first stage matched more documents than the depth reranks
    assert [h.reranked for h in hits] == [True, True] + [False] * (len(hits) - 2)
    assert [h.score is None for h in hits] == [False, False] + [True] * (len(hits) - 2)
    assert [h["score"] for h in body["hits"]] == [h.score for h in hits[:2]] + [None] * (len(hits) - 2)
    assert [h["first_stage"]["score"] for h in body["hits"]] == pytest.approx([h.first_stage_score for h in hits])
    with kvrank.Searcher(docs, retriever="bm25", mode="none") as first_stage:
        alone = first_stage.search("largest planet", top_k=3)
    assert all(h.score == h.first_stage_score and not h.reranked for h in alone)


def test_a_folder_with_only_a_corpus_can_be_searched(tmp_path):
    folder = tmp_path / "corpus-only"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_CORPUS), encoding="utf-8")
    with kvrank.Searcher(folder, retriever="bm25", mode="none") as searcher:
        assert searcher.search("capital of France", top_k=1)[0].doc_id == "d3"


@pytest.mark.parametrize(("build", "param", "words"), [
    (lambda tmp: kvrank.Searcher(tmp / "nowhere", mode="none"), "data", "data "),
    (lambda tmp: kvrank.Reranker(device="gpu"), "device", "device 'gpu' is not a torch device"),
    (lambda tmp: kvrank.Reranker(model=5), "model", "model must be a model name"),
    (lambda tmp: kvrank.Searcher(["a"], rerank_depth="5"), "rerank_depth", "rerank_depth must be an integer"),
    (lambda tmp: kvrank.Searcher(["a"], fusion_weight=2.0), "fusion_weight", "fusion_weight must be a number"),
    (lambda tmp: kvrank.Reranker(max_passage_tokens=0), "max_passage_tokens", "max_passage_tokens must be"),
])
def test_bad_settings_are_refused_in_the_librarys_words(tmp_path, build, param, words):
    with pytest.raises(kvrank.KvrankError) as err:
        build(tmp_path)
    assert err.value.param == param and words in str(err.value), str(err.value)
    assert "--" not in str(err.value) and "source" not in str(err.value)


def test_a_store_error_names_the_store_argument(tmp_path, tiny_llama):
    (tmp_path / "notes.txt").write_text("not a KV store")
    with pytest.raises(kvrank.KvrankError, match=r"^store .*holds other files") as err:
        kvrank.Reranker(tiny_llama, store=tmp_path, kv_format="none", head="none")
    assert err.value.param == "store" and "store_dir" not in str(err.value)


def test_first_stage_scores_must_be_given_for_all_documents_and_finite(reranker):
    for docs, words in [([{"text": "a", "score": 1.0}, {"text": "b"}], "1 of the 2 documents carry"),
                        ([{"text": "a", "score": float("nan")}], "must be a finite number")]:
        with pytest.raises(kvrank.KvrankError, match=words) as err:
            reranker.rank(QUERY, docs)
        assert err.value.param == "documents"
    # scores on every document, but no head for this model: the mode's own scores rank them
    plain = reranker.score(QUERY, DOCS[:2])
    assert reranker.score(QUERY, [{"text": t, "score": s, "title": None} for t, s in zip(DOCS[:2], (1.0, 2.0))]) \
        == plain
