"""Does the scoring head hold over a compact KV format? TREC DL 2019 (43 queries, the shared BM25 run, top 20),
the same head inputs computed over stores of different KV formats.

The head reads the zero-shot `ql` score; a compact format (e.g. `rank32:96+int4`, about 2 KB per token against
11.8 KB for int8) moves that score a little. Two heads per format, each scoring only queries it never saw:
- **other collections**: fitted on head_default.py's CISI, Cranfield and SciFact train lists (int8 KV), the way
  the shipped head meets a user's store;
- **5-fold by query**: fitted on the format's own DL19 lists (the folds of `kvrank train --folds`), i.e. a head
  trained over that format.

    python benchmarks/head_formats.py --data-root ../shared/data --lists /tmp/exp/hhead-bm25 \
        --store int8=/tmp/exp/stores/dl19-ql --store rank32:96+int4=/tmp/exp/stores/dl19-rank32-96-int4 \
        --out /tmp/exp/head-formats

Each `--store` is opened in its own format (its manifest says which). Lists are cached in `--out`.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
from head_default import cache_name

from kvrank.eval.conventions import convention_for
from kvrank.eval.data import load_dataset
from kvrank.eval.metrics import evaluate
from kvrank.io import atomic_write_text
from kvrank.pipeline import PipelineConfig, build_reranker
from kvrank.reranker.reranker import RerankerConfig
from kvrank.retriever.candidates import CandidatesRetriever
from kvrank.retriever.dense import load_encoder
from kvrank.train.head import DEFAULT_TREES, HeadList, fit, head_lists, rank_with, rankings, read_lists
from kvrank.train.lists import folds
from kvrank.types import Query

OTHERS = ("cisi/test", "cranfield/test", "scifact/train")  # head_default.py's sources besides DL19


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--lists", type=Path, required=True,
                        help="head_default.py's --out (BM25 lists of the other collections, ql mode).")
    parser.add_argument("--store", action="append", required=True, help="NAME=DIR, a DL19 store per format.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trees", type=int, default=DEFAULT_TREES)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    dataset = load_dataset(args.data_root / "trec-dl-2019", "test")
    first = CandidatesRetriever.from_file(args.data_root / "trec-dl-2019" / "bm25_top100.trec", dataset)
    others = [x for key in OTHERS for x in read_lists(args.lists / cache_name(key, "ql", "bm25"))]
    transfer = fit(others, trees=args.trees)
    encoder = load_encoder(None)
    level = convention_for(dataset).rel_level
    table: dict[str, dict[str, float]] = {}
    for name, folder in (item.split("=", 1) for item in args.store):
        reranker = build_reranker(PipelineConfig(reranker=RerankerConfig(mode="ql"), store_dir=Path(folder)), [])
        try:
            lists = head_lists(dataset, first, reranker, encoder, depth=20,
                               cache=args.out / f"lists-dl19-{name.replace(':', '_').replace('+', '_')}.json")
            stored = reranker.config.format.name
        finally:
            reranker.store.close()

        def ndcg(score) -> float:
            return evaluate(rank_with(lists, score), dataset.qrels, rel_level=level)["nDCG@10"]

        base = rankings(None)
        row = {"first stage": ndcg(base["first stage"]), "zero-shot ql": ndcg(lambda x: np.asarray(x.lm)),
               "zero-shot fused": ndcg(base["zero-shot fused"]),
               "head (other collections)": ndcg(rankings(transfer)["head"])}
        row["head (5-fold, own format)"] = kfold(lists, dataset, args.folds, args.trees, level)
        table[name if name == stored else f"{name} ({stored})"] = row

    cols = list(next(iter(table.values())))
    print(f"\nTREC DL 2019, BM25 top 20, nDCG@10 ({len(lists)} queries); {args.trees} trees; "
          f"{platform.platform()}, {torch.get_num_threads()} threads\n")
    print("| KV format | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in row.values()) + " |")
    atomic_write_text(args.out / "report.json", json.dumps({"nDCG@10": table, "trees": args.trees,
                                                            "folds": args.folds}, indent=2) + "\n")


def kfold(lists: list[HeadList], dataset, k: int, trees: int, level: int) -> float:
    """nDCG@10 of each query ranked by a head fitted on the other folds' lists."""
    queries = [Query(x.query_id, "") for x in lists]
    run: dict = {}
    for fold in range(k):
        train, held = folds(queries, k, fold)
        keep = {q.query_id for q in train}
        booster = fit([x for x in lists if x.query_id in keep], trees=trees)
        run |= rank_with([x for x in lists if x.query_id in {q.query_id for q in held}], rankings(booster)["head"])
    return evaluate(run, dataset.qrels, rel_level=level)["nDCG@10"]


if __name__ == "__main__":
    main()
