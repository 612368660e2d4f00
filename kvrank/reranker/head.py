"""A scoring head: a small learned ranker over the signals a rerank already has.

The head replaces rerank fusion in the mode it was trained for (`ql` or `attn`). Per candidate it reads three
signals:
- `first`: the first stage's score;
- `dense`: the cosine of query and passage under the default embedder (all-MiniLM-L6-v2);
- `lm`: the reranker's zero-shot score in the head's mode, from stored passage KV (`ql`: query likelihood;
  `attn`: calibrated attention mass).
Each signal enters as its per-query z-score and its rank / K, so the head sees the shape of one query's list, not
a collection's score scale. The head's score is the fused prior, (1 - w) z(lm) + w z(first), plus a few
LightGBM lambdarank trees fitted on top of it (`kvrank train --head`). Starting from the prior keeps a head trained
on other collections close to what fusion already does; the trees only nudge.

Nothing on the passage side changes: a head reads scores, so stores, keys and KV formats stay as they are.

A head is a folder: `head.txt` (LightGBM's text model) and `head.json` (its card: the base model, mode and template
whose scores it was trained on, the kind of first stage its lists came from, the data, the measured results).
Loading checks the card against the reranker and refuses a mismatch by name. `auto` picks the heads shipped in the
package for the base model, one per mode: the one trained on the pipeline's kind of first stage where there is one
(a BM25 score and a reciprocal-rank-fusion score rank alike but are shaped differently, and the trees read shape).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvrank.errors import KvrankError
from kvrank.io import atomic_write_text

logger = logging.getLogger(__name__)

MODEL_FILE = "head.txt"
CARD_FILE = "head.json"
CARD_FORMAT = "kvrank-head/1"
SIGNALS = ("first", "dense", "lm")  # the per-candidate inputs, in feature order
AUTO = "auto"
NONE = "none"
PACKAGED = Path(__file__).parent / "heads"  # heads shipped with kvrank, one folder each
# The kinds of first stage a head's lists can come from (`run`: a TREC run file), and for each the order in which
# `auto` prefers heads trained on the kinds: its own first, then the most alike.
FIRST_STAGE_PREFERENCE = {"bm25": ("bm25", "run", "hybrid", "dense"), "run": ("run", "bm25", "hybrid", "dense"),
                          "hybrid": ("hybrid", "dense", "bm25", "run"), "dense": ("dense", "hybrid", "bm25", "run")}


@dataclass(frozen=True)
class HeadCard:
    """What a head is for and how it was made. `digest` hashes the model file (set when saved)."""

    base_fingerprint: str
    base_model: str
    mode: str
    template: str
    dense_model: str  # the embedder whose cosines the `dense` signal holds
    prior_weight: float  # the first stage's share in the fused prior the trees start from
    trees: int
    seed: int = 0
    first_stage: str = "bm25"  # the kind of first stage the training lists came from (FIRST_STAGE_PREFERENCE)
    training: dict[str, Any] = field(default_factory=dict)  # data, first stage, depth, lists and their digests
    metrics: dict[str, Any] = field(default_factory=dict)  # what it reached on data it did not train on
    kvrank_version: str = ""
    digest: str = ""
    format: str = CARD_FORMAT

    def check(self, *, mode: str, template: str, fingerprint: str, adapter: str | None, where: str) -> None:
        """Refuse a reranker whose scores this head was not trained on (one line naming both)."""
        if self.mode != mode:
            raise KvrankError(f"{where} was trained on {self.mode!r} scores, not {mode!r}; pass mode={self.mode!r} "
                              "or head='none'", param="head")
        if self.template != template:
            raise KvrankError(f"{where} was trained with template {self.template!r}, not {template!r}; use that "
                              "template or head='none'", param="head")
        if self.base_fingerprint != fingerprint:
            raise KvrankError(f"{where} was trained on base model {self.base_model!r} (fingerprint "
                              f"{self.base_fingerprint}), not this one ({fingerprint}); pass "
                              f"model={self.base_model!r} or head='none'", param="head")
        if adapter is not None:
            raise KvrankError(f"{where} was trained on the base model's scores, and an adapter ({adapter}) changes "
                              "them; pass head='none' with an adapter", param="head")


class ScoringHead:
    """A loaded head: `score(first, dense, lm)` for one query's candidates."""

    def __init__(self, card: HeadCard, booster: Any, path: Path | None = None) -> None:
        self.card = card
        self.booster = booster
        self.path = path

    @property
    def digest(self) -> str:
        return self.card.digest

    def score(self, first: Sequence[float], dense: Sequence[float], lm: Sequence[float]) -> np.ndarray:
        """Scores for one query's K candidates (higher is better), given each signal in candidate order."""
        return head_scores(self.booster, self.card.prior_weight, first, dense, lm)


