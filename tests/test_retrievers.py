"""BM25, dense and hybrid retrievers on a tiny inline corpus: ranking, persistence, refusal of mismatched
indexes, atomic publishing, hand-computed fusion."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import TINY_CORPUS

from kvrank.errors import KvrankError
from kvrank.retriever import (
    BM25Config,
    BM25Retriever,
    DenseConfig,
    DenseRetriever,
    FusionConfig,
    HybridRetriever,
    Retriever,
    RetrieverConfig,
    build_or_load,
    load_encoder,
)
from kvrank.retriever.bm25 import KEEP_SINGLE_CHARS
from kvrank.retriever.hybrid import rrf
from kvrank.types import Passage, Query, Run, ScoredDoc

CORPUS = {r["_id"]: Passage(r["_id"], r["title"], r["text"]) for r in TINY_CORPUS}
QUERIES = [
    Query("1", "what is the capital of France"),
    Query("2", "largest planet"),
    Query("3", "memory safe programming language"),
]
QUIET = RetrieverConfig(show_progress=False)


def top(run: Run, qid: str) -> str:
    return run[qid][0].doc_id


# ---- BM25
# -------------------------------------------------------------------------------------------------------


def test_bm25_ranks_and_drops_non_matching() -> None:
    retriever = BM25Retriever.build(CORPUS, show_progress=False)
    assert isinstance(retriever, Retriever)
    run = retriever.search(QUERIES + [Query("x", "zzzz qqqq")], k=5)
    assert [top(run, q) for q in ("1", "2", "3")] == ["d3", "d5", "d8"]
    assert run["x"] == []  # no query term in the vocabulary: nothing matches, nothing returned
    scores = [d.score for d in run["3"]]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)


def test_bm25_stems_and_removes_stop_words() -> None:
    retriever = BM25Retriever.build(CORPUS, show_progress=False)
    # "barking" stems to "bark" (d2); "the" and "of" are stop words and match nothing on their own.
    assert top(retriever.search([Query("s", "barking")], 3), "s") == "d2"
    assert retriever.search([Query("t", "the of")], 3)["t"] == []


def test_bm25_single_character_tokens_option(tmp_path: Path) -> None:
    """bm25s's default tokens have 2+ characters, so "IL-6" is "il"; keeping 1-char tokens (as Lucene) tells the
    interleukins apart. The default's index identity is as before the option existed; the option's is its own."""
    corpus = {"a": Passage("a", "", "IL-6 signalling in mice"), "b": Passage("b", "", "IL-2 signalling in mice")}
    query = [Query("q", "IL 6")]
    default = BM25Retriever.build(corpus, show_progress=False).search(query, 2)["q"]
    assert default[0].score == default[1].score  # "6" is dropped: both documents match "il" alike
    lucene = BM25Config(token_pattern=KEEP_SINGLE_CHARS)
    ranked = BM25Retriever.build(corpus, lucene, show_progress=False).search(query, 2)["q"]
    assert ranked[0].doc_id == "a" and ranked[0].score > ranked[1].score
    assert "token_pattern" not in BM25Config().identity() and lucene.identity()["token_pattern"] == KEEP_SINGLE_CHARS
    build_or_load("bm25", CORPUS, tmp_path / "idx", QUIET)
    with pytest.raises(KvrankError, match="token_pattern"):
        build_or_load("bm25", CORPUS, tmp_path / "idx", RetrieverConfig(bm25=lucene, show_progress=False))


def test_bm25_save_load_round_trip(tmp_path: Path) -> None:
    built = build_or_load("bm25", CORPUS, tmp_path / "idx", QUIET)
    loaded = BM25Retriever.load(tmp_path / "idx" / "bm25", BM25Config())
    assert loaded.search(QUERIES, 8) == built.search(QUERIES, 8)


def test_bm25_other_settings_refused(tmp_path: Path) -> None:
    build_or_load("bm25", CORPUS, tmp_path / "idx", QUIET)
    with pytest.raises(KvrankError, match=r"k1: index has 1\.5, asked for 0\.9"):
        build_or_load("bm25", CORPUS, tmp_path / "idx", RetrieverConfig(bm25=BM25Config(k1=0.9, b=0.4)))


def test_index_of_another_corpus_refused(tmp_path: Path) -> None:
    build_or_load("bm25", CORPUS, tmp_path / "idx", QUIET)
    other = dict(CORPUS) | {"d9": Passage("d9", "", "A new document.")}
    with pytest.raises(KvrankError, match="built on a different corpus"):
        build_or_load("bm25", other, tmp_path / "idx", QUIET)


def test_folder_without_manifest_is_not_an_index(tmp_path: Path) -> None:
    (tmp_path / "bm25").mkdir()
    with pytest.raises(KvrankError, match="holds no complete bm25 index"):
        BM25Retriever.load(tmp_path / "bm25")


def test_unknown_kind_and_empty_corpus() -> None:
    with pytest.raises(KvrankError, match="^retriever 'splade' is not one of bm25, dense, hybrid") as err:
        build_or_load("splade", CORPUS)
    assert err.value.param == "retriever"
    with pytest.raises(KvrankError, match="corpus is empty"):
        build_or_load("bm25", {})


# ---- atomic publishing
# ------------------------------------------------------------------------------------------


def test_interrupted_build_leaves_nothing_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss

    real_write = faiss.write_index

    def crash_midway(index, path):  # the file is half there when the process "dies"
        real_write(index, path)
        with open(path, "r+b") as handle:
            handle.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(faiss, "write_index", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        build_or_load("dense", CORPUS, tmp_path / "idx", QUIET)
    leftovers = os.listdir(tmp_path / "idx")
    assert leftovers == [], leftovers  # neither dense/ nor a staging folder
    with pytest.raises(KvrankError, match="no complete dense index"):
        DenseRetriever.load(tmp_path / "idx" / "dense", load_encoder())
    monkeypatch.setattr(faiss, "write_index", real_write)
    rebuilt = build_or_load("dense", CORPUS, tmp_path / "idx", QUIET)  # builds afresh, loads nothing partial
    assert top(rebuilt.search(QUERIES, 3), "1") == "d3"


def test_failed_rebuild_keeps_previous_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bm25s

    build_or_load("bm25", CORPUS, tmp_path / "idx", QUIET)

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bm25s.BM25, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        build_or_load("bm25", CORPUS, tmp_path / "idx", QUIET, rebuild=True)
    assert sorted(os.listdir(tmp_path / "idx")) == ["bm25"]
    assert top(BM25Retriever.load(tmp_path / "idx" / "bm25").search(QUERIES, 3), "2") == "d5"


# ---- dense
# ------------------------------------------------------------------------------------------------------


def test_dense_ranks_with_cosine_scores(minilm) -> None:
    retriever = DenseRetriever.build(CORPUS, minilm, show_progress=False)
    run = retriever.search(QUERIES + [Query("4", "a pet that barks")], k=8)
    assert [top(run, q) for q in ("1", "2", "3", "4")] == ["d3", "d5", "d8", "d2"]
    assert len(run["1"]) == 8 and all(-1.0 - 1e-5 <= d.score <= 1.0 + 1e-5 for d in run["1"])


def test_dense_save_load_round_trip(tmp_path: Path, minilm) -> None:
    built = build_or_load("dense", CORPUS, tmp_path / "idx", QUIET)
    manifest = (tmp_path / "idx" / "dense" / "manifest.json").read_text()
    assert '"model": "all-MiniLM-L6-v2"' in manifest and minilm.fingerprint in manifest
    loaded = DenseRetriever.load(tmp_path / "idx" / "dense", minilm)
    assert loaded.search(QUERIES, 8) == built.search(QUERIES, 8)


def test_dense_hnsw_option(minilm) -> None:
    retriever = DenseRetriever.build(CORPUS, minilm, DenseConfig(index_type="hnsw"), show_progress=False)
    assert retriever.name.endswith(":hnsw")
    assert top(retriever.search(QUERIES, 3), "2") == "d5"


def test_index_from_another_model_refused(tmp_path: Path, minilm) -> None:
    import torch

    build_or_load("dense", CORPUS, tmp_path / "idx", QUIET)
    # Another model: the same architecture with one weight changed, in a local sentence-transformers folder.
    other_dir = tmp_path / "other-model"
    minilm.model.save(str(other_dir))
    other = load_encoder(str(other_dir))
    with torch.no_grad():
        next(other.model.parameters()).add_(0.01)
    other.fingerprint = type(other)(other.model, other.name).fingerprint
    assert other.fingerprint != minilm.fingerprint
    with pytest.raises(
        KvrankError,
        match=r"built with other settings \(model: index has 'all-MiniLM-L6-v2', "
        r"asked for 'other-model'; model_fingerprint",
    ):
        DenseRetriever.load(tmp_path / "idx" / "dense", other)
    load_encoder.cache_clear()


# ---- hybrid
# -----------------------------------------------------------------------------------------------------


class FixedRetriever:
    """A first stage that returns fixed lists: the input to fusion, not the thing under test."""

    def __init__(self, name: str, ranked: list[tuple[str, float]]) -> None:
        self.name = name
        self.ranked = ranked

    def search(self, queries: list[Query], k: int) -> Run:
        return {q.query_id: [ScoredDoc(q.query_id, d, s) for d, s in self.ranked[:k]] for q in queries}


SPARSE = FixedRetriever("sparse", [("a", 10.0), ("b", 5.0), ("c", 0.0)])
DENSE = FixedRetriever("dense", [("b", 0.9), ("d", 0.5), ("a", 0.1)])


def test_rrf_hand_computed() -> None:
    run = HybridRetriever(SPARSE, DENSE).search([Query("q", "anything")], k=10)
    # a: 1/61 + 1/63 = 0.0322664; b: 1/62 + 1/61 = 0.0325224; c: 1/63 = 0.0158730; d: 1/62 = 0.0161290
    assert [d.doc_id for d in run["q"]] == ["b", "a", "d", "c"]
    assert [d.score for d in run["q"]] == pytest.approx(
        [0.0325224, 0.0322664, 0.0161290, 0.0158730], abs=1e-7
    )
    assert rrf([SPARSE.search([Query("q", "")], 3)["q"]], rrf_k=0) == {"a": 1.0, "b": 0.5, "c": 1 / 3}


def test_rrf_depth_limits_each_list() -> None:
    run = HybridRetriever(SPARSE, DENSE, FusionConfig(depth=1)).search([Query("q", "")], k=1)
    # Each list contributes max(k, depth) = 1 doc: a (1/61) from sparse, b (1/61) from dense; tie -> doc id.
    assert [(d.doc_id, round(d.score, 7)) for d in run["q"]] == [("a", round(1 / 61, 7))]


def test_interpolation_hand_computed() -> None:
    fusion = FusionConfig(method="interpolate", weight=0.5)
    run = HybridRetriever(SPARSE, DENSE, fusion).search([Query("q", "")], k=10)
    # min-max: sparse a=1, b=0.5, c=0; dense b=1, d=0.5, a=0 -> a=0.5, b=0.75, c=0, d=0.25
    assert [(d.doc_id, d.score) for d in run["q"]] == [("b", 0.75), ("a", 0.5), ("d", 0.25), ("c", 0.0)]


def test_fusion_config_validated() -> None:
    with pytest.raises(KvrankError, match="FusionConfig.method 'max' is not supported") as err:
        FusionConfig(method="max")
    assert err.value.param == "FusionConfig.method"
    with pytest.raises(KvrankError, match=r"FusionConfig.weight must be in \[0, 1\], got 1.5") as err:
        FusionConfig(weight=1.5)
    assert err.value.param == "FusionConfig.weight"


def test_hybrid_on_real_retrievers_reuses_cached_dense(_isolated_cache: Path, minilm) -> None:
    corpus = dict(CORPUS) | {"d0": Passage("d0", "", "A corpus only this test uses.")}
    dense = build_or_load("dense", corpus, config=QUIET)
    hybrid = build_or_load("hybrid", corpus, config=QUIET)
    indexes = _isolated_cache / "indexes"
    names = sorted(
        p.name.split("-")[0]
        for p in indexes.iterdir()
        if (p / "manifest.json").read_text().find(dense.corpus_fp) >= 0
    )
    assert names == ["bm25", "dense"]  # the hybrid built only the missing BM25 index
    run = hybrid.search(QUERIES, 5)
    assert [top(run, q) for q in ("1", "2", "3")] == ["d3", "d5", "d8"]


def test_hybrid_reports_component_timings(tiny_beir: Path) -> None:
    from kvrank.eval.data import load_dataset
    from kvrank.eval.runner import run_eval
    from kvrank.pipeline import PipelineConfig, build

    dataset = load_dataset(tiny_beir)
    pipeline = build(PipelineConfig(retriever="hybrid", reranker=None, k=10), dataset,
                     first_stage=HybridRetriever(SPARSE, DENSE))
    report = run_eval(dataset, pipeline)
    assert {"retrieve", "retrieve.sparse", "retrieve.dense", "total"} == report.latency_ms.keys()
    assert report.latency_ms["retrieve.sparse"]["n"] == 3  # 4 queries, 1 warm-up


def test_hnsw_reuses_stored_embeddings(tmp_path: Path, minilm, monkeypatch: pytest.MonkeyPatch) -> None:
    flat = build_or_load("dense", CORPUS, tmp_path / "idx", QUIET)
    calls: list[int] = []
    real_encode = type(minilm).encode

    def counting_encode(self, texts, *args, **kwargs):
        calls.append(len(texts))
        return real_encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(minilm), "encode", counting_encode)
    config = RetrieverConfig(dense=DenseConfig(index_type="hnsw"), show_progress=False)
    hnsw = build_or_load("dense", CORPUS, tmp_path / "idx", config, rebuild=True)
    assert calls == []  # the passages were not encoded again
    run = hnsw.search(QUERIES, 8)
    assert calls == [len(QUERIES)]
    assert [top(run, q) for q in ("1", "2", "3")] == ["d3", "d5", "d8"]
    flat_scores = {d.doc_id: d.score for d in flat.search(QUERIES, 8)["1"]}
    assert {d.doc_id: d.score for d in run["1"]} == pytest.approx(flat_scores, abs=1e-5)


KILLED_WRITER = """
import os, signal, sys
import bm25s
from kvrank.retriever import RetrieverConfig, build_or_load
from kvrank.types import Passage

