"""Pairwise comparison of eval reports (`kvrank report A.json B.json ...`): for every pair of reports and every
metric both carry, the paired randomization test of their final rankings over the queries both evaluated, the
p-values Holm-Bonferroni corrected within each metric (the family is the pairs compared on that metric)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING

from kvrank.errors import KvrankError
from kvrank.eval.significance import holm, paired_tests

if TYPE_CHECKING:
    from kvrank.eval.runner import EvalReport


@dataclass(frozen=True)
class Comparison:
    """Report `b` against report `a` on one metric, over the `queries` both evaluated."""

    a: str
    b: str
    metric: str
    queries: int
    mean_a: float
    mean_b: float
    p_value: float
    p_holm: float


def compare_reports(reports: Sequence[tuple[str, EvalReport]]) -> list[Comparison]:
    """Every pair (in the given order) of labelled reports, on every metric all of them carry per query."""
    if len(reports) < 2:
        raise KvrankError("comparing needs at least two reports; pass two or more reports written by "
                          "`EvalReport.write_json` (`kvrank eval --json`)")
    _check_comparable(reports)
    metrics = _shared_metrics(reports)
    rows: list[Comparison] = []
    for (label_a, a), (label_b, b) in combinations(reports, 2):
        first, second = _final_values(a), _final_values(b)
        shared = sorted(first.keys() & second.keys())
        if not shared:
            raise KvrankError(f"{label_a} and {label_b} share no queries; compare reports of the same test queries")
        p_values = paired_tests(first, second, metrics)
        for metric in metrics:
            rows.append(Comparison(label_a, label_b, metric, len(shared),
                                   sum(first[q][metric] for q in shared) / len(shared),
                                   sum(second[q][metric] for q in shared) / len(shared),
                                   p_values[metric], p_values[metric]))
    adjusted: list[Comparison] = []
    for metric in metrics:
        family = [row for row in rows if row.metric == metric]
        for row, p in zip(family, holm([row.p_value for row in family]), strict=True):
            adjusted.append(Comparison(row.a, row.b, row.metric, row.queries, row.mean_a, row.mean_b,
                                       row.p_value, p))
    return adjusted


def _check_comparable(reports: Sequence[tuple[str, EvalReport]]) -> None:
    label0, report0 = reports[0]
    for label, report in reports:
        if not report.per_query:
            raise KvrankError(f"{label} has no per-query values; re-run its evaluation with this version "
                              "(reports written before per-query values cannot be tested)")
        if report.dataset != report0.dataset:
            raise KvrankError(f"{label} is for dataset {report.dataset!r} but {label0} is for {report0.dataset!r}; "
                              "compare reports of the same collection")
        level, level0 = report.settings.get("rel_level"), report0.settings.get("rel_level")
        if level is not None and level0 is not None and level != level0:
            raise KvrankError(f"{label} counts relevance >= {level} but {label0} counts >= {level0}; binary "
                              "measures are not comparable: re-run one of them with the other's rel_level")


def _final_values(report: EvalReport) -> dict[str, dict[str, float]]:
    return {qid: entry.get("final", {}) for qid, entry in report.per_query.items()}


def _shared_metrics(reports: Sequence[tuple[str, EvalReport]]) -> list[str]:
    """Metrics every report carries for every query, in the first report's order."""
    shared: list[str] | None = None
    for _, report in reports:
        names = set.intersection(*(set(entry.get("final", {})) for entry in report.per_query.values()))
        shared = [m for m in (shared if shared is not None else list(report.metrics)) if m in names]
    if not shared:
        raise KvrankError("the reports carry no metric in common; re-run them with the same metrics")
    return shared
