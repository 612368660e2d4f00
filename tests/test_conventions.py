"""Each collection's relevance level: the registry (BEIR folders and ids, TREC DL), a folder's collection.json,
`--rel-level`, and the default for an unknown collection; and the level reaching the report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import write_beir

from kvrank.demo import demo_dataset
from kvrank.errors import KvrankError
from kvrank.eval.conventions import BEIR, DEMO, TREC_DL_DOCUMENT, TREC_DL_PASSAGE, convention_for, resolve
from kvrank.eval.data import load_dataset
from kvrank.eval.metrics import DEFAULT_METRICS, TREC_DL_METRICS
from kvrank.types import Dataset, ScoredDoc

GRADED_0_3 = [("1", "d3", 3), ("1", "d4", 1), ("2", "d5", 2), ("3", "d8", 0), ("10", "d1", 1)]


def named(tmp_path: Path, name: str, qrels=GRADED_0_3) -> Dataset:
    return load_dataset(write_beir(tmp_path / name, qrels=qrels))


def test_known_folders(tmp_path: Path) -> None:
    dl19 = convention_for(named(tmp_path, "trec-dl-2019"))
    assert dl19 == TREC_DL_PASSAGE and dl19.rel_level == 2 and dl19.metrics == TREC_DL_METRICS
    assert "AP@1000" in dl19.metrics and "trec_eval -l 2" in dl19.basis
    nfcorpus = convention_for(named(tmp_path, "nfcorpus"))  # graded 0-2 in BEIR, counted >= 1
    assert nfcorpus == BEIR and nfcorpus.rel_level == 1 and nfcorpus.metrics == DEFAULT_METRICS
    for binary in ("scifact", "cranfield", "cisi"):
        assert convention_for(named(tmp_path, binary, qrels=[("1", "d3", 1)])).rel_level == 1


def test_ir_datasets_ids() -> None:
    def by_id(source: str) -> Dataset:
        return Dataset(name=source.replace("/", "_"), corpus={}, queries={}, qrels=[], source=source)

    assert convention_for(by_id("beir/nfcorpus/test")) == BEIR
    assert convention_for(by_id("beir/trec-covid")) == BEIR
    assert convention_for(by_id("msmarco-passage/trec-dl-2019/judged")) == TREC_DL_PASSAGE
    assert convention_for(by_id("msmarco-passage-v2/trec-dl-2022")) == TREC_DL_PASSAGE
    # NIST counts grades 1-3 relevant for the document task (only passages have the "related" grade 1).
    assert convention_for(by_id("msmarco-document/trec-dl-2019")) == TREC_DL_DOCUMENT
    assert TREC_DL_DOCUMENT.rel_level == 1 and TREC_DL_DOCUMENT.metrics == TREC_DL_METRICS


def test_the_demo_collection_has_its_own_convention_and_no_warning(caplog) -> None:
    dataset = demo_dataset()
    assert max(q.relevance for q in dataset.qrels) == 2  # graded: without its entry it would warn
    with caplog.at_level(logging.WARNING):
        assert convention_for(dataset) == DEMO and DEMO.rel_level == 1
    assert caplog.text == ""


def test_unknown_graded_folder_defaults_to_1_and_says_so(tmp_path: Path, caplog) -> None:
    dataset = named(tmp_path, "my-collection")
    with caplog.at_level(logging.WARNING):
        convention = convention_for(dataset)
    assert convention.rel_level == 1 and convention.metrics == DEFAULT_METRICS
    assert "default for an unknown collection" in convention.basis and "graded 0-3" in convention.basis
    assert "Set rel_level" in caplog.text
    binary = convention_for(named(tmp_path, "other", qrels=[("1", "d3", 1)]))
    assert binary.rel_level == 1 and binary.basis == "default for an unknown collection"


def test_collection_json_declares_level_and_metrics(tmp_path: Path) -> None:
    dataset = named(tmp_path, "my-collection")
    (tmp_path / "my-collection" / "collection.json").write_text(json.dumps(
        {"rel_level": 2, "metrics": ["nDCG@10", "map"], "convention": "grade 1 means related"}))
    convention = convention_for(dataset)
    assert convention.rel_level == 2 and convention.metrics == ("nDCG@10", "AP")
    assert convention.basis == "collection.json: grade 1 means related"
    # A declaration overrides the registry too.
    dl = named(tmp_path, "trec-dl-2019")
    (tmp_path / "trec-dl-2019" / "collection.json").write_text('{"rel_level": 3}')
    assert convention_for(dl).rel_level == 3 and convention_for(dl).metrics == DEFAULT_METRICS


@pytest.mark.parametrize(("content", "fragment"), [
    ("{\"rel_level\": 0}", "must be an integer >= 1"),
    ("{\"rel_level\": \"2\"}", "must be an integer >= 1"),
    ("{\"metrics\": [\"nDCG@10\"]}", "got None"),
    ("{\"rel_level\": 2, \"metrics\": \"nDCG@10\"}", "must be a list"),
    ("{\"rel_level\": 2, \"metrics\": [\"bogus@3\"]}", "'bogus@3' is not an ir_measures measure"),
    ("not json", "not valid JSON"),
])
def test_bad_collection_json(tmp_path: Path, content: str, fragment: str) -> None:
    dataset = named(tmp_path, "x")
    (tmp_path / "x" / "collection.json").write_text(content)
    with pytest.raises(KvrankError, match="collection.json") as error:
        convention_for(dataset)
    assert fragment in str(error.value)


def test_rel_level_and_metrics_override(tmp_path: Path, caplog) -> None:
    dl = named(tmp_path, "trec-dl-2019")
    override = resolve(dl, rel_level=1)
    assert override.rel_level == 1 and override.metrics == TREC_DL_METRICS
    assert override.basis == "rel_level 1 (the collection's own: 2)"
    assert resolve(dl, metrics=("P@10",)) == type(TREC_DL_PASSAGE)(2, TREC_DL_PASSAGE.basis, ("P@10",))
    with pytest.raises(KvrankError, match="^rel_level must be >= 1") as err:
        resolve(dl, rel_level=0)
    assert err.value.param == "rel_level"
    with caplog.at_level(logging.WARNING):
        resolve(named(tmp_path, "unknown"), rel_level=2)
    assert "rel_level" not in caplog.text  # no warning to pass what was passed


def test_level_reaches_the_report(tmp_path: Path) -> None:
    """The same 0-3 run under the TREC DL convention and under --rel-level 1: RR and R move, nDCG does not."""
    from kvrank.eval.runner import TimedResult, eval_report
    from kvrank.pipeline import SearchResult

    dataset = named(tmp_path, "trec-dl-2019")
    # Query 1 ranks d4 (grade 1) above d3 (grade 3); query 2 finds d5 (grade 2) at rank 1.
    ranked = {"1": ["d4", "d3"], "2": ["d5"]}
    timed = []
    for qid, docs in ranked.items():
        hits = [ScoredDoc(qid, d, float(-i)) for i, d in enumerate(docs)]
        timed.append(TimedResult(SearchResult(dataset.queries[qid], hits, hits), 1.0))
    strict = eval_report(dataset, timed, first_stage="fixed", config=_config(), reranking=False, max_queries=2)
    assert strict.settings["rel_level"] == 2 and strict.settings["metrics"] == list(TREC_DL_METRICS)
    assert "TREC DL passage" in strict.settings["rel_level_basis"]
    assert strict.metrics["RR@10"] == pytest.approx((0.5 + 1.0) / 2)
    loose = eval_report(dataset, timed, first_stage="fixed", config=_config(), reranking=False, max_queries=2,
                        convention=resolve(dataset, rel_level=1))
    assert loose.settings["rel_level"] == 1 and loose.metrics["RR@10"] == pytest.approx(1.0)
    assert loose.metrics["nDCG@10"] == strict.metrics["nDCG@10"]
    assert strict.significance is None  # nothing reranked: nothing to test


def _config():
    from kvrank.pipeline import PipelineConfig

    return PipelineConfig(retriever=None, candidates=Path("fixed.trec"), reranker=None)
