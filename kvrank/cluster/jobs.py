"""The Ray Data jobs behind `--ray`: the rows (passages or queries) go through `map_batches` over a pool of
actors. Each actor builds what the single-process command builds, once, from the same frozen config, and calls
the same function on its batches; the driver gathers the answers.

    embed_passages   index   each actor loads the encoder; the driver assembles the index (BM25 stays there)
    warm_passages    warm    each actor opens its node's store (`build_reranker`) and runs `store.warm.warm`
    search_queries   eval    each actor builds the pipeline (`build`) and runs `eval.runner.search_each`;
                             `run_eval` turns the answers into the single-process `EvalReport`

Results equal single-process ones: prefill pads a block by its own length only (`reranker.blocks.PAD_MULTIPLE`)
and eval searches one query at a time, so no stored byte or score depends on which worker did the work or
which rows shared its batch. Dense embeddings are the exception: sentence-transformers pads a batch to its
longest text, so they agree with single-process ones to ~1e-7, not bit for bit.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from kvrank.cluster.connect import (
    MAX_RESTARTS,
    MAX_TASK_RETRIES,
    RayConfig,
    current_node,
    node_store,
    require_ray,
    worker_errors,
)
from kvrank.errors import KvrankError
from kvrank.eval.conventions import Convention
from kvrank.eval.runner import EvalReport, TimedResult, eval_queries, eval_report, search_each
from kvrank.pipeline import PipelineConfig, build, build_reranker
from kvrank.retriever.dense import DenseConfig, load_encoder
from kvrank.store.formats import calibration_sample
from kvrank.store.warm import WarmResult, warm
from kvrank.types import Dataset, Passage, Query

logger = logging.getLogger(__name__)
Batch = dict[str, np.ndarray]
WORKERS_START_S = 600  # how long a job waits for its whole pool of workers (model loading included)


# ------------------------------------------------------------------------------------------ index
class _Embedder:
    """Encodes passage texts with the dense model of a `DenseConfig`, loaded once per actor."""

    def __init__(self, dense: DenseConfig):
        self.encoder = load_encoder(dense.model, dense.device)
        self.batch_size = dense.batch_size

    def __call__(self, batch: Batch) -> Batch:
        vectors = self.encoder.encode([str(t) for t in batch["text"]], self.batch_size)  # (n, dim)
        return {"doc_id": batch["doc_id"], "embedding": vectors}


def embed_passages(ray_config: RayConfig, dense: DenseConfig, corpus: Mapping[str, Passage]) -> dict[str, np.ndarray]:
    """doc id -> embedding of `Passage.contents`, what `DenseRetriever.build` would encode."""
    rows = [{"doc_id": doc_id, "text": passage.contents} for doc_id, passage in corpus.items()]
    out = _run(ray_config, rows, _Embedder, dense=dense)
    return {str(row["doc_id"]): np.asarray(row["embedding"], dtype=np.float32) for row in out}


# ------------------------------------------------------------------------------------------ warm
class _Warmer:
    """Prefills passages into its node's store, as `kvrank warm` does into one store."""

    def __init__(self, config: PipelineConfig, calibration: list[Passage]):
        self.node = current_node()
        self.config = replace(config, store_dir=node_store(config.store_dir, self.node))
        # `calibration` is the driver's sample of the corpus (`calibration_sample` of a sample is itself), so
        # a fitted format fits the same basis on every node and keys agree across nodes.
        self.reranker = build_reranker(self.config, calibration)

    def __call__(self, batch: Batch) -> Batch:
        result = warm(self.reranker, _passages(batch))
        # Every batch is committed, so a killed actor loses no stored entry; the totals are its node's store now.
        store = {"store": str(self.config.store_dir), "kv_format": self.reranker.config.format.name,
                 "at": time.time(), **self.reranker.store.totals()}
        return {"node": np.array([self.node]), "result": _objects([result]), "store": _objects([store])}


