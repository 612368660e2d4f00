"""Scoring heads: features, fitting, files, the shipped head, and a head in the pipeline, the API and the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest_models import tiny_lm
from typer.testing import CliRunner

from kvrank.cli import app
from kvrank.errors import KvrankError
from kvrank.eval.metrics import evaluate
from kvrank.pipeline import PipelineConfig, build
from kvrank.reranker import head as heads
from kvrank.reranker.reranker import RerankerConfig
from kvrank.retriever.dense import load_encoder
from kvrank.train.head import HeadList, fit, head_lists, rank_with
from kvrank.types import Dataset, Passage, Qrel

SHIPPED = heads.PACKAGED / "smollm2-ql-claim"


def synthetic_lists(n: int, seed: int) -> list[HeadList]:
    """Lists whose relevance follows the dense signal while ql and the first stage are noise: a head that learns
    must move the dense signal's favourites up."""
    rng = random.Random(seed)
    lists = []
    for q in range(n):
        dense = [rng.random() for _ in range(10)]
        best = sorted(range(10), key=lambda i: -dense[i])[:2]
        lists.append(HeadList(f"q{q}", [f"q{q}-d{i}" for i in range(10)], [rng.random() for _ in range(10)], dense,
                              [rng.random() for _ in range(10)], [1 if i in best else 0 for i in range(10)]))
    return lists


def ndcg(lists: list[HeadList], score) -> float:
    qrels = [Qrel(x.query_id, d, g) for x in lists for d, g in zip(x.doc_ids, x.labels) if g]
    return evaluate(rank_with(lists, score), qrels)["nDCG@10"]


def test_features_are_per_query_zscores_and_ranks() -> None:
    x = heads.features([3.0, 1.0, 2.0], [0.5, 0.5, 0.5], [-1.0, -3.0, -2.0])
    assert x.shape == (3, 6)
    std = np.std([3.0, 1.0, 2.0])
    np.testing.assert_allclose(x[:, 0], [1 / std, -1 / std, 0.0])
    np.testing.assert_allclose(x[:, 1], [1 / 3, 1.0, 2 / 3])  # rank / K, best first
    np.testing.assert_allclose(x[:, 2], 0.0)  # a constant signal carries nothing
    np.testing.assert_allclose(x[:, 3], [1 / 3, 2 / 3, 1.0])  # ties keep candidate order
    np.testing.assert_allclose(heads.prior([3.0, 1.0, 2.0], [-1.0, -3.0, -2.0], 0.3), 0.7 * x[:, 4] + 0.3 * x[:, 0])
    with pytest.raises(ValueError, match="one value per candidate"):
        heads.features([1.0], [1.0, 2.0], [1.0])


def test_a_fitted_head_learns_the_signal_that_predicts_relevance_and_is_deterministic() -> None:
    train, test = synthetic_lists(200, 0), synthetic_lists(100, 1)
    booster = fit(train, trees=25, seed=0)
    head = lambda x: heads.prior(x.first, x.lm, 0.3) + booster.predict(x.features())  # noqa: E731
    before = ndcg(test, lambda x: heads.prior(x.first, x.lm, 0.3))
    after = ndcg(test, head)
    assert after > before + 0.15, (before, after)
    assert fit(train, trees=25, seed=0).model_to_string() == booster.model_to_string()
    with pytest.raises(KvrankError, match="judged-relevant"):
        fit([HeadList("q", ["a", "b"], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0, 0])])
    with pytest.raises(KvrankError, match="^trees must be >= 1, got 0"):
        fit(train, trees=0)


def _card(**changes) -> heads.HeadCard:
    base = {"base_fingerprint": "f" * 32, "base_model": "tiny", "mode": "ql", "template": "ql-claim",
            "dense_model": "e" * 32, "prior_weight": 0.3, "trees": 25}
    return heads.HeadCard(**{**base, **changes})


