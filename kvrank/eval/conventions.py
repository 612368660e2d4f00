"""Each collection's evaluation convention: the lowest relevance grade that binary measures (RR, R, P, AP) count as
relevant, and the default metrics table.

Where a level comes from, in order:
1. the `rel_level` argument of `resolve` (`kvrank eval --rel-level N`);
2. the folder's `collection.json` (`{"rel_level": 2, "metrics": ["nDCG@10", ...], "convention": "why"}`; only
   `rel_level` is required);
3. the registry below: known BEIR folder names and ir_datasets ids;
4. otherwise 1, the default of trec_eval, ir_measures and BEIR's evaluator (any positive judgement counts),
   said so in the basis, with a warning when the qrels are graded.

Conventions, from the collections' own documentation:
- TREC DL passage (2019-2023): judged 0-3 where 1 means "related, does not answer"; NIST evaluates binary measures
  with `trec_eval -l 2`. Level 2; the track reports MAP, so AP@1000 joins the default table.
- TREC DL document: judged 0-3 where 1 means "relevant"; NIST counts levels 1-3 as relevant. Level 1, AP@1000.
- BEIR: its evaluator (pytrec_eval, default level) and pyserini's BEIR runs count relevance >= 1, on graded sets
  (NFCorpus, TREC-COVID 0-2) too. Level 1.
- Cranfield and CISI (binary qrels): level 1, the only level that selects anything.
- The embedded demo (`kvrank demo`): judged 0-2, 2 answers the query and 1 is on its topic; level 1.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from kvrank.errors import KvrankError
from kvrank.eval.metrics import DEFAULT_METRICS, TREC_DL_METRICS, parse_metrics
from kvrank.types import Dataset

logger = logging.getLogger(__name__)

METADATA_FILE = "collection.json"
DEFAULT_LEVEL = 1


@dataclass(frozen=True)
class Convention:
    """How a collection is scored: `rel_level` for binary measures, the default `metrics`, and `basis`, a short
    line saying where the level comes from (printed with the table, written to the eval JSON)."""

    rel_level: int
    basis: str
    metrics: tuple[str, ...] = DEFAULT_METRICS


TREC_DL_PASSAGE = Convention(2, "TREC DL passage convention (NIST: trec_eval -l 2)", TREC_DL_METRICS)
TREC_DL_DOCUMENT = Convention(1, "TREC DL document convention (NIST: grades 1-3 are relevant)", TREC_DL_METRICS)
BEIR = Convention(1, "BEIR convention (relevance >= 1, as BEIR's evaluator and pyserini)")
BINARY = Convention(1, "binary qrels (relevance 1)")
DEMO = Convention(1, "kvrank demo convention (2 answers the query, 1 is on its topic; both count)")

# BEIR folder names (as BEIR's zips unpack), TREC DL names and other collections' folder names.
FOLDERS: dict[str, Convention] = {
    **dict.fromkeys(
        ("scifact", "nfcorpus", "trec-covid", "fiqa", "arguana", "webis-touche2020", "quora", "scidocs",
         "climate-fever", "dbpedia-entity", "fever", "hotpotqa", "nq", "msmarco", "cqadupstack", "bioasq",
         "signal1m", "trec-news", "robust04"), BEIR),
    **dict.fromkeys(("trec-dl-2019", "trec-dl-2020", "dl19-passage", "dl20-passage", "trec-dl-hard"),
                    TREC_DL_PASSAGE),
    **dict.fromkeys(("dl19-doc", "dl20-doc"), TREC_DL_DOCUMENT),
    "cranfield": BINARY,
    "cisi": BINARY,
}

# ir_datasets ids without the `beir/` namespace (every `beir/...` id is BEIR's convention).
IR_DATASETS: dict[str, Convention] = {
    **dict.fromkeys(
        (f"msmarco-passage/trec-dl-{year}{judged}" for year in (2019, 2020) for judged in ("", "/judged")),
        TREC_DL_PASSAGE),
    **dict.fromkeys(
        (f"msmarco-passage-v2/trec-dl-{year}{judged}" for year in (2021, 2022, 2023) for judged in ("", "/judged")),
        TREC_DL_PASSAGE),
    "msmarco-passage/trec-dl-hard": TREC_DL_PASSAGE,
    **dict.fromkeys(
        (f"msmarco-document/trec-dl-{year}{judged}" for year in (2019, 2020) for judged in ("", "/judged")),
        TREC_DL_DOCUMENT),
    **dict.fromkeys(
        (f"msmarco-document-v2/trec-dl-{year}{judged}" for year in (2019, 2020, 2021, 2022, 2023)
         for judged in ("", "/judged")), TREC_DL_DOCUMENT),
    "msmarco-document/trec-dl-hard": TREC_DL_DOCUMENT,
}


def convention_for(dataset: Dataset, warn: bool = True) -> Convention:
    """The convention of `dataset`, from its folder's `collection.json`, the registry, or the default (with a
    warning, unless `warn` is False, when the qrels are graded)."""
    source = dataset.source or dataset.name
    folder = Path(source).expanduser()
    if folder.is_dir():
        declared = read_metadata(folder)
        if declared is not None:
            return declared
        known = FOLDERS.get(folder.name)
    elif source == "kvrank.demo":  # the embedded demo collection (kvrank.demo.demo_dataset)
        known = DEMO
    else:
        known = BEIR if source.startswith("beir/") else IR_DATASETS.get(source)
    if known is not None:
        return known
    top = max((q.relevance for q in dataset.qrels), default=0)
    if top > 1:
        if warn:
            logger.warning("%s: unknown collection with graded qrels (0-%d); binary measures count relevance >= "
                           "%d. Set rel_level, or declare it in %s", source, top, DEFAULT_LEVEL, METADATA_FILE)
        return Convention(DEFAULT_LEVEL, f"default for an unknown collection (graded 0-{top}: set rel_level or "
                                         f"{METADATA_FILE})")
    return Convention(DEFAULT_LEVEL, "default for an unknown collection")


def resolve(dataset: Dataset, rel_level: int | None = None, metrics: tuple[str, ...] | None = None) -> Convention:
    """The collection's convention with the caller's `rel_level` and `metrics` applied over it."""
    base = convention_for(dataset, warn=rel_level is None)
    if rel_level is not None:
        if rel_level < 1:
            raise KvrankError(f"rel_level must be >= 1 (the lowest grade that counts as relevant), got {rel_level}",
                              param="rel_level")
        base = Convention(rel_level, f"rel_level {rel_level} (the collection's own: {base.rel_level})",
                          base.metrics)
    if metrics is not None:
        base = Convention(base.rel_level, base.basis, metrics)
    return base


def read_metadata(folder: Path) -> Convention | None:
    """The convention a folder declares in `collection.json`, or None when it has none."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KvrankError(f"{path} is not valid JSON ({error}); write e.g. {{\"rel_level\": 2}}") from None
    level = data.get("rel_level") if isinstance(data, dict) else None
    if not isinstance(level, int) or isinstance(level, bool) or level < 1:
        raise KvrankError(f"{path}: \"rel_level\" must be an integer >= 1 (the lowest relevance grade that counts "
                          f"as relevant), got {level!r}; write e.g. {{\"rel_level\": 2}}")
    metrics = data.get("metrics")
    if metrics is not None and (not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics)):
        raise KvrankError(f"{path}: \"metrics\" must be a list of ir_measures strings, got {metrics!r}")
    note = data.get("convention")
    basis = f"{METADATA_FILE}" + (f": {note}" if isinstance(note, str) and note else "")
    return Convention(level, basis, parse_metrics(metrics, f"{path} \"metrics\"") if metrics else DEFAULT_METRICS)
