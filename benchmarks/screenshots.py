"""Regenerate the screenshots in docs/ from real output, in headless Debian Chromium (driven by Playwright):

- docs/search_page.png: `kvrank serve` with its defaults (demo corpus, hybrid first stage, SmolLM2 reranker, ql),
  the page opened on a judged demo query, then "Search again" (the second search reads every passage's KV from
  the store);
- docs/eval_report.png: the HTML report (`kvrank eval --html`) of a real evaluation, by default SciFact's first 20
  test queries, BM25 top 20 reranked with ql (pass --report RUN.json to reuse an existing `kvrank eval --json`).

    python benchmarks/screenshots.py [--data ../shared/data/scifact] [--max-queries 20] [--report RUN.json]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlencode

from kvrank.testing import ServerNotReady, wait_ready

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHROMIUM = os.environ.get("KVRANK_CHROMIUM", "/usr/bin/chromium")
QUERY = "What is the capital of Japan?"  # demo query q01 (judged)
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
# A first search prefills 20 passages with SmolLM2; on a small shared CPU that can take longer than the default
# 30 s request limit.
SERVE_ENV = {**ENV, "KVRANK_REQUEST_TIMEOUT_S": os.environ.get("KVRANK_REQUEST_TIMEOUT_S", "600")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def page_screenshot(browser, out: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen([sys.executable, "-m", "kvrank.cli", "serve", "--port", str(port)], cwd=ROOT,
                              env=SERVE_ENV, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        try:
            waited = wait_ready(url, server, timeout_s=600, poll_s=0.5)
        except ServerNotReady as error:
            log.seek(0)
            raise SystemExit(f"{error}:\n{log.read()[-3000:]}") from None
        print(f"kvrank serve ready in {waited:.0f} s at {url}")
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(f"{url}/?{urlencode({'q': QUERY, 'mode': 'ql'})}")
        page.wait_for_selector("#final .hit, #error:not([hidden])", timeout=600_000)
        if page.locator("#error").is_visible():
            raise SystemExit(f"the search failed: {page.locator('#error').inner_text()}")
        page.get_by_role("button", name="Search again").click()
        page.wait_for_selector("li.timing[data-run='2']", timeout=600_000)
        for run in (1, 2):
            print(f"search {run}: " + page.locator(f"li.timing[data-run='{run}'] .timing-head").inner_text()
                  .replace("\n", "  "))
        print(page.locator("#reuse").inner_text())
        page.screenshot(path=out, full_page=True)
        page.close()
    finally:
        server.terminate()
        server.wait(60)
        log.close()


def report_screenshot(browser, report: Path | None, args: argparse.Namespace, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "report.html"
        if report is None:
            report = Path(tmp) / "report.json"
            command = [sys.executable, "-m", "kvrank.cli", "eval", "--data", args.data, "--max-queries",
                       str(args.max_queries), "--rerank", args.rerank, "--json", str(report), "--html", str(html)]
            print("running", " ".join(command[2:]))
            subprocess.run(command, cwd=ROOT, env=ENV, check=True)
        else:
            subprocess.run([sys.executable, "-m", "kvrank.cli", "report", str(report), "--html", str(html)],
                           cwd=ROOT, env=ENV, check=True)
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        page.goto(html.as_uri())
        page.screenshot(path=out, full_page=True)
        page.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    parser.add_argument("--max-queries", type=int, default=20)
    parser.add_argument("--rerank", default="ql")
    parser.add_argument("--report", type=Path, help="an existing `kvrank eval --json` report to show instead")
    parser.add_argument("--only", choices=("page", "report"), help="regenerate one of the two")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        if args.only in (None, "page"):
            page_screenshot(browser, DOCS / "search_page.png")
            print(f"wrote {DOCS / 'search_page.png'}")
        if args.only in (None, "report"):
            report_screenshot(browser, args.report, args, DOCS / "eval_report.png")
            print(f"wrote {DOCS / 'eval_report.png'}")
        browser.close()


if __name__ == "__main__":
    main()
