"""Prometheus metrics of one app, in a registry of its own (several apps in one process do not collide)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvrank.store.kv import CacheStats

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
        self.rejected = Counter("kvrank_rejected", "Requests refused before the model: queue full, timeout, "
                                                   "shutting down.", ["reason"], registry=self.registry)

    def observe_batch(self, jobs: int, seconds: float) -> None:
        self.batch_size.observe(jobs)
        self.batch_seconds.observe(seconds)

    def watch(self, depth: Callable[[], int], in_flight: Callable[[], int], stats: Callable[[], CacheStats]) -> None:
        self.queue_depth.set_function(depth)
        self.in_flight.set_function(in_flight)
        self.registry.register(StoreCollector(stats))
