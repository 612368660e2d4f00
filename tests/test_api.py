"""Search API through an ASGI client with the tiny model: routes, scores equal to the reranker's own, fusion as
`kvrank eval` fuses, `/v1/search` ranking as `kvrank eval` ranks, KV reuse, micro-batching (`score_many`), the
bounded queue, timeouts, limits, auth, CORS, metrics, OpenAPI. The tiny pipeline and the app builder are shared
with test_api_server.py through conftest.py (`tiny_llama`, `api_retriever`, `API_CORPUS`, `make_app`)."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import API_CORPUS as CORPUS
from conftest import GatedStore, make_app, write_beir
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrank.api.app import create_app
from kvrank.api.batching import Batcher, Closed, QueueFull
from kvrank.api.server import pipeline_config
from kvrank.api.settings import Settings, settings_table
from kvrank.defaults import DEFAULT_FUSION_WEIGHT
from kvrank.eval.data import load_dataset
from kvrank.eval.runner import run_eval
from kvrank.pipeline import PipelineConfig, build
from kvrank.reranker.fusion import fuse
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.retriever import RetrieverConfig, build_or_load
from kvrank.types import Passage, Query, ScoredDoc

KEY = "k" * 8 + "secret-api-key-0123"


def make_client(lm, retriever, store: GatedStore | None = None, **settings) -> TestClient:
    return TestClient(make_app(lm, retriever, store, **settings))


@pytest.fixture
def client(tiny_llama, api_retriever):
    with make_client(tiny_llama, api_retriever) as c:
        yield c


def reference(lm, mode: str = "ql") -> BlockReranker:
    """A plain reranker (uncompressed KV in its own store): the scores the API must reproduce."""
    return BlockReranker(RerankerConfig(kv_format="none", mode=mode, batch_size=4), lm=lm)


def rerank_reference(lm, retriever, query: str, depth: int,
                     mode: str = "ql") -> tuple[list[ScoredDoc], list[ScoredDoc]]:
    """The reference reranker's scores of the first stage's top `depth` (first-stage order), and that top."""
    stage1 = retriever.search([Query("q", query)], depth)["q"]
    candidates = [CORPUS[d.doc_id] for d in stage1]
    scores = reference(lm, mode).score(query, candidates)
    return [ScoredDoc("q", p.doc_id, s) for p, s in zip(candidates, scores)], stage1


def ranked(hits: list[dict]) -> list[tuple[str, float]]:
    return [(h["doc_id"], h["score"]) for h in hits]


def approx(docs: list[ScoredDoc], tol: float = 1e-5) -> list[tuple[str, float]]:
    return [(d.doc_id, pytest.approx(d.score, abs=tol)) for d in docs]


# ---------------------------------------------------------------------------------------------- /v1/search
def test_search_reranks_the_first_stage_and_reuses_stored_kv(client, tiny_llama, api_retriever):
    # `fusion_weight: null`: the reranker's scores alone, best first.
    body = {"query": "topic 1 item 5", "top_k": 4, "rerank": {"depth": 6, "fusion_weight": None}}
    first = client.post("/v1/search", json=body)
    assert first.status_code == 200, first.text
    data = first.json()
    raw, stage1 = rerank_reference(tiny_llama, api_retriever, body["query"], 6)
    assert ranked(data["hits"]) == approx(sorted(raw, key=lambda d: -d.score)[:4])
    assert data["fusion_weight"] is None
    ranks = {d.doc_id: (i + 1, d.score) for i, d in enumerate(stage1)}
    for hit in data["hits"]:
        assert hit["reranked"] and (hit["first_stage"]["rank"], hit["first_stage"]["score"]) == pytest.approx(
            ranks[hit["doc_id"]])
        assert hit["snippet"] == CORPUS[hit["doc_id"]].text and hit["title"] == CORPUS[hit["doc_id"]].title
    assert data["kv_cache"] == {"hits": 0, "misses": 6} and data["mode"] == "ql" and data["depth"] == 6
    assert set(data["timings_ms"]) == {"queue", "retrieve", "kv_lookup", "prefill", "scoring", "head", "total"}
    assert data["timings_ms"]["head"] == 0.0 and data["head"] is None  # no head ships for the tiny model
    again = client.post("/v1/search", json=body).json()
    assert again["kv_cache"] == {"hits": 6, "misses": 0} and again["timings_ms"]["prefill"] == 0.0
    assert [h["score"] for h in again["hits"]] == pytest.approx([h["score"] for h in data["hits"]], abs=1e-5)


def test_search_fuses_with_the_server_weight_by_default(client, tiny_llama, api_retriever):
    """No `fusion_weight` in the request: the server's `fusion_weight` (default 0.3, `kvrank eval`'s), applied as
    `kvrank.reranker.fusion.fuse` applies it and reported in the response."""
    body = {"query": "topic 1 item 5", "top_k": 5, "rerank": {"depth": 5}}
    data = client.post("/v1/search", json=body).json()
    raw, stage1 = rerank_reference(tiny_llama, api_retriever, body["query"], 5)
    assert Settings().fusion_weight == DEFAULT_FUSION_WEIGHT == 0.3
    assert data["fusion_weight"] == DEFAULT_FUSION_WEIGHT
    assert ranked(data["hits"]) == approx(fuse(raw, stage1, DEFAULT_FUSION_WEIGHT))
    explicit = client.post("/v1/search", json={**body, "rerank": {"depth": 5, "fusion_weight": 0.3}}).json()
    assert ranked(explicit["hits"]) == ranked(data["hits"]) and explicit["fusion_weight"] == 0.3


def test_server_fusion_setting_is_the_default_and_null_turns_it_off(tiny_llama, api_retriever):
    raw, stage1 = rerank_reference(tiny_llama, api_retriever, "item 3", 5)
    body = {"query": "item 3", "top_k": 5, "rerank": {"depth": 5}}
    with make_client(tiny_llama, api_retriever, fusion_weight=0.7) as c:
        data = c.post("/v1/search", json=body).json()
        assert data["fusion_weight"] == 0.7 and ranked(data["hits"]) == approx(fuse(raw, stage1, 0.7))
    with make_client(tiny_llama, api_retriever, fusion_weight=None) as c:  # KVRANK_FUSION_WEIGHT unset (null)
        data = c.post("/v1/search", json=body).json()
        assert data["fusion_weight"] is None
        assert ranked(data["hits"]) == approx(sorted(raw, key=lambda d: -d.score))


def test_search_without_reranking_and_below_the_depth(client, api_retriever):
    plain = client.post("/v1/search", json={"query": "topic 2", "top_k": 5, "rerank": {"mode": "none"}}).json()
    stage1 = api_retriever.search([Query("q", "topic 2")], 5)["q"]
    assert [(h["doc_id"], h["score"], h["reranked"]) for h in plain["hits"]] == [
        (d.doc_id, pytest.approx(d.score), False) for d in stage1]
    assert plain["kv_cache"] == {"hits": 0, "misses": 0} and plain["fusion_weight"] is None
    mixed = client.post("/v1/search", json={"query": "topic 2", "top_k": 5, "rerank": {"depth": 2}}).json()
    assert [h["reranked"] for h in mixed["hits"]] == [True, True, False, False, False]
    assert [h["score"] is None for h in mixed["hits"]] == [False, False, True, True, True]
    assert [h["doc_id"] for h in mixed["hits"][2:]] == [d.doc_id for d in stage1[2:]]  # first-stage order
    assert mixed["fusion_weight"] == DEFAULT_FUSION_WEIGHT


def test_search_fusion_equals_fuse(client, tiny_llama, api_retriever):
    body = {"query": "item 3", "top_k": 5, "rerank": {"depth": 5, "fusion_weight": 0.4}}
    data = client.post("/v1/search", json=body).json()
    raw, stage1 = rerank_reference(tiny_llama, api_retriever, "item 3", 5)
    assert ranked(data["hits"]) == approx(fuse(raw, stage1, 0.4))
    assert data["fusion_weight"] == 0.4


def test_search_ranks_like_kvrank_eval(tiny_llama, tmp_path):
    """`kvrank serve` and `kvrank eval` with the same settings rank alike: for each test query, the `/v1/search`
    hits (ids in order; scores of the reranked head, fused with the default weight) are `run_eval`'s run."""
    rows = [{"_id": p.doc_id, "title": p.title, "text": p.text} for p in CORPUS.values()]
    queries = [{"_id": str(i), "text": t} for i, t in enumerate(["topic 1 item 5", "item 3", "topic 2", "number 7"])]
    dataset = load_dataset(write_beir(tmp_path / "beir", rows, queries, [(q["_id"], "d1", 1) for q in queries]))
    retriever = build_or_load("bm25", dataset, config=RetrieverConfig(show_progress=False))
    depth = 5
    # `kvrank eval --rerank ql --rerank-depth 5`: bm25, --k 100, --fusion-weight 0.3, --kv-format auto (int8 here)
    evaluated = PipelineConfig(retriever="bm25", reranker=RerankerConfig(mode="ql"), rerank_depth=depth)
    with build(evaluated, dataset, lm=tiny_llama, first_stage=retriever) as pipeline:
        report = run_eval(dataset, pipeline, warmup=0)
    assert len(report.run) == 4 and all(len(docs) > depth for docs in report.run.values())  # a head and a tail
    # `kvrank serve --retriever bm25` with KVRANK_RERANK_DEPTH=5: the pipeline `kvrank serve` builds
    served = Settings(retriever="bm25", rerank_depth=depth)
    with TestClient(create_app(build(pipeline_config(served), dataset, lm=tiny_llama, first_stage=retriever),
                               served)) as c:
        for query in dataset.sorted_queries():
            want = report.run[query.query_id]
            r = c.post("/v1/search", json={"query": query.text, "top_k": len(want)})
            assert r.status_code == 200, r.text
            data = r.json()
            assert data["depth"] == depth and data["fusion_weight"] == DEFAULT_FUSION_WEIGHT
            assert [h["doc_id"] for h in data["hits"]] == [d.doc_id for d in want], query
            head = [h["score"] for h in data["hits"] if h["reranked"]]
            assert len(head) == depth
            assert head == pytest.approx([d.score for d in want[:depth]], abs=1e-5), query


