"""Training data and fitting for a scoring head (`kvrank/reranker/head.py`).

A head learns from rerank lists exactly as a search produces them: a judged query's first-stage top `depth`, with
the three signals the head reads (first-stage score, dense cosine, the reranker's zero-shot score in the head's
mode from stored passage KV) and the qrels' grades (0 for unjudged). Nothing is added to the list: a query whose
positives the first stage missed teaches the head nothing and costs nothing.

Computing the lists is the slow part (one rerank pass per query); `head_lists` saves them as it goes into a cache
file and a rerun computes only what the file lacks. Fitting is seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kvrank.errors import KvrankError
from kvrank.fingerprints import corpus_fingerprint
from kvrank.io import atomic_write_text
from kvrank.reranker import head as heads
from kvrank.retriever.base import Retriever
from kvrank.types import Dataset, Query

logger = logging.getLogger(__name__)

SAVE_EVERY = 20  # queries between cache writes
MAX_GRADE = 3  # grades above are clipped (label_gain has one entry per grade)
LABEL_GAIN = [0, 1, 3, 7]  # 2^grade - 1, as nDCG's gain
DEFAULT_TREES = 25  # chosen by leave-one-collection-out (docs/guide/training.md)
DEFAULT_PRIOR_WEIGHT = 0.3  # the rerank fusion weight the trees start from


@dataclass(frozen=True)
class HeadList:
    """One judged query's rerank list: per candidate (first-stage order) its three signals and its grade."""

    query_id: str
    doc_ids: list[str]
    first: list[float]
    dense: list[float]
    lm: list[float]  # the reranker's score in the head's mode (ql: query likelihood; attn: attention mass)
    labels: list[int]
    source: str = ""

    def features(self) -> np.ndarray:  # (K, 6)
        return heads.features(self.first, self.dense, self.lm)


def head_lists(dataset: Dataset, first_stage: Retriever, reranker: Any, encoder: Any, *, depth: int,
               queries: Sequence[Query] | None = None, cache: Path | None = None,
               progress: bool = True) -> list[HeadList]:
    """Rerank lists for `queries` (default: every judged query of `dataset`) that have at least one candidate.
    `reranker` scores in the head's mode (zero-shot: the head learns from base-model scores); `encoder` is the dense
    embedder. With `cache`, lists are read from and saved to that JSON file as they are made."""
    if not dataset.qrels:
        raise KvrankError(f"{dataset.source or dataset.name} has no qrels to train a head on; load a split with "
                          "judgements (e.g. split='dev')")
    if depth < 2:
        raise KvrankError(f"depth must be >= 2 (a head ranks lists), got {depth}", param="depth")
    grades = dataset.grades()
    chosen = [q for q in (queries if queries is not None else dataset.sorted_queries()) if q.query_id in grades]
    if not chosen:
        raise KvrankError(f"{dataset.source or dataset.name}: none of the chosen queries is judged; check the split")
    # what made the lists: a cache made by another model, template or first stage is refused, not mixed in
    settings = reranker.config
    signature = {"depth": depth, "first_stage": getattr(first_stage, "name", type(first_stage).__name__),
                 "corpus": corpus_fingerprint(dataset.corpus), "model": reranker.lm.fingerprint,
                 "mode": settings.mode, "template": reranker.template.name, "kv_format": settings.format.name,
                 "max_passage_tokens": settings.max_passage_tokens, "dtype": settings.dtype,
                 "encoder": getattr(encoder, "fingerprint", "")}
    done = _read_cache(cache, signature)
    todo = [q for q in chosen if q.query_id not in done]
    for i, query in enumerate(tqdm(todo, desc=f"head lists {dataset.name}", disable=not progress or not todo), 1):
        hits = [h for h in first_stage.search([query], depth).get(query.query_id, []) if h.doc_id in dataset.corpus]
        if not hits:
            done[query.query_id] = None
            continue
        passages = [dataset.corpus[h.doc_id] for h in hits]
        vectors = encoder.encode([query.text, *(p.contents for p in passages)])  # (1 + K, dim), unit length
        lm = reranker.score_many([query.text], [passages]).scores[0]
        judged = grades[query.query_id]
        done[query.query_id] = HeadList(
            query.query_id, [h.doc_id for h in hits], [float(h.score) for h in hits],
            [float(x) for x in vectors[1:] @ vectors[0]], [float(s) for s in lm],
            [max(0, judged.get(h.doc_id, 0)) for h in hits], dataset.name)
        if cache is not None and i % SAVE_EVERY == 0:
            _write_cache(cache, signature, done)
    if cache is not None and todo:
        _write_cache(cache, signature, done)
    made = [done[q.query_id] for q in chosen]
    return [item for item in made if item is not None]


