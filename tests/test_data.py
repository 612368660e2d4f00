"""Dataset loading (BEIR folders), qrels and TREC run files: the happy path and every bad-input message."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import pytest
from conftest import write_beir

from kvrank.errors import KvrankError
from kvrank.eval.data import load_beir_folder, load_dataset, read_qrels_tsv, read_run, write_run
from kvrank.types import ScoredDoc


def test_loads_beir_folder(tiny_beir: Path) -> None:
    ds = load_dataset(tiny_beir)
    assert ds.name == "tiny" and len(ds.corpus) == 8
    assert set(ds.queries) == {"1", "2", "3", "10"}  # only judged queries are test queries
    assert set(ds.extra_queries) == {"99"}
    assert [q.query_id for q in ds.sorted_queries()] == ["1", "2", "3", "10"]  # numeric ids sort numerically
    assert [q.query_id for q in ds.sorted_queries(2)] == ["1", "2"]
    assert ds.corpus["d3"].contents == "Paris Paris is the capital and largest city of France."
    assert len(ds.qrels) == 4


def test_missing_folder_names_the_value(tmp_path: Path) -> None:
    with pytest.raises(KvrankError, match="nope: no such folder"):
        load_dataset(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path: Path) -> None:
    (tmp_path / "corpus.jsonl").write_text("{}\n")
    with pytest.raises(KvrankError, match="is a file"):
        load_dataset(tmp_path / "corpus.jsonl")


def test_missing_qrels_file(tiny_beir: Path) -> None:
    (tiny_beir / "qrels" / "test.tsv").unlink()
    with pytest.raises(KvrankError, match=r"qrels/test\.tsv is missing"):
        load_beir_folder(tiny_beir)


def test_malformed_jsonl_reports_file_and_line(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "bad")
    lines = (folder / "corpus.jsonl").read_text().splitlines()
    lines[2] = '{"_id": "d3", "text": "unterminated'
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(KvrankError, match=r"corpus\.jsonl:3: malformed JSON"):
        load_dataset(folder)


def test_non_object_line(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "bad")
    (folder / "queries.jsonl").write_text('["1", "a list"]\n')
    with pytest.raises(KvrankError, match=r"queries\.jsonl:1: expected a JSON object, got list"):
        load_dataset(folder)


def test_missing_id_field(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "bad", corpus=[{"_id": "d1", "text": "x"}, {"text": "no id"}])
    with pytest.raises(KvrankError, match=r"corpus\.jsonl:2: missing '_id'"):
        load_dataset(folder)


def test_duplicate_doc_id(tmp_path: Path) -> None:
    folder = write_beir(
        tmp_path / "dup",
        corpus=[{"_id": "d1", "text": "a"}, {"_id": "d1", "text": "b"}],
        qrels=[("1", "d1", 1)],
    )
    with pytest.raises(KvrankError, match=r"corpus\.jsonl:2: duplicate doc id 'd1'"):
        load_dataset(folder)


def test_empty_corpus(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "empty", corpus=[])
    with pytest.raises(KvrankError, match="holds no documents"):
        load_dataset(folder)


def test_qrels_naming_unknown_queries(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "q", qrels=[("1", "d3", 1), ("404", "d1", 1)])
    with pytest.raises(
        KvrankError, match=r"qrels name 1 queries missing from queries\.jsonl \(e\.g\. \['404'\]\)"
    ):
        load_dataset(folder)


def test_qrels_naming_unknown_docs_warns_and_keeps_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_beir(tmp_path / "pool", qrels=[("1", "d3", 1), ("1", "gone", 2)])
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(folder)
    assert "qrels name 1 doc ids not in the corpus" in caplog.text and "gone" in caplog.text
    assert len(ds.qrels) == 2  # kept: the ideal DCG needs every judgement


def test_qrels_formats(tmp_path: Path) -> None:
    beir = tmp_path / "beir.tsv"
    beir.write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\n\nq1\td2\t0\n")
    assert [(q.query_id, q.doc_id, q.relevance) for q in read_qrels_tsv(beir)] == [
        ("q1", "d1", 2),
        ("q1", "d2", 0),
    ]
    trec = tmp_path / "trec.txt"
    trec.write_text("q1 0 d1 1\nq2 0 d7 3\n")
    assert [(q.query_id, q.doc_id, q.relevance) for q in read_qrels_tsv(trec)] == [
        ("q1", "d1", 1),
        ("q2", "d7", 3),
    ]


def test_qrels_bad_relevance(tmp_path: Path) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\thigh\n")
    with pytest.raises(KvrankError, match=r"bad\.tsv:2: relevance 'high' is not a number"):
        read_qrels_tsv(path)
    path.write_text("q1\td1\n")
    with pytest.raises(KvrankError, match=r"bad\.tsv:1: expected"):
        read_qrels_tsv(path)


def test_run_round_trip_keeps_order_and_precision(tmp_path: Path) -> None:
    run = {
        "q2": [ScoredDoc("q2", "b", 0.016393442622950821), ScoredDoc("q2", "a", 0.016393442622950800)],
        "q1": [ScoredDoc("q1", "x", 3.5), ScoredDoc("q1", "y", -1.25)],
    }
    path = tmp_path / "out" / "run.trec"
    write_run(run, path, tag="test")
    assert path.read_text().splitlines()[0] == "q1 Q0 x 1 3.5 test"
    assert read_run(path) == run


def test_run_sorted_by_score(tmp_path: Path) -> None:
    path = tmp_path / "r.trec"
    path.write_text("q1 Q0 a 1 1.0 t\nq1 Q0 b 2 3.0 t\nq1 Q0 c 3 1.0 t\n")
    assert [d.doc_id for d in read_run(path)["q1"]] == ["b", "a", "c"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "q1 Q0 a 1 1.0 t\nq1 Q0 b\n",
            r"r\.trec:2: expected 'qid Q0 docid rank score tag' \(6 fields\), got 3",
        ),
        ("q1 Q0 a 1 high t\n", r"r\.trec:1: score 'high' is not a number"),
        ("q1 Q0 a 1 1.0 t\nq1 Q0 a 2 0.5 t\n", r"r\.trec:2: doc 'a' appears twice for query 'q1'"),
        ("\n", r"r\.trec is empty"),
    ],
)
def test_bad_run_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "r.trec"
    path.write_text(content)
    with pytest.raises(KvrankError, match=message):
        read_run(path)


def test_gzipped_run_file_reads_like_the_plain_one(tmp_path: Path) -> None:
    """TREC DL's official runs come gzipped: `read_run` (and so `--candidates`) reads `.gz` directly."""
    run = {
        "q1": [ScoredDoc("q1", "x", 3.5), ScoredDoc("q1", "y", -1.25)],
        "q2": [ScoredDoc("q2", "b", 0.016393442622950821), ScoredDoc("q2", "a", 0.016393442622950800)],
    }
    plain = tmp_path / "run.trec"
    write_run(run, plain, tag="test")
    packed = tmp_path / "run.trec.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_run(packed) == read_run(plain) == run
    bad = tmp_path / "bad.trec.gz"
    bad.write_bytes(gzip.compress(b"q1 Q0 a 1 1.0 t\nq1 Q0 b\n"))
    with pytest.raises(KvrankError, match=r"bad\.trec\.gz:2: expected 'qid Q0 docid rank score tag' \(6 fields\)"):
        read_run(bad)


def test_missing_run_file(tmp_path: Path) -> None:
    with pytest.raises(KvrankError, match="no such run file"):
        read_run(tmp_path / "none.trec")


def test_unknown_ir_datasets_id_is_a_user_error() -> None:
    # A path-like value whose parent folder does not exist is read as an ir_datasets id (no network needed to
    # know this one does not exist).
    with pytest.raises(KvrankError, match="unknown ir_datasets id 'nosuch/dataset/test'"):
        load_dataset("nosuch/dataset/test")
