"""The shipped scoring head: how it was chosen, what it reaches on collections it never saw, and how it was made.

Recipe (fixed before measuring; every collection in ../shared/data that has labels):

| source | split | first stage | depth | queries |
|---|---|---|---|---|
| TREC DL 2019 | test | the shared BM25 top-100 run | 20 | all 43 |
| CISI | test | BM25 | 10 | all 76 |
| Cranfield | test | BM25 | 10 | first 100 |
| SciFact | train | BM25 | 10 | first 150 |

SciFact test (first 100 claims, BM25 top-10) is evaluated, never trained on. `--first-stage hybrid` makes the
lists with the search default's first stage instead (BM25 + MiniLM, RRF; DL19 retrieves from its pool) at the
search default's depth, 20, for every source: the head `auto` picks for a hybrid or dense first stage.

1. **Leave one collection out.** For each of DL19, CISI, Cranfield and SciFact test, heads are fitted on the
   other collections only (for SciFact test: without SciFact train) and scored on it, for each tree count in
   `--trees`. Nested selection: the tree count is chosen by leave-one-out *within* the training collections, so
   the held-out collection never picks its own setting. Rows: first stage, zero-shot `--mode` alone, zero-shot fused
   (kvrank's default, fusion weight 0.3), the head.
2. **The shipped head.** The tree count is the best mean over step 1's held-out collections; the head is fitted
   on all four sources and, with `--write DIR`, saved there with its card (the results of step 1 included).
   SciFact test is then reported with and without the claims that share a cited document with a train claim.

    python benchmarks/head_default.py --data-root ../shared/data --stores '/tmp/kv/{short}-ql' --out /tmp/head \
        [--write kvrank/reranker/heads/smollm2-ql-claim]
    python benchmarks/head_default.py ... --mode attn --out /tmp/head-attn \
        [--write kvrank/reranker/heads/smollm2-attn-claim]
    python benchmarks/head_default.py ... --first-stage hybrid --out /tmp/head-hybrid \
        [--write kvrank/reranker/heads/smollm2-ql-claim-hybrid]

`--stores` is a store folder per collection (`{short}`: dl19, cisi, cranfield, scifact); the lists (one zero-shot
rerank pass per query, the slow part) are cached in `--out` and a rerun computes only what is missing.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from kvrank.defaults import DEFAULT_RERANK_DEPTH
from kvrank.eval.conventions import convention_for
from kvrank.eval.data import load_dataset, read_qrels_tsv
from kvrank.eval.metrics import evaluate
from kvrank.io import atomic_write_text
from kvrank.pipeline import PipelineConfig, build_reranker
from kvrank.reranker import head as heads
from kvrank.reranker.model import load_lm
from kvrank.reranker.reranker import RerankerConfig
from kvrank.retriever import build_or_load
from kvrank.retriever.candidates import CandidatesRetriever
from kvrank.retriever.dense import load_encoder
from kvrank.train.head import (
    DEFAULT_PRIOR_WEIGHT,
    DEFAULT_TREES,
    HeadList,
    fit,
    head_lists,
    lists_digest,
    rank_with,
    rankings,
    read_lists,
)


@dataclass(frozen=True)
class Source:
    short: str
    name: str
    split: str
    depth: int
    max_queries: int | None
    candidates: str | None = None


TRAIN = (Source("dl19", "trec-dl-2019", "test", 20, None, "bm25_top100.trec"),
         Source("cisi", "cisi", "test", 10, None),
         Source("cranfield", "cranfield", "test", 10, 100),
         Source("scifact", "scifact", "train", 10, 150))
HELD = {"dl19": "trec-dl-2019/test", "cisi": "cisi/test", "cranfield": "cranfield/test", "scifact": "scifact/test"}
SCIFACT_TEST = Source("scifact", "scifact", "test", 10, 100)
FIRST_STAGES = ("bm25", "hybrid")


def sources(first_stage: str) -> tuple[tuple[Source, ...], Source]:
    """The training sources and SciFact test for `first_stage`: `bm25` is the table above; `hybrid` (the search
    default) retrieves every source, DL19 included (its corpus is the BM25 pool), at the search default's depth."""
    if first_stage == "bm25":
        return TRAIN, SCIFACT_TEST
    return (tuple(replace(s, depth=DEFAULT_RERANK_DEPTH, candidates=None) for s in TRAIN),
            replace(SCIFACT_TEST, depth=DEFAULT_RERANK_DEPTH))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--stores", help="Store folder per collection, with {short}; default: in memory.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trees", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=("ql", "attn"), default="ql", help="The scores the head ranks.")
    parser.add_argument("--first-stage", choices=FIRST_STAGES, default="bm25",
                        help="bm25: the recipe's BM25 lists (DL19: the shared BM25 run); hybrid: the search "
                             "default's hybrid first stage, every source at depth 20.")
    parser.add_argument("--write", type=Path, help="Save the head fitted on all sources in this folder.")
    parser.add_argument("--transfer-from", type=Path,
                        help="With --first-stage hybrid: the --out of a bm25 run; adds a column ranking each held-out "
                             "collection's lists with a head fitted on the other collections' BM25 lists.")
    parser.add_argument("--verify", type=int, default=0,
                        help="Recompute the first N CISI lists without the cache and print how far they differ.")
    args = parser.parse_args()
    if args.transfer_from and args.first_stage == "bm25":
        parser.error("--transfer-from compares with a head fitted on BM25 lists: pass it with --first-stage hybrid")
    args.out.mkdir(parents=True, exist_ok=True)

    train, held_out = sources(args.first_stage)
    lists = {f"{s.name}/{s.split}": make_lists(s, args) for s in (*train, held_out)}
    datasets = {key: load_dataset(args.data_root / key.split("/")[0], key.split("/")[1]) for key in lists}

    def ndcg(key: str, score) -> float:
        run = rank_with(lists[key], score)
        qrels = [q for q in datasets[key].qrels if q.query_id in run]
        return evaluate(run, qrels, rel_level=convention_for(datasets[key]).rel_level)["nDCG@10"]

    def pool(held: str) -> list[str]:  # training sources when `held` is left out
        skip = {held, "scifact/train"} if held == "scifact/test" else {held}
        return [f"{s.name}/{s.split}" for s in train if f"{s.name}/{s.split}" not in skip]

    fitted: dict[tuple[tuple[str, ...], int], object] = {}

    def head_score(train: list[str], trees: int):
        key = (tuple(train), trees)
        if key not in fitted:
            fitted[key] = fit([x for k in train for x in lists[k]], trees=trees, seed=args.seed)
        return rankings(fitted[key])["head"]

    # 1. leave one collection out, every tree count, then nested selection
    table: dict[str, dict[str, float]] = {}
    for short, key in HELD.items():
        baselines = rankings(None)
        row = {"first stage": ndcg(key, baselines["first stage"]),
               f"zero-shot {args.mode}": ndcg(key, lambda x: np.asarray(x.lm)),
               "zero-shot fused": ndcg(key, baselines["zero-shot fused"])}
        for trees in args.trees:
            row[f"head {trees} trees"] = ndcg(key, head_score(pool(key), trees))
        inner = pool(key)
        chosen = max(args.trees, key=lambda t: statistics.fmean(
            ndcg(k, head_score([j for j in inner if j != k], t)) for k in inner))
        row["head (nested choice)"] = ndcg(key, head_score(pool(key), chosen))
        row["nested choice: trees"] = chosen
        if args.transfer_from:  # the same held-out lists ranked by a head fitted on the other kind's lists
            other = [x for k in pool(key) for x in read_lists(args.transfer_from / cache_name(k, args.mode, "bm25"))]
            row[f"BM25-list head, {DEFAULT_TREES} trees"] = ndcg(key, rankings(fit(other, seed=args.seed))["head"])
        table[short] = row
    trees = max(args.trees, key=lambda t: statistics.fmean(table[s][f"head {t} trees"] for s in HELD))

    # 2. the head fitted on every source
    train_keys = [f"{s.name}/{s.split}" for s in train]
    everything = [x for k in train_keys for x in lists[k]]
    start = time.perf_counter()
    booster = fit(everything, trees=trees, seed=args.seed)
    print(f"fitting {len(everything)} lists ({sum(len(x.doc_ids) for x in everything)} candidates): "
          f"{time.perf_counter() - start:.1f} s; peak RSS of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    final = {"scifact/test": overlap_split(args.data_root / "scifact", datasets["scifact/test"], lists["scifact/test"],
                                           booster)}
    report = {"leave_one_collection_out": table, "trees": trees, "scifact_test_after_training_on_all": final,
              "lists": {k: len(v) for k, v in lists.items()},
              "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
              "settings": {k: str(v) for k, v in vars(args).items()}}
    atomic_write_text(args.out / "report.json", json.dumps(report, indent=2) + "\n")
    print_report(table, trees, final, lists, held_out, args.first_stage)

    if args.verify:
        verify(train[1], args, lists["cisi/test"][:args.verify])
    if args.write:
        reranker = _reranker(None, args.mode)
        encoder = load_encoder(None)
        card = heads.HeadCard(
            base_fingerprint=reranker.lm.fingerprint, base_model=reranker.config.model, mode=args.mode,
            template=reranker.template.name, dense_model=encoder.fingerprint, prior_weight=DEFAULT_PRIOR_WEIGHT,
            trees=trees, seed=args.seed, first_stage=args.first_stage,
            training={"recipe": "benchmarks/head_default.py", "sources": [
                {"data": f"{s.name}/{s.split}", "first_stage": s.candidates or args.first_stage, "depth": s.depth,
                 "lists": len(lists[f"{s.name}/{s.split}"]), "digest": lists_digest(lists[f"{s.name}/{s.split}"])}
                for s in train]},
            metrics={"leave_one_collection_out_nDCG@10": {
                s: {k: round(v, 4) for k, v in row.items() if k in ("first stage", "zero-shot fused",
                                                                    "head (nested choice)")}
                for s, row in table.items()},
                "scifact_test_first_100_nDCG@10": final["scifact/test"]})
        card = heads.save(args.write, booster, card)
        print(f"\nwrote {args.write} (digest {card.digest}, {trees} trees)")