def test_head_files_round_trip_and_refuse_a_partial_copy(tmp_path: Path) -> None:
    booster = fit(synthetic_lists(120, 0), trees=5)
    card = heads.save(tmp_path / "h", booster, _card())
    loaded = heads.load(tmp_path / "h")
    assert loaded.card == card and card.digest and card.kvrank_version
    x = synthetic_lists(1, 3)[0]
    np.testing.assert_allclose(loaded.score(x.first, x.dense, x.lm),
                               heads.prior(x.first, x.lm, 0.3) + booster.predict(x.features()))
    assert loaded.score([1.0], [1.0], [1.0]).tolist() == [0.0]  # one candidate: nothing to rank
    (tmp_path / "h" / heads.MODEL_FILE).write_text(booster.model_to_string().replace("tree", "trea", 1))
    with pytest.raises(KvrankError, match="does not match the digest"):
        heads.load(tmp_path / "h")
    with pytest.raises(KvrankError, match="not a head folder"):
        heads.load(tmp_path)
    for bad in ("{}", "[]", "not json"):
        (tmp_path / "h" / heads.CARD_FILE).write_text(bad)
        with pytest.raises(KvrankError, match="not a kvrank head card"):
            heads.read_card(tmp_path / "h")
    heads.save(tmp_path / "g", booster, _card())
    (tmp_path / "g" / heads.CARD_FILE).write_text(json.dumps({**json.loads(
        (tmp_path / "g" / heads.CARD_FILE).read_text()), "digest": ""}))  # no digest to check against
    (tmp_path / "g" / heads.MODEL_FILE).write_text("not a model")
    with pytest.raises(KvrankError, match="not a LightGBM model"):
        heads.load(tmp_path / "g")


def test_a_head_is_refused_for_scores_it_was_not_trained_on() -> None:
    card = _card()
    card.check(mode="ql", template="ql-claim", fingerprint="f" * 32, adapter=None, where="--head h")
    for changes, message in (({"mode": "attn"}, "trained on 'ql' scores, not 'attn'"),
                             ({"template": "ql-passage-query"}, "template 'ql-claim'"),
                             ({"fingerprint": "0" * 32}, "base model 'tiny'"),
                             ({"adapter": "abc"}, "an adapter")):
        given = {"mode": "ql", "template": "ql-claim", "fingerprint": "f" * 32, "adapter": None, **changes}
        with pytest.raises(KvrankError, match=message):
            card.check(**given, where="--head h")


def test_the_shipped_head_is_found_for_its_model_only() -> None:
    card = heads.read_card(SHIPPED)
    assert (card.mode, card.template, card.base_model) == ("ql", "ql-claim", "smollm2")
    weights = Path(heads.__file__).parent / "weights"  # the model's measured template weights are keyed alike
    assert any(p.name.startswith(card.base_fingerprint) for p in weights.iterdir())
    found = heads.resolve(heads.AUTO, fingerprint=card.base_fingerprint, mode="ql", template="ql-claim", adapter=None)
    assert found["ql"].digest == card.digest  # loads: the model file matches its digest
    for other in ({"fingerprint": "0" * 32}, {"template": "ql-passage-query"}):
        given = {"fingerprint": card.base_fingerprint, "mode": "ql", "template": "ql-claim", **other}
        assert heads.resolve(heads.AUTO, adapter=None, **given) == {}
    assert heads.resolve(heads.AUTO, fingerprint=card.base_fingerprint, mode="ql", template="ql-claim",
                         adapter="abc") == {}  # an adapter changes the scores the head was fitted on
    assert heads.resolve(heads.NONE, fingerprint=card.base_fingerprint, mode="ql", template="ql-claim",
                         adapter=None) == {}
    # what its card claims was measured on collections it did not train on: never below the first stage
    for collection, row in card.metrics["leave_one_collection_out_nDCG@10"].items():
        assert row["head (nested choice)"] > row["first stage"], collection


