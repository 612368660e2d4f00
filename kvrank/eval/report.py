"""Rich renderings of an EvalReport: metrics (first stage and final side by side) and per-stage latency."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from kvrank.errors import KvrankError
from kvrank.eval.significance import mark

if TYPE_CHECKING:
    from kvrank.eval.compare import Comparison
    from kvrank.eval.runner import EvalReport


def report_tables(report: EvalReport) -> list[RenderableType]:
    """A heading line, the metrics table (first stage and final side by side) and the latency table."""
    reranked = bool(report.settings.get("rerank"))
    heading = (f"[bold]{escape(report.dataset)}[/bold]: {report.queries} queries, "
               f"first stage {escape(report.retriever)}")
    if reranked:
        mode, depth = report.settings.get("rerank_mode"), report.settings.get("rerank_depth")
        heading += f", reranked ({escape(str(mode))}, top {depth})"
        ranker = (report.extra or {}).get("reranker", {})
        if ranker.get("head"):
            heading += f", ranked by scoring head {escape(str(ranker['head']))}"
        elif ranker.get("fusion_weight") is not None:
            heading += f", fused with the first stage (weight {ranker['fusion_weight']})"
    p_values = (report.significance or {}).get("p_values", {})
    metrics = Table()
    metrics.add_column("metric")
    metrics.add_column("first stage", justify="right")
    metrics.add_column("final", justify="right")
    if p_values:
        metrics.add_column("p", justify="right")
    for name in report.metrics:
        first, final = report.first_stage_metrics[name], report.metrics[name]
        delta = f" ({final - first:+.4f}){mark(p_values.get(name))}" if reranked else ""
        p = p_values.get(name)
        metrics.add_row(name, f"{first:.4f}", f"{final:.4f}{delta}",
                        *([f"{p:.4f}" if p is not None else "-"] if p_values else []))
    warmup = report.settings.get("warmup_queries", 1)
    latency = Table()
    for column in ("stage", "p50 ms", "p95 ms", "n"):
        latency.add_column(column, justify="left" if column == "stage" else "right")
    for stage, stats in report.latency_ms.items():
        latency.add_row(stage, f"{stats['p50']:.2f}", f"{stats['p95']:.2f}", str(int(stats.get("n", 0))))
    note = f"latency per query after {warmup} warm-up quer{'y' if warmup == 1 else 'ies'}"
    out: list[RenderableType] = [Text.from_markup(heading), metrics]
    level = report.settings.get("rel_level")
    if level is not None:
        out.append(Text(f"binary measures (RR, R, P, AP) count relevance >= {level}: "
                        f"{report.settings.get('rel_level_basis', 'level recorded in the report')}; nDCG uses the "
                        "graded gains"))
    deep = _beyond_depth(report)
    if deep:
        out.append(Text(f"{', '.join(deep)}: computed over the run's depth (at most k={report.settings['k']} "
                        "documents per query), not over a deeper ranking"))
    if p_values:
        out.append(Text(f"p: final vs first stage, {(report.significance or {}).get('test')}; \u2020 p < 0.05"))
    out += [Text(note), latency]
    cache = report.extra.get("kv_cache")
    if cache:
        out.append(Text(f"passage KV: {cache['hits']} hits, {cache['misses']} misses (hit rate "
                        f"{cache['hit_rate']:.1%}), {report.extra.get('prefills', 0)} passages prefilled, "
                        f"{cache['entries']} entries / {cache['bytes'] / 2**20:.1f} MiB in the store"))
    return out


def _beyond_depth(report: EvalReport) -> list[str]:
    """Metrics whose cut-off exceeds the run's depth `k` (e.g. AP@1000 of a 100-deep run)."""
    from kvrank.eval.metrics import parse_metric

    k = report.settings.get("k")
    if not isinstance(k, int):
        return []
    out = []
    for name in report.metrics:
        try:
            cutoff = parse_metric(name).params.get("cutoff")
        except KvrankError:  # a name this version does not know: no note
            continue
        if isinstance(cutoff, int) and cutoff > k:
            out.append(name)
    return out


def comparison_table(rows: Sequence[Comparison]) -> list[RenderableType]:
    """Pairwise comparisons of reports (`kvrank report A.json B.json ...`): means over the shared queries, the raw
    and the Holm-corrected p-values, a dagger where the corrected p < 0.05. Reports are numbered in the table,
    with a legend above it (file names would squeeze the numbers)."""
    from kvrank.eval.significance import TEST_NAME

    numbers: dict[str, int] = {}
    for row in rows:
        for label in (row.a, row.b):
            numbers.setdefault(label, len(numbers) + 1)
    legend = Text("\n".join(f"#{n}: {label}" for label, n in numbers.items()))
    table = Table()
    for column in ("A", "B", "metric", "queries", "A mean", "B mean", "B - A", "p", "p (Holm)"):
        table.add_column(column, justify="left" if column in ("A", "B", "metric") else "right", no_wrap=True)
    for row in rows:
        table.add_row(f"#{numbers[row.a]}", f"#{numbers[row.b]}", row.metric, str(row.queries),
                      f"{row.mean_a:.4f}", f"{row.mean_b:.4f}", f"{row.mean_b - row.mean_a:+.4f}",
                      f"{row.p_value:.4f}", f"{row.p_holm:.4f}{mark(row.p_holm)}")
    note = Text(f"final rankings compared over the queries both reports evaluated; {TEST_NAME}; p-values "
                "Holm-Bonferroni corrected over the pairs of each metric; \u2020 corrected p < 0.05")
    return [legend, table, note]