# ---------------------------------------------------------------------------------------------- /v1/rerank
def test_rerank_is_cohere_and_jina_compatible_and_stores_document_kv(client, tiny_llama):
    docs = ["Paris is the capital of France.", {"text": "Jupiter is the largest planet."}, "Cats purr."]
    body = {"model": "rerank-english-v3.0", "query": "largest planet", "documents": docs, "top_n": 2,
            "return_documents": True}
    r = client.post("/v1/rerank", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    texts = [d if isinstance(d, str) else d["text"] for d in docs]
    scores = reference(tiny_llama).score("largest planet", [Passage(str(i), "", t) for i, t in enumerate(texts)])
    order = sorted(range(3), key=lambda i: -scores[i])[:2]
    assert [x["index"] for x in data["results"]] == order
    assert [x["relevance_score"] for x in data["results"]] == pytest.approx([scores[i] for i in order], abs=1e-5)
    assert [x["document"]["text"] for x in data["results"]] == [texts[i] for i in order]
    assert data["usage"]["total_tokens"] > 0 and data["id"] and data["model"] == "smollm2"
    assert data["meta"]["kv_cache"] == {"hits": 0, "misses": 3} and data["meta"]["mode"] == "ql"
    # Jina's body (no top_n: every document); the same documents are now stored, so nothing is prefilled.
    jina = client.post("/v1/rerank", json={"model": "jina-reranker-v2-base-multilingual", "query": "cats",
                                           "documents": texts}).json()
    assert len(jina["results"]) == 3 and all(x["document"] is None for x in jina["results"])
    assert jina["meta"]["kv_cache"] == {"hits": 3, "misses": 0}
    # Cohere's v2 SDK posts to /v2/rerank with `max_tokens_per_doc`: fewer tokens, so other (new) KV.
    v2 = client.post("/v2/rerank", json={"model": "rerank-v3.5", "query": "cats", "documents": texts,
                                         "max_tokens_per_doc": 4}).json()
    assert v2["meta"]["max_passage_tokens"] == 4 and v2["meta"]["kv_cache"] == {"hits": 0, "misses": 3}
    assert v2["usage"]["total_tokens"] == len("cats") + 3 * 4  # byte tokenizer: a token per byte


def test_rerank_model_field_picks_a_mode(client, tiny_llama):
    data = client.post("/v1/rerank", json={"model": "kvrank-yesno", "query": "planet",
                                           "documents": ["Mars is red.", "Bread."]}).json()
    assert data["meta"]["mode"] == "yesno"
    scores = reference(tiny_llama, "yesno").score("planet", [Passage("0", "", "Mars is red."),
                                                             Passage("1", "", "Bread.")])
    assert {x["index"]: x["relevance_score"] for x in data["results"]} == {
        0: pytest.approx(scores[0], abs=1e-5), 1: pytest.approx(scores[1], abs=1e-5)}


@pytest.mark.parametrize("mode", ["attn", "cascade", "yesno"])
def test_search_in_every_mode_scores_as_the_reranker_does(client, tiny_llama, api_retriever, mode):
    data = client.post("/v1/search", json={"query": "topic 3", "top_k": 5,
                                           "rerank": {"mode": mode, "depth": 5, "fusion_weight": None}})
    assert data.status_code == 200, data.text
    raw, _ = rerank_reference(tiny_llama, api_retriever, "topic 3", 5, mode)
    assert data.json()["mode"] == mode
    assert {h["doc_id"]: h["score"] for h in data.json()["hits"]} == pytest.approx(
        {d.doc_id: d.score for d in raw}, abs=1e-4)


def test_long_documents_are_truncated_or_rejected_as_configured(tiny_llama, api_retriever):
    long = "word " * 30
    with make_client(tiny_llama, api_retriever, max_document_chars=40) as c:
        data = c.post("/v1/rerank", json={"query": "q", "documents": ["short", long],
                                          "return_documents": True}).json()
        assert data["meta"]["truncated_documents"] == [1]
        assert {x["index"]: x["document"]["text"] for x in data["results"]}[1] == long[:40]
    with make_client(tiny_llama, api_retriever, max_document_chars=40, long_documents="reject") as c:
        r = c.post("/v1/rerank", json={"query": "q", "documents": ["short", long]})
        assert r.status_code == 422
        assert r.json()["error"]["limit"] == "max_document_chars" and r.json()["error"]["param"] == "documents[1]"


BOOKS = [{"title": "Jupiter", "author": "NASA", "text": "Jupiter is the largest planet in the solar system."},
         {"title": "Paris", "author": "Wikipedia", "text": "Paris is the capital of France."},
         {"title": "Planets", "author": "an encyclopedia", "text": "Mars and Jupiter orbit the sun."}]


def test_document_objects_rank_on_rank_fields_as_the_library_ranks_them(client, tiny_llama):
    """Cohere v1 document objects: every field kept and echoed whole; `rank_fields` ["title", "text"] ranks
    `Passage(id, title, text)`, exactly as `kvrank.Reranker.rank(query, [{"title", "text"}])` does."""
    import kvrank

    body = {"query": "largest planet", "documents": BOOKS, "rank_fields": ["title", "text"],
            "return_documents": True}
    r = client.post("/v1/rerank", json=body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    with kvrank.Reranker(tiny_llama, kv_format="none") as library:
        want = library.rank("largest planet", [{"title": d["title"], "text": d["text"]} for d in BOOKS])
    assert [x["index"] for x in results] == [h["corpus_id"] for h in want]
    assert [x["relevance_score"] for x in results] == pytest.approx([h["score"] for h in want], abs=1e-5)
    assert [x["document"] for x in results] == [BOOKS[h["corpus_id"]] for h in want]  # author included
    passages = [Passage(str(i), d["title"], d["text"]) for i, d in enumerate(BOOKS)]
    assert {x["index"]: x["relevance_score"] for x in results} == pytest.approx(
        dict(enumerate(reference(tiny_llama).score("largest planet", passages))), abs=1e-5)


@pytest.mark.parametrize(("fields", "passage"), [
    (None, lambda d: Passage("", "", d["text"])),  # the default: ["text"]; the title is not read
    (["text", "author"], lambda d: Passage("", "", d["text"] + "\n" + d["author"])),
    (["author", "title", "text"], lambda d: Passage("", d["title"], d["author"] + "\n" + d["text"])),
    (["title"], lambda d: Passage("", d["title"], "")),
])
def test_rank_fields_map_to_the_passage_title_and_text(client, tiny_llama, fields, passage):
    body = {"query": "planet", "documents": BOOKS} | ({"rank_fields": fields} if fields else {})
    data = client.post("/v1/rerank", json=body).json()
    want = reference(tiny_llama).score("planet", [passage(d) for d in BOOKS])
    assert {x["index"]: x["relevance_score"] for x in data["results"]} == pytest.approx(dict(enumerate(want)),
                                                                                        abs=1e-5)


def test_string_and_object_documents_mix(client, tiny_llama):
    docs = ["Jupiter is the largest planet.", {"text": "Paris is in France.", "id": "p"}]
    data = client.post("/v1/rerank", json={"query": "planet", "documents": docs, "return_documents": True}).json()
    assert {x["index"]: x["document"] for x in data["results"]} == {0: {"text": docs[0]}, 1: docs[1]}
    want = reference(tiny_llama).score("planet", [Passage("0", "", docs[0]), Passage("1", "", "Paris is in France.")])
    assert {x["index"]: x["relevance_score"] for x in data["results"]} == pytest.approx(dict(enumerate(want)),
                                                                                        abs=1e-5)


def test_the_document_limit_counts_the_rank_fields_together(tiny_llama, api_retriever):
    """`max_document_chars` applies to the ranked text: the rank fields' characters together (other fields are
    not read). Truncated, the fields are cut in rank_fields order and echoed as the model read them."""
    doc = {"title": "T" * 10, "author": "A" * 100, "text": "x " * 25}
    short = {"title": "", "text": "short"}
    body = {"query": "q", "documents": [doc, short], "rank_fields": ["title", "text"], "return_documents": True}
    with make_client(tiny_llama, api_retriever, max_document_chars=40) as c:
        data = c.post("/v1/rerank", json={**body, "documents": [doc | {"text": "x" * 30}, short]}).json()
        assert data["meta"]["truncated_documents"] == []  # 10 + 30 characters: at the limit
        data = c.post("/v1/rerank", json=body).json()
        assert data["meta"]["truncated_documents"] == [0]
        echoed = {x["index"]: x["document"] for x in data["results"]}[0]
        assert echoed == {"title": "T" * 10, "author": "A" * 100, "text": ("x " * 25)[:30]}
        want = reference(tiny_llama).score("q", [Passage("0", "T" * 10, ("x " * 25)[:30])])
        assert {x["index"]: x["relevance_score"] for x in data["results"]}[0] == pytest.approx(want[0], abs=1e-5)
    with make_client(tiny_llama, api_retriever, max_document_chars=40, long_documents="reject") as c:
        r = c.post("/v1/rerank", json=body)
        assert r.status_code == 422 and r.json()["error"]["param"] == "documents[0]"
        assert r.json()["error"]["limit"] == "max_document_chars" and "60 characters" in r.json()["error"]["message"]


def test_library_errors_name_the_request_field(tmp_path, api_retriever):
    """A `KvrankError` from the pipeline becomes a 422 whose `param` is the request's own field for the library
    argument it names (`mode` is `/v1/rerank`'s `model` and `/v1/search`'s `rerank.mode`)."""
    from conftest import API_DATASET
    from conftest_models import tiny_lm

    from kvrank.reranker import adapter as adapters
    from kvrank.reranker.adapter import AdapterCard

    lm = tiny_lm("llama")
    plain = BlockReranker(RerankerConfig(kv_format="none", mode="ql", batch_size=4), lm=lm)
    card = AdapterCard(base_fingerprint=lm.fingerprint, base_model="tiny-llama", mode="ql",
                       template=plain.template.name, rank=4, alpha=8, seed=0)
    adapters.attach(lm, card)
    adapters.save_adapter(tmp_path / "adapter", lm, card)
    config = PipelineConfig(retriever="bm25", reranker=RerankerConfig(batch_size=4), adapter=tmp_path / "adapter",
                            kv_format="none")
    pipeline = build(config, API_DATASET, lm=tiny_lm("llama"), first_stage=api_retriever)
    with TestClient(create_app(pipeline, Settings())) as c:
        for route, body, param in [
            ("/v1/rerank", {"model": "kvrank-attn", "query": "q", "documents": ["a"]}, "model"),
            ("/v2/rerank", {"model": "kvrank-yesno", "query": "q", "documents": ["a"]}, "model"),
            ("/v1/search", {"query": "topic 1", "rerank": {"mode": "attn"}}, "rerank.mode"),
        ]:
            r = c.post(route, json=body)
            assert r.status_code == 422 and "trained for mode 'ql'" in r.text, r.text
            assert r.json()["error"] == {"type": "invalid_request", "message": r.json()["error"]["message"],
                                         "limit": None, "param": param}


# ---------------------------------------------------------------------------------------------- bad input
LIMITED = {"max_query_chars": 20, "max_documents": 3, "max_top_k": 5, "max_rerank_depth": 6, "max_body_bytes": 2048}


@pytest.mark.parametrize(("route", "body", "status", "limit", "param"), [
    ("/v1/search", {"query": ""}, 422, None, "query"),
    ("/v1/search", {"query": "   "}, 422, None, "query"),
    ("/v1/search", {"query": "x" * 21}, 422, "max_query_chars", "query"),
    ("/v1/search", {"query": "ok", "top_k": 6}, 422, "max_top_k", "top_k"),
    ("/v1/search", {"query": "ok", "top_k": 0}, 422, None, "top_k"),
    ("/v1/search", {"query": "ok", "top_k": 1, "rerank": {"depth": 7}}, 422, "max_rerank_depth", "rerank.depth"),
    ("/v1/search", {"query": "ok", "rerank": {"mode": "magic"}}, 422, None, "rerank.mode"),
    ("/v1/search", {"query": "ok", "rerank": {"fusion_weight": 1.5}}, 422, None, "rerank.fusion_weight"),
    ("/v1/search", {"query": "ok", "filter": "x"}, 422, None, "filter"),
    ("/v1/rerank", {"query": "q", "documents": ["a"] * 4}, 422, "max_documents", "documents"),
    ("/v1/rerank", {"query": "q", "documents": []}, 422, None, "documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 422, None, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 4}, 422, "max_documents", "top_n"),
    ("/v1/rerank", {"query": "q", "documents": [{"text": "a", "id": 1}]}, 422, None, None),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "rank_fields": ["title"]}, 422, None, "documents[0].title"),
    ("/v1/rerank", {"query": "q", "documents": [{"text": "a"}, {"title": "b"}], "rank_fields": ["title", "text"]},
     422, None, "documents[0].title"),
    ("/v1/rerank", {"query": "q", "documents": [{"title": "a", "text": "b"}, {"title": "b"}],
                    "rank_fields": ["title", "text"]}, 422, None, "documents[1].text"),
    ("/v1/rerank", {"query": "q", "documents": [{"title": "a"}]}, 422, None, "documents[0].text"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "rank_fields": []}, 422, None, "rank_fields"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "rank_fields": ["text", "text"]}, 422, None, "rank_fields[1]"),
    ("/v1/rerank", {"query": "q", "documents": ["a" * 3000]}, 413, "max_body_bytes", None),
])
def test_limits_and_bad_fields_get_a_4xx_naming_them(tiny_llama, api_retriever, route, body, status, limit, param):
    with make_client(tiny_llama, api_retriever, **LIMITED) as c:
        r = c.post(route, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["limit"] == limit
    if param is not None:
        assert error["param"] == param
    if limit:
        assert limit in error["message"] and f"KVRANK_{limit.upper()}" in error["message"]


def test_malformed_and_non_utf8_bodies(client):
    for raw, message in [(b'{"query": ', "malformed JSON"), (b'{"query": "\xff\xfe"}', "not valid UTF-8"),
                         (b"[1, 2]", "body")]:
        r = client.post("/v1/search", content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 and message in r.json()["error"]["message"], (raw, r.text)
    no_type = client.post("/v1/search", content=b'{"query": "q"}')
    assert no_type.status_code == 422 and "Content-Type: application/json" in no_type.json()["error"]["message"]
    surrogate = client.post("/v1/search", content=b'{"query": "a\\ud800"}',
                            headers={"content-type": "application/json"})
    assert surrogate.status_code == 422 and "unicode" in surrogate.json()["error"]["message"]
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/search").status_code == 405
    assert client.get("/healthz").json() == {"status": "ok"}  # the worker survived all of it


SURROGATE_DOCS = [
    ("/v1/rerank", {"query": "x", "documents": ["ok\ud800"]}, "documents[0]"),
    ("/v1/rerank", {"query": "x", "documents": ["fine", {"text": "\udc80"}]}, "documents[1].text"),
    ("/v2/rerank", {"query": "x", "documents": ["a", "b", "c\udfff d"]}, "documents[2]"),
    ("/v1/rerank", {"query": "x", "documents": ["a", "\ud800"], "return_documents": True}, "documents[1]"),
    ("/v2/rerank", {"query": "x", "documents": [{"text": "\ud800x"}], "return_documents": True}, "documents[0].text"),
    ("/v1/rerank", {"model": "rerank-\udc80", "query": "x", "documents": ["a"]}, "model"),
    ("/v1/rerank", {"query": "\ud800", "documents": ["a"]}, "query"),
    ("/v1/search", {"query": "a\ud800"}, "query"),
]


@pytest.mark.parametrize(("route", "body", "param"), SURROGATE_DOCS)
def test_unencodable_text_in_any_field_is_a_422_naming_it(client, route, body, param):
    """JSON may escape a lone surrogate (`\\ud800`), which no UTF-8 text holds and the tokenizer refuses: every
    text field, documents included, is checked like the query."""
    r = client.post(route, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(f"{param}: character ")
    assert "lone surrogate" in error["message"] and "more)" not in error["message"]


def test_surrogate_pairs_and_other_planes_are_fine(client):
    body = {"model": "rerank-\U0001f600", "query": "x \U0001f600",
            "documents": ["a \U0001f600", {"text": "\x00\ufffe"}]}
    escaped = json.dumps(body).encode()  # ASCII with \\ud83d\\ude00 pairs
    assert b"\\ud83d\\ude00" in escaped
    r = client.post("/v2/rerank", content=escaped, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/v1/search", {"query": "q", "top_k": True}, "top_k"),
    ("/v1/search", {"query": "q", "top_k": "5"}, "top_k"),
    ("/v1/search", {"query": "q", "top_k": 5.0}, "top_k"),
    ("/v1/search", {"query": "q", "rerank": {"depth": False}}, "rerank.depth"),
    ("/v1/search", {"query": "q", "rerank": {"fusion_weight": "0.5"}}, "rerank.fusion_weight"),
    ("/v1/search", {"query": "q", "rerank": {"fusion_weight": True}}, "rerank.fusion_weight"),
    ("/v1/search", {"query": 5}, "query"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": True}, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": "1"}, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "return_documents": "yes"}, "return_documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "return_documents": 1}, "return_documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "return_documents": "true"}, "return_documents"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "max_tokens_per_doc": 2.5}, "max_tokens_per_doc"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "max_chunks_per_doc": "10"}, "max_chunks_per_doc"),
    ("/v1/rerank", {"query": "q", "documents": [1]}, "documents[0]"),
    ("/v1/rerank", {"query": "q", "documents": [{"text": 1}]}, "documents[0].text"),
])
def test_types_are_strict(client, route, body, param):
    """A boolean, a string or a float is not an integer; a string or a number is not a boolean: 422 naming the
    field, never a silent coercion (`top_k: true` is not 1)."""
    r = client.post(route, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_cohere_and_jina_sdk_bodies_pass_strict_validation(client):
    """What Cohere's v1 and v2 SDKs and Jina's API send (ints, booleans, `rank_fields`, `max_chunks_per_doc`,
    `{text}` documents, a float fusion weight given as an integer) is still accepted."""
    v1 = {"model": "rerank-english-v3.0", "query": "planet", "documents": ["Mars.", {"text": "Jupiter."}],
          "top_n": 1, "return_documents": False, "rank_fields": ["text"], "max_chunks_per_doc": 10}
    v2 = {"model": "rerank-v3.5", "query": "planet", "documents": ["Mars.", "Jupiter."], "top_n": 2,
          "max_tokens_per_doc": 4096, "return_documents": True}
    jina = {"model": "jina-reranker-v2-base-multilingual", "query": "planet", "documents": ["Mars."], "top_n": 1,
            "return_documents": True}
    for route, body in [("/v1/rerank", v1), ("/v2/rerank", v2), ("/v1/rerank", jina)]:
        r = client.post(route, json=body)
        assert r.status_code == 200, (route, r.text)
    search = client.post("/v1/search", json={"query": "topic 1", "top_k": 2, "rerank": {"fusion_weight": 1}})
    assert search.status_code == 200 and search.json()["fusion_weight"] == 1.0


@pytest.mark.parametrize(("raw", "message"), [
    (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    (b'{"query": "q", "top_k": ' + b"7" * 5000 + b"}", "more than 4300 digits"),
    (b'{"query": "\xff\xfe"}', "not valid UTF-8"),
])
def test_unparsable_bodies_are_told_why(tiny_llama, api_retriever, raw, message):
    with make_client(tiny_llama, api_retriever, max_body_bytes=200_000) as c:
        r = c.post("/v1/search", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


# ---------------------------------------------------------------------------------------------- load behaviour
def _post_in_thread(client: TestClient, body: dict, out: list, route: str = "/v1/rerank") -> threading.Thread:
    thread = threading.Thread(target=lambda: out.append(client.post(route, json=body)))
    thread.start()
    return thread


def test_concurrent_requests_share_a_micro_batch_with_unbatched_scores(tiny_llama, api_retriever):
    store = GatedStore()
    queries = ["alpha beta", "a considerably longer query text", "x", "topic item"]
    docs = [f"Document {i} about topic {i % 3} and things." for i in range(6)]
    with make_client(tiny_llama, api_retriever, store=store, max_batch_queries=8, batch_wait_ms=0) as c:
        store.gate.clear()
        out: list = []
        threads = [_post_in_thread(c, {"query": queries[0], "documents": docs}, out)]
        assert store.waiting.wait(5)  # the worker holds request 0
        threads += [_post_in_thread(c, {"query": q, "documents": docs[i:]}, out) for i, q in
                    enumerate(queries[1:], start=1)]
        deadline = time.time() + 5
        while c.app.state.batcher.depth < 3 and time.time() < deadline:
            time.sleep(0.01)
        store.gate.set()
        for t in threads:
            t.join(10)
    assert all(r.status_code == 200 for r in out), [r.text for r in out]
    batches = sorted(r.json()["meta"]["batch_queries"] for r in out)
    assert batches == [1, 3, 3, 3]
    ref = reference(tiny_llama)
    by_first = {len(r.json()["results"]): r.json() for r in out}  # 6, 5, 4, 3 documents: one per query
    for i, q in enumerate(queries):
        data = by_first[len(docs) - i]
        want = ref.score(q, [Passage(str(j), "", t) for j, t in enumerate(docs[i:])])
        got = {x["index"]: x["relevance_score"] for x in data["results"]}
        assert [got[j] for j in range(len(want))] == pytest.approx(want, abs=1e-5)


def test_concurrent_searches_share_one_pipeline_call_and_rank_as_alone(tiny_llama, api_retriever):
    """Searches of one micro-batch (same mode, depth and weight; different `top_k`) are one `pipeline.search`
    call, and each answer equals that query's answer alone.

    The reranker's own scores are compared (`fusion_weight` null). A row batched with other queries' rows runs in
    a forward of another shape than alone, which can move its score by one fp32 ulp (4.8e-7 at |score| ~ 5, seen
    when the queries arrive in some orders); fusion z-scores the tiny random model's nearly flat scores (std ~5e-3)
    and would magnify that ulp ~100x."""
    store = GatedStore()
    bodies = [{"query": q, "top_k": k, "rerank": {"depth": 6, "fusion_weight": None}}
              for q, k in [("topic 1 item 5", 3), ("item 3", 8), ("a longer query about topic 2 and item 9", 5)]]
    with make_client(tiny_llama, api_retriever, store=store, max_batch_queries=8, batch_wait_ms=0) as c:
        store.gate.clear()
        out: list = []
        threads = [_post_in_thread(c, {"query": "held topic", "top_k": 1}, out, "/v1/search")]
        assert store.waiting.wait(5)  # the worker holds the first request
        threads += [_post_in_thread(c, body, out, "/v1/search") for body in bodies]
        deadline = time.time() + 5
        while c.app.state.batcher.depth < len(bodies) and time.time() < deadline:
            time.sleep(0.01)
        store.gate.set()
        for t in threads:
            t.join(10)
        assert all(r.status_code == 200 for r in out), [r.text for r in out]
        batched = {r.json()["query"]: r.json() for r in out}
        for body in bodies:
            data = batched[body["query"]]
            assert data["batch_queries"] == len(bodies) and len(data["hits"]) == body["top_k"]
            alone = c.post("/v1/search", json=body).json()
            assert alone["batch_queries"] == 1
            assert [h["doc_id"] for h in data["hits"]] == [h["doc_id"] for h in alone["hits"]]
            assert [h["score"] for h in data["hits"]] == pytest.approx([h["score"] for h in alone["hits"]],
                                                                       abs=1e-5)


def test_full_queue_answers_503_with_retry_after_and_slow_requests_504(tiny_llama, api_retriever):
    store = GatedStore()
    with make_client(tiny_llama, api_retriever, store=store, max_batch_queries=1, queue_size=1,
                     request_timeout_s=1.0) as c:
        store.gate.clear()
        out: list = []
        threads = [_post_in_thread(c, {"query": "q", "documents": ["a"]}, out)]
        assert store.waiting.wait(5)
        threads.append(_post_in_thread(c, {"query": "q2", "documents": ["b"]}, out))
        deadline = time.time() + 5
        while c.app.state.batcher.depth < 1 and time.time() < deadline:
            time.sleep(0.01)
        full = c.post("/v1/rerank", json={"query": "q3", "documents": ["c"]})
        assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1
        assert full.json()["error"]["limit"] == "queue_size"
        for t in threads:
            t.join(10)
        assert sorted(r.status_code for r in out) == [504, 504]  # held past request_timeout_s
        assert out[0].json()["error"]["limit"] == "request_timeout_s"
        store.gate.set()
        assert c.post("/v1/rerank", json={"query": "q4", "documents": ["d"]}).status_code == 200
        metrics = c.get("/metrics").text
    assert 'kvrank_rejected_total{reason="queue_full"} 1.0' in metrics
    assert 'kvrank_rejected_total{reason="timeout"} 2.0' in metrics


def test_batcher_drains_on_close_and_survives_a_failing_batch():
    seen: list[list[int]] = []

    def process(batch):
        seen.append([job.payload for job in batch])
        for job in batch:
            if job.payload == 13:
                raise RuntimeError("boom")
            job.future.set_result(job.payload * 2)

    batcher = Batcher(process, max_batch=4, max_wait_s=0.0, queue_size=3)
    jobs = [batcher.submit(i) for i in (1, 2, 3)]
    with pytest.raises(QueueFull):
        batcher.submit(4)
    cancelled = jobs[1].future.cancel()  # a request that timed out before the worker took it
    batcher.start()
    assert batcher.close(5)
    assert seen == [[1, 3]] and cancelled
    assert jobs[0].future.result() == 2 and jobs[2].future.result() == 6
    with pytest.raises(Closed):
        batcher.submit(5)
    failing = Batcher(process, max_batch=1, max_wait_s=0.0)
    failing.start()
    bad, good = failing.submit(13), failing.submit(7)
    with pytest.raises(RuntimeError, match="boom"):
        bad.future.result(5)
    assert good.future.result(5) == 14
    failing.close(5)


@pytest.mark.parametrize("mode", ["ql", "yesno"])
def test_score_many_equals_one_query_at_a_time(tiny_llama, mode):
    """`BlockReranker.score_many`, the one scoring path (the API's micro-batches and the search pipeline): rows of
    different queries and of blocks of different lengths share forward passes (11 rows, 4 per pass), yet each
    list's scores equal `score` of its query alone, one row per pass; a passage shared by lists is prefilled once."""
    passages = [Passage(f"p{i}", f"T{i}", "text " * (i + 1)) for i in range(7)]
    lists = [passages[:5], passages[2:], passages[:1]]
    queries = ["short", "a much longer query with many more words in it", "mid query"]
    many = BlockReranker(RerankerConfig(kv_format="none",
                                        mode=mode, batch_size=4), lm=tiny_llama).score_many(queries, lists)
    assert many.kv_misses == [5, 2, 0] and many.kv_hits == [0, 3, 1]
    assert set(many.timings.as_dict()) == {"kv_lookup", "prefill", "scoring"}
    alone = BlockReranker(RerankerConfig(kv_format="none", mode=mode, batch_size=1), lm=tiny_llama)
    for query, candidates, got in zip(queries, lists, many.scores, strict=True):
        assert len(got) == len(candidates)
        assert torch.allclose(torch.tensor(got), torch.tensor(alone.score(query, candidates)), atol=1e-5)


# ---------------------------------------------------------------------------------------------- ops and security
def test_api_keys_guard_every_route_but_health_and_are_never_logged(tiny_llama, api_retriever, caplog):
    caplog.set_level("DEBUG")
    with make_client(tiny_llama, api_retriever, api_keys=KEY) as c:
        for method, path in [("post", "/v1/search"), ("post", "/v1/rerank"), ("get", "/metrics"),
                             ("get", "/openapi.json")]:
            r = c.post(path, json={"query": "q", "documents": ["a"]}) if method == "post" else c.get(path)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", path
        wrong = c.post("/v1/rerank", json={"query": "q", "documents": ["a"]},
                       headers={"Authorization": "Bearer " + KEY[:-1] + "x"})
        assert wrong.status_code == 401 and KEY not in wrong.text
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        ok = c.post("/v1/rerank", json={"query": "q", "documents": ["a"]}, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
        spec = c.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert KEY not in caplog.text
    assert KEY not in repr(Settings(api_keys=KEY))
    with pytest.raises(ValueError, match="shorter than 16"):
        Settings(api_keys="short")


def test_cors_is_off_unless_configured(tiny_llama, api_retriever, client):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/v1/search", headers=preflight).headers
    with make_client(tiny_llama, api_retriever, cors_origins="https://app.example") as c:
        r = c.options("/v1/search", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "https://app.example"


def test_the_settings_reference_page_is_generated_from_the_settings():
    """The docs site's settings page asks for the table the docs build generates from `Settings`
    (docs/hooks.py), so it lists every setting, `KVRANK_<NAME>`, as the server reads it."""
    import importlib.util
    from types import SimpleNamespace

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "reference" / "settings.md").read_text(encoding="utf-8")
    spec = importlib.util.spec_from_file_location("kvrank_docs_hooks", root / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    built = hooks.on_page_markdown(page, SimpleNamespace(file=SimpleNamespace(src_uri="reference/settings.md")))
    assert settings_table() in built and "<!-- kvrank:" not in built
    assert all(f"`KVRANK_{name.upper()}`" in built for name in Settings.model_fields)


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("KVRANK_MAX_BATCH_QUERIES", "3")
    monkeypatch.setenv("KVRANK_CORS_ORIGINS", "https://a.example,https://b.example")
    settings = Settings()
    assert settings.max_batch_queries == 3 and settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.host == "127.0.0.1" and settings.fusion_weight == DEFAULT_FUSION_WEIGHT
    monkeypatch.setenv("KVRANK_FUSION_WEIGHT", "0.5")
    assert Settings().fusion_weight == 0.5


def test_metrics_count_requests_kv_use_and_batches(client):
    client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
    client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b", "c"]})
    client.post("/v1/rerank", json={"query": ""})
    text = client.get("/metrics").text
    assert 'kvrank_http_requests_total{method="POST",route="/v1/rerank",status="200"} 2.0' in text
    assert 'kvrank_http_requests_total{method="POST",route="/v1/rerank",status="422"} 1.0' in text
    assert 'kvrank_http_request_duration_seconds_count{method="POST",route="/v1/rerank",status="200"} 2.0' in text
    assert "kvrank_kv_hits_total 2.0" in text and "kvrank_kv_misses_total 3.0" in text
    assert "kvrank_kv_entries 3.0" in text and "kvrank_queue_depth 0.0" in text
    assert "kvrank_batch_queries_count 2.0" in text


def test_not_ready_without_the_worker(tiny_llama, api_retriever):
    client = make_client(tiny_llama, api_retriever)  # no `with`: the lifespan (and the worker) never starts
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["components"]["worker"] is False
    r = client.post("/v1/search", json={"query": "q"})
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"


def test_openapi_documents_errors_and_examples(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/search", "/v1/rerank", "/v2/rerank"):
        op = spec["paths"][path]["post"]
        assert {"200", "400", "401", "413", "422", "503", "504"} <= set(op["responses"])
        assert op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
        assert "Retry-After" in op["responses"]["503"]["headers"]
    schemas = spec["components"]["schemas"]
    for name in ("SearchRequest", "SearchResponse", "RerankRequest", "RerankResponse", "ErrorResponse"):
        assert schemas[name].get("examples"), name
    assert set(spec["paths"]) == {"/v1/search", "/v1/rerank", "/v2/rerank", "/rerank", "/healthz", "/readyz",
                                  "/metrics", "/v1/store"}


def test_serve_refuses_bad_settings_with_a_one_line_error():
    from typer.testing import CliRunner

    from kvrank.cli import app

    result = CliRunner().invoke(app, ["serve", "--rerank", "bogus", "--port", "1"])
    assert result.exit_code == 2
    assert "setting rerank_mode" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------- valid input, fuzzed
@pytest.fixture(scope="module")
def shared_client(tiny_llama, api_retriever):
    with make_client(tiny_llama, api_retriever, max_top_k=10, max_rerank_depth=10, max_documents=6) as c:
        yield c


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=40).filter(str.strip)


@given(query=TEXT, top_k=st.integers(1, 10), depth=st.integers(1, 10),
       mode=st.sampled_from(["none", "ql", "attn", "yesno", "cascade"]),
       fusion=st.one_of(st.none(), st.floats(0.0, 1.0), st.just("default")))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_valid_search_is_answered(shared_client, query, top_k, depth, mode, fusion):
    rerank = {"mode": mode, "depth": depth} | ({} if fusion == "default" else {"fusion_weight": fusion})
    r = shared_client.post("/v1/search", json={"query": query, "top_k": top_k, "rerank": rerank})
    assert r.status_code == 200, r.text
    data = r.json()
    hits = data["hits"]
    assert len(hits) <= top_k and len({h["doc_id"] for h in hits}) == len(hits)
    assert sum(h["reranked"] for h in hits) == (0 if mode == "none" else min(depth, top_k, len(hits)))
    applied = DEFAULT_FUSION_WEIGHT if fusion == "default" else fusion
    assert data["fusion_weight"] == (None if mode == "none" else applied)
    scores = [h["score"] for h in hits if h["reranked"]]
    assert scores == sorted(scores, reverse=True) and all(math.isfinite(s) for s in scores)


@given(query=TEXT, docs=st.lists(st.one_of(TEXT, st.just(""), st.builds(lambda t: {"text": t}, TEXT)),
                                 min_size=1, max_size=6),
       top_n=st.one_of(st.none(), st.integers(1, 6)), echo=st.booleans())
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_valid_rerank_is_answered(shared_client, query, docs, top_n, echo):
    r = shared_client.post("/v1/rerank", json={"query": query, "documents": docs, "top_n": top_n,
                                               "return_documents": echo})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == min(top_n or len(docs), len(docs))
    assert sorted(x["index"] for x in results) == sorted({x["index"] for x in results})
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True) and all(math.isfinite(s) for s in scores)


# ---------------------------------------------------------------------------------------------- any text, fuzzed
# Every free-text and enum-valued string field of every route, and how to put a string there. Strings are any
# code points, lone surrogates included, sent as JSON escapes (`\ud800`) the way a hostile client can.
TEXT_FIELDS = {
    "/v1/search": {"query": lambda s: {"query": s},
                   "rerank.mode": lambda s: {"query": "q", "rerank": {"mode": s}}},
    "/v1/rerank": {"query": lambda s: {"query": s, "documents": ["a"]},
                   "model": lambda s: {"model": s, "query": "q", "documents": ["a"]},
                   "documents[1]": lambda s: {"query": "q", "documents": ["a", s], "return_documents": True},
                   "documents[0].text": lambda s: {"query": "q", "documents": [{"text": s}, "b"],
                                                   "return_documents": True},
                   "documents[0].title": lambda s: {"query": "q", "documents": [{"title": s, "text": "b"}],
                                                    "rank_fields": ["title", "text"], "return_documents": True},
                   "rank_fields[0]": lambda s: {"query": "q", "documents": ["a"], "rank_fields": [s]}},
    "/rerank": {"query": lambda s: {"query": s, "texts": ["a"]},
                "texts[1]": lambda s: {"query": "q", "texts": ["a", s], "return_text": True},
                "truncation_direction": lambda s: {"query": "q", "texts": ["a"], "truncation_direction": s}},
}
TEXT_FIELDS["/v2/rerank"] = TEXT_FIELDS["/v1/rerank"]
# A field whose string may also be refused as naming what another field lacks: a rank field no document has.
ALSO_REFUSED = {"rank_fields[0]": lambda s: f"documents[0].{s}"}
SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)  # st.characters() alone rarely draws one
ANY_TEXT = st.text(st.characters() | SURROGATES, max_size=30) | st.sampled_from(["\x00", " ", "ql", "text"])


@given(route=st.sampled_from(sorted(TEXT_FIELDS)), data=st.data(), text=ANY_TEXT)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_string_in_any_text_field_is_never_a_5xx(shared_client, route, data, text):
    field = data.draw(st.sampled_from(sorted(TEXT_FIELDS[route])), label="field")
    body = TEXT_FIELDS[route][field](text)
    r = shared_client.post(route, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        also = ALSO_REFUSED[field](text) if field in ALSO_REFUSED else field
        assert r.status_code == 422 and r.json()["error"]["param"] in (field, also), r.text
    else:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            pytest.fail(f"unencodable {field} accepted: {r.text}")