def test_auto_picks_the_head_trained_on_the_pipelines_kind_of_first_stage(tmp_path: Path, monkeypatch,
                                                                          caplog) -> None:
    booster = fit(synthetic_lists(120, 0), trees=3)
    monkeypatch.setattr(heads, "PACKAGED", tmp_path)
    heads.save(tmp_path / "bm25", booster, _card(first_stage="bm25"))
    only_bm25 = {kind: heads.packaged("f" * 32, "ql-claim", kind)["ql"].name for kind in heads.FIRST_STAGE_PREFERENCE}
    assert set(only_bm25.values()) == {"bm25"}  # one head for a mode: every kind of first stage gets it
    heads.save(tmp_path / "hybrid", booster, _card(first_stage="hybrid"))
    heads.save(tmp_path / "attn", booster, _card(mode="attn", first_stage="hybrid"))
    picked = {kind: heads.packaged("f" * 32, "ql-claim", kind)["ql"].name for kind in heads.FIRST_STAGE_PREFERENCE}
    assert picked == {"bm25": "bm25", "run": "bm25", "hybrid": "hybrid", "dense": "hybrid"}
    assert heads.packaged("f" * 32, "ql-claim", "bm25")["attn"].name == "attn"  # the only attn head
    found = heads.resolve(tmp_path / "hybrid", fingerprint="f" * 32, mode="ql", template="ql-claim", adapter=None,
                          first_stage="bm25")
    assert found["ql"].card.first_stage == "hybrid" and "trained on hybrid lists" in caplog.text
    caplog.clear()
    heads.resolve(tmp_path / "bm25", fingerprint="f" * 32, mode="ql", template="ql-claim", adapter=None,
                  first_stage="run")
    assert "trained on" not in caplog.text  # a run file is most often a BM25 run


def test_a_card_without_first_stage_reads_it_from_its_training_record_and_a_bad_one_is_refused(
        tmp_path: Path) -> None:
    booster = fit(synthetic_lists(120, 0), trees=3)
    card_file = heads.save(tmp_path / "h", booster, _card()) and tmp_path / "h" / heads.CARD_FILE
    data = json.loads(card_file.read_text())
    for training, kind in (({}, "bm25"), ({"first_stage": "hybrid"}, "hybrid"), ({"first_stage": "candidates"}, "run")):
        card_file.write_text(json.dumps({k: v for k, v in data.items() if k != "first_stage"} | {"training": training}))
        assert heads.read_card(tmp_path / "h").first_stage == kind
    card_file.write_text(json.dumps(data | {"first_stage": "hybird"}))
    with pytest.raises(KvrankError, match="first_stage 'hybird' is not one of bm25, run, hybrid, dense"):
        heads.read_card(tmp_path / "h")


def test_the_pipeline_knows_its_kind_of_first_stage(tiny_beir: Path) -> None:
    from kvrank.eval.data import load_dataset
    from kvrank.pipeline import first_stage_kind
    from kvrank.retriever import RetrieverConfig, build_or_load
    from kvrank.retriever.candidates import CandidatesRetriever

    dataset = load_dataset(tiny_beir, "test")
    config = RetrieverConfig(show_progress=False)
    assert [first_stage_kind(build_or_load(k, dataset, config=config)) for k in ("bm25", "dense", "hybrid")] == [
        "bm25", "dense", "hybrid"]
    assert first_stage_kind(CandidatesRetriever({}, "run.trec")) == "run"


PASSAGES = [Passage(f"d{i}", f"topic {i % 3}", f"passage {i} about topic {i % 3} and item {i}") for i in range(8)]


def _tiny_head(folder: Path, lm, dataset: Dataset, first) -> heads.HeadCard:
    """A head for the tiny model, fitted on synthetic lists (its trees split; what they learned does not matter
    here, only that the pipeline applies exactly them)."""
    booster = fit(synthetic_lists(120, 0), trees=10)
    return heads.save(folder, booster, _card(base_fingerprint=lm.fingerprint,
                                             dense_model=load_encoder(None).fingerprint))


