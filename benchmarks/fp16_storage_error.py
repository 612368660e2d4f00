"""How far fp16 passage-KV storage moves scores from fp32 storage, on real passages and the offline models.

  python benchmarks/fp16_storage_error.py [--queries 3] [--depth 10]
"""

from __future__ import annotations

import argparse

from kvrank.eval.data import load_dataset, read_run
from kvrank.reranker.model import GEMMA3, SMOLLM2, load_lm
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.store.kv import MemoryKVStore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/trec-dl-2019")
    parser.add_argument("--queries", type=int, default=3)
    parser.add_argument("--depth", type=int, default=10)
    args = parser.parse_args()
    dataset = load_dataset(args.data)
    run = read_run(f"{args.data}/bm25_top100.trec")
    queries = dataset.sorted_queries(args.queries)
    for name in (SMOLLM2, GEMMA3):
        lm = load_lm(name)
        for mode in ("ql", "attn"):
            exact = BlockReranker(RerankerConfig(kv_format="none",
                                                 mode=mode, storage_dtype="float32"), store=MemoryKVStore(), lm=lm)
            half = BlockReranker(RerankerConfig(kv_format="none",
                                                mode=mode, storage_dtype="float16"), store=MemoryKVStore(), lm=lm)
            worst = 0.0
            for q in queries:
                passages = [dataset.corpus[d.doc_id] for d in run[q.query_id][: args.depth]]
                a, b = exact.score(q.text, passages), half.score(q.text, passages)
                worst = max(worst, max(abs(x - y) for x, y in zip(a, b)))
            print(f"{name} {mode}: max |fp16 - fp32| over {args.queries * args.depth} passages = {worst:.2e}")


if __name__ == "__main__":
    main()
