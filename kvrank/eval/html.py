"""One self-contained HTML file for one or more evaluation reports (`kvrank eval --html`, `kvrank report --html`).

Everything is inline: the styles, and the plots as base64 PNGs drawn by matplotlib. Nothing is fetched when the
file opens, so it reads offline. Sections, per run: metrics of the first stage and the final ranking with deltas
(and p-values when the report carries a significance test), per-query deltas of the primary metric sorted (a plot)
and the queries that got worse, latency per stage after warm-up (a plot and p50/p95), KV counters, settings.
Metrics and stages are whatever the reports hold, not a fixed list.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from kvrank.errors import KvrankError
from kvrank.eval.metrics import primary_metric
from kvrank.io import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from kvrank.eval.runner import EvalReport

WORSE_SHOWN = 20  # queries listed under "got worse", worst first
STAGE_ORDER = ("retrieve", "rerank", "kv_lookup", "prefill", "scoring", "total")


@dataclass(frozen=True)
class MetricRow:
    name: str
    first: float | None
    final: float | None
    delta: float | None
    p_value: float | None


@dataclass(frozen=True)
class QueryDelta:
    query_id: str
    text: str
    first: float
    final: float
    delta: float


@dataclass(frozen=True)
class RunView:
    """What the template shows of one report."""

    label: str
    heading: str
    reranked: bool
    metrics: list[MetricRow]
    significance_test: str | None
    primary: str
    deltas: list[QueryDelta]  # evaluated queries, best gain first
    worse: list[QueryDelta]  # the worst WORSE_SHOWN of the `lost`
    lost: int
    improved: int
    unchanged: int
    delta_plot: str | None  # base64 PNG
    latency: list[tuple[str, dict[str, float]]]
    warmup: int
    latency_plot: str | None
    kv: dict[str, Any]
    settings: dict[str, str]
    machine: dict[str, str]


def write_html(reports: Sequence[EvalReport], path: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Write `reports` (one, or several to compare) as one HTML file at `path`; returns the path."""
    if not reports:
        raise KvrankError("no reports to write; pass at least one evaluation report")
    labels = list(labels) if labels is not None else [f"run {i + 1}" for i in range(len(reports))]
    if len(labels) != len(reports):
        raise ValueError(f"{len(labels)} labels for {len(reports)} reports")
    html = render_html(reports, labels)
    out = Path(path)
    if out.is_dir():
        raise KvrankError(f"{out} is a folder; pass a file name such as {out / 'report.html'}", param="path")
    atomic_write_text(out, html)
    return out