def verify(source: Source, args, cached: list[HeadList]) -> None:
    """Recompute `cached` lists through `head_lists` (no cache) and print the largest differences."""
    dataset = load_dataset(args.data_root / source.name, source.split)
    reranker = _reranker(Path(args.stores.format(short=source.short)) if args.stores else None, args.mode)
    try:
        fresh = head_lists(dataset, build_or_load(args.first_stage, dataset), reranker, load_encoder(None),
                           depth=source.depth, queries=[dataset.queries[x.query_id] for x in cached], progress=False)
    finally:
        reranker.store.close()
    same_docs = all(a.doc_ids == b.doc_ids and a.labels == b.labels for a, b in zip(fresh, cached))
    gap = {name: max(abs(p - q) for a, b in zip(fresh, cached) for p, q in zip(getattr(a, name), getattr(b, name)))
           for name in ("first", "dense", "lm")}
    print(f"\nrecomputed {len(fresh)} {source.name} lists: same documents and grades {same_docs}; largest "
          "differences " + ", ".join(f"{k} {v:.1e}" for k, v in gap.items()))


def make_lists(source: Source, args) -> list[HeadList]:
    dataset = load_dataset(args.data_root / source.name, source.split)
    first = (CandidatesRetriever.from_file(args.data_root / source.name / source.candidates, dataset)
             if source.candidates else build_or_load(args.first_stage, dataset))
    cache = args.out / cache_name(f"{source.name}/{source.split}", args.mode, args.first_stage)
    store = Path(args.stores.format(short=source.short)) if args.stores else None
    reranker = _reranker(store, args.mode)
    try:  # a BEIR split's queries are its judged ones
        return head_lists(dataset, first, reranker, load_encoder(None), depth=source.depth,
                          queries=dataset.sorted_queries(source.max_queries), cache=cache)
    finally:
        reranker.store.close()


