"""Labelled training, k-fold by query: every query is scored by an adapter that never saw it.

For each fold f of `--folds`: train a query-side adapter on the other folds' judged queries (`kvrank train`'s
lists and loss), then rerank fold f's queries with it. The held-out rankings of all folds are joined and scored
against the qrels, next to the zero-shot model and the first stage on the same queries, fused (`--fusion-weight`)
and alone. Passage KV comes from one store (`--store`), prefilled once and reused by every fold and epoch.

    python benchmarks/train_kfold.py --data ../shared/data/trec-dl-2019 \
        --candidates ../shared/data/trec-dl-2019/bm25_top100.trec --folds 5 --store /tmp/kv-dl19 --out /tmp/kfold-dl19

Resumable: a fold whose adapter is complete in `--out/fold<f>` is not trained again. Writes `--out/report.json`
and the joined runs; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from kvrank.eval.conventions import convention_for
from kvrank.eval.data import load_dataset, write_run
from kvrank.eval.metrics import evaluate
from kvrank.io import atomic_write_text
from kvrank.pipeline import PipelineConfig, build, build_reranker
from kvrank.reranker.adapter import AdapterCard
from kvrank.reranker.reranker import RerankerConfig
from kvrank.retriever.candidates import CandidatesRetriever
from kvrank.train.lists import folds as split_folds
from kvrank.train.lists import labelled_lists, pseudo_lists
from kvrank.train.trainer import TrainConfig, train
from kvrank.types import Dataset

METRICS = ("nDCG@10", "RR@10")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--candidates", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--mode", default="ql")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--negatives", type=int, default=16)
    parser.add_argument("--pseudo-queries", type=int, default=0, help="Label-free lists added to each fold's.")
    parser.add_argument("--recipe", default="cloze")
    parser.add_argument("--rerank-depth", type=int, default=20)
    parser.add_argument("--fusion-weight", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-format", help="Stored KV layout (default: the store's own, else auto). With the "
                        "adapters of --out already trained, this scores them over another format.")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    dataset = load_dataset(args.data)
    first = CandidatesRetriever.from_file(args.candidates, dataset)
    settings = RerankerConfig(kv_format="none", mode=args.mode)
    queries = dataset.sorted_queries()
    held_runs: dict[str, dict] = {"fused": {}, "alone": {}, "rerank_ms": {}}
    folds_done = []
    for f in range(args.folds):
        train_q, held_q = split_folds(queries, args.folds, f)
        adapter = args.out / f"fold{f}"
        if not (adapter / "card.json").exists():
            folds_done.append(_train_fold(args, dataset, first, settings, train_q, adapter, f))
        else:
            folds_done.append(json.loads((adapter / "card.json").read_text())["training"])
        held = _subset(dataset, held_q)
        for name, runs in _rankings(args, held, first, settings, adapter).items():
            held_runs[name].update(runs)
        print(f"fold {f}: trained on {len(train_q)}, scored {len(held_q)} held-out queries", flush=True)

    zero = _rankings(args, dataset, first, settings, None)
    first_run = {q.query_id: first.search([q], args.rerank_depth)[q.query_id] for q in queries}
    level = convention_for(dataset).rel_level  # the collection's relevance level for RR and R
    rows = {"first stage": evaluate(first_run, dataset.qrels, rel_level=level),
            "zero-shot fused": evaluate(zero["fused"], dataset.qrels, rel_level=level),
            "zero-shot alone": evaluate(zero["alone"], dataset.qrels, rel_level=level),
            "k-fold adapter fused": evaluate(held_runs["fused"], dataset.qrels, rel_level=level),
            "k-fold adapter alone": evaluate(held_runs["alone"], dataset.qrels, rel_level=level)}
    suffix = f"-{args.kv_format.replace(':', '_').replace('+', '_')}" if args.kv_format else ""
    for name in ("fused", "alone"):
        write_run(held_runs[name], args.out / f"kfold-{name}{suffix}.trec", tag=f"kvrank-{args.mode}-kfold")
    # query-time cost: reranking from stored KV, prefill of passages the store missed excluded
    cost = {"zero-shot": statistics.median(zero["rerank_ms"].values()),
            "k-fold adapter": statistics.median(held_runs["rerank_ms"].values())}
    report = {"dataset": dataset.name, "queries": len(queries), "settings": vars(args) | {
        "data": args.data, "candidates": str(args.candidates), "out": str(args.out), "store": str(args.store)},
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        "metrics": rows, "rerank_ms_p50": cost, "folds": folds_done}
    atomic_write_text(args.out / f"report{suffix}.json", json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n{dataset.name}, {len(queries)} queries, {args.folds}-fold by query, {args.mode}, top-{args.rerank_depth},"
          f" fusion weight {args.fusion_weight}\n")
    print("| ranking | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for name, m in rows.items():
        print(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in METRICS) + " |")
    print(f"\nrerank ms per query (p50, stored KV, prefill excluded): zero-shot {cost['zero-shot']:.0f}, "
          f"adapter {cost['k-fold adapter']:.0f}")
    secs = [d.get("seconds", 0.0) for d in folds_done]
    print(f"\ntraining: {sum(secs):.0f} s over {args.folds} folds; lists per fold "
          f"{[d.get('queries') for d in folds_done]}; peak RSS {report['machine']['peak_rss_mib']:.0f} MiB")


def _train_fold(args, dataset: Dataset, first, settings: RerankerConfig, train_q, out: Path, f: int) -> dict:
    lists = labelled_lists(dataset, first, negatives=args.negatives, queries=train_q, seed=args.seed)
    if args.pseudo_queries:
        lists += pseudo_lists(dataset, first, recipe=args.recipe, n=args.pseudo_queries, negatives=min(
            args.negatives, 7), seed=args.seed + f)
    reranker = build_reranker(PipelineConfig(reranker=settings, store_dir=args.store, kv_format=args.kv_format),
                              list(dataset.corpus.values()))
    card = AdapterCard(base_fingerprint=reranker.lm.fingerprint, base_model=settings.model, mode=args.mode,
                       template=reranker.template.name, rank=args.rank, alpha=2 * args.rank, seed=args.seed,
                       training={"data": [{"name": dataset.name, "lists": len(lists)}], "labels": "test",
                                 "folds": args.folds, "fold": f, "pseudo_queries": args.pseudo_queries,
                                 "recipe": args.recipe if args.pseudo_queries else None,
                                 "negatives": args.negatives, "first_stage": "candidates"})
    started = time.perf_counter()
    card, _ = train(reranker, lists, TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed), out, card=card)
    reranker.store.close()
    print(f"fold {f}: {len(lists)} lists, {time.perf_counter() - started:.0f} s", flush=True)
    return card.training


def _rankings(args, dataset: Dataset, first, settings: RerankerConfig, adapter: Path | None) -> dict[str, dict]:
    """The reranked runs of `dataset`'s queries, fused with the first stage and the reranker alone."""
    config = PipelineConfig(head="none", candidates=args.candidates, reranker=settings, adapter=adapter,
                            store_dir=args.store, kv_format=args.kv_format,
                            rerank_depth=args.rerank_depth, k=args.rerank_depth, fusion_weight=args.fusion_weight)
    out: dict[str, dict] = {"fused": {}, "alone": {}, "rerank_ms": {}}
    with build(config, dataset, first_stage=first) as pipeline:
        for query in dataset.sorted_queries():
            result = pipeline.search([query])[0]
            out["fused"][query.query_id] = result.hits
            out["rerank_ms"][query.query_id] = result.timings["rerank"] - result.timings.get("prefill", 0.0)
            out["alone"][query.query_id] = pipeline.search([query], fusion_weight=0.0)[0].hits
    return out


def _subset(dataset: Dataset, queries) -> Dataset:
    keep = {q.query_id for q in queries}
    return replace(dataset, queries={q.query_id: q for q in queries},
                   qrels=[q for q in dataset.qrels if q.query_id in keep])


if __name__ == "__main__":
    main()
