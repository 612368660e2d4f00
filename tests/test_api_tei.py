"""`POST /rerank`, Hugging Face text-embeddings-inference's rerank API (its router's `RerankRequest` and `Rank`):
`{query, texts, raw_scores, return_text, truncate, truncation_direction}` in, `[{index, score, text?}]` best first
out, through an HTTP client (Starlette's TestClient is an httpx client) over the tiny pipeline of conftest.py.
`huggingface_hub.InferenceClient` has no rerank call, so httpx is the client here."""

from __future__ import annotations

import json
import math

import pytest
from conftest import make_app
from fastapi.testclient import TestClient

from kvrank.api.errors import invalid
from kvrank.api.routes import RERANK_PARAMS, SEARCH_PARAMS, TEI_PARAMS, sigmoid
from kvrank.errors import KvrankError
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.types import Passage

KEY = "t" * 8 + "secret-api-key-0123"
TEXTS = ["Paris is the capital of France.", "Jupiter is the largest planet.", "Cats purr.", "Mars is red."]


@pytest.fixture(scope="module")
def client(tiny_llama, api_retriever):
    with TestClient(make_app(tiny_llama, api_retriever, max_documents=5, max_query_chars=40,
                             max_document_chars=40)) as c:
        yield c


def scores(lm, query: str, texts: list[str], mode: str = "ql") -> list[float]:
    """A plain reranker's scores (uncompressed KV in its own store): what the API must reproduce."""
    reranker = BlockReranker(RerankerConfig(kv_format="none", mode=mode, batch_size=4), lm=lm)
    return reranker.score(query, [Passage(str(i), "", t) for i, t in enumerate(texts)])


def test_tei_rerank_answers_ranks_best_first_with_sigmoid_scores(client, tiny_llama):
    r = client.post("/rerank", json={"query": "largest planet", "texts": TEXTS})
    assert r.status_code == 200, r.text
    ranks = r.json()
    raw = scores(tiny_llama, "largest planet", TEXTS)
    order = sorted(range(len(TEXTS)), key=lambda i: -raw[i])
    assert [x["index"] for x in ranks] == order
    assert [x["score"] for x in ranks] == pytest.approx([1 / (1 + math.exp(-raw[i])) for i in order], abs=1e-6)
    assert all(set(x) == {"index", "score"} for x in ranks)  # no `text` key at all without return_text
    assert all(0 < x["score"] < 0.5 for x in ranks)  # ql: a mean log-probability (< 0) through the sigmoid


def test_tei_raw_scores_and_return_text(client, tiny_llama):
    ranks = client.post("/rerank", json={"query": "cats", "texts": TEXTS, "raw_scores": True,
                                          "return_text": True}).json()
    raw = scores(tiny_llama, "cats", TEXTS)
    assert {x["index"]: x["score"] for x in ranks} == pytest.approx(dict(enumerate(raw)), abs=1e-5)
    assert [x["text"] for x in ranks] == [TEXTS[x["index"]] for x in ranks]
    assert [x["score"] for x in ranks] == sorted((x["score"] for x in ranks), reverse=True)


def test_tei_ranks_as_the_cohere_route(client):
    tei = client.post("/rerank", json={"query": "planet", "texts": TEXTS, "raw_scores": True}).json()
    cohere = client.post("/v1/rerank", json={"query": "planet", "documents": TEXTS}).json()["results"]
    assert [(x["index"], pytest.approx(x["score"], abs=1e-6)) for x in tei] == [
        (x["index"], x["relevance_score"]) for x in cohere]


def test_tei_truncate_maps_to_the_long_document_limit(client, tiny_llama):
    """`truncate: true` cuts a text over `max_document_chars` (40 here) at the end (`Right`) or the start
    (`Left`); `false` rejects it; unset follows the server's `long_documents` (truncate, by default). The echoed
    text is the text as sent."""
    long = "alpha " * 5 + "omega " * 5  # 60 characters
    texts = ["short text", long]

    def score_of(body: dict) -> float:
        r = client.post("/rerank", json={"query": "q", "texts": texts, "raw_scores": True, "return_text": True,
                                         **body})
        assert r.status_code == 200, r.text
        assert {x["index"]: x["text"] for x in r.json()}[1] == long
        return {x["index"]: x["score"] for x in r.json()}[1]

    right, left = scores(tiny_llama, "q", [long[:40], long[-40:]])
    assert score_of({"truncate": True}) == pytest.approx(right, abs=1e-5)
    assert score_of({"truncate": True, "truncation_direction": "Right"}) == pytest.approx(right, abs=1e-5)
    assert score_of({"truncate": True, "truncation_direction": "Left"}) == pytest.approx(left, abs=1e-5)
    assert score_of({"truncate": True, "truncation_direction": "left"}) == pytest.approx(left, abs=1e-5)
    assert score_of({}) == pytest.approx(right, abs=1e-5)
    assert score_of({"truncate": None, "truncation_direction": "Left"}) == pytest.approx(left, abs=1e-5)
    r = client.post("/rerank", json={"query": "q", "texts": texts, "truncate": False})
    assert r.status_code == 422
    assert r.json()["error"] == {"type": "limit_exceeded", "limit": "max_document_chars", "param": "texts[1]",
                                 "message": r.json()["error"]["message"]}
    assert "60 characters" in r.json()["error"]["message"] and '"truncate": true' in r.json()["error"]["message"]


