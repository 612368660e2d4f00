"""Query-side adapters and training over stored passage KV (tiny random models: fast and exact).

The headline properties: an untrained adapter changes no score; passage KV (and a stored entry's bytes) never
depend on the adapter; cached scores with an adapter equal a plain forward with the same adapter on the query side;
training lowers the loss in every mode; a killed run resumes to the same adapter; mismatches are refused early.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest_models import tiny_lm
from transformers import DynamicCache
from typer.testing import CliRunner

from kvrank.cli import app
from kvrank.errors import KvrankError
from kvrank.pipeline import PipelineConfig, build_reranker
from kvrank.reranker import adapter as adapters
from kvrank.reranker.adapter import AdapterCard
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.retriever import build_or_load
from kvrank.store.disk import encode_entry
from kvrank.train.lists import TrainList, folds, labelled_lists, pseudo_lists
from kvrank.train.trainer import TrainConfig, list_loss, train
from kvrank.types import Dataset, Passage, Qrel, Query

PASSAGES = [Passage(f"d{i}", f"Title {i}", f"Passage {i} is about topic {i % 3} and the number {i * 7}.")
            for i in range(6)]
QUERY = "topic 1 and numbers"
LABELS = [0.0, 1.0, 0.0, 0.0, 2.0, 0.0]
# the byte-level test tokenizer encodes " yes"/" no" as several tokens starting with the same space byte
MODE_OPTIONS = {"ql": {}, "yesno": {"yes_token": "y", "no_token": "n"}, "attn": {}}


def reranker_for(mode: str, lm=None, **options) -> BlockReranker:
    options = {"kv_format": "none", **MODE_OPTIONS[mode], **options}
    config = RerankerConfig(mode=mode, batch_size=4, storage_dtype="float32", **options)
    return BlockReranker(config, lm=lm or tiny_lm("llama"))


def card_for(reranker: BlockReranker, **changes) -> AdapterCard:
    fields = dict(base_fingerprint=reranker.lm.fingerprint, base_model="tiny-llama", mode=reranker.config.mode,
                  template=reranker.template.name, rank=4, alpha=8, seed=0)
    return AdapterCard(**{**fields, **changes})


def perturb(lm, seed: int = 1) -> None:
    """Give an attached adapter non-zero up-projections (what training would)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lm.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("mode", ["ql", "yesno", "attn"])
def test_zero_initialised_adapter_changes_no_score(mode: str) -> None:
    base = reranker_for(mode).score(QUERY, PASSAGES)
    lm = tiny_lm("llama")
    rr = reranker_for(mode, lm)
    adapters.attach(lm, card_for(rr))
    assert lm.fingerprint == tiny_lm("llama").fingerprint  # the base identity: stores keep their keys
    scores = reranker_for(mode, lm).score(QUERY, PASSAGES)
    assert max(abs(a - b) for a, b in zip(base, scores)) <= 1e-6


def test_stored_entries_are_byte_identical_with_and_without_an_adapter() -> None:
    plain = reranker_for("ql")
    before = [b"".join(bytes(c) for c in encode_entry(kv)) for kv in plain.passage_kv(PASSAGES)[0]]
    lm = tiny_lm("llama")
    adapters.attach(lm, card_for(plain))
    perturb(lm)
    adapted = reranker_for("ql", lm)
    assert adapted.score(QUERY, PASSAGES) != plain.score(QUERY, PASSAGES)  # the adapter does change scores
    after = [b"".join(bytes(c) for c in encode_entry(kv)) for kv in adapted.passage_kv(PASSAGES)[0]]
    assert after == before
    assert adapted.passage_keys(PASSAGES)[1] == plain.passage_keys(PASSAGES)[1]


def test_cached_scores_with_an_adapter_equal_a_fresh_forward_with_it() -> None:
    """Reference: a plain transformers forward over prefix + passage with the base weights, then the query part
    with the adapter on (activated LoRA), no kvrank engine, no stored KV."""
    lm = tiny_lm("llama")
    rr = reranker_for("ql", lm)
    adapters.attach(lm, card_for(rr))
    perturb(lm)
    cached = rr.score(QUERY, PASSAGES)
    ids, start, end = rr.query_ids(QUERY)
    for passage, score in zip(PASSAGES, cached):
        context = rr.prefix_ids + rr.block_ids(passage)
        with torch.no_grad():
            with lm.base_weights():
                cache = lm.model(input_ids=torch.tensor([context]), cache=DynamicCache(), use_cache=True).cache
            positions = torch.arange(len(context), len(context) + len(ids))[None]
            logits = lm.model(input_ids=torch.tensor([ids]), cache=cache, position_ids=positions).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        fresh = logp[start - 1:end - 1].gather(-1, torch.tensor(ids[start:end])[:, None]).mean()
        assert abs(float(fresh) - score) <= 1e-4