def head_scores(booster: Any, prior_weight: float, first: Sequence[float], dense: Sequence[float],
                lm: Sequence[float]) -> np.ndarray:
    """The fused prior plus `booster`'s trees, for one query's candidates."""
    base = prior(first, lm, prior_weight)
    if len(base) < 2:
        return base
    return base + booster.predict(features(first, dense, lm), num_threads=1)  # ~K rows: no thread pool


def zscore(values: Sequence[float]) -> np.ndarray:
    """Per-query z-scores (population std, as rerank fusion uses); a constant list is all zeros."""
    x = np.asarray(values, dtype=np.float64)
    std = x.std() if len(x) else 0.0
    return (x - x.mean()) / std if std > 0 else np.zeros_like(x)


def ranks(values: Sequence[float]) -> np.ndarray:
    """1-based rank of each value (best = highest = 1; ties keep candidate order) divided by K."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(-x, kind="stable")
    out = np.empty(len(x))
    out[order] = np.arange(1, len(x) + 1)
    return out / max(1, len(x))


def features(first: Sequence[float], dense: Sequence[float], lm: Sequence[float]) -> np.ndarray:
    """(K, 6): z-score and rank / K of each signal in `SIGNALS` order."""
    if not len(first) == len(dense) == len(lm):
        raise ValueError(f"one value per candidate for each signal, got {len(first)}, {len(dense)}, {len(lm)}")
    return np.column_stack([f(s) for s in (first, dense, lm) for f in (zscore, ranks)])


def prior(first: Sequence[float], lm: Sequence[float], weight: float) -> np.ndarray:
    """The fused ranking the trees start from: (1 - weight) z(lm) + weight z(first)."""
    return (1.0 - weight) * zscore(lm) + weight * zscore(first)


class PassageVectors:
    """Unit-length passage embeddings for the `dense` signal, by doc id. Read from the first stage's dense index
    when it was built with the head's encoder (a hybrid or dense first stage: nothing is encoded), else encoded on
    first use and kept, most recent `capacity` (a passage reranked again, like its stored KV, costs nothing)."""

    def __init__(self, encoder: Any, contents: Callable[[str], str], first_stage: Any = None,
                 capacity: int = 50_000) -> None:
        self.encoder = encoder
        self.contents = contents
        self.capacity = capacity
        self._kept: OrderedDict[str, np.ndarray] = OrderedDict()
        dense: Any = first_stage if hasattr(first_stage, "index") else getattr(first_stage, "dense", None)
        same = getattr(getattr(dense, "encoder", None), "fingerprint", None) == encoder.fingerprint
        self._index: Any = dense.index if same else None
        self._rows = {d: i for i, d in enumerate(dense.doc_ids)} if same else {}

    def get(self, doc_ids: Sequence[str]) -> np.ndarray:
        """(K, dim) embeddings of `doc_ids`, in order."""
        missing = [d for d in dict.fromkeys(doc_ids) if d not in self._kept and d not in self._rows]
        if missing:
            for doc_id, vector in zip(missing, self.encoder.encode([self.contents(d) for d in missing])):
                self._kept[doc_id] = vector
        out = []
        for doc_id in doc_ids:
            if doc_id in self._rows:
                out.append(self._index.reconstruct(self._rows[doc_id]))
            else:
                self._kept.move_to_end(doc_id)
                out.append(self._kept[doc_id])
        while len(self._kept) > self.capacity:  # after the lookup: never evicts what this call needs
            self._kept.popitem(last=False)
        return np.stack(out)


# ------------------------------------------------------------------------------------------------ files
def read_card(folder: str | Path, where: str = "head") -> HeadCard:
    """The card of the head in `folder` (no model is read)."""
    path = Path(folder).expanduser()
    if not (path / CARD_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise KvrankError(f"{where} {folder}: not a head folder (needs {CARD_FILE} and {MODEL_FILE}); make one "
                          "with `kvrank train --head`, or pass head='auto' or head='none'", param="head")
    try:
        data = json.loads((path / CARD_FILE).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        if data.get("format") != CARD_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {CARD_FORMAT!r}")
        data.setdefault("first_stage", _first_stage_of(data.get("training")))
        if data["first_stage"] not in FIRST_STAGE_PREFERENCE:
            raise ValueError(f"first_stage {data['first_stage']!r} is not one of "
                             f"{', '.join(FIRST_STAGE_PREFERENCE)}")
        return HeadCard(**data)
    except (ValueError, TypeError, KeyError) as err:  # UnicodeDecodeError is a ValueError
        raise KvrankError(f"{where} {folder}: {CARD_FILE} is not a kvrank head card ({err})", param="head") from None


def _first_stage_of(training: Any) -> str:
    """The kind of first stage a card written before cards named it was trained on, from its training record."""
    named = training.get("first_stage") if isinstance(training, dict) else None
    if named in FIRST_STAGE_PREFERENCE:
        return str(named)
    return "run" if named else "bm25"  # `kvrank train --head --candidates` recorded "candidates"


def load(folder: str | Path, where: str = "head") -> ScoringHead:
    """Read the head in `folder` and check its model file against the card's digest."""
    lgb = _lightgbm()
    card = read_card(folder, where)
    path = Path(folder).expanduser()
    try:
        text = (path / MODEL_FILE).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        text = ""
    if (card.digest and _digest(text) != card.digest) or not text:
        raise KvrankError(f"{where} {folder}: {MODEL_FILE} does not match the digest in {CARD_FILE} (a partial "
                          "copy?); copy the head folder again", param="head")
    try:
        booster = lgb.Booster(model_str=text)
    except lgb.basic.LightGBMError as err:
        raise KvrankError(f"{where} {folder}: {MODEL_FILE} is not a LightGBM model ({err}); make the head again "
                          "with `kvrank train --head`", param="head") from None
    return ScoringHead(card, booster, path)