def test_tei_unset_truncate_follows_a_rejecting_server(tiny_llama, api_retriever):
    with TestClient(make_app(tiny_llama, api_retriever, max_document_chars=10, long_documents="reject")) as c:
        r = c.post("/rerank", json={"query": "q", "texts": ["a" * 11]})
        assert r.status_code == 422 and r.json()["error"]["limit"] == "max_document_chars"
        assert "KVRANK_LONG_DOCUMENTS=truncate" in r.json()["error"]["message"]
        assert c.post("/rerank", json={"query": "q", "texts": ["a" * 11], "truncate": True}).status_code == 200


@pytest.mark.parametrize(("body", "limit", "param"), [
    ({"query": "q", "texts": ["a"] * 6}, "max_documents", "texts"),
    ({"query": "q" * 41, "texts": ["a"]}, "max_query_chars", "query"),
    ({"query": "  ", "texts": ["a"]}, None, "query"),
    ({"query": "q", "texts": []}, None, "texts"),
    ({"texts": ["a"]}, None, "query"),
    ({"query": "q"}, None, "texts"),
    ({"query": "q", "texts": ["a"], "model": "x"}, None, "model"),  # unknown fields are refused
    ({"query": "q", "texts": ["a"], "raw_scores": "true"}, None, "raw_scores"),
    ({"query": "q", "texts": ["a"], "return_text": 1}, None, "return_text"),
    ({"query": "q", "texts": ["a"], "truncate": "yes"}, None, "truncate"),
    ({"query": "q", "texts": ["a"], "truncation_direction": "Up"}, None, "truncation_direction"),
    ({"query": "q", "texts": ["a", 2]}, None, "texts[1]"),
    ({"query": "q", "texts": "a"}, None, "texts"),
    ({"query": "q", "texts": ["a", "b\ud800"]}, None, "texts[1]"),
])
def test_tei_bad_requests_get_a_422_naming_the_field(client, body, limit, param):
    # sent as ASCII JSON, the way a client escapes a lone surrogate (`\ud800`)
    r = client.post("/rerank", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["limit"], error["param"]) == (limit, param), r.text
    if limit:
        assert f"KVRANK_{limit.upper()}" in error["message"]


def test_tei_route_is_guarded_counted_and_documented(tiny_llama, api_retriever):
    with TestClient(make_app(tiny_llama, api_retriever, api_keys=KEY)) as c:
        body = {"query": "q", "texts": ["a", "b"]}
        denied = c.post("/rerank", json=body)
        assert denied.status_code == 401 and denied.headers["WWW-Authenticate"] == "Bearer"
        auth = {"Authorization": f"Bearer {KEY}"}
        assert c.post("/rerank", json=body, headers=auth).status_code == 200
        assert c.post("/rerank", json={"query": ""}, headers=auth).status_code == 422
        metrics = c.get("/metrics", headers=auth).text
        spec = c.get("/openapi.json", headers=auth).json()
    for status in ("200", "401", "422"):
        assert f'kvrank_http_requests_total{{method="POST",route="/rerank",status="{status}"}} 1.0' in metrics
    op = spec["paths"]["/rerank"]["post"]
    assert op["security"] == [{"bearer": []}]
    assert {"200", "400", "401", "413", "422", "503", "504"} <= set(op["responses"])
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("TeiRerankRequest")
    answer = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer["type"] == "array" and answer["items"]["$ref"].endswith("TeiRank")
    request = spec["components"]["schemas"]["TeiRerankRequest"]
    assert set(request["properties"]) == {"query", "texts", "raw_scores", "return_text", "truncate",
                                          "truncation_direction"}
    assert request["required"] == ["query", "texts"] and request["additionalProperties"] is False
    assert request["properties"]["texts"]["maxItems"] == 100 and request["properties"]["query"]["maxLength"] == 2000
    defaults = {name: field.get("default") for name, field in request["properties"].items()}
    assert defaults == {"query": None, "texts": None, "raw_scores": False, "return_text": False, "truncate": None,
                        "truncation_direction": "Right"}


def test_sigmoid_is_stable_and_keeps_the_order():
    values = [-1000.0, -30.0, -2.5, 0.0, 2.5, 30.0, 1000.0]
    out = [sigmoid(v) for v in values]
    assert out[3] == 0.5 and out[0] == 0.0 and out[-1] == 1.0
    assert out == sorted(out) and out[1] < out[2] < out[3] < out[4] < out[5]


@pytest.mark.parametrize(("params", "library", "field"), [
    (RERANK_PARAMS, "top_k", "top_n"), (RERANK_PARAMS, "mode", "model"), (RERANK_PARAMS, "query", "query"),
    (RERANK_PARAMS, "max_passage_tokens", "max_tokens_per_doc"), (SEARCH_PARAMS, "k", "top_k"),
    (SEARCH_PARAMS, "mode", "rerank.mode"), (TEI_PARAMS, "documents", "texts"), (TEI_PARAMS, "query", "query"),
])
def test_a_library_param_is_named_as_the_route_names_it(params, library, field):
    error = invalid(KvrankError("bad value; fix it", param=library), params)
    assert (error.status, error.type, error.param, error.message) == (422, "invalid_request", field,
                                                                       "bad value; fix it")
    assert invalid(KvrankError("no field at fault"), params).param is None
