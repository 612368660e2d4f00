"""SciFact with and without the test claims that share a cited document with a train claim.

SciFact's train and test splits contain negated claim pairs: a test claim whose cited abstract a train claim also
cites. A model trained on SciFact train has seen that abstract as a positive, so its test score on those claims is
not a held-out score. This prints nDCG@10 of each run over the evaluated test claims: all, overlapping, and not.

    python benchmarks/scifact_overlap.py --data ../shared/data/scifact zeroshot.trec adapter.trec
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvrank.eval.data import read_qrels_tsv
from kvrank.eval.metrics import evaluate
from kvrank.retriever.candidates import read_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args()

    test = read_qrels_tsv(args.data / "qrels" / "test.tsv")
    train_docs = {q.doc_id for q in read_qrels_tsv(args.data / "qrels" / "train.tsv") if q.relevance > 0}
    overlapping = {q.query_id for q in test if q.relevance > 0 and q.doc_id in train_docs}
    print(f"{len({q.query_id for q in test})} test claims, {len(overlapping)} cite a document a train claim cites\n")
    print("| run | claims | all | overlapping | not overlapping (held out) |")
    print("|---|---|---|---|---|")
    for path in args.runs:
        run = read_run(path)
        scored = set(run)
        cells = []
        for keep in (scored, scored & overlapping, scored - overlapping):
            qrels = [q for q in test if q.query_id in keep]
            cells.append(f"{evaluate({k: v for k, v in run.items() if k in keep}, qrels)['nDCG@10']:.4f} "
                         f"({len(keep)})")
        print(f"| {path.name} | {len(scored)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