def test_the_pipeline_ranks_with_the_head_in_its_mode_and_fuses_in_others(tmp_path: Path) -> None:
    lm = tiny_lm("llama")
    dataset = Dataset("tiny", {p.doc_id: p for p in PASSAGES}, {}, source="test")
    card = _tiny_head(tmp_path / "h", lm, dataset, None)
    config = PipelineConfig(retriever="bm25", reranker=RerankerConfig(batch_size=4), head=tmp_path / "h",
                            kv_format="none", rerank_depth=6)
    pipeline = build(config, dataset, lm=lm)
    assert pipeline.head_digest == card.digest
    from kvrank.types import Query

    query = Query("q", "topic 1 item 4")
    result = pipeline.search([query])[0]
    window = pipeline.first_stage.search([query], 100)["q"][:6]
    ql = pipeline.reranker.score_many([query.text], [[dataset.corpus[d.doc_id] for d in window]]).scores[0]
    vectors = load_encoder(None).encode([query.text, *(dataset.corpus[d.doc_id].contents for d in window)])
    expected = heads.load(tmp_path / "h").score([d.score for d in window], (vectors[1:] @ vectors[0]).tolist(), ql)
    order = [window[i].doc_id for i in np.argsort(-expected, kind="stable")]
    assert [h.doc_id for h in result.hits[:6]] == order
    np.testing.assert_allclose([h.score for h in result.hits[:6]], np.sort(expected)[::-1], rtol=1e-6)
    assert "head" in result.timings and pipeline.describe()["reranker"]["head"] == card.digest
    assert pipeline.describe()["reranker"]["fusion_weight"] is None
    fused = pipeline.search([query], mode="attn")[0]  # another mode: fusion as before, no head stage
    assert "head" not in fused.timings
    none = build(PipelineConfig(retriever="bm25", reranker=RerankerConfig(batch_size=4), head="none",
                                kv_format="none"), dataset, lm=lm)
    assert none.head is None and none.describe()["reranker"]["head"] is None
    auto = build(PipelineConfig(retriever="bm25", reranker=RerankerConfig(batch_size=4), kv_format="none",
                                head="auto"), dataset, lm=lm)
    assert auto.head is None  # auto: no head ships for the tiny model
    plain = build(PipelineConfig(retriever="bm25", reranker=RerankerConfig(batch_size=4), kv_format="none"),
                  dataset, lm=lm)
    assert plain.heads == {}  # the default, auto: no head ships for the tiny model, so it fuses