@dataclass
class ClusterWarm:
    """What `warm_passages` did: the summed `WarmResult` (wall time is the job's) and, per node, its store's
    folder, KV format and `totals()` after the job."""

    result: WarmResult
    stores: dict[str, dict[str, Any]] = field(default_factory=dict)


def warm_passages(ray_config: RayConfig, config: PipelineConfig, passages: Sequence[Passage]) -> ClusterWarm:
    """Every passage's KV in the store of the node that prefilled it (`--store` with `{node}`: one folder per
    node; without it, the same path on every node)."""
    if config.store_dir is None and config.remote_store is None:
        raise KvrankError("warming on Ray needs a persistent store; set store_dir (with {node} for one folder per "
                          "node), remote_store (a URL shared by all nodes), or both", param="store_dir")
    start = time.perf_counter()
    calibration = calibration_sample(passages, config.calibration_passages)
    rows = [{"doc_id": p.doc_id, "title": p.title, "text": p.text} for p in passages]
    out = _run(ray_config, rows, _Warmer, config=config, calibration=calibration)
    total = WarmResult(passages=len(passages))
    stores: dict[str, dict[str, Any]] = {}
    for row in out:
        done: WarmResult = row["result"]
        for name in ("skipped", "prefilled", "tokens", "bytes", "prefill_s", "store_s", "evicted"):
            setattr(total, name, getattr(total, name) + getattr(done, name))
        node, store = str(row["node"]), row["store"]
        if node not in stores or store["at"] > stores[node]["at"]:  # the node's store after its last batch
            stores[node] = store
    total.seconds = time.perf_counter() - start
    return ClusterWarm(total, stores)


# ------------------------------------------------------------------------------------------ eval
class _Searcher:
    """Searches queries with the pipeline `build(config, dataset)` makes, one query at a time."""

    def __init__(self, config: PipelineConfig, dataset: Dataset):
        self.node = current_node()
        self.pipeline = build(replace(config, store_dir=node_store(config.store_dir, self.node)), dataset)

    def __call__(self, batch: Batch) -> Batch:
        queries = [Query(str(i), str(t)) for i, t in zip(batch["query_id"], batch["text"])]
        timed = search_each(self.pipeline, queries)
        about = {"node": self.node, "pid": os.getpid(), "retriever": self.pipeline.first_stage.name,
                 **self.pipeline.describe()}
        return {"query_id": batch["query_id"], "timed": _objects(timed), "about": _objects([about] * len(timed))}


@dataclass
class ClusterSearch:
    """The searched queries in the order asked for; the first stage's name; and what each worker's
    `SearchPipeline.describe()` said last (KV use and store size per worker, the reranker's settings)."""

    timed: list[TimedResult]
    retriever: str
    workers: dict[str, dict[str, Any]]  # worker (node and pid) -> its last `describe()`, with its node

    def describe(self) -> dict[str, Any]:
        """`SearchPipeline.describe()` for the cluster: KV use summed over the workers, store size over the
        nodes (workers of one node share its store)."""
        about = next(iter(self.workers.values()))
        if "kv_cache" not in about:  # no reranker
            return {}
        hits = sum(w["kv_cache"]["hits"] for w in self.workers.values())
        misses = sum(w["kv_cache"]["misses"] for w in self.workers.values())
        stores = {w["node"]: w["kv_cache"] for w in self.workers.values()}
        cache = {"hits": hits, "misses": misses, "hit_rate": round(hits / (hits + misses), 4) if hits + misses else 0.0,
                 "entries": sum(c["entries"] for c in stores.values()),
                 "bytes": sum(c["bytes"] for c in stores.values())}
        return {"kv_cache": cache, "prefills": sum(w["prefills"] for w in self.workers.values()),
                "reranker": about["reranker"]}


