"""Rich renderings of an EvalReport: metrics (first stage and final side by side) and per-stage latency."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from kvrank.eval.metrics import METRIC_NAMES

if TYPE_CHECKING:
    from kvrank.eval.runner import EvalReport


def report_tables(report: EvalReport) -> list[RenderableType]:
    """A heading line, the metrics table (first stage and final side by side) and the latency table."""
    reranked = bool(report.settings.get("rerank"))
    heading = (f"[bold]{escape(report.dataset)}[/bold]: {report.queries} queries, "
               f"first stage {escape(report.retriever)}")
    if reranked:
        mode, depth = report.settings.get("rerank_mode"), report.settings.get("rerank_depth")
        heading += f", reranked ({escape(str(mode))}, top {depth})"
    metrics = Table()
    metrics.add_column("metric")
    metrics.add_column("first stage", justify="right")
    metrics.add_column("final", justify="right")
    for name in METRIC_NAMES:
        first, final = report.first_stage_metrics[name], report.metrics[name]
        delta = f" ({final - first:+.4f})" if reranked else ""
        metrics.add_row(name, f"{first:.4f}", f"{final:.4f}{delta}")
    warmup = report.settings.get("warmup_queries", 1)
    latency = Table()
    for column in ("stage", "p50 ms", "p95 ms", "n"):
        latency.add_column(column, justify="left" if column == "stage" else "right")
    for stage, stats in report.latency_ms.items():
        latency.add_row(stage, f"{stats['p50']:.2f}", f"{stats['p95']:.2f}", str(int(stats.get("n", 0))))
    note = f"latency per query after {warmup} warm-up quer{'y' if warmup == 1 else 'ies'}"
    out: list[RenderableType] = [Text.from_markup(heading), metrics, Text(note), latency]
    cache = report.extra.get("kv_cache")
    if cache:
        out.append(Text(f"passage KV: {cache['hits']} hits, {cache['misses']} misses (hit rate "
                        f"{cache['hit_rate']:.1%}), {report.extra.get('prefills', 0)} passages prefilled, "
                        f"{cache['entries']} entries / {cache['bytes'] / 2**20:.1f} MiB in the store"))
    return out
