"""What a user would try instead of a query-side adapter, on the same labels, folds and candidates:

- **LightGBM lambdarank** over features kvrank already computes for each (query, candidate): the zero-shot `ql`
  score, the calibrated `attn` per-head attention masses, the first stage's score and rank, the dense (MiniLM)
  cosine and its rank;
- **a cross-encoder fine-tuned from the offline all-MiniLM-L6-v2 weights** with sentence-transformers' own
  CrossEncoder training (binary cross-entropy on graded labels scaled to [0, 1]), and its milliseconds per query.

Protocols: `--folds K` (k-fold by query within `--data`, the folds of `kvrank train --folds`), or `--train-data`
(train on that set's judged queries, test on `--data`: e.g. Cranfield -> CISI). Every reported query is scored by
a model that never saw it.

    python benchmarks/ltr_baselines.py --data ../shared/data/trec-dl-2019 \
        --candidates ../shared/data/trec-dl-2019/bm25_top100.trec --folds 5 --store /tmp/kv-dl19 --out /tmp/ltr-dl19

Features are cached in `--out/features-<name>[-<split>].json`, saved as they are computed (a rerun computes only
what is missing). Prints a Markdown table and writes `--out/report.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kvrank.eval.conventions import convention_for
from kvrank.eval.data import load_dataset, write_run
from kvrank.eval.metrics import evaluate
from kvrank.io import atomic_write_text
from kvrank.pipeline import PipelineConfig, build_reranker
from kvrank.reranker.reranker import RerankerConfig
from kvrank.retriever import build_or_load
from kvrank.retriever.candidates import CandidatesRetriever
from kvrank.retriever.dense import default_model_path
from kvrank.train.lists import folds as split_folds
from kvrank.types import Dataset, ScoredDoc

METRICS = ("nDCG@10", "RR@10")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Test set (BEIR folder).")
    parser.add_argument("--candidates", type=Path, help="First stage of --data from a run (else BM25).")
    parser.add_argument("--train-data", help="Train on this set (BM25 first stage) instead of k-fold.")
    parser.add_argument("--train-split", default="test",
                        help="Qrels split of --train-data to train on (e.g. `train` with --train-data = --data).")
    parser.add_argument("--max-train-queries", type=int, help="Only the first N judged training queries.")
    parser.add_argument("--runs", action="store_true", help="Also write each ranking as a TREC run in --out.")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--store", type=Path, required=True, help="Passage KV store (ql and attn share it).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-queries", type=int, help="Only the first N judged queries of each set.")
    parser.add_argument("--ce-epochs", type=int, default=2)
    parser.add_argument("--skip-ce", action="store_true", help="LightGBM only (the cross-encoder takes longest).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    test = load_dataset(args.data)
    test_feats = features(test, args.candidates, args, args.max_queries)
    if args.train_data:
        train = load_dataset(args.train_data, split=args.train_split)
        train_feats = features(train, None, args, args.max_train_queries, split=args.train_split)
        splits = [(train, train_feats, list(train_feats), list(test_feats))]
        protocol = f"train on {train.name} ({len(train_feats)} queries), test on {test.name}"
    else:
        queries = [q for q in test.sorted_queries() if q.query_id in test_feats]
        splits = []
        for f in range(args.folds):
            tr, held = split_folds(queries, args.folds, f)
            splits.append((test, test_feats, [q.query_id for q in tr], [q.query_id for q in held]))
        protocol = f"{args.folds}-fold by query on {test.name}"

    runs: dict[str, dict[str, list[ScoredDoc]]] = {name: {} for name in ("first stage", "zero-shot ql", *VARIANTS,
                                                                         "cross-encoder")}
    ce_ms: list[float] = []
    for train_set, train_feats, train_ids, test_ids in splits:
        for name, cols in VARIANTS.items():
            ranker = fit_lambdarank(train_feats, train_ids, train_set, cols, args.seed)
            for qid in test_ids:
                runs[name][qid] = _ranked(qid, test_feats[qid], ranker.predict(_matrix(test_feats[qid], cols)))
        if args.skip_ce:
            continue
        ce = fit_cross_encoder(train_set, train_feats, train_ids, args)
        for qid in test_ids:
            row = test_feats[qid]
            pairs = [(row["query"], text) for text in row["texts"]]
            t0 = time.perf_counter()
            scores = ce.predict(pairs, batch_size=len(pairs), show_progress_bar=False)
            ce_ms.append((time.perf_counter() - t0) * 1000)
            runs["cross-encoder"][qid] = _ranked(qid, row, np.asarray(scores))
    for qid in (qid for _, _, _, ids in splits for qid in ids):
        row = test_feats[qid]
        runs["first stage"][qid] = _ranked(qid, row, -np.asarray(row["first_rank"], dtype=float))
        runs["zero-shot ql"][qid] = _ranked(qid, row, np.asarray(row["ql"]))
    scored = set(runs["first stage"])  # a judged query missing from a run would count as 0
    qrels = [q for q in test.qrels if q.query_id in scored]
    level = convention_for(test).rel_level  # the collection's relevance level for RR and R
    metrics = {name: evaluate(run, qrels, rel_level=level) for name, run in runs.items() if run}
    report = {"protocol": protocol, "dataset": test.name, "queries": len(runs["first stage"]), "depth": args.depth,
              "metrics": metrics,
              "cross_encoder_ms_per_query": {"median": statistics.median(ce_ms),
                                             "p95": float(np.percentile(ce_ms, 95))} if ce_ms else None,
              "lm_ms_per_query": {"median_ql": statistics.median(r["ql_ms"] for r in test_feats.values())},
              "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
              "settings": {k: str(v) for k, v in vars(args).items()}}
    atomic_write_text(args.out / "report.json", json.dumps(report, indent=2) + "\n")
    if args.runs:
        for name, run in runs.items():
            if run:
                write_run(run, args.out / f"{name.replace(' ', '-').replace('(', '').replace(')', '')}.trec")
    print(f"\n{protocol}; top-{args.depth} candidates; {report['queries']} test queries\n")
    print("| ranking | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for name, m in metrics.items():
        print(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in METRICS) + " |")
    if ce_ms:
        print(f"\ncross-encoder: median {statistics.median(ce_ms):.0f} ms per query (K={args.depth}), zero-shot ql "
              f"from stored KV: median {report['lm_ms_per_query']['median_ql']:.0f} ms per query")


# ------------------------------------------------------------------------------------------------ features
FIRST_STAGE_COLS = ("first_score", "first_rank", "dense", "dense_rank")
ATTN = "attn"  # the per-(layer, head) calibrated masses, one column each
# lambdarank variants by feature columns (None: all). "ql, no attn" costs a ql pass, "attn, no ql" an attn pass.
VARIANTS: dict[str, tuple[str, ...] | None] = {"lambdarank": None,
                                               "lambdarank (no LM features)": FIRST_STAGE_COLS,
                                               "lambdarank (ql, no attn masses)": (*FIRST_STAGE_COLS, "ql", "ql_rank"),
                                               "lambdarank (attn masses, no ql)": (*FIRST_STAGE_COLS, ATTN)}


def features(dataset: Dataset, candidates: Path | None, args, max_queries: int | None,
             split: str = "test") -> dict[str, dict]:
    """Per judged query (the first `max_queries` in sorted id order): its top-`depth` candidates with
    first-stage, dense, `ql` and `attn` features. Cached in `--out`, saved every 20 queries; a rerun computes
    only the queries the cache lacks."""
    cache = args.out / f"features-{dataset.name}{'' if split == 'test' else '-' + split}.json"
    out: dict[str, dict] = json.loads(cache.read_text()) if cache.exists() else {}
    grades = dataset.grades()
    judged = [q for q in dataset.sorted_queries() if q.query_id in grades][:max_queries]
    todo = [q for q in judged if q.query_id not in out]
    if not todo:
        return {q.query_id: out[q.query_id] for q in judged}
    first = (CandidatesRetriever.from_file(candidates, dataset) if candidates is not None
             else build_or_load("bm25", dataset))
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(str(default_model_path()), device="cpu")
    ql = build_reranker(PipelineConfig(reranker=RerankerConfig(mode="ql"), store_dir=args.store),
                        list(dataset.corpus.values()))
    attn = ql.variant(mode="attn")
    for done, query in enumerate(tqdm(todo, desc=f"features {dataset.name} {split}"), 1):
        hits = first.search([query], args.depth)[query.query_id]
        passages = [dataset.corpus[h.doc_id] for h in hits]
        texts = [f"{p.title} {p.text}".strip() for p in passages]
        emb = encoder.encode([query.text, *texts], normalize_embeddings=True)
        dense = emb[1:] @ emb[0]
        t0 = time.perf_counter()
        ql_scores = ql.score_many([query.text], [passages]).scores[0]
        ql_ms = (time.perf_counter() - t0) * 1000
        blocks, _ = attn.passage_kv(passages)
        with torch.no_grad():
            mass, free = attn.attention_mass(query.text, blocks)
        calibrated = (mass - free if free is not None else mass).flatten(0, 1).T  # (K, L*H)
        out[query.query_id] = {
            "query": query.text, "doc_ids": [h.doc_id for h in hits], "texts": texts,
            "first_score": [h.score for h in hits], "first_rank": list(range(1, len(hits) + 1)),
            "dense": dense.tolist(), "dense_rank": _ranks(dense).tolist(), "ql": [float(s) for s in ql_scores],
            "ql_rank": _ranks(np.asarray(ql_scores)).tolist(), "attn": calibrated.tolist(), "ql_ms": ql_ms,
            "labels": [max(0, grades[query.query_id].get(h.doc_id, 0)) for h in hits]}
        if done % 20 == 0:
            atomic_write_text(cache, json.dumps(out) + "\n")
    ql.store.close()
    atomic_write_text(cache, json.dumps(out) + "\n")
    return {q.query_id: out[q.query_id] for q in judged}


def _ranks(scores: np.ndarray) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(len(scores), dtype=int)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks


def _matrix(row: dict, cols: tuple[str, ...] | None) -> np.ndarray:
    """Feature columns `cols` (None: everything); ATTN stands for all the attention-mass columns."""
    names = cols or (*FIRST_STAGE_COLS, "ql", "ql_rank", ATTN)
    parts = [np.asarray(row[c], dtype=float).reshape(len(row["doc_ids"]), -1) for c in names]
    return np.hstack(parts)


def _ranked(qid: str, row: dict, scores: np.ndarray) -> list[ScoredDoc]:
    order = np.argsort(-scores, kind="stable")
    return [ScoredDoc(qid, row["doc_ids"][i], float(scores[i])) for i in order]


# ------------------------------------------------------------------------------------------------ models
def fit_lambdarank(feats: dict[str, dict], ids: list[str], dataset: Dataset, cols, seed: int):
    import lightgbm as lgb

    x = np.vstack([_matrix(feats[q], cols) for q in ids])
    y = np.concatenate([np.minimum(np.asarray(feats[q]["labels"]), 3) for q in ids])
    groups = [len(feats[q]["doc_ids"]) for q in ids]
    ranker = lgb.LGBMRanker(objective="lambdarank", n_estimators=200, learning_rate=0.05, num_leaves=15,
                            min_child_samples=10, subsample=0.8, subsample_freq=1, colsample_bytree=0.8,
                            random_state=seed, verbose=-1, label_gain=[0, 1, 3, 7])
    ranker.fit(x, y, group=groups)
    return ranker


def fit_cross_encoder(dataset: Dataset, feats: dict[str, dict], ids: list[str], args):
    from datasets import Dataset as HFDataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    top = max(max(feats[q]["labels"]) for q in ids) or 1
    rows = {"query": [], "passage": [], "label": []}
    for q in ids:
        for text, label in zip(feats[q]["texts"], feats[q]["labels"]):
            rows["query"].append(feats[q]["query"])
            rows["passage"].append(text)
            rows["label"].append(min(label, top) / top)
    model = CrossEncoder(str(default_model_path()), num_labels=1, max_length=256, device="cpu")
    training = CrossEncoderTrainingArguments(
        output_dir=str(args.out / "ce-tmp"), num_train_epochs=args.ce_epochs, per_device_train_batch_size=16,
        learning_rate=2e-5, warmup_ratio=0.1, seed=args.seed, save_strategy="no", report_to="none",
        logging_steps=50, disable_tqdm=True)
    CrossEncoderTrainer(model=model, args=training, train_dataset=HFDataset.from_dict(rows),
                        loss=BinaryCrossEntropyLoss(model)).train()
    return model


if __name__ == "__main__":
    main()
