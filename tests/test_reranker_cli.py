"""`kvrank eval --rerank` end to end with a tiny checkpoint saved to disk (the real loading path for a local
model folder), through the persistent store: the second run over the same store prefills nothing and ranks
identically."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from kvrank.cli import app


def run_eval(args: list[str]) -> Result:
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code == 0, result.output
    return result


def test_eval_rerank_reports_both_stages_latency_and_kv_reuse(tiny_beir: Path, tiny_checkpoint: Path,
                                                              tmp_path: Path) -> None:
    store = tmp_path / "store"
    common = ["--data", str(tiny_beir), "--retriever", "bm25", "--rerank", "ql", "--rerank-depth", "3",
              "--model", str(tiny_checkpoint), "--store", str(store)]
    first = run_eval([*common, "--json", str(tmp_path / "a.json"), "--run", str(tmp_path / "a.trec")])
    assert "passage KV:" in first.output
    a = json.loads((tmp_path / "a.json").read_text())
    assert set(a["metrics"]) >= {"nDCG@10", "RR@10", "R@100"} and set(a["first_stage_metrics"]) == set(a["metrics"])
    assert {"kv_lookup", "prefill", "scoring"} <= set(a["latency_ms"])
    assert a["kv_cache"]["misses"] > 0 and a["prefills"] > 0 and a["kv_cache"]["bytes"] > 0
    # Reranked vs first stage: one p-value per metric, in the JSON and the printed table.
    assert "paired randomization test" in a["significance"]["test"]
    assert set(a["significance"]["p_values"]) == set(a["metrics"])
    assert all(0.0 < p <= 1.0 for p in a["significance"]["p_values"].values())
    assert "final vs first stage" in first.output and "count relevance >= 1" in first.output

    run_eval([*common, "--json", str(tmp_path / "b.json"), "--run", str(tmp_path / "b.trec")])
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["prefills"] == 0 and b["kv_cache"]["misses"] == 0 and b["kv_cache"]["hits"] > 0
    # Same scores from stored KV as from fresh prefill: the final rankings, every doc and its score at full
    # precision, are identical line for line.
    fresh, stored = (tmp_path / "a.trec").read_text().splitlines(), (tmp_path / "b.trec").read_text().splitlines()
    assert fresh == stored
    assert {line.split()[0] for line in fresh} == {"1", "2", "3", "10"}  # every test query ...
    assert all(line.split()[5] == "kvrank-ql" for line in fresh)  # ... ranked by the reranker


def test_unknown_rerank_mode_and_bad_model_are_clear_errors(tiny_beir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", "--data", str(tiny_beir), "--rerank", "bogus"])
    assert result.exit_code == 2 and "bogus" in result.output
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    result = CliRunner().invoke(app, ["eval", "--data", str(tiny_beir), "--rerank", "ql", "--model", str(empty)])
    assert result.exit_code == 2 and "config.json" in result.output