def cache_name(key: str, mode: str, first_stage: str) -> str:
    """The list cache file of `key` (name/split) in --out."""
    return f"lists-{key.replace('/', '-')}-{mode}-{first_stage}.json"


@functools.cache
def _lm():
    return load_lm()


def _reranker(store: Path | None, mode: str):
    """A zero-shot reranker in `mode` over `store` (the model is loaded once and shared)."""
    return build_reranker(PipelineConfig(reranker=RerankerConfig(mode=mode), store_dir=store), [], lm=_lm())


def overlap_split(folder: Path, dataset, lists: list[HeadList], booster) -> dict[str, dict[str, float]]:
    """nDCG@10 on SciFact test of first stage, zero-shot fused and the head: all claims, and the claims that
    share no cited document with a train claim (held out in the strict sense)."""
    train_docs = {q.doc_id for q in read_qrels_tsv(folder / "qrels" / "train.tsv") if q.relevance > 0}
    overlapping = {q.query_id for q in dataset.qrels if q.relevance > 0 and q.doc_id in train_docs}
    scorers = rankings(booster)
    out: dict[str, dict[str, float]] = {}
    for part, keep in (("all", None), ("not overlapping", False), ("overlapping", True)):
        chosen = [x for x in lists if keep is None or (x.query_id in overlapping) == keep]
        ids = {x.query_id for x in chosen}
        qrels = [q for q in dataset.qrels if q.query_id in ids]
        out[f"{part} ({len(chosen)})"] = {name: round(evaluate(rank_with(chosen, fn), qrels)["nDCG@10"], 4)
                                          for name, fn in scorers.items()}
    return out


def print_report(table, trees, final, lists, held_out: Source, first_stage: str) -> None:
    cols = list(next(iter(table.values())))
    print("\nnDCG@10, leave one collection out (each row: a head that never saw that collection)\n")
    print("| held out | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for short, row in table.items():
        print(f"| {short} ({len(lists[HELD[short]])}) | "
              + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    fitted_on = ", ".join(f"{k} ({len(lists[k])})" for k in lists if k != "scifact/test")
    print(f"\nshipped head: {trees} trees, fitted on {fitted_on}")
    print(f"\nSciFact test (first {held_out.max_queries} claims, {first_stage} top {held_out.depth}), after training "
          "on SciFact train among others\n")
    print("| claims | first stage | zero-shot fused | head |\n|---|---|---|---|")
    for part, row in final["scifact/test"].items():
        print(f"| {part} | " + " | ".join(f"{v:.4f}" for v in row.values()) + " |")


if __name__ == "__main__":
    main()
