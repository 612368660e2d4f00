"""`kvrank report`: read back reports written by `kvrank eval --json` and show them side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from kvrank.cli.common import console, friendly_errors
from kvrank.errors import KvrankError


@friendly_errors
def report(
    runs: Annotated[list[Path], typer.Argument(help="Reports written by `kvrank eval --json`.",
                                               show_default=False)],
    html_path: Annotated[Path | None, typer.Option(
        "--html", help="Also write them as one self-contained HTML file (plots inline) to compare.")] = None,
) -> None:
    """Show evaluation reports (metrics first stage vs final, latency, KV counters), one after another; with two
    or more, compare their final rankings pairwise (paired randomization test, Holm-Bonferroni corrected)."""
    from kvrank.eval.report import report_tables
    from kvrank.eval.runner import load_report

    if not runs:
        raise KvrankError("no reports given; pass one or more files written by `kvrank eval --json`")
    loaded = []
    for path in runs:
        console.rule(escape(str(path)))
        loaded.append((str(path), load_report(path)))
        for renderable in report_tables(loaded[-1][1]):
            console.print(renderable)
    if len(loaded) >= 2:
        from kvrank.eval.compare import compare_reports
        from kvrank.eval.report import comparison_table

        console.rule("pairwise comparison")
        try:
            for renderable in comparison_table(compare_reports(loaded)):
                console.print(renderable)
        except KvrankError as error:  # reports that cannot be paired are still shown, and written as HTML
            console.print(f"[yellow]no pairwise test:[/yellow] {escape(str(error))}")
    if html_path is not None:
        from kvrank.eval.html import write_html

        written = write_html([report for _, report in loaded], html_path, [path.stem for path in runs])
        console.print(f"wrote {escape(str(written))}")
