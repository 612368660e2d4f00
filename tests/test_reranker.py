"""Reranker behaviour: KV reuse across queries, truncation, bad input, fusion, and the search pipeline's use of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest_models import tiny_lm

from kvrank.defaults import RERANK_MODES
from kvrank.errors import KvrankError
from kvrank.pipeline import PipelineConfig, SearchPipeline
from kvrank.reranker.fusion import fuse, zscore
from kvrank.reranker.modes import SCORING_MODES, get_mode
from kvrank.reranker.reranker import MODES, BlockReranker, RerankerConfig
from kvrank.reranker.templates import PromptTemplate
from kvrank.retriever.candidates import CandidatesRetriever
from kvrank.store.kv import MemoryKVStore, StoreIdentity
from kvrank.store.remote import RemoteTier
from kvrank.store.tiered import TieredKVStore
from kvrank.types import Passage, Query, ScoredDoc

CORPUS = {f"d{i}": Passage(f"d{i}", f"Title {i}", f"Passage number {i} about topic {i % 3}.") for i in range(6)}


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


@pytest.fixture
def rr(lm):
    return BlockReranker(RerankerConfig(kv_format="none", mode="ql", batch_size=4), store=MemoryKVStore(), lm=lm)


def test_second_query_reuses_stored_passage_kv(rr):
    passages = list(CORPUS.values())
    first = rr.score_many(["topic one"], [passages[:4]])
    assert rr.prefills == 4 and first.timings.prefill > 0
    assert (first.kv_hits, first.kv_misses) == ([0], [4])
    result = rr.rerank(Query("q2", "topic two"), passages[2:])  # d2, d3 stored; d4, d5 new
    assert rr.prefills == 6
    assert {d.query_id for d in result} == {"q2"} and len(result) == 4
    third = rr.score_many(["topic three"], [passages])
    assert rr.prefills == 6 and third.timings.prefill == 0.0  # nothing left to prefill
    assert (third.kv_hits, third.kv_misses) == ([6], [0])
    stats = rr.store.stats()
    assert (stats.hits, stats.misses, stats.entries) == (2 + 6, 4 + 2, 6)


def test_the_registry_holds_every_mode_in_the_order_of_rerank_modes():
    assert tuple(SCORING_MODES) == RERANK_MODES == MODES
    for name, mode in SCORING_MODES.items():
        assert mode.name == name and RerankerConfig(kv_format="none", mode=name).prompt == mode.template
    assert [name for name, mode in SCORING_MODES.items() if mode.trainable] == ["ql", "attn", "yesno"]
    with pytest.raises(KvrankError, match=r"mode 'bogus' is not one of \('ql', 'attn', 'yesno', 'cascade'\)") as err:
        get_mode("bogus")
    assert err.value.param == "mode"


@pytest.mark.parametrize("mode", ["ql", "attn"])
def test_waiting_skips_scoring_of_a_list_but_its_kv_is_stored(lm, mode):
    """Every list's KV is looked up (and prefilled, stored) before `waiting` is asked; a list nobody waits for
    gets no scores, the others the scores they get alone."""
    passages = list(CORPUS.values())
    queries, lists = ["topic one", "topic two", "topic three"], [passages[:2], passages[2:4], passages[4:]]
    rr = BlockReranker(RerankerConfig(kv_format="none",
                                      mode=mode, batch_size=4, attn_weights=None), store=MemoryKVStore(), lm=lm)
    asked = []

    def waiting(i: int) -> bool:
        asked.append((i, rr.prefills))
        return i != 1

    result = rr.score_many(queries, lists, waiting)
    assert asked == [(0, 6), (1, 6), (2, 6)]  # all six passages prefilled before any list is scored
    assert result.scores[1] == [] and (result.kv_hits, result.kv_misses) == ([0, 0, 0], [2, 2, 2])
    alone = BlockReranker(rr.config, lm=lm)
    for i in (0, 2):
        assert len(result.scores[i]) == 2
        assert result.scores[i] == pytest.approx(alone.score(queries[i], lists[i]), abs=1e-5)
    assert rr.uncached_tokens(lists[1]) == 0  # the skipped list's KV was stored
    again = rr.score_many([queries[1]], [lists[1]])
    assert (again.kv_hits, again.kv_misses) == ([2], [0]) and rr.prefills == 6
    assert again.scores[0] == pytest.approx(alone.score(queries[1], lists[1]), abs=1e-5)
    nobody = rr.score_many(queries, lists, lambda i: False)
    assert nobody.scores == [[], [], []] and nobody.kv_hits == [2, 2, 2]


def test_uncached_tokens_counts_the_distinct_passages_the_store_lacks(rr):
    short, stored = CORPUS["d0"], CORPUS["d1"]
    long = Passage("long", "Long", "a passage with many more words than the others have " * 2)
    rr.passage_kv([stored])
    before = rr.store.stats()
    assert len(rr.block_ids(long)) > len(rr.block_ids(short))
    assert rr.uncached_tokens([short, stored, short, long, long]) == len(rr.block_ids(short)) + len(
        rr.block_ids(long))
    after = rr.store.stats()
    assert (after.hits, after.misses) == (before.hits, before.misses)  # a contains-check, not a lookup
    assert rr.uncached_tokens([]) == 0 and rr.prefills == 1
    rr.passage_kv([short, long])
    assert rr.uncached_tokens([short, stored, long]) == 0


def test_uncached_tokens_of_a_tiered_store_asks_only_the_local_tier(lm, tmp_path):
    """An entry only the remote tier holds counts as uncached: admission asks no other machine."""
    config = RerankerConfig(kv_format="none", mode="ql", batch_size=4)
    probe = BlockReranker(config, lm=lm)
    identity = StoreIdentity(probe.engine.fingerprint, probe.storage_tag)
    url = f"file://{tmp_path}/remote"
    writer = BlockReranker(config, store=TieredKVStore(MemoryKVStore(), RemoteTier(url, identity)), lm=lm)
    passages = list(CORPUS.values())[:3]
    writer.passage_kv(passages)  # stored in the writer's local tier and uploaded
    remote = RemoteTier(url, identity)
    reader = BlockReranker(config, store=TieredKVStore(MemoryKVStore(), remote), lm=lm)
    _, keys = reader.passage_keys(passages)
    assert all(key in reader.store for key in keys)  # the remote tier holds them
    assert reader.uncached_tokens(passages) == sum(len(ids) for ids in reader.blocks_ids(passages))
    assert (remote.counters.hits, remote.counters.misses) == (0, 0)
    reader.passage_kv(passages)  # read through: copied into the local tier, nothing prefilled
    assert reader.prefills == 0 and remote.counters.hits == 3
    assert reader.uncached_tokens(passages) == 0


def test_results_are_sorted_and_duplicates_prefilled_once(rr):
    p = CORPUS["d1"]
    result = rr.rerank("number", [p, CORPUS["d2"], p])
    assert [d.score for d in result] == sorted((d.score for d in result), reverse=True)
    assert rr.prefills == 2
    assert result[0].score == pytest.approx(result[1].score) or result[1].score == pytest.approx(result[2].score)


def test_passages_are_truncated_to_the_token_budget(lm):
    rr = BlockReranker(RerankerConfig(kv_format="none", mode="ql", max_passage_tokens=7), lm=lm)
    long = Passage("x", "", "word " * 100)
    assert len(rr.block_ids(long)) == 7
    blocks, prefilled = rr.passage_kv([long])
    assert blocks[0].num_tokens == 7 and prefilled == 1


def test_bad_input_gets_clear_errors(rr, lm):
    with pytest.raises(KvrankError, match="query text is empty"):
        rr.rerank("  ", list(CORPUS.values()))
    assert rr.rerank("anything", []) == []
    with pytest.raises(KvrankError, match="mode 'bogus'"):
        RerankerConfig(kv_format="none", mode="bogus")
    with pytest.raises(KvrankError, match="exactly once"):
        PromptTemplate("t", "", "{text}", "no placeholder")
    with pytest.raises(KvrankError, match="only appear in the query part"):
        PromptTemplate("t", "{query}", "{text}", "{query}")
    with pytest.raises(KvrankError, match="batch_size must be >= 1"):
        RerankerConfig(kv_format="none", batch_size=0)


def test_ql_needs_text_before_the_query(lm):
    rr = BlockReranker(RerankerConfig(kv_format="none",
                                      mode="ql", template=PromptTemplate("bare", "", "{text}", "{query}")), lm=lm)
    with pytest.raises(KvrankError, match="needs text before"):
        rr.rerank("q", [CORPUS["d0"]])


def test_zscore_and_fusion_by_hand():
    assert zscore([1.0, 3.0]) == [-1.0, 1.0]
    assert zscore([2.0, 2.0]) == [0.0, 0.0]
    first = [ScoredDoc("q", "a", 3.0), ScoredDoc("q", "b", 1.0)]  # z: a +1, b -1
    reranked = [ScoredDoc("q", "b", 10.0), ScoredDoc("q", "a", 0.0)]  # z: b +1, a -1
    assert [d.doc_id for d in fuse(reranked, first, 0.0)] == ["b", "a"]
    assert [d.doc_id for d in fuse(reranked, first, 1.0)] == ["a", "b"]
    fused = fuse(reranked, first, 0.25)  # b: .75*1 + .25*-1 = .5 ; a: -.5
    assert [(d.doc_id, d.score) for d in fused] == [("b", 0.5), ("a", -0.5)]
    with pytest.raises(ValueError, match="fusion weight"):
        fuse(reranked, first, 1.5)


def test_rerank_hook_reports_stage_timings(rr):
    """The pipeline reranks the first stage's top docs with the reranker, fuses the two per-query z-scores with
    the fusion weight (here 0.5) and reports the reranker's stages."""
    candidates = [ScoredDoc("q1", d, float(-i)) for i, d in enumerate(CORPUS)]
    config = PipelineConfig(retriever=None, candidates=Path("fixed.trec"), reranker=rr.config, k=10,
                            rerank_depth=10, fusion_weight=0.5)
    pipeline = SearchPipeline(config, CORPUS, CandidatesRetriever({"q1": candidates}, "fixed"), rr)
    (result,) = pipeline.search([Query("q1", "topic")])
    # The expected order, by hand: the reranker's own scores (now read back from the store: the same KV) and the
    # first-stage scores, each z-scored over the six docs, weighted 0.5 each.
    model = rr.score("topic", list(CORPUS.values()))
    z_model, z_first = zscore(model), zscore([d.score for d in candidates])
    fused = {d: 0.5 * zm + 0.5 * zf for d, zm, zf in zip(CORPUS, z_model, z_first)}
    expected = sorted(CORPUS, key=lambda d: -fused[d])
    assert [d.doc_id for d in result.hits] == expected
    assert [d.score for d in result.hits] == pytest.approx([fused[d] for d in expected], abs=1e-9)
    # non-vacuous: the fused order is neither the first stage's nor the reranker's alone
    assert expected != list(CORPUS) and expected != sorted(CORPUS, key=lambda d: -model[list(CORPUS).index(d)])
    assert result.first_stage == candidates and result.reranked == 6
    assert (result.kv_hits, result.kv_misses) == (0, 6)
    assert set(result.timings) == {"rerank", "kv_lookup", "prefill", "scoring"} and result.timings["prefill"] > 0


