"""Rich renderings of an EvalReport: metrics (first stage and final side by side) and per-stage latency."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from kvrank.eval.metrics import METRIC_NAMES

if TYPE_CHECKING:
    from kvrank.eval.pipeline import EvalReport


def report_tables(report: EvalReport) -> list[Table]:
    reranked = bool(report.settings.get("rerank"))
    title = f"{escape(report.dataset)}: {report.queries} queries, first stage {escape(report.retriever)}" + (
        f", reranked ({escape(str(report.settings.get('rerank_mode')))}, depth "
        f"{report.settings.get('rerank_depth')})"
        if reranked
        else ""
    )
    metrics = Table(title=title, title_justify="left")
    metrics.add_column("metric")
    metrics.add_column("first stage", justify="right")
    metrics.add_column("final", justify="right")
    for name in METRIC_NAMES:
        first, final = report.first_stage_metrics[name], report.metrics[name]
        delta = f" ({final - first:+.4f})" if reranked else ""
        metrics.add_row(name, f"{first:.4f}", f"{final:.4f}{delta}")
    warmup = report.settings.get("warmup_queries", 1)
    latency = Table(
        title=f"latency per query in ms (after {warmup} warm-up quer{'y' if warmup == 1 else 'ies'})",
        title_justify="left",
    )
    for column in ("stage", "p50", "p95", "n"):
        latency.add_column(column, justify="left" if column == "stage" else "right")
    for stage, stats in report.latency_ms.items():
        latency.add_row(stage, f"{stats['p50']:.2f}", f"{stats['p95']:.2f}", str(int(stats.get("n", 0))))
    return [metrics, latency]