real_save = bm25s.BM25.save

def save_then_die(self, save_dir, *args, **kwargs):
    real_save(self, save_dir, *args, **kwargs)  # the index files are written...
    os.kill(os.getpid(), signal.SIGKILL)  # ...and the process dies before the manifest and the publish

bm25s.BM25.save = save_then_die
corpus = {f"d{i}": Passage(f"d{i}", "", f"document number {i} about topic {i % 7}") for i in range(50)}
build_or_load("bm25", corpus, sys.argv[1], RetrieverConfig(show_progress=False))
"""


def test_writer_killed_mid_save_leaves_nothing_loadable(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "idx")], capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    leftovers = os.listdir(tmp_path / "idx")
    assert "bm25" not in leftovers  # never published
    assert len(leftovers) == 1 and leftovers[0].startswith(".bm25.pid") and leftovers[0].endswith(".partial")
    corpus = {f"d{i}": Passage(f"d{i}", "", f"document number {i} about topic {i % 7}") for i in range(50)}
    with pytest.raises(KvrankError, match="no complete bm25 index"):
        BM25Retriever.load(tmp_path / "idx" / "bm25")
    rebuilt = build_or_load("bm25", corpus, tmp_path / "idx", QUIET)  # builds afresh...
    assert top(rebuilt.search([Query("q", "document number 17")], 3), "q") == "d17"
    assert os.listdir(tmp_path / "idx") == ["bm25"]  # ...and clears the dead writer's staging folder


def test_same_weights_under_another_name_load_the_index(tmp_path: Path, minilm) -> None:
    built = build_or_load("dense", CORPUS, tmp_path / "idx", QUIET)
    copy_dir = tmp_path / "my-copy-of-minilm"
    minilm.model.save(str(copy_dir))
    copy = load_encoder(str(copy_dir))
    assert copy.name == "my-copy-of-minilm" and copy.fingerprint == minilm.fingerprint
    loaded = DenseRetriever.load(tmp_path / "idx" / "dense", copy)
    assert loaded.search(QUERIES, 3) == built.search(QUERIES, 3)