def test_search_api_names_the_head(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from kvrank.api.app import create_app
    from kvrank.api.settings import Settings

    lm = tiny_lm("llama")
    dataset = Dataset("tiny", {p.doc_id: p for p in PASSAGES}, {}, source="test")
    card = _tiny_head(tmp_path / "h", lm, dataset, None)
    config = PipelineConfig(retriever="bm25", reranker=RerankerConfig(batch_size=4), head=tmp_path / "h",
                            kv_format="none")
    with TestClient(create_app(build(config, dataset, lm=lm), Settings())) as client:
        body = client.post("/v1/search", json={"query": "topic 1", "top_k": 3}).json()
        assert body["head"] == card.digest and body["fusion_weight"] is None and body["hits"][0]["reranked"]
        other = client.post("/v1/search", json={"query": "topic 1", "top_k": 3, "rerank": {"mode": "attn"}}).json()
        assert other["head"] is None and other["fusion_weight"] == 0.3
        assert client.get("/v1/page/config").json()["heads"] == {"ql": card.digest}  # the page says where fw is unused


def test_cli_train_head_then_eval_with_it(tiny_beir: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "head"
    args = ["train", "--head", "--data", str(tiny_beir), "--split", "test", "--out", str(out), "--model",
            str(tiny_checkpoint), "--depth", "4", "--trees", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    card = heads.read_card(out)
    assert card.trees == 3 and card.training["depth"] == 4 and card.training["sources"][0]["lists"] == 4
    assert card.first_stage == "bm25" == card.training["first_stage"]  # the --retriever default of train
    cache = out / "lists-tiny-test-ql.json"
    made_by = json.loads(cache.read_text())["signature"]
    assert made_by["mode"] == "ql" and made_by["depth"] == 4 and made_by["kv_format"] and made_by["corpus"]
    lists = json.loads(cache.read_text())["lists"]
    assert sorted(lists) == ["1", "10", "2", "3"]  # the judged queries; "99" has no qrels
    assert all(1 <= len(x["doc_ids"]) <= 4 for x in lists.values())  # BM25 finds fewer for some
    before = cache.stat().st_mtime_ns
    assert runner.invoke(app, args).exit_code == 0  # a rerun finds every list in the cache and fits again
    assert cache.stat().st_mtime_ns == before
    result = runner.invoke(app, [*args[:-4], "--depth", "5", "--trees", "3"])
    assert result.exit_code == 2 and "other settings" in result.output and "depth 4 != 5" in result.output
    result = runner.invoke(app, ["eval", "--data", str(tiny_beir), "--rerank", "ql", "--model", str(tiny_checkpoint),
                                 "--head", str(out), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["head"]["digest"] == card.digest == report["reranker"]["head"]
    assert f"ranked by scoring head {card.digest}" in " ".join(result.output.split())
    for bad, message in (([*args, "--mode", "yesno"], "learns from ql or attn scores"),
                         (["eval", "--data", str(tiny_beir), "--rerank", "ql", "--head", str(tmp_path)],
                          "not a head folder"),
                         (["eval", "--data", str(tiny_beir), "--rerank", "yesno", "--model", str(tiny_checkpoint),
                           "--head", str(out)], "trained on 'ql' scores")):
        result = runner.invoke(app, bad)
        assert result.exit_code == 2 and message in result.output, result.output


def test_head_lists_need_judged_queries(tiny_llama) -> None:
    from kvrank.pipeline import build_reranker
    from kvrank.retriever import build_or_load

    unjudged = Dataset("plain", {p.doc_id: p for p in PASSAGES}, {}, [], source="plain")
    reranker = build_reranker(PipelineConfig(reranker=RerankerConfig(), kv_format="none"), PASSAGES, lm=tiny_llama)
    with pytest.raises(KvrankError, match="no qrels"):
        head_lists(unjudged, build_or_load("bm25", unjudged), reranker, load_encoder(None), depth=4)


def test_an_attn_head_ranks_attn_results(tiny_beir: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "attn-head"
    result = runner.invoke(app, ["train", "--head", "--mode", "attn", "--data", str(tiny_beir), "--split", "test",
                                 "--out", str(out), "--model", str(tiny_checkpoint), "--depth", "4", "--trees", "2"])
    assert result.exit_code == 0, result.output
    card = heads.read_card(out)
    assert card.mode == "attn"
    result = runner.invoke(app, ["eval", "--data", str(tiny_beir), "--rerank", "attn", "--model",
                                 str(tiny_checkpoint), "--head", str(out), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["reranker"]["head"] == card.digest
    result = runner.invoke(app, ["eval", "--data", str(tiny_beir), "--rerank", "ql", "--model",
                                 str(tiny_checkpoint), "--head", str(out)])
    assert result.exit_code == 2 and "trained on 'attn' scores, not 'ql'" in result.output


class CountingEncoder:
    """The real MiniLM encoder, counting the texts it is asked to encode."""

    def __init__(self) -> None:
        self.inner = load_encoder(None)
        self.fingerprint = self.inner.fingerprint
        self.texts = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.texts += len(texts)
        return self.inner.encode(texts)


def test_passage_vectors_come_from_the_dense_index_or_are_encoded_once() -> None:
    from kvrank.retriever import build_or_load

    dataset = Dataset("tiny-vectors", {p.doc_id: p for p in PASSAGES}, {}, source="test")
    ids = ["d3", "d1", "d3"]
    expected = load_encoder(None).encode([dataset.corpus[d].contents for d in ids])
    hybrid = CountingEncoder()
    from_index = heads.PassageVectors(hybrid, lambda d: dataset.corpus[d].contents,
                                      build_or_load("hybrid", dataset))
    np.testing.assert_allclose(from_index.get(ids), expected, atol=1e-5)
    assert hybrid.texts == 0  # read from the first stage's index
    plain = CountingEncoder()
    kept = heads.PassageVectors(plain, lambda d: dataset.corpus[d].contents, build_or_load("bm25", dataset),
                                capacity=2)
    np.testing.assert_allclose(kept.get(ids), expected, atol=1e-5)
    assert plain.texts == 2  # each passage once
    kept.get(["d1", "d3"])
    assert plain.texts == 2  # kept
    kept.get(["d5"])  # evicts the least recently used (d1)
    kept.get(["d3", "d1"])
    assert plain.texts == 4