@pytest.mark.parametrize("mode", ["ql", "yesno", "attn"])
def test_the_training_loss_is_over_the_scores_reranking_uses(mode: str) -> None:
    """One definition of each mode's score: the loss equals the mode's objective computed from `score`."""
    rr = reranker_for(mode)
    scores = torch.tensor(rr.score(QUERY, PASSAGES))
    labels = torch.tensor(LABELS)
    config = TrainConfig()
    if mode == "attn":  # InfoNCE: the positives against every candidate
        logits = scores / config.attn_temperature
        want = torch.logsumexp(logits, 0) - torch.logsumexp(logits[labels > 0], 0)
    else:  # listwise softmax cross-entropy, targets 2^rel - 1, normalised
        target = (2.0 ** labels - 1) / (2.0 ** labels - 1).sum()
        want = -(target * torch.log_softmax(scores / config.temperature, dim=0)).sum()
    loss, hits, misses = list_loss(rr, TrainList(Query("q", QUERY), PASSAGES, LABELS), config)
    assert loss.item() == pytest.approx(want.item(), abs=1e-5) and (hits, misses) == (len(PASSAGES), 0)


def test_a_mode_without_a_training_objective_is_refused(tmp_path: Path) -> None:
    rr = BlockReranker(RerankerConfig(kv_format="none", mode="cascade", batch_size=4), lm=tiny_lm("llama"))
    lists = [TrainList(Query("q", QUERY), PASSAGES, LABELS)]
    with pytest.raises(KvrankError, match="mode 'cascade' cannot be trained; use one of ql, attn, yesno") as err:
        train(rr, lists, TrainConfig(), tmp_path / "a", card=card_for(rr), show_progress=False)
    assert err.value.param == "mode"


LEARNING_RATES = {"ql": 1e-2, "yesno": 3e-3, "attn": 1e-2}  # measured on this tiny model: each mode's loss falls


@pytest.mark.parametrize("mode", ["ql", "yesno", "attn"])
def test_training_lowers_the_loss_in_every_mode(mode: str, tmp_path: Path) -> None:
    """Listwise cross-entropy (ql, yesno) and attention-mass InfoNCE (attn) both learn; passage KV never moves."""
    lm = tiny_lm("llama")
    rr = reranker_for(mode, lm)
    card = card_for(rr)
    adapters.attach(lm, card)
    lists = [TrainList(Query(f"q{i}", QUERY), PASSAGES, LABELS) for i in range(6)]
    before = rr.passage_kv(PASSAGES)[0]
    initial = list_loss(rr, lists[0], TrainConfig())[0].item()
    card, history = train(rr, lists, TrainConfig(epochs=4, lr=LEARNING_RATES[mode]), tmp_path / "a", card=card,
                          show_progress=False)
    final = list_loss(rr, lists[0], TrainConfig())[0].item()
    assert final < 0.8 * initial, (initial, final)
    assert all(torch.equal(a.keys[0], b.keys[0]) for a, b in zip(before, rr.passage_kv(PASSAGES)[0]))
    assert history.kv_misses == 0 and history.kv_hits == 24 * len(PASSAGES)  # every epoch reused the stored KV
    saved = adapters.read_card(tmp_path / "a")
    assert saved.digest == card.digest and saved.mode == mode and saved.training["queries"] == 6
    # the saved adapter, loaded into a fresh model, scores as the trained one does
    fresh = tiny_lm("llama")
    adapters.load(tmp_path / "a", fresh, mode=mode, template=rr.template.name)
    assert reranker_for(mode, fresh).score(QUERY, PASSAGES) == pytest.approx(rr.score(QUERY, PASSAGES), abs=1e-5)


CHILD = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from conftest_models import tiny_lm
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.reranker.adapter import AdapterCard
from kvrank.train import trainer
from kvrank.train.lists import TrainList
from kvrank.types import Passage, Query
torch.set_num_threads(1)
PASSAGES = [Passage(f"d{{i}}", f"Title {{i}}", f"Passage {{i}} is about topic {{i % 3}} and the number {{i * 7}}.")
            for i in range(6)]
