"""The search page at `/` in a real headless Chromium, against a real `kvrank serve` (CLI subprocess, demo corpus,
tiny random Llama): search, both columns, URL state, mode switch, timing bar, KV reuse on "search again", a
server limit shown as a readable error and a narrow window; then against the app in a real uvicorn thread (as
tests/test_api_server.py runs it): the key prompt with API keys on, and a full queue's 503."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from browser_support import browser, chromium_or_skip, kvrank_serve

pytestmark = pytest.mark.browser
expect = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]' "
                             "(scripts/test does)").expect
# The page's Content-Security-Policy forbids eval, so waits use locators (`expect`), not `wait_for_function`.

QUERY = "What is the capital of Japan?"  # demo query q01, judged: country-japan-1 has relevance 2
MAX_QUERY_CHARS = 120
KEY = "browser-test-key-0123456789"
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def server(tiny_checkpoint) -> Iterator[str]:
    chromium_or_skip()  # skip before starting a server that nothing would use
    with kvrank_serve(tiny_checkpoint, env={"KVRANK_MAX_QUERY_CHARS": str(MAX_QUERY_CHARS)}) as url:
        yield url


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with browser() as launched:
        yield launched


@pytest.fixture
def page(chromium) -> Iterator[Any]:
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def search(page: Any, query: str, mode: str | None = None, depth: int | None = None) -> None:
    page.get_by_label("Query").fill(query)
    if mode is not None:
        page.get_by_label("Reranking").select_option(mode)
    if depth is not None:
        page.get_by_label("Depth").fill(str(depth))
    page.get_by_role("button", name="Search", exact=True).click()


def hits(page: Any, column: str) -> list[str]:
    return page.locator(f"#{column} .hit").evaluate_all("items => items.map(li => li.dataset.doc)")


def test_search_shows_first_stage_and_reranked_with_moves_timings_and_judgements(server, page):
    page.goto(server + "/")
    expect(page.locator("#mode option")).to_have_count(5, timeout=WAIT_MS)
    search(page, QUERY, mode="ql", depth=10)
    page.wait_for_selector("#final .hit", timeout=WAIT_MS)

    first, final = hits(page, "first"), hits(page, "final")
    assert len(first) == len(final) == 10 and sorted(first) == sorted(final)  # the head, reordered
    api = httpx.post(server + "/v1/search", json={"query": QUERY, "top_k": 10, "rerank": {"mode": "ql", "depth": 10}})
    assert final == [h["doc_id"] for h in api.json()["hits"]]  # the page shows the API's ranking
    moves = page.locator("#final .move").all_inner_texts()
    assert len(moves) == 10 and all(re.search(r"(from|=) #\d+", m) for m in moves)
    assert any("from #" in m for m in moves)  # the random reranker moves something
    for i, doc in enumerate(final):  # "from #N" is the hit's first-stage rank
        label = page.locator(f"#final .hit[data-doc='{doc}'] .move").inner_text()
        assert label.endswith(f"#{first.index(doc) + 1}"), (doc, label, i)
    assert "Japan" in page.locator("#final mark").all_inner_texts()  # query terms highlighted
    assert page.locator("#final .hit[data-doc='country-japan-1'] .badge.relevant").inner_text() == "relevant (2)"
    assert "Judged query q01" in page.locator("#summary").inner_text()

    # first search: every candidate prefilled, a stacked bar with the four stages
    run = page.locator("li.timing[data-run='1']")
    assert "0 hit / 10 prefilled" in run.locator(".kv-run").inner_text()
    for stage in ("retrieve", "kv_lookup", "prefill", "scoring"):
        assert run.locator(f".bar .seg.{stage}").count() == 1, stage
    assert float(run.locator("dd[data-stage='prefill']").inner_text().split()[0]) > 0
    assert page.locator("#store-stats dd[data-stat='entries']").inner_text() != "0"

    params = parse_qs(urlsplit(page.url).query)
    assert params["q"] == [QUERY] and params["mode"] == ["ql"] and params["depth"] == ["10"]


def test_search_again_shows_the_reuse(server, page):
    page.goto(server + "/?" + urlencode({"q": QUERY + " again", "mode": "ql", "depth": "8"}))
    page.wait_for_selector("li.timing[data-run='1']", timeout=WAIT_MS)
    before = hits(page, "final")
    page.get_by_label("Depth").fill("3")  # an edit not yet searched: "Search again" repeats the last search
    page.get_by_role("button", name="Search again").click()
    page.wait_for_selector("li.timing[data-run='2']", timeout=WAIT_MS)
    again = page.locator("li.timing[data-run='2']")
    assert "8 hit / 0 prefilled" in again.locator(".kv-run").inner_text()
    assert again.locator("dd[data-stage='prefill']").inner_text() == "0.0 ms"
    assert again.locator(".bar .seg.prefill").count() == 0  # the prefill segment is gone
    assert "KV: 8 from the store, 0 prefilled" in page.locator("#summary").inner_text()
    assert page.locator("#reuse").get_attribute("data-same") == "yes"
    assert page.locator("#reuse").inner_text().startswith("Same ranking as the previous search")
    assert hits(page, "final") == before


def test_url_opens_a_search_and_switching_mode_updates_it(server, page):
    page.goto(server + "/?" + urlencode({"q": "largest planet", "mode": "yesno", "depth": "5"}))
    page.wait_for_selector("#final .hit", timeout=WAIT_MS)
    assert page.get_by_label("Query").input_value() == "largest planet"
    assert page.get_by_label("Reranking").input_value() == "yesno"
    assert page.get_by_label("Depth").input_value() == "5"
    assert page.locator("#final-note").inner_text().startswith("yesno, top 5 reranked")

    page.get_by_label("Reranking").select_option("attn")
    page.keyboard.press("Tab")  # keyboard only: to the depth field, then Enter submits the form
    page.keyboard.press("Enter")
    expect(page.locator("#final-note")).to_have_text(re.compile("^attn"), timeout=WAIT_MS)
    assert parse_qs(urlsplit(page.url).query)["mode"] == ["attn"]

    search(page, "largest planet", mode="none")
    expect(page.locator("#final-note")).to_have_text(re.compile("^No reranking"), timeout=WAIT_MS)
    assert hits(page, "first") == hits(page, "final")
    assert page.locator("#final .move").count() == 0
    page.go_back()  # the previous URL's search runs again
    expect(page.locator("#final-note")).to_have_text(re.compile("^attn"), timeout=WAIT_MS)


def test_a_server_limit_is_shown_as_a_readable_error(server, page):
    page.goto(server + "/")
    expect(page.locator("#mode option")).to_have_count(5, timeout=WAIT_MS)
    search(page, "capital " * 40)
    error = page.locator("#error")
    error.wait_for(state="visible", timeout=WAIT_MS)
    text = error.inner_text()
    assert text.startswith("Over a server limit (422):"), text
    assert f"the limit max_query_chars is {MAX_QUERY_CHARS}" in text and "KVRANK_MAX_QUERY_CHARS" in text
    assert page.locator("#error").get_attribute("role") == "alert"
    search(page, "capital of France")  # the next good search clears it
    page.wait_for_selector("#final .hit", timeout=WAIT_MS)
    assert page.locator("#error").is_hidden()


def test_narrow_window_has_no_horizontal_scroll_and_labelled_inputs(server, chromium):
    context = chromium.new_context(viewport={"width": 360, "height": 740})
    page = context.new_page()
    page.goto(server + "/?" + urlencode({"q": QUERY, "mode": "ql", "depth": "5"}))
    page.wait_for_selector("#final .hit", timeout=WAIT_MS)
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    boxes = [page.locator(f"#{column}").bounding_box() for column in ("first", "final")]
    assert boxes[1]["y"] > boxes[0]["y"] + boxes[0]["height"] - 1  # columns stack
    for label in ("Query", "Reranking", "Depth", "Fusion weight"):
        assert page.get_by_label(label).count() == 1, label
    context.close()


def test_with_api_keys_the_page_asks_for_a_key_and_sends_it(tiny_llama, api_retriever, chromium):
    """KVRANK_API_KEYS set (a real uvicorn, as tests/test_api_server.py runs it): the page is open, its data is
    not; the page asks for the key, forgets a refused one, and keeps a good one in sessionStorage only."""
    from conftest import make_app
    from test_api_server import LiveServer

    with LiveServer(make_app(tiny_llama, api_retriever, api_keys=KEY, rerank_depth=5)) as server:
        url = server.url
        assert httpx.get(url + "/").status_code == 200  # the page itself is open
        assert httpx.get(url + "/v1/store").status_code == 401
        context = chromium.new_context()
        page = context.new_page()
        page.goto(url + "/?" + urlencode({"q": "topic 2", "mode": "ql", "depth": "5"}))
        panel = page.locator("#key-panel")
        panel.wait_for(state="visible", timeout=WAIT_MS)
        assert page.locator("#error").inner_text().startswith("API key missing or not accepted (401)")
        assert page.evaluate("document.activeElement.id") == "api-key"
        page.get_by_label("API key", exact=True).fill("wrong-key-wrong-key-wrong")
        page.get_by_role("button", name="Use this key").click()
        expect(page.locator("#key-why")).to_have_attribute("data-rejected", "yes", timeout=WAIT_MS)
        assert panel.is_visible()  # refused: asked again, the bad key forgotten
        assert page.evaluate("sessionStorage.getItem('kvrank.apiKey')") is None
        page.get_by_label("API key", exact=True).fill(KEY)
        page.keyboard.press("Enter")
        page.wait_for_selector("#final .hit", timeout=WAIT_MS)  # the URL's search ran with the key
        assert panel.is_hidden() and page.locator("#error").is_hidden()
        assert page.evaluate("sessionStorage.getItem('kvrank.apiKey')") == KEY
        assert page.evaluate("localStorage.length") == 0 and KEY not in page.evaluate("document.cookie")
        expect(page.locator("#store-stats dd[data-stat='entries']")).to_have_text("5", timeout=WAIT_MS)
        context.close()


def test_a_full_queue_is_shown_as_busy_with_the_retry_time(tiny_llama, api_retriever, chromium):
    """A real uvicorn (as tests/test_api_server.py runs it) whose model worker is held busy by a gated store and
    whose one-place queue is full: the page's search gets the API's 503 and says so, with Retry-After."""
    import threading

    from conftest import GatedStore, make_app
    from test_api_server import LiveServer

    store = GatedStore()
    app = make_app(tiny_llama, api_retriever, store, queue_size=1, max_batch_queries=1, rerank_depth=3)
    with LiveServer(app) as server:
        page = chromium.new_page()
        page.goto(server.url + "/")
        expect(page.locator("#mode option")).to_have_count(5, timeout=WAIT_MS)
        store.gate.clear()
        held = [threading.Thread(target=httpx.post, args=(server.url + "/v1/search",),
                                 kwargs={"json": {"query": f"topic {i}"}, "timeout": 60}) for i in range(2)]
        held[0].start()
        assert store.waiting.wait(10)  # the worker is busy with the first search ...
        held[1].start()
        deadline = time.time() + 10
        while app.state.batcher.depth < 1:  # ... and the second fills the queue
            assert time.time() < deadline
            time.sleep(0.02)
        try:
            search(page, "topic 1")
            error = page.locator("#error")
            error.wait_for(state="visible", timeout=WAIT_MS)
            text = error.inner_text()
            assert text.startswith("The server is busy (503):") and "queue_size" in text, text
            assert re.search(r"Try again in \d+ s\.$", text), text
        finally:
            store.gate.set()
            for thread in held:
                thread.join(60)
        search(page, "topic 1")  # the worker is free again
        page.wait_for_selector("#final .hit", timeout=WAIT_MS)
        assert page.locator("#error").is_hidden()
        page.close()
