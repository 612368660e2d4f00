"""Retrieval metrics, computed by ir_measures: any ir_measures measure string; nDCG@10 (primary), RR@10, R@100 by
default.

Binary measures (RR, R, P, AP, ...; every measure with an ir_measures `rel` parameter) count a document as relevant
at relevance >= `rel_level`: the collection's convention (`kvrank.eval.conventions`), e.g. 2 on TREC DL passage,
1 on BEIR. A level the measure string sets itself (`R(rel=3)@100`) is kept. nDCG uses the graded gains as they are.
Cut-offs beyond the run's depth see only the run: AP@1000 of a 100-deep run is AP over those 100 documents.
Every query in the qrels is averaged, a query missing from the run scoring 0; pass qrels restricted to the
evaluated queries when evaluating a subset.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import ir_measures
from ir_measures import Measure

from kvrank.errors import KvrankError
from kvrank.types import Qrel, Run

primary_metric = "nDCG@10"
DEFAULT_METRICS: tuple[str, ...] = ("nDCG@10", "RR@10", "R@100")
METRIC_NAMES = DEFAULT_METRICS  # the default table (older name)
TREC_DL_METRICS: tuple[str, ...] = (*DEFAULT_METRICS, "AP@1000")  # the track reports MAP over 1000 hits

# Split a `metrics` string on whitespace, and on commas outside parentheses (`P(rel=2,judged_only=True)@10`).
_SEPARATOR = re.compile(r"\s+|,(?![^()]*\))")


def parse_metric(text: str, where: str = "metrics") -> Measure:
    """One ir_measures measure from its string (`AP@1000`, `R(rel=2)@100`) or its trec_eval name (`map`,
    `ndcg_cut.10`), with an error naming the bad string (and `where` it was given: an argument's name, which is
    the error's `param`, or a place in a file)."""
    param = where if where.isidentifier() else None
    text = text.strip()
    try:
        parsed = [ir_measures.parse_measure(text)]
    except (NameError, ValueError, SyntaxError, TypeError):
        try:
            parsed = ir_measures.parse_trec_measure(text)
        except (NameError, ValueError, SyntaxError, TypeError, KeyError):
            parsed = []
    if len(parsed) == 1:
        try:
            parsed[0].validate_params()  # e.g. nDCG(foo=1)@10, nDCG@1.5
        except AssertionError as error:
            raise KvrankError(f"{where}: {text!r} has a bad parameter ({error}); see the measure's parameters at "
                              "https://ir-measur.es/en/latest/measures.html", param=param) from None
        return parsed[0]
    raise KvrankError(f"{where}: {text!r} is not an ir_measures measure; write measures such as nDCG@10, "
                      "RR@10, R@100, AP@1000, P@10, R(rel=2)@100 (see https://ir-measur.es/en/latest/measures.html)",
                      param=param)


def parse_metrics(texts: str | Iterable[str], where: str = "metrics") -> tuple[str, ...]:
    """Canonical measure names (`str(measure)`) of one or more `metrics` strings, each holding one or more
    measures separated by spaces or commas; duplicates dropped, order kept."""
    items = [texts] if isinstance(texts, str) else list(texts)
    names: list[str] = []
    for item in items:
        for token in _SEPARATOR.split(item):
            if token.strip():
                name = str(parse_metric(token, where))
                if name not in names:
                    names.append(name)
    if not names:
        raise KvrankError(f"{where} is empty; pass measure strings such as 'nDCG@10 RR@10 R@100'",
                          param=where if where.isidentifier() else None)
    return tuple(names)


def measures_for(metrics: Sequence[str] = DEFAULT_METRICS, rel_level: int = 1) -> dict[str, Measure]:
    """Metric name -> ir_measures measure, binary measures counting relevance >= `rel_level` unless the name sets
    its own `rel`."""
    if rel_level < 1:
        raise KvrankError(f"rel_level must be >= 1 (the lowest relevance grade that counts as relevant), "
                          f"got {rel_level}", param="rel_level")
    out: dict[str, Measure] = {}
    for name in metrics:
        measure = parse_metric(name)
        if "rel" in measure.SUPPORTED_PARAMS and "rel" not in measure.params:
            measure = measure(rel=rel_level)
        out[name] = measure
    return out


def evaluate(run: Run, qrels: list[Qrel], metrics: Sequence[str] = DEFAULT_METRICS,
             rel_level: int = 1) -> dict[str, float]:
    """Mean of each metric of `run` over the queries in `qrels` (relevance >= `rel_level` counts for binary
    measures: pass the collection's, `conventions.convention_for(dataset).rel_level`)."""
    measures = measures_for(metrics, rel_level)
    docs = [doc for ranked in run.values() for doc in ranked]
    values = ir_measures.calc_aggregate(set(measures.values()), qrels, docs)
    return {name: float(values[measure]) for name, measure in measures.items()}


def per_query(run: Run, qrels: list[Qrel], metrics: Sequence[str] = DEFAULT_METRICS,
              rel_level: int = 1) -> dict[str, dict[str, float]]:
    """query id -> metric name -> value (for significance tests and per-query inspection). Queries that
    ir_measures yields nothing for (not in the run) are absent: their value is 0."""
    measures = measures_for(metrics, rel_level)
    names: dict[Measure, list[str]] = {}
    for name, measure in measures.items():  # two names may spell one measure (`AP@1000`, `AP(rel=2)@1000`)
        names.setdefault(measure, []).append(name)
    docs = [doc for ranked in run.values() for doc in ranked]
    out: dict[str, dict[str, float]] = {}
    for metric in ir_measures.iter_calc(list(names), qrels, docs):
        for name in names[metric.measure]:
            out.setdefault(metric.query_id, {})[name] = float(metric.value)
    return {qid: {name: values.get(name, 0.0) for name in measures} for qid, values in out.items()}
