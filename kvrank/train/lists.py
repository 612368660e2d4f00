"""Training lists: for each training query, its judged positives and hard negatives from the first stage.

Two sources:
- `labelled_lists`: queries with qrels (a BEIR split). Positives are the judged-relevant passages (graded labels
  kept); negatives are first-stage hits that are not judged relevant (hard negatives).
- `pseudo_lists`: no labels at all, from the corpus alone (`kvrank tune`). Recipes:
  - `title`: a passage's title is the query; the positive is the passage without its title, so the query is
    not copied verbatim;
  - `cloze`: inverse cloze; one sentence of the passage is the query, the positive is the passage without it.
  The first stage's other hits for the pseudo-query are the negatives.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from kvrank.errors import KvrankError
from kvrank.retriever.base import Retriever
from kvrank.types import Dataset, Passage, Query

logger = logging.getLogger(__name__)

RECIPES = ("title", "cloze")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")


@dataclass(frozen=True)
class TrainList:
    """One training query with its candidates; `labels[i]` is passage i's graded relevance (0: a negative)."""

    query: Query
    passages: list[Passage]
    labels: list[float]
    source: str = ""


def labelled_lists(dataset: Dataset, first_stage: Retriever, *, negatives: int = 7, depth: int = 30,
                   max_positives: int = 4, queries: Sequence[Query] | None = None, seed: int = 0) -> list[TrainList]:
    """Lists for `queries` (default: every judged query of `dataset`): positives with their grades, then up to
    `negatives` unjudged-or-irrelevant passages from the first stage's top `depth`, in rank order."""
    if not dataset.qrels:
        raise KvrankError(f"{dataset.source or dataset.name} has no qrels to train on; pass a split with "
                          "judgements, or tune without labels (`kvrank tune`)")
    if negatives < 1:
        raise KvrankError(f"negatives must be >= 1, got {negatives}", param="negatives")
    grades = dataset.grades()
    chosen = list(queries) if queries is not None else dataset.sorted_queries()
    run = first_stage.search(chosen, depth)
    rng = random.Random(seed)
    lists, skipped = [], 0
    for query in chosen:
        judged = grades.get(query.query_id, {})
        positives = [d for d, g in sorted(judged.items(), key=lambda x: (-x[1], x[0])) if g > 0
                     and d in dataset.corpus][:max_positives]
        if not positives:
            skipped += 1
            continue
        pool = [d.doc_id for d in run.get(query.query_id, []) if judged.get(d.doc_id, 0) <= 0
                and d.doc_id in dataset.corpus]
        hard = pool[:negatives]
        if not hard:
            skipped += 1
            continue
        docs = positives + hard
        order = list(range(len(docs)))
        rng.shuffle(order)  # no position the model could learn
        lists.append(TrainList(query, [dataset.corpus[docs[i]] for i in order],
                               [float(judged.get(docs[i], 0)) if docs[i] in positives else 0.0 for i in order],
                               dataset.name))
    if not lists:
        raise KvrankError(f"{dataset.source or dataset.name}: none of its {len(chosen)} training queries has a judged "
                          "positive in the corpus and a first-stage negative; check the qrels split")
    if skipped:
        logger.warning("%s: %d of %d training queries have no positive (or no negative) and are left out",
                       dataset.name, skipped, len(chosen))
    return lists


def pseudo_lists(dataset: Dataset, first_stage: Retriever, *, recipe: str = "title", n: int = 200,
                 negatives: int = 7, depth: int = 30, seed: int = 0) -> list[TrainList]:
    """`n` label-free training lists made from `dataset`'s corpus with `recipe` (see the module docstring)."""
    if recipe not in RECIPES:
        raise KvrankError(f"recipe {recipe!r} is not one of {', '.join(RECIPES)}", param="recipe")
    if not dataset.corpus:
        raise KvrankError(f"{dataset.source or dataset.name}: the corpus is empty; nothing to make queries from")
    rng = random.Random(seed)
    ids = sorted(dataset.corpus)
    rng.shuffle(ids)
    made: list[tuple[Query, Passage]] = []
    for doc_id in ids:
        if len(made) >= n:
            break
        pair = _pseudo(dataset.corpus[doc_id], recipe, rng)
        if pair is not None:
            made.append((Query(f"pseudo-{recipe}-{doc_id}", pair[0]), pair[1]))
    if not made:
        raise KvrankError(f"{dataset.name}: no passage suits recipe {recipe!r} (title: titles of 4+ words; cloze: "
                          "passages of 3+ sentences); try the other recipe")
    run = first_stage.search([q for q, _ in made], depth)
    lists = []
    for query, positive in made:
        source = query.query_id.split("-", 2)[2]
        hard = [dataset.corpus[d.doc_id] for d in run.get(query.query_id, []) if d.doc_id != source][:negatives]
        if not hard:
            continue
        docs = [positive, *hard]
        labels = [1.0] + [0.0] * len(hard)
        order = list(range(len(docs)))
        rng.shuffle(order)
        lists.append(TrainList(query, [docs[i] for i in order], [labels[i] for i in order], f"{dataset.name}:{recipe}"))
    return lists


def _pseudo(passage: Passage, recipe: str, rng: random.Random) -> tuple[str, Passage] | None:
    if recipe == "title":
        if len(passage.title.split()) < 4 or len(passage.text.split()) < 20:
            return None
        return passage.title, Passage(passage.doc_id, "", passage.text)
    sentences = [s for s in _SENTENCE.split(passage.text) if s.strip()]
    if len(sentences) < 3:
        return None
    i = rng.randrange(len(sentences))
    if len(sentences[i].split()) < 6:
        return None
    rest = " ".join(sentences[:i] + sentences[i + 1:])
    return sentences[i], Passage(passage.doc_id, passage.title, rest)


def lists_digest(lists: Sequence[TrainList]) -> str:
    """A content hash of training lists (queries, passages, labels): recorded in an adapter's card."""
    h = hashlib.blake2b(digest_size=8)
    for item in lists:
        h.update(f"{item.query.query_id}\x00{item.query.text}\x01".encode())
        for p, label in zip(item.passages, item.labels):
            h.update(f"{p.doc_id}\x00{p.title}\x00{p.text}\x00{label}\x02".encode())
    return h.hexdigest()


def folds(queries: Sequence[Query], k: int, fold: int) -> tuple[list[Query], list[Query]]:
    """Split queries into k folds by a stable hash of their ids: (train, held out) for `fold` (0-based)."""
    if k < 2 or not 0 <= fold < k:
        raise KvrankError(f"fold {fold} of {k} folds: need at least 2 folds and 0 <= fold < {k}", param="fold")
    held = [q for q in queries if int(hashlib.sha256(q.query_id.encode()).hexdigest(), 16) % k == fold]
    kept = {q.query_id for q in held}
    return [q for q in queries if q.query_id not in kept], held
