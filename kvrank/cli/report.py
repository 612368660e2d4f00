"""`kvrank report`: read back reports written by `kvrank eval --json` and show them side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvrank.cli.common import console, friendly_errors
from kvrank.errors import KvrankError


@friendly_errors
def report(
    runs: Annotated[list[Path], typer.Argument(help="Reports written by `kvrank eval --json`.",
                                               show_default=False)],
    html_path: Annotated[Path | None, typer.Option(
        "--html", help="Also write them as one self-contained HTML file (plots inline) to compare.")] = None,
) -> None:
    """Show evaluation reports (metrics first stage vs final, latency, KV counters), one after another."""
    from kvrank.eval.report import report_tables
    from kvrank.eval.runner import load_report

    if not runs:
        raise KvrankError("no reports given; pass one or more files written by `kvrank eval --json`")
    for path in runs:
        console.rule(str(path))
        for renderable in report_tables(load_report(path)):
            console.print(renderable)
    if html_path is not None:
        from rich.markup import escape

        from kvrank.eval.html import write_html

        written = write_html([load_report(path) for path in runs], html_path, [path.stem for path in runs])
        console.print(f"wrote {escape(str(written))}")