slow = float(sys.argv[2])
loss = trainer.list_loss
def slow_loss(*args):
    time.sleep(slow)
    return loss(*args)
trainer.list_loss = slow_loss
lm = tiny_lm("llama")
rr = BlockReranker(RerankerConfig(batch_size=4, storage_dtype="float32"), lm=lm)
card = AdapterCard(base_fingerprint=lm.fingerprint, base_model="tiny-llama", mode="ql", template=rr.template.name,
                   rank=4, alpha=8, seed=3)
lists = [TrainList(Query(f"q{{i}}", f"topic {{i % 3}} and numbers"), PASSAGES, [float(j == i % 6) for j in range(6)])
         for i in range(12)]
card, _ = trainer.train(rr, lists, trainer.TrainConfig(epochs=2, lr=5e-3, seed=3, checkpoint_every=2), sys.argv[1],
                        card=card, show_progress=False)
print(card.digest)
"""


def test_a_killed_run_resumes_to_the_same_adapter(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    def run(out: Path, slow: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(out), str(slow)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    whole = run(tmp_path / "whole", 0.0)
    killed = run(tmp_path / "killed", 0.3)
    state = tmp_path / "killed" / ".checkpoint" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a mid-epoch checkpoint of the second epoch is published
        if state.is_file() and json.loads(state.read_text())["epoch"] == 2 and json.loads(state.read_text())["done"]:
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    resumed = run(tmp_path / "killed", 0.0)
    out_whole, err_whole = whole.communicate(timeout=300)
    out_resumed, err_resumed = resumed.communicate(timeout=300)
    assert whole.returncode == 0 and resumed.returncode == 0, err_whole[-2000:] + err_resumed[-2000:]
    assert out_resumed.strip() == out_whole.strip()  # same digest: the same adapter bytes
    history = json.loads((tmp_path / "killed" / "history.json").read_text())
    assert history["queries"] >= 24  # the resumed run finished both epochs
    assert not (tmp_path / "killed" / ".checkpoint").exists()  # a finished adapter folder holds what ships


def test_a_mismatched_adapter_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    lm = tiny_lm("llama")
    rr = reranker_for("ql", lm)
    adapters.attach(lm, card_for(rr))
    adapters.save_adapter(tmp_path / "a", lm, card_for(rr))
    missing_model = str(tmp_path / "no-such-model")  # loading it would fail: the adapter check must come first
    with pytest.raises(KvrankError, match="trained for mode 'ql', not 'yesno'"):
        build_reranker(PipelineConfig(reranker=RerankerConfig(mode="yesno", model=missing_model),
                                      adapter=tmp_path / "a", kv_format="none"), PASSAGES)
    card = adapters.read_card(tmp_path / "a")
    with pytest.raises(KvrankError, match="template"):
        card.check(mode="ql", template="another-template")
    with pytest.raises(KvrankError, match="trained on base model 'tiny-llama'"):
        adapters.load(tmp_path / "a", tiny_lm("llama", seed=5), mode="ql", template=rr.template.name)
    (tmp_path / "b").mkdir()
    with pytest.raises(KvrankError, match="not an adapter folder"):
        adapters.read_card(tmp_path / "b")


def _dataset(qrels: list[Qrel]) -> Dataset:
    corpus = {p.doc_id: p for p in PASSAGES}
    queries = {"1": Query("1", "topic 1 numbers"), "2": Query("2", "topic 2 numbers")}
    return Dataset("tiny", corpus, queries, qrels, source="test")


def test_training_lists_and_their_bad_input() -> None:
    dataset = _dataset([Qrel("1", "d1", 2), Qrel("1", "d4", 1), Qrel("2", "d2", 1)])
    first = build_or_load("bm25", dataset)
    lists = labelled_lists(dataset, first, negatives=2)
    assert [item.query.query_id for item in lists] == ["1", "2"]
    one = lists[0]
    assert sorted(zip(one.labels, (p.doc_id for p in one.passages)))[-2:] == [(1.0, "d4"), (2.0, "d1")]
    assert len(one.passages) == 4 and sum(label == 0 for label in one.labels) == 2
    with pytest.raises(KvrankError, match="no qrels to train on"):
        labelled_lists(_dataset([]), first)
    with pytest.raises(KvrankError, match="none of its 2 training queries has a judged positive"):
        labelled_lists(_dataset([Qrel("1", "d1", 0)]), first)
    with pytest.raises(KvrankError, match="negatives must be >= 1"):
        labelled_lists(dataset, first, negatives=0)
    with pytest.raises(KvrankError, match="corpus is empty"):
        pseudo_lists(Dataset("empty", {}, {}), first)
    with pytest.raises(KvrankError, match="no passage suits recipe 'title'"):
        pseudo_lists(dataset, first, recipe="title")
    cloze = pseudo_lists(Dataset("c", {"x": Passage("x", "", "One two three four five six. Seven eight nine ten "
                                                    "eleven twelve. Thirteen fourteen fifteen sixteen seventeen.")},
                                 {}), first, recipe="cloze", n=1)
    assert len(cloze) <= 1
    train_part, held = folds([Query(str(i), "q") for i in range(20)], 2, 0)
    assert held and train_part and not {q.query_id for q in held} & {q.query_id for q in train_part}


def test_cli_train_then_eval_with_the_adapter(tiny_beir: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "adapter"
    result = runner.invoke(app, ["train", "--data", str(tiny_beir), "--split", "test", "--out", str(out),
                                 "--model", str(tiny_checkpoint), "--negatives", "2", "--epochs", "1", "--rank", "2"])
    assert result.exit_code == 0, result.output
    card = adapters.read_card(out)
    assert card.mode == "ql" and card.training["labels"] == "test" and card.digest
    result = runner.invoke(app, ["eval", "--data", str(tiny_beir), "--rerank", "ql", "--model", str(tiny_checkpoint),
                                 "--adapter", str(out), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["adapter"]["digest"] == card.digest == report["reranker"]["adapter"]
    result = runner.invoke(app, ["eval", "--data", str(tiny_beir), "--rerank", "yesno", "--model",
                                 str(tiny_checkpoint), "--adapter", str(out)])
    assert result.exit_code == 2 and "trained for mode 'ql'" in result.output
    result = runner.invoke(app, ["train", "--data", str(tiny_beir), "--out", str(out), "--mode", "cascade"])
    assert result.exit_code == 2 and "cannot be trained" in result.output


def test_list_loss_is_a_listwise_cross_entropy() -> None:
    rr = reranker_for("ql")
    item = TrainList(Query("q", QUERY), PASSAGES, LABELS)
    scores = torch.tensor(rr.score(QUERY, PASSAGES))  # stores the passages' KV
    loss, hits, misses = list_loss(rr, item, TrainConfig(temperature=0.5))
    target = torch.tensor([(2.0 ** x - 1) for x in LABELS])
    expected = -(target / target.sum() * torch.log_softmax(scores / 0.5, 0)).sum()
    assert loss.item() == pytest.approx(float(expected), abs=1e-5)
    assert (hits, misses) == (len(PASSAGES), 0)  # the scoring above stored the passages


def test_search_api_names_the_adapter(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from kvrank.api.app import create_app
    from kvrank.api.settings import Settings
    from kvrank.pipeline import build

    lm = tiny_lm("llama")
    rr = reranker_for("ql", lm)
    adapters.attach(lm, card_for(rr))
    perturb(lm)
    card = adapters.save_adapter(tmp_path / "a", lm, card_for(rr))
    dataset = Dataset("tiny", {p.doc_id: p for p in PASSAGES}, {}, source="test")
    config = PipelineConfig(retriever="bm25", reranker=RerankerConfig(batch_size=4), adapter=tmp_path / "a",
                            kv_format="none")
    pipeline = build(config, dataset, lm=tiny_lm("llama"))
    with TestClient(create_app(pipeline, Settings())) as client:
        hits = client.post("/v1/search", json={"query": "topic 1", "top_k": 3}).json()
        assert hits["adapter"] == card.digest and hits["hits"][0]["reranked"]
        plain = client.post("/v1/search", json={"query": "topic 1", "top_k": 3, "rerank": {"mode": "none"}}).json()
        assert plain["adapter"] is None
        other = client.post("/v1/search", json={"query": "topic 1", "rerank": {"mode": "attn"}})
        assert other.status_code == 422 and "trained for mode 'ql'" in other.text
        page = client.get("/v1/page/config").json()  # the search page labels the adapter's mode, disables others
        assert page["adapter"] == {"digest": card.digest, "mode": "ql"} and page["default_mode"] == "ql"
