"""`kvrank eval --html` and `kvrank report --html`: one self-contained HTML file (nothing fetched, plots inline),
with the report's own numbers; and it renders in headless Chromium (marker `browser`)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from kvrank.cli import app


def invoke(*args: object) -> Result:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> tuple[dict, str, Path]:
    """A real `kvrank eval --rerank ql` on the tiny BEIR folder with the tiny Llama: its JSON and its HTML."""
    from conftest import write_beir

    folder = tmp_path_factory.mktemp("html")
    beir = write_beir(folder / "tiny")
    out = folder / "out"
    invoke("eval", "--data", beir, "--retriever", "bm25", "--rerank", "ql", "--rerank-depth", "4", "--model",
           tiny_checkpoint, "--json", out / "ql.json", "--html", out / "ql.html")
    return json.loads((out / "ql.json").read_text()), (out / "ql.html").read_text(encoding="utf-8"), out


def images(html: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_eval_html_is_self_contained_and_shows_the_report(evaluated) -> None:
    report, html, _ = evaluated
    assert not re.search(r"https?://", html)  # nothing to fetch: no external references at all
    assert not re.search(r"<(script|link|iframe)\b", html) and 'src="' not in html.replace('src="data:image/png', "")
    plots = images(html)
    assert len(plots) == 2 and all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 5000 for p in plots)

    for name, final in report["metrics"].items():  # every metric, both stages and the change
        first = report["first_stage_metrics"][name]
        row = re.search(rf"<th scope=\"row\">{re.escape(name)}</th><td>([^<]+)</td><td>([^<]+)</td>\s*<td[^>]*>([^<]+)",
                        html)
        assert row and row.groups() == (f"{first:.4f}", f"{final:.4f}", f"{final - first:+.4f}"), name
    per_query = report["per_query"]
    deltas = {q: v["final"]["nDCG@10"] - v["first_stage"]["nDCG@10"] for q, v in per_query.items()}
    lost = [q for q, d in deltas.items() if d < 0]
    gained = sum(d > 0 for d in deltas.values())
    assert (f"Of {len(deltas)} queries, {gained} gained, {len(lost)} lost and {sum(d == 0 for d in deltas.values())} "
            "did not change" in html)
    if lost:
        assert f"Queries that got worse ({len(lost)})" in html
        for query_id in lost:
            assert f"<td>{query_id}</td><td class=\"text\">{per_query[query_id]['text']}</td>" in html
    else:
        assert "No query got worse." in html
    # latency after warm-up: the table's n is the queries less the warm-up one
    assert re.search(r"<th scope=\"row\">prefill</th>(<td>[^<]+</td>){3}<td>3</td>", html)
    assert f"<dt>misses</dt><dd>{report['kv_cache']['misses']}</dd>" in html
    assert f"<dt>bytes</dt><dd>{report['kv_cache']['bytes']:,} (" in html
    assert "<dt>rerank_depth</dt><dd>4</dd>" in html and "<dt>machine.cpu_count</dt>" in html


def test_report_html_compares_runs_escapes_text_and_shows_p_values(evaluated, tmp_path: Path) -> None:
    report, _, out = evaluated
    other = json.loads(json.dumps(report))
    other["metrics"] = {name: value + 0.05 for name, value in report["metrics"].items()}
    other["significance"] = {"test": "paired t-test", "p_values": {"nDCG@10": 0.0123}}
    query_id = next(iter(other["per_query"]))
    entry = other["per_query"][query_id]
    entry["text"] = "<img src=x onerror=alert(1)> & co"
    entry["final"]["nDCG@10"] = entry["first_stage"]["nDCG@10"] - 0.25  # now it got worse
    (tmp_path / "other.json").write_text(json.dumps(other))
    page = tmp_path / "compare.html"
    result = invoke("report", out / "ql.json", tmp_path / "other.json", "--html", page)
    assert f"wrote {page}" in result.output.replace("\n", "")
    html = page.read_text(encoding="utf-8")
    assert "Runs compared" in html and "<th scope=\"col\">ql</th><th scope=\"col\">other</th>" in html
    first_ndcg = report["metrics"]["nDCG@10"]
    assert f"{first_ndcg + 0.05:.4f} <span class=\"up\">(+0.0500)</span>" in html
    assert "<th scope=\"col\">p (paired t-test)</th>" in html and "<td>0.0123</td>" in html
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; co" in html and "<img src=x" not in html
    assert len(images(html)) == 4  # two plots per run
    # the pairwise test of `kvrank report`, Holm-corrected, from the per-query values of both files
    from kvrank.eval.compare import compare_reports
    from kvrank.eval.runner import load_report

    rows = compare_reports([("ql", load_report(out / "ql.json")), ("other", load_report(tmp_path / "other.json"))])
    ndcg = next(row for row in rows if row.metric == "nDCG@10")
    assert "<th scope=\"col\">p (Holm)</th>" in html
    assert (f"<th scope=\"row\">nDCG@10</th><td>ql</td><td>other</td><td>{ndcg.queries}</td>" in html
            and f"<td>{ndcg.p_holm:.4f}" in html)


def test_html_to_a_folder_is_refused_before_the_evaluation(tiny_beir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", "--data", str(tiny_beir), "--html", str(tmp_path)])
    assert result.exit_code != 0 and "is a folder" in result.output and "report.html" in result.output


@pytest.mark.browser
def test_html_report_renders_offline_in_chromium(evaluated) -> None:
    from browser_support import browser
    from matplotlib.image import imread

    _, _, out = evaluated
    with browser() as chromium:
        page = chromium.new_page(viewport={"width": 1100, "height": 900})
        fetched: list[str] = []
        page.on("request", lambda request: fetched.append(request.url))
        page.goto((out / "ql.html").as_uri())
        assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 300)")
        assert page.evaluate("document.images.length") == 2
        shot = page.screenshot(full_page=True)
    assert [url for url in fetched if not url.startswith(("file:", "data:"))] == []
    pixels = imread(io.BytesIO(shot), format="png")
    assert pixels.shape[0] > 900 and pixels.std() > 0.05  # a tall page with something drawn on it
