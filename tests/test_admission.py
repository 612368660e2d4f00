"""Deadline- and cost-aware serving (`kvrank/api/batching.py`, `service.py`): the cost model and its online
calibration, admission against the queue's estimated drain time with a Retry-After from the estimate, micro-batches
formed by cost, dropped work (expired, abandoned, rows of a running batch nobody waits for), and /metrics."""

from __future__ import annotations

import math
import threading
import time

import pytest
from conftest import GatedStore, api_pipeline, make_app
from fastapi.testclient import TestClient

from kvrank.api.batching import EWMA, Batcher, Cost, CostModel, Expired, Measured, Overloaded
from kvrank.api.service import Abandoned, RerankWork, Service
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.types import Passage


def exact_costs(per_token: float = 0.1) -> CostModel:
    """Seconds = prefill tokens x `per_token`; rows and batches free (numbers a test can reason about)."""
    return CostModel(s_per_token=per_token, s_per_row=0.0, s_per_batch=0.0, safety=1.0)


class Recorder:
    """A `process` callback that records each batch's payloads and answers at once, or holds until released."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.running = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, batch):
        self.running.set()
        self.release.wait(10)
        self.batches.append([job.payload for job in batch])
        for job in batch:
            job.future.set_result(job.payload)
        return None


def test_cost_model_calibrates_online_by_ewma():
    model = CostModel(s_per_token=0.01, s_per_row=0.1, s_per_batch=0.02)
    assert model.seconds(Cost(100, 10)) == pytest.approx(100 * 0.01 + 10 * 0.1 + 0.02)
    # the first batch measured (200 tokens prefilled in 1 s, 10 rows scored in 0.5 s, 1.6 s in all) replaces the
    # starting values; later ones are averaged in
    model.observe(Measured(Cost(200, 10), prefill_s=1.0, scoring_s=0.5), total_s=1.6)
    assert (model.s_per_token, model.s_per_row, model.s_per_batch) == pytest.approx((0.005, 0.05, 0.1))
    model.observe(Measured(Cost(100, 20), prefill_s=1.0, scoring_s=0.5), total_s=1.5)
    assert model.s_per_token == pytest.approx((1 - EWMA) * 0.005 + EWMA * 0.01)
    assert model.s_per_row == pytest.approx((1 - EWMA) * 0.05 + EWMA * 0.025)
    assert model.s_per_batch == pytest.approx((1 - EWMA) * 0.1)  # nothing besides prefill and scoring
    for _ in range(40):  # follows the machine
        model.observe(Measured(Cost(100, 20), prefill_s=1.0, scoring_s=0.5), total_s=1.5)
    assert (model.s_per_token, model.s_per_row) == pytest.approx((0.01, 0.025), rel=1e-4)
    model.observe(Measured(Cost(0, 0), prefill_s=0.0, scoring_s=0.0), total_s=0.1)  # nothing to learn per token
    assert model.s_per_token == pytest.approx(0.01, rel=1e-4)


def test_admission_refuses_what_cannot_finish_and_retry_after_comes_from_the_estimate():
    process = Recorder(hold=True)
    batcher = Batcher(process, max_batch=1, max_wait_s=0.0, queue_size=8, cost_model=exact_costs(0.1))
    batcher.start()
    try:
        now = time.perf_counter()
        running = batcher.submit("a", Cost(10, 1), now + 4)  # 1 s; the idle worker takes it
        assert process.running.wait(5)
        queued = batcher.submit("b", Cost(20, 1), time.perf_counter() + 4)  # 1 s ahead + 2 s <= 4 s: admitted
        with pytest.raises(Overloaded) as refused:  # 3 s ahead + 3 s of its own > 4 s
            batcher.submit("c", Cost(30, 1), time.perf_counter() + 4)
        # once 2 s of the 3 s ahead have drained, a new request of this cost fits its 4 s: Retry-After 2
        assert refused.value.retry_after_s == 2
        small = batcher.submit("d", Cost(5, 1), time.perf_counter() + 4)  # 3 s ahead + 0.5 s: admitted
        assert (batcher.counts.admitted, batcher.counts.rejected_deadline) == (3, 1)
        process.release.set()
        assert [j.future.result(5) for j in (running, queued, small)] == ["a", "b", "d"]
    finally:
        process.release.set()
        batcher.close(5)


def test_an_idle_worker_admits_even_what_the_estimate_says_is_too_slow():
    process = Recorder()
    batcher = Batcher(process, max_batch=4, max_wait_s=0.0, cost_model=exact_costs(1.0))
    batcher.start()
    job = batcher.submit("big", Cost(100, 1), time.perf_counter() + 5)  # 100 s by the estimate
    assert job.future.result(5) == "big"
    batcher.close(5)


def test_batches_grow_by_cost_only_while_they_finish_before_the_earliest_deadline():
    process = Recorder()
    batcher = Batcher(process, max_batch=8, max_wait_s=0.0, queue_size=8, cost_model=exact_costs(0.1))
    now = time.perf_counter()
    jobs = [batcher.submit("d1", Cost(10, 1), now + 2.5),  # 1 s each; d1's deadline admits two of them
            batcher.submit("d2", Cost(10, 1), now + 30),
            batcher.submit("d3", Cost(10, 1), now + 3.5),
            batcher.submit("d4", Cost(5, 1), now + 30),
            batcher.submit("d5", Cost(200, 1), now + 30)]  # 20 s
    batcher.start()
    assert [j.future.result(5) for j in jobs] == ["d1", "d2", "d3", "d4", "d5"]
    # d1+d2+d3 (3 s) would end after d1's deadline; d3+d4+d5 (21.5 s) after d3's
    assert process.batches == [["d1", "d2"], ["d3", "d4"], ["d5"]]
    batcher.close(5)


def test_expired_and_abandoned_jobs_are_dropped_before_they_run():
    process = Recorder()
    batcher = Batcher(process, max_batch=8, max_wait_s=0.0, queue_size=8, cost_model=exact_costs(0.1))
    now = time.perf_counter()
    late = batcher.submit("late", Cost(0, 1), now + 0.05)  # its deadline passes in the queue
    doomed = batcher.submit("doomed", Cost(10, 1), now + 1.2)  # 1 s of work: fits when queued, not after waiting
    gone = batcher.submit("gone", Cost(0, 1), now + 30)  # its request timed out / its client went away
    kept = batcher.submit("kept", Cost(0, 1), now + 30)
    assert batcher.cancel(gone) and gone.abandoned
    time.sleep(0.3)
    batcher.start()
    assert kept.future.result(5) == "kept"
    for job in (late, doomed):
        with pytest.raises(Expired):
            job.future.result(5)
    assert process.batches == [["kept"]]
    assert (batcher.counts.expired, batcher.counts.dropped, batcher.counts.wasted) == (2, 1, 0)
    batcher.close(5)


class CountingStore(GatedStore):
    """Holds the n-th lookup (1-based) until `gate` is set."""

    def __init__(self, hold_call: int) -> None:
        super().__init__()
        self.calls, self.hold_call = 0, hold_call

    def get_many(self, keys):
        self.calls += 1
        if self.calls == self.hold_call:
            self.waiting.set()
            self.gate.wait(10)
        return self.inner.get_many(keys)


def test_a_running_batch_scores_only_rows_someone_waits_for_and_keeps_their_kv(tiny_llama, api_retriever):
    pipeline = api_pipeline(tiny_llama, api_retriever)
    store = CountingStore(hold_call=2)
    pipeline.reranker.store = store.around(pipeline.reranker.store)
    store.gate.clear()
    service = Service(pipeline)
    docs_a = [Passage(str(i), "", t) for i, t in enumerate(["alpha passage one", "alpha passage two"])]
    docs_b = [Passage(str(i), "", t) for i, t in enumerate(["beta passage one", "beta passage two",
                                                             "beta passage three"])]
    batcher = Batcher(service.process, max_batch=4, max_wait_s=0.0, queue_size=4)
    a = batcher.submit(RerankWork("alpha", docs_a, "ql"), service.estimate(RerankWork("alpha", docs_a, "ql")))
    b = batcher.submit(RerankWork("beta", docs_b, "ql"), service.estimate(RerankWork("beta", docs_b, "ql")))
    assert b.cost == Cost(sum(len(pipeline.reranker.block_ids(p)) for p in docs_b), 3)
    batcher.start()
    assert store.waiting.wait(10)  # the batch is looking up b's passage KV (a's is done)
    batcher.cancel(b)  # b's client gives up now
    store.gate.set()
    outcome = a.future.result(10)
    with pytest.raises(Abandoned):
        b.future.result(10)
    want = BlockReranker(RerankerConfig(kv_format="none",
                                        mode="ql", batch_size=4), lm=tiny_llama).score("alpha", docs_a)
    assert outcome.scores == pytest.approx(want, abs=1e-5)
    assert service.rows_dropped == 3 and batcher.counts.wasted == 0
    assert service.estimate(RerankWork("beta", docs_b, "ql")) == Cost(0, 3)  # b's KV was stored all the same
    assert batcher.costs.batches == 1  # calibrated on the two requests' prefill and a's rows
    batcher.close(5)


def test_api_refuses_at_once_with_retry_after_from_the_estimate(tiny_llama, api_retriever):
    store = GatedStore()
    with TestClient(make_app(tiny_llama, api_retriever, store, request_timeout_s=5.0, max_batch_queries=1)) as c:
        batcher = c.app.state.batcher
        c.post("/v1/rerank", json={"query": "warm up", "documents": ["x"]})
        costs = batcher.costs
        costs.s_per_token, costs.s_per_row, costs.s_per_batch, costs.safety = 0.05, 0.0, 0.0, 1.0
        store.gate.clear()
        out: list = []
        held = threading.Thread(target=lambda: out.append(c.post("/v1/rerank", json={
            "query": "q", "documents": [f"held document {i}" for i in range(3)]})))
        held.start()
        assert store.waiting.wait(5)
        docs = [f"a new document number {i} with several words" for i in range(4)]
        reranker = c.app.state.pipeline.reranker
        tokens = sum(len(reranker.block_ids(Passage("", "", d))) for d in docs)
        held_tokens = sum(len(reranker.block_ids(Passage("", "", f"held document {i}"))) for i in range(3))
        t0 = time.perf_counter()
        r = c.post("/v1/rerank", json={"query": "q", "documents": docs})
        elapsed = time.perf_counter() - t0
        assert r.status_code == 503 and elapsed < 1.0  # at once, not at the deadline
        error = r.json()["error"]
        assert error["type"] == "overloaded" and error["limit"] == "request_timeout_s"
        # what is left of the held batch and this request's own estimate, less the 5 s a new request has
        late = 0.05 * held_tokens + 0.05 * tokens - 5.0
        assert late > 1 and math.ceil(late - 1.0) <= int(r.headers["Retry-After"]) <= math.ceil(late)
        store.gate.set()
        held.join(10)
        assert out[0].status_code == 200
        metrics = c.get("/metrics").text
    assert 'kvrank_admission_rejected_total{reason="deadline"} 1.0' in metrics
    assert 'kvrank_rejected_total{reason="deadline"} 1.0' in metrics
    assert "kvrank_admitted_total 2.0" in metrics and "kvrank_wasted_completions_total 0.0" in metrics
    for name in ("kvrank_dropped_before_run_total", "kvrank_expired_in_queue_total", "kvrank_rows_dropped_total",
                 "kvrank_cost_estimated_seconds_total", "kvrank_cost_actual_seconds_total",
                 'kvrank_cost_model_seconds{per="prefill_token"}'):
        assert name in metrics


def test_a_search_without_candidates_does_not_teach_the_cost_model_that_work_is_free(tiny_llama, api_retriever):
    # Two searches in one batch; the first matches nothing in the BM25 index, so its result carries only its
    # retrieval time. The batch's measured prefill and scoring must come from the search that was reranked.
    from kvrank.api.batching import Job
    from kvrank.api.service import SearchWork

    pipeline = api_pipeline(tiny_llama, api_retriever)
    service = Service(pipeline)
    jobs = [Job(SearchWork("zzqx wvvk", 3, "ql", 4, 0.3)), Job(SearchWork("passage about topic 2", 3, "ql", 4, 0.3))]
    measured = service.process(jobs)
    first, second = (job.future.result(5) for job in jobs)
    assert first.result.reranked == 0 and second.result.reranked > 0
    assert measured.cost.rows == second.result.reranked and measured.cost.prefill_tokens > 0
    assert measured.prefill_s > 0 and measured.scoring_s > 0
