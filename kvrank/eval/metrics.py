"""Retrieval metrics, computed by ir_measures: nDCG@10 (primary), RR@10, R@100.

For graded qrels (maximum relevance > 1, e.g. TREC DL's 0-3) a document counts as relevant for RR and R
only at relevance >= 2 (ir_measures `rel=2`), the TREC DL passage convention; nDCG uses the graded gains as
they are.
Every query in the qrels is averaged, a query missing from the run scoring 0; pass qrels restricted to the
evaluated queries when evaluating a subset.
"""

from __future__ import annotations

from collections.abc import Iterable

import ir_measures
from ir_measures import RR, Measure, R, nDCG

from kvrank.types import Qrel, Run

primary_metric = "nDCG@10"
METRIC_NAMES = ("nDCG@10", "RR@10", "R@100")


def measures_for(qrels: Iterable[Qrel]) -> dict[str, Measure]:
    """Our metric names -> ir_measures measures, with `rel=2` for RR and R when the qrels are graded."""
    graded = max((q.relevance for q in qrels), default=0) > 1
    if graded:
        return {"nDCG@10": nDCG @ 10, "RR@10": RR(rel=2) @ 10, "R@100": R(rel=2) @ 100}
    return {"nDCG@10": nDCG @ 10, "RR@10": RR @ 10, "R@100": R @ 100}


def evaluate(run: Run, qrels: list[Qrel]) -> dict[str, float]:
    """Mean nDCG@10, RR@10 and R@100 of `run` over the queries in `qrels`."""
    measures = measures_for(qrels)
    docs = [doc for ranked in run.values() for doc in ranked]
    values = ir_measures.calc_aggregate(list(measures.values()), qrels, docs)
    return {name: float(values[measure]) for name, measure in measures.items()}


def per_query(run: Run, qrels: list[Qrel]) -> dict[str, dict[str, float]]:
    """query id -> metric name -> value (for significance tests and per-query inspection)."""
    measures = measures_for(qrels)
    names = {measure: name for name, measure in measures.items()}
    docs = [doc for ranked in run.values() for doc in ranked]
    out: dict[str, dict[str, float]] = {}
    for metric in ir_measures.iter_calc(list(measures.values()), qrels, docs):
        out.setdefault(metric.query_id, {})[names[metric.measure]] = float(metric.value)
    return out
