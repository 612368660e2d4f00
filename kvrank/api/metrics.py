"""Prometheus metrics of one app, in a registry of its own (several apps in one process do not collide)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvrank.store.kv import CacheStats

if TYPE_CHECKING:
    from kvrank.api.batching import Batcher

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class StoreCollector(Collector):
    """KV store counters read at scrape time from `store.stats()` (this server's hits, misses, evictions)."""

    def __init__(self, stats: Callable[[], CacheStats]):
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.stats()
        yield CounterMetricFamily("kvrank_kv_hits", "Passage KV lookups answered by the store.", value=s.hits)
        yield CounterMetricFamily("kvrank_kv_misses", "Passage KV lookups that needed a prefill.", value=s.misses)
        yield CounterMetricFamily("kvrank_kv_evictions", "Entries evicted by this server.", value=s.evictions)
        yield GaugeMetricFamily("kvrank_kv_entries", "Entries in the KV store.", value=s.entries)
        yield GaugeMetricFamily("kvrank_kv_bytes", "Bytes in the KV store.", value=s.bytes)


class AdmissionCollector(Collector):
    """Admission, dropped and wasted work, and the cost model, read at scrape time from the batcher."""

    def __init__(self, batcher: Batcher, rows_dropped: Callable[[], int]):
        self.batcher, self.rows_dropped = batcher, rows_dropped

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        c, costs = self.batcher.counts, self.batcher.costs
        yield CounterMetricFamily("kvrank_admitted", "Requests admitted to the model queue.", value=c.admitted)
        yield _family("kvrank_admission_rejected", c.rejected_full, c.rejected_deadline)
        yield CounterMetricFamily("kvrank_dropped_before_run", "Queued jobs dropped before they ran: their "
                                  "request had timed out or their client had gone.", value=c.dropped)
        yield CounterMetricFamily("kvrank_expired_in_queue", "Queued jobs that could no longer finish before "
                                  "their deadline when the worker reached them (answered 504 at once).",
                                  value=c.expired)
        yield CounterMetricFamily("kvrank_rows_dropped", "Rows of a running batch not scored: nobody waited for "
                                  "them any more.", value=self.rows_dropped())
        yield CounterMetricFamily("kvrank_wasted_completions", "Jobs completed after their request had been "
                                  "given up.", value=c.wasted)
        yield CounterMetricFamily("kvrank_cost_estimated_seconds", "The cost model's estimate of the batches "
                                  "run.", value=c.estimated_s)
        yield CounterMetricFamily("kvrank_cost_actual_seconds", "Measured duration of the same batches.",
                                  value=c.actual_s)
        model = GaugeMetricFamily("kvrank_cost_model_seconds", "Calibrated seconds per prefilled passage token, "
                                  "per scored row and per batch.", labels=["per"])
        model.add_metric(["prefill_token"], costs.s_per_token)
        model.add_metric(["row"], costs.s_per_row)
        model.add_metric(["batch"], costs.s_per_batch)
        yield model


def _family(name: str, full: int, deadline: int) -> CounterMetricFamily:
    family = CounterMetricFamily(name, "Requests refused at admission: the queue was full, or the queued work "
                                 "would not let them finish before their deadline.", labels=["reason"])
    family.add_metric(["queue_full"], full)
    family.add_metric(["deadline"], deadline)
    return family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kvrank_http_requests", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("kvrank_http_request_duration_seconds", "HTTP request latency.",
                                 ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("kvrank_queue_depth", "Requests waiting for the model worker.",
                                 registry=self.registry)
        self.in_flight = Gauge("kvrank_requests_in_flight", "Requests queued or being processed by the model.",
                               registry=self.registry)
        self.batch_size = Histogram("kvrank_batch_queries", "Requests served per micro-batch.",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=self.registry)
        self.batch_seconds = Histogram("kvrank_batch_duration_seconds", "Model worker time per micro-batch.",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.rejected = Counter("kvrank_rejected", "Requests refused or given up before the model answered: "
                                "queue_full, deadline (would not finish in time), timeout, disconnected, "
                                "shutting_down, not_ready.", ["reason"], registry=self.registry)

        self.expired = Counter("kvrank_expired", "Requests answered 504: their deadline passed before the "
                                                 "model finished them.", registry=self.registry)

    def observe_batch(self, jobs: int, seconds: float) -> None:
        self.batch_size.observe(jobs)
        self.batch_seconds.observe(seconds)

    def watch(self, depth: Callable[[], int], in_flight: Callable[[], int], stats: Callable[[], CacheStats]) -> None:
        self.queue_depth.set_function(depth)
        self.in_flight.set_function(in_flight)
        self.registry.register(StoreCollector(stats))

    def watch_admission(self, batcher: Batcher, rows_dropped: Callable[[], int]) -> None:
        self.registry.register(AdmissionCollector(batcher, rows_dropped))