def test_cascade_keeps_attn_top_and_orders_it_by_ql(lm):
    passages = list(CORPUS.values())
    store = MemoryKVStore()
    attn = BlockReranker(RerankerConfig(kv_format="none", mode="attn", attn_weights=None), store=store, lm=lm)
    ql = BlockReranker(RerankerConfig(kv_format="none", mode="ql"), store=store, lm=lm)
    cascade = BlockReranker(RerankerConfig(kv_format="none",
                                           mode="cascade", cascade_keep=3, attn_weights=None), store=store, lm=lm)
    a = attn.score("topic", passages)
    q = ql.score("topic", passages)
    result = [d.doc_id for d in cascade.rerank("topic", passages)]
    top3 = sorted(range(6), key=lambda i: -a[i])[:3]
    rest = sorted(range(6), key=lambda i: -a[i])[3:]
    assert result == [f"d{i}" for i in sorted(top3, key=lambda i: -q[i])] + [f"d{i}" for i in rest]


def test_attn_weights_uniform_by_default_and_shape_checked(lm):
    passages = list(CORPUS.values())[:3]
    auto = BlockReranker(RerankerConfig(kv_format="none",
                                        mode="attn"), lm=lm)  # no shipped weights for a tiny model: uniform
    feats = auto.attention_features("topic", auto.passage_kv(passages)[0])
    assert auto.score("topic", passages) == pytest.approx(feats.mean(dim=(0, 1)).tolist(), abs=1e-6)
    one_layer = tuple(tuple(1.0 if layer == 1 else 0.0 for _ in range(4)) for layer in range(2))
    weighted = BlockReranker(RerankerConfig(kv_format="none", mode="attn", attn_weights=one_layer), lm=lm)
    assert weighted.score("topic", passages) == pytest.approx(feats[1].sum(dim=0).tolist(), abs=1e-6)
    bad = BlockReranker(RerankerConfig(kv_format="none", mode="attn", attn_weights=((1.0,),)), lm=lm)
    with pytest.raises(KvrankError, match=r"attn_weights has shape \(1, 1\)"):
        bad.score("topic", passages)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_prefilled_kv_does_not_depend_on_the_batch(arch):
    """A block's stored bytes are the same alone, beside a longer block, or in another order: workers that
    batch a corpus differently (`kvrank warm --ray`, an eval prefilling misses query by query) store identical
    entries. Without padding by the block's own length, 3 of 40 blocks differed in their last bits."""
    from kvrank.reranker.blocks import PAD_MULTIPLE

    reranker = BlockReranker(RerankerConfig(mode="ql", batch_size=8, kv_format="none"), lm=tiny_lm(arch))
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    passages = [Passage(f"d{i}", f"T{i}", " ".join(words[(i * j) % 10] for j in range(3 + 7 * i % 61)))
                for i in range(24)]
    ids, keys = reranker.passage_keys(passages)
    assert len({len(x) // PAD_MULTIPLE for x in ids}) > 3  # several padded lengths, so batches mix them
    batched = reranker.prefill(ids, keys)
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    for i in range(len(ids)):
        for other in (reranker.prefill([ids[i]], [keys[i]]),
                      reranker.prefill([ids[i], ids[longest]], [keys[i], keys[longest]])[:1]):
            assert all(a.equal(b) for a, b in zip(batched[i].keys + batched[i].values,
                                                  other[0].keys + other[0].values)), passages[i].doc_id
