"""The CLI end to end on tiny BEIR folders: bad input exits 2 naming the value; eval writes JSON."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from conftest import write_beir
from typer.testing import CliRunner

from kvrank.cli import app
from kvrank.cli.common import command_flags, in_flags
from kvrank.cli.search import eval_cmd, index
from kvrank.cli.store import warm
from kvrank.errors import KvrankError

runner = CliRunner()

FIRST_STAGE = ("--rerank", "none")  # eval reranks by default; these tests read the first stage alone


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_missing_folder(tmp_path: Path) -> None:
    result = invoke("eval", "--data", tmp_path / "nowhere")
    assert_user_error(result, f"{tmp_path / 'nowhere'}: no such folder")


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "bad")
    with (folder / "corpus.jsonl").open("a") as handle:
        handle.write("{not json}\n")
    assert_user_error(invoke("eval", "--data", folder), f"{folder / 'corpus.jsonl'}:9: malformed JSON")


def test_empty_corpus(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "empty", corpus=[])
    assert_user_error(
        invoke("index", "--data", folder, "--index-dir", tmp_path / "idx", "--retriever", "bm25"),
        "holds no documents",
    )


def test_duplicate_doc_ids(tmp_path: Path) -> None:
    folder = write_beir(
        tmp_path / "dup",
        corpus=[{"_id": "d1", "text": "a"}, {"_id": "d1", "text": "b"}],
        qrels=[("1", "d1", 1)],
    )
    assert_user_error(invoke("eval", "--data", folder), "duplicate doc id 'd1'")


def test_qrels_with_unknown_queries(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "q", qrels=[("1", "d3", 1), ("404", "d3", 1)])
    assert_user_error(invoke("eval", "--data", folder), "['404']")


def test_bad_options(tiny_beir: Path, tmp_path: Path) -> None:
    assert_user_error(
        invoke("eval", "--data", tiny_beir, "--retriever", "splade"),
        "--retriever 'splade' is not one of bm25, dense, hybrid",
    )
    assert_user_error(invoke("eval", "--data", tiny_beir, "--rerank", "magic"), "--rerank 'magic'")
    assert_user_error(invoke("eval", "--data", tiny_beir, "--max-queries", "0"), "--max-queries must be >= 1")
    assert_user_error(
        invoke("eval", "--data", tiny_beir, "--candidates", tmp_path / "none.trec"), "no such run file"
    )
    run = tmp_path / "r.trec"
    run.write_text("1 Q0 d3 1 1.0 t\n")
    assert_user_error(
        invoke("eval", "--data", tiny_beir, "--candidates", run, "--retriever", "bm25"),
        "--candidates and --retriever are alternatives",
    )


def test_a_library_error_names_the_argument_and_the_cli_its_option(tmp_path: Path, tiny_beir: Path) -> None:
    """The library speaks its own words (the argument's name, also in `KvrankError.param`), never a flag; each
    command shows its option instead."""
    from kvrank.attention.kvformat import KVFormat
    from kvrank.eval.data import load_dataset
    from kvrank.retriever import build_or_load

    with pytest.raises(KvrankError, match="^kv_format 'int3': cannot read 'int3'") as err:
        KVFormat.parse("int3")
    assert err.value.param == "kv_format"
    with pytest.raises(KvrankError, match=f"^source {re.escape(str(tmp_path / 'nowhere'))}: no such folder") as err:
        load_dataset(tmp_path / "nowhere")
    assert err.value.param == "source" and "--" not in str(err.value)
    assert_user_error(invoke("eval", "--data", tmp_path / "nowhere"),
                      f"error: --data {tmp_path / 'nowhere'}: no such folder")

    (tmp_path / "a-file").write_text("")
    with pytest.raises(KvrankError, match="^index_dir .* is a file") as err:
        build_or_load("bm25", load_dataset(tiny_beir), tmp_path / "a-file")
    assert err.value.param == "index_dir"
    assert_user_error(invoke("index", "--data", tiny_beir, "--index-dir", tmp_path / "a-file"),
                      f"error: --index-dir {tmp_path / 'a-file'} is a file")


def test_library_words_become_the_commands_options() -> None:
    """`in_flags`: the argument at fault, keyword hints and underscored names, as the command's own options,
    read off its typer signature (`store_dir` is `--store`, `mode` is `--rerank` in eval and `--mode` in warm)."""
    flags = command_flags(eval_cmd)
    assert flags["kv_format"] == "--kv-format" and flags["store"] == "--store" and flags["json_path"] == "--json"
    assert command_flags(index)["dense_model"] == "--model"  # an option's other name: `--model/--dense-model`

    def shown(message: str, param: str | None = None, command=eval_cmd) -> str:
        return in_flags(KvrankError(message, param=param), command_flags(command))

    assert shown("k must be >= 1, got 0", "k") == "--k must be >= 1, got 0"
    assert shown("store_dir /s holds KV in format 'int8', not kv_format 'none'; pass kv_format='int8' or another "
                 "store_dir", "kv_format") == ("--store /s holds KV in format 'int8', not --kv-format 'none'; pass "
                                               "--kv-format int8 or another --store")
    assert shown("the head was trained on 'ql' scores; pass mode='ql' or head='none'", "head") == (
        "the head was trained on 'ql' scores; pass --rerank ql or --head none")
    assert shown("mode 'bogus' is not one of ql, attn", "mode") == "--rerank 'bogus' is not one of ql, attn"
    assert shown("mode 'bogus' is not one of ql, attn", "mode", warm) == "--mode 'bogus' is not one of ql, attn"
    assert shown("RayConfig.workers must be >= 1, got 0", "RayConfig.workers") == "--ray-workers must be >= 1, got 0"
    assert shown("cannot read 'int3'", "kv_format") == "--kv-format: cannot read 'int3'"  # named nowhere: it leads
    # what the command has no option for stays as it is, and so do plain words and unquoted values
    assert shown("basis_digest 'ab' differs; pass basis='x'", "basis") == "basis_digest 'ab' differs; pass basis='x'"
    assert shown("storage_tag 'dtype=float16;format=int8' != 'dtype=float32'") == (
        "storage_tag 'dtype=float16;format=int8' != 'dtype=float32'")
    assert shown("the model has no head", "head") == "--head: the model has no head"


def test_errors_pickle_with_their_param() -> None:
    """Ray ships a worker's KvrankError to the driver: `param` must survive."""
    import pickle

    err = pickle.loads(pickle.dumps(KvrankError("k must be >= 1, got 0", param="k")))
    assert isinstance(err, KvrankError) and str(err) == "k must be >= 1, got 0" and err.param == "k"
    assert pickle.loads(pickle.dumps(KvrankError("plain"))).param is None


def test_index_built_for_another_corpus_is_refused(tmp_path: Path, tiny_beir: Path) -> None:
    assert (
        invoke("index", "--data", tiny_beir, "--index-dir", tmp_path / "idx", "--retriever", "bm25").exit_code
        == 0
    )
    other = write_beir(
        tmp_path / "other",
        corpus=[{"_id": "d3", "title": "", "text": "Paris, France."}],
        qrels=[("1", "d3", 1)],
    )
    assert_user_error(
        invoke("eval", "--data", other, "--index-dir", tmp_path / "idx"), "built on a different corpus"
    )


def test_index_then_eval_writes_json_and_run(tmp_path: Path, tiny_beir: Path) -> None:
    result = invoke("index", "--data", tiny_beir, "--index-dir", tmp_path / "idx", "--retriever", "bm25")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "idx" / "bm25" / "manifest.json").is_file()
    out, run_file = tmp_path / "out" / "report.json", tmp_path / "out" / "run.trec"
    result = invoke(
        "eval",
        "--data",
        tiny_beir,
        "--index-dir",
        tmp_path / "idx",
        "--retriever",
        "bm25",
        "--json",
        out,
        "--run",
        run_file,
        "--k",
        "5",
    )
    assert result.exit_code == 0, result.output
    assert "nDCG@10" in result.output and "first stage" in result.output and "p95" in result.output
    report = json.loads(out.read_text())
    assert set(report) >= {
        "metrics",
        "queries",
        "latency_ms",
        "first_stage_metrics",
        "dataset",
        "retriever",
        "settings",
        "machine",
    }
    assert set(report["metrics"]) == {"nDCG@10", "RR@10", "R@100"}
    assert report["queries"] == 4
    assert set(report["latency_ms"]["retrieve"]) >= {"p50", "p95"}
    # Every tiny query has its one relevant doc at rank 1 under BM25.
    assert report["metrics"]["nDCG@10"] == pytest.approx(1.0)
    lines = run_file.read_text().splitlines()
    assert lines[0].split()[:4] == ["1", "Q0", "d3", "1"]
    # Per query: text, metric values of both stages, per-stage latency; the first query is the warm-up.
    per_query = report["per_query"]
    assert len(per_query) == 4 and [q["warmup"] for q in per_query.values()] == [True, False, False, False]
    first = per_query["1"]
    assert first["first_stage"]["nDCG@10"] == pytest.approx(1.0) and first["final"] == first["first_stage"]
    assert first["text"] and set(first["latency_ms"]) >= {"retrieve", "total"}

    shown = invoke("report", out, out)
    assert shown.exit_code == 0, shown.output
    assert shown.output.count("nDCG@10") >= 2 and "1.0000" in shown.output
    assert "pairwise comparison" in shown.output  # two reports: also compared (a report against itself: p = 1)


