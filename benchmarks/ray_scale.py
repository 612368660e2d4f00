"""Warm and eval throughput on Ray with 1 vs 2 workers (docs/results/scale.md).

    python benchmarks/ray_scale.py [--passages 48] [--queries 6] [--pairs 2] [--model smollm2]

One local Ray of `--cpus` CPUs (one per worker). Runs are interleaved A B A B (A: 1 worker, B: 2 workers), the
same number of each; the reported figure is the median over pairs of time(A) / time(B), so drift on a shared
machine hits both sides of a pair alike. Each run is a whole job as a user runs it: wall time from submitting to
the last answer, workers' start and model loading included.
- warm: the first `--passages` passages of the corpus into a fresh store (`cluster.jobs.warm_passages`);
- eval: the first `--queries` test queries over BM25 on that slice, reranked (`ql`, depth 10) from a cold,
  in-memory store, so each worker prefills its queries' candidates (`cluster.jobs.search_queries`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import ray

from kvrank.cluster import RayConfig
from kvrank.cluster.jobs import search_queries, warm_passages
from kvrank.eval.data import load_dataset
from kvrank.eval.runner import machine_info
from kvrank.pipeline import PipelineConfig
from kvrank.reranker.reranker import RerankerConfig
from kvrank.retriever import RetrieverConfig
from kvrank.types import Dataset

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--passages", type=int, default=48)
    parser.add_argument("--queries", type=int, default=6)
    parser.add_argument("--max-passage-tokens", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (one per worker)")
    parser.add_argument("--device", default="cpu", help="cuda: workers prefill on GPUs (with --gpus-per-worker)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    args = parser.parse_args()

    full = load_dataset(args.data)
    corpus = dict(list(full.corpus.items())[: args.passages])
    queries = full.sorted_queries(args.queries)
    dataset = Dataset(name=f"{full.name}[:{args.passages}]", corpus=corpus, queries={q.query_id: q for q in queries},
                      qrels=[q for q in full.qrels if q.doc_id in corpus], source=full.source)
    reranker = RerankerConfig(kv_format="none",
                              mode="ql", model=args.model, batch_size=8, max_passage_tokens=args.max_passage_tokens,
                              device=args.device)
    config = PipelineConfig(head="none", retriever="bm25", retriever_config=RetrieverConfig(show_progress=False),
                            reranker=reranker, kv_format="none", rerank_depth=10)
    ray.init(num_cpus=args.cpus, num_gpus=None if args.device == "cuda" else 0, include_dashboard=False,
             object_store_memory=250 * 1024**2, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    ray.data.DataContext.get_current().enable_progress_bars = False

    def on_ray(workers: int, batch_size: int) -> RayConfig:
        return RayConfig(f"local:{args.cpus}", workers=workers, batch_size=batch_size,
                         gpus_per_worker=args.gpus_per_worker)

    def run_warm(workers: int) -> float:
        with tempfile.TemporaryDirectory() as store:
            start = time.perf_counter()
            warm_passages(on_ray(workers, 8),
                          replace(config, store_dir=Path(store)), list(corpus.values()))
            return time.perf_counter() - start

    def run_eval(workers: int) -> float:
        start = time.perf_counter()
        search_queries(on_ray(workers, 1), config, dataset, queries)
        return time.perf_counter() - start

    print(json.dumps({"machine": machine_info(), "ray": ray.__version__, "settings": {
        **{k: v for k, v in vars(args).items()}, "omp_threads_per_worker": 1, "kv_format": "none",
        "cpus_visible": os.cpu_count()}}, indent=1))
    for name, job, amount, unit in (("warm", run_warm, args.passages, "passages"),
                                    ("eval", run_eval, args.queries, "queries")):
        ratios, times = [], {1: [], 2: []}
        for pair in range(args.pairs):
            one, two = job(1), job(2)  # A B, A B, ...
            times[1].append(one)
            times[2].append(two)
            ratios.append(one / two)
            print(f"{name} pair {pair + 1}: 1 worker {one:.1f} s, 2 workers {two:.1f} s, ratio {one / two:.2f}",
                  flush=True)
        print(f"{name}: {amount} {unit}; median 1 worker {statistics.median(times[1]):.1f} s "
              f"({amount / statistics.median(times[1]):.2f} {unit}/s), 2 workers {statistics.median(times[2]):.1f} s "
              f"({amount / statistics.median(times[2]):.2f} {unit}/s); speed-up (median of per-pair ratios) "
              f"{statistics.median(ratios):.2f}x over {args.pairs} pairs", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