def search_queries(ray_config: RayConfig, config: PipelineConfig, dataset: Dataset,
                   queries: Sequence[Query]) -> ClusterSearch:
    """Each query searched by one worker's pipeline over `dataset`; answers in the order of `queries`."""
    rows = [{"query_id": q.query_id, "text": q.text} for q in queries]
    out = _run(ray_config, rows, _Searcher, config=config, dataset=dataset)
    by_id = {str(row["query_id"]): row["timed"] for row in out}
    workers: dict[str, dict[str, Any]] = {}
    for row in out:  # rows come in any order; a worker's lookups only grow: keep its last describe()
        about = row["about"]
        key = f"{about['node']}:{about['pid']}"
        if key not in workers or _lookups(about) >= _lookups(workers[key]):
            workers[key] = about
    return ClusterSearch([by_id[q.query_id] for q in queries], next(iter(workers.values()))["retriever"], workers)


def run_eval(ray_config: RayConfig, config: PipelineConfig, dataset: Dataset, *, max_queries: int | None = None,
             settings: dict[str, Any] | None = None, convention: Convention | None = None) -> EvalReport:
    """`eval.runner.run_eval` with the queries searched on Ray: the same queries, runs, metrics and report."""
    queries = eval_queries(dataset, max_queries)
    found = search_queries(ray_config, config, dataset, queries)
    ray_settings = {"ray": {"address": ray_config.address, "workers": ray_config.workers,
                            "batch_size": ray_config.batch_size}}
    return eval_report(dataset, found.timed, first_stage=found.retriever, config=config,
                       reranking=config.reranker is not None, max_queries=max_queries,
                       settings={**(settings or {}), **ray_settings}, extra=found.describe(), convention=convention)


# ------------------------------------------------------------------------------------------ running a job
def _run(ray_config: RayConfig, rows: list[dict[str, Any]], actor: type, **constructor: Any) -> list[dict[str, Any]]:
    """`rows` through `actor` (constructed once per worker with `constructor`), all output rows gathered on the
    driver. The job starts once every worker has loaded its model (so the work is spread over all of them, and
    a cluster too small for the pool is an error, not a wait); a worker that dies is restarted and its batch
    retried (`MAX_RESTARTS`, `MAX_TASK_RETRIES`)."""
    ray = require_ray()
    context = ray.data.DataContext.get_current()
    waited = context.wait_for_min_actors_s
    context.wait_for_min_actors_s = WORKERS_START_S
    try:
        with worker_errors(), warnings.catch_warnings():
            # Ray 2.60 takes restart limits only as generic remote args (deprecated from 2.64 in favour of named
            # parameters, which do not cover them yet); its default, unbounded, retries a crashing batch forever.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
            dataset = ray.data.from_items(rows).map_batches(
                actor, fn_constructor_kwargs=constructor, batch_size=ray_config.batch_size,
                compute=ray.data.ActorPoolStrategy(size=ray_config.workers),
                num_cpus=ray_config.cpus_per_worker, num_gpus=ray_config.gpus_per_worker,
                max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)
            return list(dataset.iter_rows())
    except ray.exceptions.GetTimeoutError:
        raise KvrankError(
            f"RayConfig.workers {ray_config.workers}: the cluster did not start {ray_config.workers} workers of "
            f"{ray_config.cpus_per_worker:g} CPUs and {ray_config.gpus_per_worker:g} GPUs each within "
            f"{WORKERS_START_S} s; lower RayConfig.workers, RayConfig.cpus_per_worker or RayConfig.gpus_per_worker, "
            "or add nodes", param="RayConfig.workers") from None
    finally:
        context.wait_for_min_actors_s = waited


def _lookups(about: dict[str, Any]) -> int:
    cache = about.get("kv_cache", {})
    return int(cache.get("hits", 0) + cache.get("misses", 0))


def _objects(items: Sequence[Any]) -> np.ndarray:
    """A column of Python objects (Ray Data stores them pickled)."""
    column = np.empty(len(items), dtype=object)
    column[:] = items
    return column


def _passages(batch: Batch) -> list[Passage]:
    return [Passage(str(i), str(t), str(x)) for i, t, x in zip(batch["doc_id"], batch["title"], batch["text"])]
