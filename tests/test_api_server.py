"""The API served by a real uvicorn on a loopback port: HTTP calls (every rerank route, TEI's `/rerank` included),
graceful shutdown with a request in flight, and a bounded schemathesis run against the served OpenAPI document (no
5xx, responses match the schema)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from conftest import GatedStore, make_app

FUZZ_EXAMPLES = 50  # per operation and phase; the whole run stays well under a minute


class LiveServer:
    """uvicorn in a thread on 127.0.0.1 with an OS-chosen port; `stop()` is what SIGTERM does."""

    def __init__(self, app) -> None:
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=20)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.thread.join(30)


LIMITS = {"max_documents": 8, "max_query_chars": 200, "max_document_chars": 300, "max_top_k": 10,
          "max_rerank_depth": 10, "rerank_depth": 5}


def served_app(lm, retriever, store: GatedStore | None = None):
    """The tiny pipeline of conftest.py (`make_app`), 8 scoring rows per pass, with small limits to fuzz."""
    return make_app(lm, retriever, store, batch_size=8, **LIMITS)


@pytest.fixture(scope="module")
def live(tiny_llama, api_retriever):
    with LiveServer(served_app(tiny_llama, api_retriever)) as server:
        yield server


def test_real_server_over_http(live):
    with httpx.Client(base_url=live.url, timeout=30) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json()["ready"] is True
        found = http.post("/v1/search", json={"query": "topic 3", "top_k": 3}).json()
        assert len(found["hits"]) == 3 and all(h["reranked"] for h in found["hits"])
        assert found["depth"] == 5 and found["fusion_weight"] == 0.3  # the server's defaults
        ranked = http.post("/v1/rerank", json={"query": "topic 3", "documents": ["about topic 3", "other"]})
        assert ranked.status_code == 200 and {r["index"] for r in ranked.json()["results"]} == {0, 1}
        tei = http.post("/rerank", json={"query": "topic 3", "texts": ["about topic 3", "other"], "return_text": True})
        assert tei.status_code == 200 and sorted(r["index"] for r in tei.json()) == [0, 1]
        assert [r["text"] for r in tei.json()] == [["about topic 3", "other"][r["index"]] for r in tei.json()]
        assert all(0 < r["score"] < 1 for r in tei.json())  # the sigmoid of a score (raw_scores: false)
        cohere = http.post("/v1/rerank", json={"query": "topic 3", "rank_fields": ["title", "text"],
                                               "return_documents": True,
                                               "documents": [{"title": "T", "author": "A", "text": "topic 3"}]})
        assert cohere.json()["results"][0]["document"] == {"title": "T", "author": "A", "text": "topic 3"}
        metrics = http.get("/metrics").text
        assert 'route="/v1/rerank",status="200"' in metrics and 'route="/rerank",status="200"' in metrics


def test_graceful_shutdown_finishes_the_request_in_flight(tiny_llama, api_retriever):
    store = GatedStore()
    app = served_app(tiny_llama, api_retriever, store)
    out: list[httpx.Response] = []
    with LiveServer(app) as server:
        store.gate.clear()
        call = threading.Thread(target=lambda: out.append(
            httpx.post(f"{server.url}/v1/rerank", json={"query": "q", "documents": ["a", "b"]}, timeout=30)))
        call.start()
        assert store.waiting.wait(10)  # the request is in the model worker
        server.stop()  # as on SIGTERM: stop accepting, wait for in-flight requests
        time.sleep(0.3)
        assert server.thread.is_alive() and not out
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.url}/healthz", timeout=2)  # no new connections during shutdown
        store.gate.set()
        call.join(30)
        server.thread.join(30)
    assert out and out[0].status_code == 200 and len(out[0].json()["results"]) == 2
    assert not server.thread.is_alive() and not app.state.batcher.alive


def test_served_openapi_fuzz_has_no_server_errors(live, tmp_path):
    """schemathesis' CLI (its pytest plugin does not load under pytest 9) with bounded examples per operation:
    no 5xx, and every response matches the documented status codes, content types, headers and schemas."""
    cli = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [str(cli), "run", f"{live.url}/openapi.json", "--max-examples", str(FUZZ_EXAMPLES),
         "--phases", "examples,coverage,fuzzing", "--seed", "20261129", "--generation-database", "none",
         "--request-timeout", "30", "--checks", "not_a_server_error,status_code_conformance,"
         "content_type_conformance,response_headers_conformance,response_schema_conformance",
         "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "NO_COLOR": "1"}, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert cases and int(cases[1]) == int(cases[2]) >= 100, result.stdout[-3000:]