def render_html(reports: Sequence[EvalReport], labels: Sequence[str]) -> str:
    runs = [run_view(report, label) for report, label in zip(reports, labels)]
    env = Environment(loader=PackageLoader("kvrank.eval", "templates"), autoescape=select_autoescape(["html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["signed"] = _signed
    template = env.get_template("report.html")
    return template.render(runs=runs, comparison=comparison(runs) if len(runs) > 1 else None,
                           pairwise=pairwise(reports, labels) if len(runs) > 1 else None,
                           generated=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def pairwise(reports: Sequence[EvalReport], labels: Sequence[str]) -> dict[str, Any]:
    """The pairwise significance table of `kvrank report` (`eval.compare`), or why there is none (reports of
    different datasets or levels, or without per-query values)."""
    from kvrank.eval.compare import compare_reports
    from kvrank.eval.significance import TEST_NAME

    try:
        return {"rows": compare_reports(list(zip(labels, reports, strict=True))), "test": TEST_NAME, "why_not": None}
    except KvrankError as error:
        return {"rows": [], "test": TEST_NAME, "why_not": str(error)}


# ---------------------------------------------------------------------------------------------- one run
def run_view(report: EvalReport, label: str) -> RunView:
    settings = report.settings
    reranked = bool(settings.get("rerank"))
    heading = f"{report.dataset}: {report.queries} queries, first stage {report.retriever}"
    if reranked:
        heading += f", reranked ({settings.get('rerank_mode')}, top {settings.get('rerank_depth')})"
    # {"test": name, "p_values": {metric: p}} (reranked vs first stage), where the report carries one
    significance = getattr(report, "significance", None) or report.extra.get("significance") or {}
    p_values = significance.get("p_values", {}) if isinstance(significance, dict) else {}
    names = list(report.metrics) + [m for m in report.first_stage_metrics if m not in report.metrics]
    rows = []
    for name in names:
        first, final = report.first_stage_metrics.get(name), report.metrics.get(name)
        delta = final - first if reranked and first is not None and final is not None else None
        rows.append(MetricRow(name, first, final, delta, p_values.get(name)))
    primary = primary_metric if primary_metric in names else (names[0] if names else primary_metric)
    deltas = query_deltas(report, primary)
    worse = sorted((d for d in deltas if d.delta < 0), key=lambda d: d.delta)
    warmup = int(settings.get("warmup_queries", 1) or 0)
    samples = stage_samples(report)
    return RunView(
        label=label, heading=heading, reranked=reranked, metrics=rows,
        significance_test=significance.get("test") if p_values else None, primary=primary, deltas=deltas,
        worse=worse[:WORSE_SHOWN], lost=len(worse), improved=sum(d.delta > 0 for d in deltas),
        unchanged=sum(d.delta == 0 for d in deltas),
        delta_plot=_png(delta_figure(deltas, primary, label)) if reranked and deltas else None,
        latency=_ordered(report.latency_ms), warmup=warmup,
        latency_plot=_png(latency_figure(samples, label)) if samples else None,
        kv=kv_counters(report), settings=_flat(settings), machine=_flat(report.machine))


def query_deltas(report: EvalReport, metric: str) -> list[QueryDelta]:
    """Every evaluated query's `metric` in the first stage and the final ranking, best gain first."""
    out = []
    for query_id, entry in report.per_query.items():
        first, final = entry.get("first_stage", {}).get(metric), entry.get("final", {}).get(metric)
        if first is None or final is None:
            continue
        out.append(QueryDelta(query_id, str(entry.get("text", "")), float(first), float(final),
                              float(final) - float(first)))
    return sorted(out, key=lambda d: (-d.delta, d.query_id))


def stage_samples(report: EvalReport) -> dict[str, list[float]]:
    """Per-query milliseconds by stage, warm-up queries left out (as the report's p50/p95 are)."""
    samples: dict[str, list[float]] = {}
    for entry in report.per_query.values():
        if entry.get("warmup"):
            continue
        for stage, ms in entry.get("latency_ms", {}).items():
            samples.setdefault(stage, []).append(float(ms))
    return dict(_ordered(samples))


def kv_counters(report: EvalReport) -> dict[str, Any]:
    """The passage-KV counters a report carries (this run's lookups, the store's lifetime totals, prefills)."""
    out: dict[str, Any] = {}
    for name in ("kv_cache", "kv_store"):
        value = report.extra.get(name)
        if isinstance(value, dict):
            out[name] = {k: _bytes(v) if k == "bytes" or k.endswith("_bytes") else _show(v) for k, v in value.items()}
    if "prefills" in report.extra:
        out["prefills"] = {"passages prefilled": _show(report.extra["prefills"])}
    return out


def comparison(runs: Sequence[RunView]) -> dict[str, Any]:
    """Final metrics of every run side by side, each with its delta against the first run."""
    names: list[str] = []
    for run in runs:
        names += [row.name for row in run.metrics if row.name not in names]
    table = []
    for name in names:
        values = [next((row.final for row in run.metrics if row.name == name), None) for run in runs]
        base = values[0]
        table.append((name, [(v, None if v is None or base is None or i == 0 else v - base)
                             for i, v in enumerate(values)]))
    return {"labels": [run.label for run in runs], "rows": table}


# ---------------------------------------------------------------------------------------------- plots
def delta_figure(deltas: Sequence[QueryDelta], metric: str, label: str) -> Figure:
    from matplotlib.figure import Figure

    values = [d.delta for d in deltas]
    fig = Figure(figsize=(8, 3.2), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    colours = ["#0a6b2c" if v > 0 else "#a4161a" if v < 0 else "#9aa5b1" for v in values]
    ax.bar(range(len(values)), values, width=1.0 if len(values) > 60 else 0.8, color=colours)
    ax.axhline(0, color="#1b1f24", linewidth=0.8)
    ax.set_xlabel(f"queries, sorted by change ({len(values)})")
    ax.set_ylabel(f"{metric}: reranked - first stage")
    ax.set_title(f"{label}: per-query {metric} change")
    ax.set_xlim(-0.6, len(values) - 0.4)
    ax.set_xticks([])
    ax.grid(axis="y", alpha=0.3)
    return fig


def latency_figure(samples: dict[str, list[float]], label: str) -> Figure:
    from matplotlib.figure import Figure

    stages = list(samples)
    fig = Figure(figsize=(8, 0.5 + 0.45 * len(stages)), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.boxplot([samples[s] for s in stages], orientation="horizontal", tick_labels=stages, showfliers=True,
               widths=0.6, medianprops={"color": "#a4161a"})
    positive = [v for values in samples.values() for v in values if v > 0]
    if positive and max(positive) / max(min(positive), 1e-3) > 50:
        ax.set_xscale("log")
    ax.invert_yaxis()
    n = max(len(v) for v in samples.values())
    ax.set_xlabel(f"ms per query ({n} queries after warm-up)")
    ax.set_title(f"{label}: latency per stage")
    ax.grid(axis="x", alpha=0.3)
    return fig


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------- formatting
def _ordered(by_stage: dict[str, Any]) -> list[tuple[str, Any]]:
    rank = {stage: i for i, stage in enumerate(STAGE_ORDER)}
    return sorted(by_stage.items(), key=lambda item: (rank.get(item[0], len(rank) - 0.5), item[0]))


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= _flat(value, f"{name}.")
        else:
            out[name] = _show(value)
    return out


def _show(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, int | str | bool):
        return str(value)
    return json.dumps(value)


def _bytes(value: Any) -> str:
    if not isinstance(value, int) or value < 1024:
        return _show(value)
    return f"{value:,} ({value / 2**20:,.1f} MiB)"


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"


def _signed(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"
