"""The `kvrank` command line: one module per command group, registered here.

    index, eval   cli/search.py    first-stage indexes; evaluation of a pipeline on a test collection
    demo          cli/demo.py      the embedded corpus, searched and reranked
    serve         cli/serve.py     the HTTP API
    warm, store   cli/store.py     the persistent passage-KV store
    train, tune   cli/train.py     query-side adapters, from labels or from the corpus alone
    report        cli/report.py    eval reports read back and compared
"""

from __future__ import annotations

import logging

import typer
from rich.logging import RichHandler

from kvrank.cli.common import err_console
from kvrank.cli.demo import demo
from kvrank.cli.report import report
from kvrank.cli.search import eval_cmd, index
from kvrank.cli.serve import serve
from kvrank.cli.store import store_app, warm
from kvrank.cli.train import train, tune

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="kvrank: retrieve-then-rerank search. `kvrank demo` shows it on an embedded corpus.",
)


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")) -> None:
    level = logging.INFO if verbose else logging.WARNING
    handler = RichHandler(console=err_console, show_path=False, level=level)  # some libraries force DEBUG
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)


app.command()(index)
app.command("eval")(eval_cmd)
app.command()(demo)
app.command()(serve)
app.command("warm")(warm)
app.command()(train)
app.command()(tune)
app.command()(report)
app.add_typer(store_app, name="store")


def main() -> None:
    """Console entry point."""
    app()


__all__ = ["app", "main"]