def fit(lists: Sequence[HeadList], *, trees: int = DEFAULT_TREES, seed: int = 0,
        prior_weight: float = DEFAULT_PRIOR_WEIGHT) -> Any:
    """LightGBM lambdarank trees over `lists`, boosted from the fused prior. Returns the Booster."""
    lgb = heads._lightgbm()
    if trees < 1:
        raise KvrankError(f"trees must be >= 1, got {trees}", param="trees")
    if not 0.0 <= prior_weight <= 1.0:
        raise KvrankError(f"prior_weight (the prior's fusion weight) must be in [0, 1], got {prior_weight}",
                          param="prior_weight")
    useful = [item for item in lists if len(item.doc_ids) >= 2 and any(item.labels)]
    if not useful:
        raise KvrankError("no training list has a judged-relevant candidate in the first stage's top depth; train "
                          "on more queries or a deeper first stage (a larger depth)", param="depth")
    x = np.vstack([item.features() for item in useful])  # (sum K, 6)
    y = np.concatenate([np.minimum(item.labels, MAX_GRADE) for item in useful])
    init = np.concatenate([heads.prior(item.first, item.lm, prior_weight) for item in useful])
    ranker = lgb.LGBMRanker(objective="lambdarank", n_estimators=trees, learning_rate=0.05, num_leaves=7,
                            min_child_samples=50, subsample=0.8, subsample_freq=1, colsample_bytree=0.8,
                            random_state=seed, deterministic=True, force_row_wise=True, n_jobs=1, verbose=-1,
                            label_gain=LABEL_GAIN)
    ranker.fit(x, y, group=[len(item.doc_ids) for item in useful], init_score=init)
    return ranker.booster_


def rankings(booster: Any, prior_weight: float = DEFAULT_PRIOR_WEIGHT) -> dict[str, Callable[[HeadList], Any]]:
    """The rankings a head is measured against on held-out lists: the first stage's order, the fused prior (the
    zero-shot default) and the head itself."""
    return {"first stage": lambda x: -np.arange(len(x.doc_ids), dtype=float),
            "zero-shot fused": lambda x: heads.prior(x.first, x.lm, prior_weight),
            "head": lambda x: heads.head_scores(booster, prior_weight, x.first, x.dense, x.lm)}


def rank_with(lists: Iterable[HeadList], score: Callable[[HeadList], Sequence[float]]) -> dict[str, list[Any]]:
    """A run (query id -> ScoredDocs, best first) from scoring each list with `score`."""
    from kvrank.types import ScoredDoc

    run = {}
    for item in lists:
        values = np.asarray(score(item), dtype=np.float64)
        order = np.argsort(-values, kind="stable")
        run[item.query_id] = [ScoredDoc(item.query_id, item.doc_ids[i], float(values[i])) for i in order]
    return run


def lists_digest(lists: Sequence[HeadList]) -> str:
    """A content hash of head lists (ids, signals, grades), recorded in the head's card."""
    h = hashlib.blake2b(digest_size=8)
    for item in lists:
        h.update(json.dumps(asdict(item), sort_keys=True).encode())
    return h.hexdigest()


def read_lists(cache: Path) -> list[HeadList]:
    """The lists in a `head_lists` cache file, whatever made them (no signature check: for comparing lists made
    with other settings, e.g. another first stage or KV format)."""
    _, lists = _parse_cache(cache, "make one with `kvrank train --head --out DIR` or benchmarks/head_default.py "
                                   "--out DIR")
    return [item for item in lists.values() if item is not None]


def _read_cache(cache: Path | None, signature: dict[str, Any]) -> dict[str, HeadList | None]:
    if cache is None or not cache.exists():
        return {}
    made_by, lists = _parse_cache(cache, "delete it to recompute the lists")
    if made_by != signature:
        differ = ", ".join(f"{k} {made_by.get(k)!r} != {v!r}" for k, v in signature.items() if made_by.get(k) != v)
        raise KvrankError(f"{cache} holds lists made with other settings ({differ}); pass another cache or delete "
                          "it to recompute", param="cache")
    return lists


def _parse_cache(cache: Path, fix: str) -> tuple[dict[str, Any], dict[str, HeadList | None]]:
    """A cache file's signature and lists by query id (None: a query the first stage found nothing for)."""
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        lists = {qid: HeadList(**item) if item is not None else None for qid, item in data["lists"].items()}
        return data["signature"], lists
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise KvrankError(f"{cache}: not a head-list cache ({err}); {fix}") from None


def _write_cache(cache: Path, signature: dict[str, Any], lists: dict[str, HeadList | None]) -> None:
    body = {qid: asdict(item) if item is not None else None for qid, item in lists.items()}
    atomic_write_text(cache, json.dumps({"signature": signature, "lists": body}) + "\n")