def test_eval_candidates_subset(tmp_path: Path, tiny_beir: Path) -> None:
    # Candidates: query 1 finds d3 at rank 2 (nDCG = 1/log2(3) = 0.6309), query 2 at rank 1; --max-queries 2
    # evaluates queries 1 and 2 only (sorted id order), so queries 3 and 10 do not count as misses.
    run = tmp_path / "cands.trec"
    run.write_text("1 Q0 d4 1 2.0 bm25\n1 Q0 d3 2 1.0 bm25\n2 Q0 d5 1 1.0 bm25\n")
    out = tmp_path / "r.json"
    result = invoke("eval", *FIRST_STAGE, "--data", tiny_beir, "--candidates", run, "--max-queries", "2", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["queries"] == 2
    assert report["metrics"]["nDCG@10"] == pytest.approx((0.6309298 + 1.0) / 2, abs=1e-6)
    assert report["metrics"]["RR@10"] == pytest.approx(0.75)
    assert report["retriever"] == "candidates:cands.trec"
    packed = tmp_path / "cands.trec.gz"  # the same run gzipped, as TREC distributes them
    packed.write_bytes(gzip.compress(run.read_bytes()))
    result = invoke("eval", *FIRST_STAGE, "--data", tiny_beir, "--candidates", packed, "--max-queries", "2",
                    "--json", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["metrics"] == report["metrics"]


def test_dense_index_of_another_model_is_refused(tmp_path: Path, tiny_beir: Path, minilm) -> None:
    import torch

    from kvrank.retriever.dense import load_encoder

    idx = tmp_path / "idx"
    assert invoke("index", "--data", tiny_beir, "--index-dir", idx, "--retriever", "dense").exit_code == 0
    # Another model on disk: MiniLM with one weight changed.
    other_dir = tmp_path / "tuned-minilm"
    minilm.model.save(str(other_dir))
    other = load_encoder(str(other_dir))
    with torch.no_grad():
        next(other.model.parameters()).add_(0.01)
    other.model.save(str(other_dir))
    load_encoder.cache_clear()
    result = invoke("eval", "--data", tiny_beir, "--index-dir", idx, "--retriever", "dense",
                    "--dense-model", other_dir)
    assert_user_error(result, "model: index has 'all-MiniLM-L6-v2', asked for 'tuned-minilm'",
                      "model_fingerprint")
    load_encoder.cache_clear()


def test_hybrid_fusion_option_and_its_deprecated_alias(tmp_path: Path, tiny_beir: Path, minilm) -> None:
    """`--hybrid-fusion` names the hybrid first stage's fusion; `--fusion` still works, with a warning."""
    def hybrid(*options: str, name: str):
        out, run = tmp_path / f"{name}.json", tmp_path / f"{name}.trec"
        result = invoke("eval", *FIRST_STAGE, "--data", tiny_beir, "--retriever", "hybrid",
                        "--json", out, "--run", run, *options)
        assert result.exit_code == 0, result.output
        return result.output, json.loads(out.read_text()), run.read_text().splitlines()

    output, new, new_run = hybrid("--hybrid-fusion", "interpolate", name="new")
    assert "deprecated" not in output
    assert new["settings"]["retriever_config"]["fusion"]["method"] == "interpolate"
    output, old, old_run = hybrid("--fusion", "interpolate", name="old")
    assert "warning: --fusion is deprecated; use --hybrid-fusion" in output
    assert old["settings"]["retriever_config"]["fusion"]["method"] == "interpolate"
    assert old_run == new_run  # the alias does what the new name does
    _, default, rrf_run = hybrid(name="default")
    assert default["settings"]["retriever_config"]["fusion"]["method"] == "rrf"
    # ... which is not the default: interpolated min-max scores reach 1, RRF's are at most 2/61
    top = {float(line.split()[4]) for line in new_run if line.split()[3] == "1"}
    assert max(float(line.split()[4]) for line in rrf_run) <= 2 / 61 < min(top)
    help_text = invoke("eval", "--help").output
    assert "--hybrid-fusion" in help_text and not re.search(r"--fusion(?![-\w])", help_text)  # the alias is hidden


def test_report_rejects_what_is_not_a_report(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{\"foo\": 1}")
    (tmp_path / "text.json").write_text("not json")
    for name, expected in (("bad.json", "missing"), ("text.json", "not JSON"), ("absent.json", "no such report")):
        result = invoke("report", tmp_path / name)
        assert result.exit_code == 2, result.output
        assert expected in result.output and "kvrank eval --json" in result.output


def test_eval_metrics_and_rel_level_options(tmp_path: Path) -> None:
    # A 0-3 scale in an unknown folder: the default level is 1, said in the output; --rel-level 2 changes RR.
    data = write_beir(tmp_path / "graded", qrels=[("1", "d3", 3), ("1", "d4", 1), ("2", "d5", 2)])
    run = tmp_path / "cands.trec"
    run.write_text("1 Q0 d4 1 2.0 bm25\n1 Q0 d3 2 1.0 bm25\n2 Q0 d5 1 1.0 bm25\n")
    out = tmp_path / "r.json"
    result = invoke("eval", *FIRST_STAGE, "--data", data, "--candidates", run,
                    "--json", out, "--metrics", "RR@10 AP@1000,P@1",
                    "--metrics", "ndcg_cut.10")
    assert result.exit_code == 0, result.output
    assert "relevance >= 1: default for an unknown collection (graded 0-3" in " ".join(result.output.split())
    report = json.loads(out.read_text())
    assert report["settings"]["rel_level"] == 1
    assert report["settings"]["metrics"] == ["RR@10", "AP@1000", "P@1", "nDCG@10"] == list(report["metrics"])
    assert report["metrics"]["RR@10"] == pytest.approx(1.0) and report["metrics"]["P@1"] == pytest.approx(1.0)
    assert set(report["per_query"]["1"]["final"]) == set(report["metrics"])
    assert "significance" not in report  # nothing reranked
    result = invoke("eval", *FIRST_STAGE, "--data", data, "--candidates", run, "--json", out, "--rel-level", "2")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    # >= 2: query 1's relevant d3 is at rank 2 -> RR 1/2; query 2 -> 1.
    assert report["settings"]["rel_level"] == 2 and report["metrics"]["RR@10"] == pytest.approx(0.75)
    assert report["settings"]["rel_level_basis"] == "rel_level 2 (the collection's own: 1)"
    assert_user_error(invoke("eval", "--data", data, "--candidates", run, "--metrics", "nDCG@10 ndcg@ten"),
                      "'ndcg@ten' is not an ir_measures measure")
    assert_user_error(invoke("eval", "--data", data, "--candidates", run, "--rel-level", "0"),
                      "--rel-level must be >= 1")


def test_report_compares_runs_pairwise(tmp_path: Path, tiny_beir: Path) -> None:
    better, worse = tmp_path / "better.trec", tmp_path / "worse.trec"
    better.write_text("1 Q0 d3 1 2.0 x\n2 Q0 d5 1 1.0 x\n3 Q0 d8 1 1.0 x\n10 Q0 d1 1 1.0 x\n")
    worse.write_text("1 Q0 d4 1 2.0 x\n1 Q0 d3 2 1.0 x\n2 Q0 d5 1 1.0 x\n")
    for name, run in (("a", better), ("b", worse)):
        result = invoke("eval", *FIRST_STAGE, "--data", tiny_beir, "--candidates", run,
                        "--json", tmp_path / f"{name}.json")
        assert result.exit_code == 0, result.output
    shown = invoke("report", tmp_path / "a.json", tmp_path / "b.json")
    assert shown.exit_code == 0, shown.output
    assert "pairwise comparison" in shown.output and "Holm" in shown.output
    # nDCG@10 per query: a = 1, 1, 1, 1; b = 0.6309, 1, 0, 0 -> differences 0.369, 0, 1, 1 (4 queries, exact):
    # |sum| >= 2.369 only when the three non-zero signs agree -> 2 * 2 (the zero's sign) of 16 patterns -> 0.25.
    assert "0.2500" in shown.output
    other = write_beir(tmp_path / "other")
    result = invoke("eval", *FIRST_STAGE, "--data", other, "--candidates", better, "--json", tmp_path / "c.json")
    assert result.exit_code == 0, result.output
    # reports that cannot be paired are still shown (and written as HTML), saying why there is no test
    shown = invoke("report", tmp_path / "a.json", tmp_path / "c.json", "--html", tmp_path / "ac.html")
    assert shown.exit_code == 0, shown.output
    said = " ".join(shown.output.split())
    assert "no pairwise test:" in said and "is for dataset 'other' but" in said and "same collection" in said
    assert "No pairwise significance test: " in (tmp_path / "ac.html").read_text(encoding="utf-8")