def save(folder: str | Path, booster: Any, card: HeadCard) -> HeadCard:
    """Write `booster` and `card` (with the model's digest) into `folder`, model first, each atomically."""
    from kvrank import __version__

    path = Path(folder).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    text = booster.model_to_string()
    card = HeadCard(**{**asdict(card), "digest": _digest(text), "kvrank_version": __version__})
    atomic_write_text(path / MODEL_FILE, text)
    atomic_write_text(path / CARD_FILE, json.dumps(asdict(card), indent=2, sort_keys=True) + "\n")
    return card


def packaged(fingerprint: str, template: str, first_stage: str = "bm25") -> dict[str, Path]:
    """The shipped heads for this base model and template, by mode: per mode, the one trained on the kind of
    `first_stage` most like this one (FIRST_STAGE_PREFERENCE)."""
    order = FIRST_STAGE_PREFERENCE.get(first_stage, FIRST_STAGE_PREFERENCE["bm25"])
    found: dict[str, tuple[int, Path]] = {}
    for card_path in sorted(PACKAGED.glob(f"*/{CARD_FILE}")):
        card = read_card(card_path.parent, where="packaged head")
        if (card.base_fingerprint, card.template) != (fingerprint, template):
            continue
        rank = order.index(card.first_stage)  # read_card refuses a kind outside the table
        if card.mode not in found or rank < found[card.mode][0]:
            found[card.mode] = (rank, card_path.parent)
    return {mode: path for mode, (_, path) in found.items()}


def resolve(head: str | Path | None, *, fingerprint: str, mode: str, template: str, adapter: str | None,
            first_stage: str = "bm25") -> dict[str, ScoringHead]:
    """The heads a pipeline uses, by mode: `auto` (the shipped heads for the model, template and kind of first
    stage, when no adapter is attached), `none`/None (no head), or a folder (checked against the reranker's
    `mode`; a mismatch is refused; a head trained on another kind of first stage is used, with a warning)."""
    if head is None or str(head) == NONE:
        return {}
    if str(head) == AUTO:
        if adapter is not None:
            return {}
        found = packaged(fingerprint, template, first_stage)
        if found:
            logger.info("using the shipped scoring heads %s", ", ".join(p.name for p in found.values()))
        return {m: load(path, where="packaged head") for m, path in found.items()}
    card = read_card(head)
    card.check(mode=mode, template=template, fingerprint=fingerprint, adapter=adapter, where=f"head {head}")
    # no warning between bm25 and run: a run file is most often a BM25 run
    if {card.first_stage, first_stage} - {"bm25", "run"} and card.first_stage != first_stage:
        logger.warning("head %s was trained on %s lists and ranks a %s first stage here; its trees read the shape "
                       "of first-stage scores, so it may rank worse than on its own kind", head, card.first_stage,
                       first_stage)
    return {card.mode: load(head)}


def check_option(head: str | Path | None) -> None:
    """Refuse a `head` value that is neither auto, none nor a head folder, before any model work."""
    if head is None or str(head) in (AUTO, NONE):
        return
    read_card(head)


def _lightgbm() -> Any:
    try:
        import lightgbm
    except ImportError as err:  # a core dependency; a broken install says how to mend it
        raise KvrankError("scoring heads need lightgbm: pip install 'lightgbm>=4.5', or pass head='none'",
                          param="head") from err
    return lightgbm


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
