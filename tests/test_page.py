"""The search page's routes without a browser: the page and its files (open even with API keys), its JSON
endpoints (store panel, config, judgements of a judged query) and the page's Content-Security-Policy."""

from __future__ import annotations

import re

from conftest import api_pipeline
from fastapi.testclient import TestClient

from kvrank.api.app import create_app
from kvrank.api.page import STATIC, Judgements
from kvrank.api.settings import Settings
from kvrank.types import Dataset, Passage, Qrel, Query

KEY = "page-test-key-0123456789"
DATASET = Dataset(name="page-tiny", corpus={"d1": Passage("d1", "", "x")},
                  queries={"q2": Query("q2", "Topic  ONE items"), "q1": Query("q1", "topic 3")},
                  qrels=[Qrel("q1", "d3", 2), Qrel("q1", "d7", 0), Qrel("q2", "d1", 1)])


def client(lm, retriever, **settings) -> TestClient:
    pipeline = api_pipeline(lm, retriever)
    return TestClient(create_app(pipeline, Settings(**settings), judgements=Judgements.from_dataset(DATASET)))


def test_page_and_files_are_served_with_a_strict_csp(tiny_llama, api_retriever):
    with client(tiny_llama, api_retriever) as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
        for asset in re.findall(r'(?:src|href)="(/page/[^"]+)"', page.text):
            assert http.get(asset).status_code == 200, asset
        assert {"/page/page.js", "/page/page.css"} <= set(re.findall(r'"(/page/[^"]+)"', page.text))
    for path in STATIC.iterdir():  # nothing the page loads comes from elsewhere
        assert not re.search(r"(src|href)=\"(https?:)?//|url\((https?:)?//|fetch\(\"?https?:", path.read_text())


def test_store_config_and_judgements_endpoints(tiny_llama, api_retriever):
    with client(tiny_llama, api_retriever, rerank_depth=4, max_rerank_depth=50) as http:
        empty = http.get("/v1/store").json()
        assert empty["entries"] == 0 and empty["hits"] == empty["misses"] == 0 and empty["kv_format"] == "none"
        http.post("/v1/search", json={"query": "topic 3", "rerank": {"depth": 4}})
        http.post("/v1/search", json={"query": "topic 3", "rerank": {"depth": 4}})
        stats = http.get("/v1/store").json()
        assert stats["entries"] == 4 and stats["misses"] == 4 and stats["hits"] == 4 and stats["hit_rate"] == 0.5
        assert stats["bytes"] > 0 and stats["bytes_per_token"] == round(stats["bytes"] / stats["tokens"], 1)
        assert stats["persistent"] is False

        config = http.get("/v1/page/config").json()
        assert config["modes"] == ["none", "ql", "attn", "yesno", "cascade"] and config["default_mode"] == "ql"
        assert config["depth"] == 4 and config["max_rerank_depth"] == 50 and config["adapter"] is None
        assert config["corpus"] == "page-tiny" and config["judged_queries"] == 2
        assert config["examples"] == ["topic 3", "Topic  ONE items"]  # sorted by query id

        judged = http.get("/v1/page/judgements", params={"query": " Topic 3 "}).json()
        assert judged == {"query_id": "q1", "relevance": {"d3": 2, "d7": 0}}  # case and spacing ignored
        assert http.get("/v1/page/judgements", params={"query": "topic one items"}).json()["query_id"] == "q2"
        assert http.get("/v1/page/judgements", params={"query": "topic 4"}).json() == {"query_id": None,
                                                                                        "relevance": {}}


def test_with_keys_the_page_is_open_and_its_data_needs_the_key(tiny_llama, api_retriever):
    with client(tiny_llama, api_retriever, api_keys=KEY) as http:
        assert http.get("/").status_code == 200 and http.get("/page/page.js").status_code == 200
        for path in ("/v1/store", "/v1/page/config", "/v1/page/judgements?query=x"):
            assert http.get(path).status_code == 401, path
            assert http.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path
        assert http.get("/page/%2e%2e/app.py").status_code == 404  # the static mount serves its folder only
