"""kvrank's BM25 next to published BM25 numbers, on the collections in ../shared/data.

References (copied by hand from the public sources named; see docs/results/retrieval.md):
- TREC DL 2019 passage, the official Anserini BM25 run (k1=0.9, b=0.4, full 8.8M-passage MS MARCO): nDCG@10 .5058,
  MAP .3013 and R@1000 .7501 at relevance >= 2 (pyserini's two-click reproductions, msmarco-v1-passage.yaml,
  condition bm25-default). The shared folder holds that run's top 100 (`bm25_top100.trec`) and a corpus made of
  the union of those 100s, so only measures inside the top 100 can be compared: nDCG@10 and RR@10 exactly; AP
  and recall not (the run is cut at 100, and many judged passages are outside the pool).
- BEIR sets: pyserini's two-click reproductions (beir.yaml), BM25 "flat" (title and text in one field) and
  "multifield" (title and text indexed as separate fields, a query scored against both, equal weights), both
  Anserini defaults k1=0.9, b=0.4, 1000 hits: nDCG@10, R@100, R@1000. Only SciFact of the shared folders is in
  BEIR; Cranfield and CISI have no 2CR reference and are printed for the record.

Each BEIR-layout folder is scored with kvrank's own BM25 (bm25s) in several settings: kvrank's default (k1=1.5,
b=0.75, Snowball English stemmer, bm25s's tokens of 2+ characters, title + text in one field); Anserini's k1/b;
then with the Porter stemmer Anserini uses; then also keeping one-character tokens as Lucene's tokenizer does;
and a multifield emulation (two bm25s indexes, title and text, scores summed) of the last two.
Every run retrieves 1000 documents per query (so R@1000 is defined; `kvrank eval` keeps k=100).

Usage: python benchmarks/bm25_reproduction.py [--data ../shared/data] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

from kvrank.eval.conventions import convention_for
from kvrank.eval.data import load_dataset, read_run
from kvrank.eval.metrics import evaluate
from kvrank.retriever.bm25 import KEEP_SINGLE_CHARS, BM25Config, BM25Retriever
from kvrank.types import Dataset, Passage, Run, ScoredDoc

DEPTH = 1000
METRICS = ("nDCG@10", "RR@10", "R@100", "R@1000", "AP@1000")
ANSERINI = {"k1": 0.9, "b": 0.4}

# name -> condition -> published values (pyserini 2CR beir.yaml; msmarco-v1-passage.yaml bm25-default)
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "scifact": {"flat": {"nDCG@10": 0.6789, "R@100": 0.9253, "R@1000": 0.9767},
                "multifield": {"nDCG@10": 0.6647, "R@100": 0.9076, "R@1000": 0.9800}},
    "trec-dl-2019": {"official run": {"nDCG@10": 0.5058, "AP@1000": 0.3013, "R@1000": 0.7501}},
}

LUCENE_LIKE = BM25Config(**ANSERINI, stemmer="porter", token_pattern=KEEP_SINGLE_CHARS)
SETTINGS: dict[str, tuple[BM25Config, bool, str]] = {
    # label -> (config, multifield, the published condition it is compared with)
    "kvrank default (k1=1.5 b=0.75, snowball)": (BM25Config(), False, "flat"),
    "k1=0.9 b=0.4, snowball": (BM25Config(**ANSERINI), False, "flat"),
    "k1=0.9 b=0.4, porter": (BM25Config(**ANSERINI, stemmer="porter"), False, "flat"),
    "k1=0.9 b=0.4, porter, 1-char tokens": (LUCENE_LIKE, False, "flat"),
    "multifield k1=0.9 b=0.4, porter": (BM25Config(**ANSERINI, stemmer="porter"), True, "multifield"),
    "multifield k1=0.9 b=0.4, porter, 1-char tokens": (LUCENE_LIKE, True, "multifield"),
}


def flat_run(dataset: Dataset, config: BM25Config) -> Run:
    retriever = BM25Retriever.build(dataset.corpus, config, show_progress=False)
    return retriever.search(dataset.sorted_queries(), k=DEPTH)


def multifield_run(dataset: Dataset, config: BM25Config) -> Run:
    """Anserini's multifield condition with bm25s: one index per field (own length normalisation and IDF), the
    query's BM25 against each field summed with equal weights."""
    ids = list(dataset.corpus)
    fields = [
        BM25Retriever.build({d: Passage(d, "", dataset.corpus[d].title) for d in ids}, config, show_progress=False),
        BM25Retriever.build({d: Passage(d, "", dataset.corpus[d].text) for d in ids}, config, show_progress=False),
    ]
    stemmer = Stemmer.Stemmer(config.stemmer) if config.stemmer else None
    run: Run = {}
    for query in dataset.sorted_queries():
        tokens = bm25s.tokenize([query.text], stopwords=config.stopwords, stemmer=stemmer, return_ids=False,
                                token_pattern=config.token_pattern, show_progress=False)[0]
        total = np.zeros(len(ids))
        for field in fields:
            known = [t for t in tokens if t in field.model.vocab_dict]
            if known:
                total += field.model.get_scores(known)
        top = total.argsort()[::-1][:DEPTH]
        run[query.query_id] = [ScoredDoc(query.query_id, ids[i], float(total[i])) for i in top if total[i] > 0]
    return run


def folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "corpus.jsonl").is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--json", type=Path, help="Also write the numbers here.")
    args = parser.parse_args()

    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, python "
          f"{platform.python_version()}, bm25s {bm25s.__version__}; depth {DEPTH} per query")
    rows: list[dict] = []
    for folder in folders(args.data):
        dataset = load_dataset(folder)
        convention = convention_for(dataset)
        qrels = dataset.qrels
        published = PUBLISHED.get(folder.name, {})
        if (folder / "bm25_top100.trec").is_file():  # the official run's top 100 (TREC DL 2019)
            pool = read_run(folder / "bm25_top100.trec")
            values = evaluate({q: pool[q] for q in dataset.queries if q in pool}, qrels, METRICS,
                              convention.rel_level)
            rows.append({"set": folder.name, "run": "official BM25 run, top 100 (bm25_top100.trec)",
                         "rel_level": convention.rel_level, "queries": len(dataset.queries), **values,
                         "published": published.get("official run", {}), "seconds": 0.0})
        for label, (config, multifield, condition) in SETTINGS.items():
            if multifield and not any(p.title for p in dataset.corpus.values()):
                continue  # no titles (the DL19 pool): multifield is flat
            start = time.perf_counter()
            run = multifield_run(dataset, config) if multifield else flat_run(dataset, config)
            seconds = time.perf_counter() - start
            values = evaluate(run, qrels, METRICS, convention.rel_level)
            rows.append({"set": folder.name, "run": label, "rel_level": convention.rel_level,
                         "queries": len(dataset.queries), **values,
                         "published": published.get(condition, {}) if folder.name != "trec-dl-2019" else {},
                         "seconds": seconds})

    print("| set | run | rel | nDCG@10 | RR@10 | R@100 | R@1000 | AP@1000 | published nDCG@10 / R@100 / R@1000 "
          "(AP) | nDCG@10 diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ref = row["published"]
        shown = " / ".join(f"{ref[m]:.4f}" if m in ref else "-" for m in ("nDCG@10", "R@100", "R@1000"))
        if "AP@1000" in ref:
            shown += f" (MAP {ref['AP@1000']:.4f})"
        diff = f"{row['nDCG@10'] - ref['nDCG@10']:+.4f}" if "nDCG@10" in ref else "-"
        print(f"| {row['set']} ({row['queries']} q) | {row['run']} | >={row['rel_level']} | "
              + " | ".join(f"{row[m]:.4f}" for m in METRICS) + f" | {shown or '-'} | {diff} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
