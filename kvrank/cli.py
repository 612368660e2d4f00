"""The `kvrank` command line: `index`, `eval` and `demo`.

Every user-input problem surfaces as a `KvrankError`, printed in red without a traceback, exit code 2.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from kvrank.errors import KvrankError

logger = logging.getLogger(__name__)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kvrank: retrieve-then-rerank search. `kvrank demo` shows it on an embedded corpus.")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

RERANK_MODES = ("none", "ql", "attn", "yesno")
F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(func: F) -> F:
    """Turn KvrankError (and OS errors on user paths) into a red one-line message and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KvrankError as err:
            err_console.print(f"[bold red]error:[/bold red] [red]{escape(str(err))}[/red]")
            raise typer.Exit(2) from None
        except OSError as err:
            err_console.print(f"[bold red]error:[/bold red] [red]{escape(str(err))}[/red] (check the path and "
                              "its permissions)")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")) -> None:
    level = logging.INFO if verbose else logging.WARNING
    handler = RichHandler(console=err_console, show_path=False, level=level)  # some libraries force DEBUG
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)


def _retriever_config(model: str | None, device: str, batch_size: int, dense_index: str, fusion: str,
                      hybrid_weight: float, bm25_k1: float = 1.5, bm25_b: float = 0.75,
                      show_progress: bool = True) -> Any:
    from kvrank.retriever import BM25Config, DenseConfig, FusionConfig, RetrieverConfig

    return RetrieverConfig(bm25=BM25Config(k1=bm25_k1, b=bm25_b),
                           dense=DenseConfig(model=model, device=device, batch_size=batch_size,
                                             index_type=dense_index),
                           fusion=FusionConfig(method=fusion, weight=hybrid_weight),
                           show_progress=show_progress)


@app.command()
@friendly_errors
def index(
    data: str = typer.Option(..., "--data", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv) or "
                             "ir_datasets id."),
    index_dir: Path = typer.Option(..., "--index-dir", help="Folder to write the index into (bm25/, dense/)."),
    retriever: str = typer.Option("hybrid", "--retriever", help="bm25, dense or hybrid (builds both)."),
    model: str | None = typer.Option(None, "--model", "--dense-model", help="Dense model: local path or hub id "
                                     "(default: the bundled all-MiniLM-L6-v2)."),
    device: str = typer.Option("cpu", "--device", help="Device for the dense encoder (cpu, cuda, mps)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Passages per encoding batch."),
    dense_index: str = typer.Option("flat", "--dense-index", help="flat (exact) or hnsw (approximate)."),
    bm25_k1: float = typer.Option(1.5, "--bm25-k1", help="BM25 term-frequency saturation."),
    bm25_b: float = typer.Option(0.75, "--bm25-b", help="BM25 length normalisation."),
) -> None:
    """Build (or rebuild) the first-stage index of a corpus; writes are atomic."""
    import time

    from kvrank.eval.data import load_dataset
    from kvrank.retriever import build_or_load

    dataset = load_dataset(data)
    config = _retriever_config(model, device, batch_size, dense_index, "rrf", 0.5, bm25_k1, bm25_b)
    start = time.perf_counter()
    built = build_or_load(retriever, dataset, index_dir, config, rebuild=True)
    console.print(f"[green]indexed[/green] {len(dataset.corpus)} passages of {escape(dataset.name)} with "
                  f"{escape(built.name)} into {escape(str(index_dir))} in {time.perf_counter() - start:.1f} s")


@app.command("eval")
@friendly_errors
def eval_cmd(
    data: str = typer.Option(..., "--data", help="BEIR folder or ir_datasets id (e.g. beir/scifact/test)."),
    index_dir: Path | None = typer.Option(None, "--index-dir", help="Index folder from `kvrank index`; default: "
                                          "a per-corpus cache (~/.cache/kvrank or $KVRANK_CACHE_DIR)."),
    retriever: str | None = typer.Option(None, "--retriever", help="bm25 (default), dense or hybrid."),
    candidates: Path | None = typer.Option(None, "--candidates", help="First-stage candidates from a TREC run "
                                           "file instead of a retriever (e.g. bm25_top100.trec)."),
    max_queries: int | None = typer.Option(None, "--max-queries", help="Evaluate the first N test queries in "
                                           "sorted id order."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the report as JSON here."),
    run_path: Path | None = typer.Option(None, "--run", help="Write the final ranking as a TREC run file here."),
    k: int = typer.Option(100, "--k", help="Candidates per query from the first stage."),
    dense_model: str | None = typer.Option(None, "--dense-model", help="Dense retriever model (path or hub id)."),
    dense_index: str = typer.Option("flat", "--dense-index", help="flat (exact) or hnsw (approximate)."),
    fusion: str = typer.Option("rrf", "--fusion", help="Hybrid fusion: rrf (k=60) or interpolate."),
    hybrid_weight: float = typer.Option(0.5, "--hybrid-weight", help="Dense weight for --fusion interpolate."),
    batch_size: int = typer.Option(64, "--batch-size", help="Passages per encoding batch when building."),
    bm25_k1: float = typer.Option(1.5, "--bm25-k1", help="BM25 term-frequency saturation."),
    bm25_b: float = typer.Option(0.75, "--bm25-b", help="BM25 length normalisation."),
    rerank: str = typer.Option("none", "--rerank", help="Reranking: none, ql, attn or yesno."),
    rerank_depth: int = typer.Option(20, "--rerank-depth", help="How many first-stage candidates to rerank."),
    model: str | None = typer.Option(None, "--model", help="Reranker model (path or id)."),
    fusion_weight: float | None = typer.Option(None, "--fusion-weight", help="Weight of the first-stage score "
                                               "fused with the reranker score."),
    store: Path | None = typer.Option(None, "--store", help="Passage KV store folder for the reranker."),
    device: str = typer.Option("cpu", "--device", help="Device for the models (cpu, cuda, mps)."),
    dtype: str = typer.Option("float32", "--dtype", help="Reranker dtype (float32, bfloat16, float16)."),
) -> None:
    """Evaluate first-stage retrieval (and reranking) on a test collection: nDCG@10, RR@10, R@100, latency."""
    from kvrank.eval.data import load_dataset, read_run, write_run
    from kvrank.eval.pipeline import run_eval
    from kvrank.retriever import build_or_load

    if candidates is not None and retriever is not None:
        raise KvrankError("--candidates and --retriever are alternatives: the candidates run is the first stage; "
                          "drop one of them")
    dataset = load_dataset(data)
    settings: dict[str, Any] = {"rerank_mode": rerank}
    if candidates is not None:
        first_stage: Any = read_run(candidates)
        name = f"candidates:{candidates.name}"
        settings["candidates"] = str(candidates)
    else:
        kind = retriever or "bm25"
        config = _retriever_config(dense_model, device, batch_size, dense_index, fusion, hybrid_weight, bm25_k1,
                                   bm25_b)
        first_stage = build_or_load(kind, dataset, index_dir, config)
        name = first_stage.name
        settings |= {"retriever_kind": kind, "index_dir": str(index_dir) if index_dir else None,
                     "retriever_config": dataclasses.asdict(config)}
    rerank_fn, extra = make_rerank_hook(rerank, model=model, fusion_weight=fusion_weight, store=store,
                                        device=device, dtype=dtype, dataset=dataset)
    if rerank != "none":
        settings |= {"rerank_model": model, "fusion_weight": fusion_weight, "store": str(store) if store else None,
                     "device": device, "dtype": dtype}
    report = run_eval(dataset, first_stage, k=k, max_queries=max_queries, rerank_fn=rerank_fn,
                      rerank_depth=rerank_depth, first_stage_name=name, settings=settings, show_progress=True)
    if extra is not None:
        report.extra.update(extra())
    print_report(report)
    if json_path is not None:
        report.write_json(json_path)
        console.print(f"wrote {escape(str(json_path))}")
    if run_path is not None:
        write_run(report.run, run_path, tag=f"kvrank-{rerank}" if rerank != "none" else "kvrank")
        console.print(f"wrote {escape(str(run_path))}")


@app.command()
@friendly_errors
def demo(
    retriever: str = typer.Option("hybrid", "--retriever", help="bm25, dense or hybrid."),
    k: int = typer.Option(5, "--k", help="Results shown per query."),
    rerank: str = typer.Option("none", "--rerank", help="Reranking: none, ql, attn or yesno."),
    rerank_depth: int = typer.Option(20, "--rerank-depth", help="How many first-stage candidates to rerank."),
    model: str | None = typer.Option(None, "--model", help="Reranker model (path or id)."),
    device: str = typer.Option("cpu", "--device", help="Device for the models."),
    dtype: str = typer.Option("float32", "--dtype", help="Reranker dtype."),
) -> None:
    """Index the embedded demo corpus, search its queries and show ranked results with timings."""
    from kvrank.demo import demo_dataset, run_demo

    dataset = demo_dataset()
    rerank_fn, extra = make_rerank_hook(rerank, model=model, fusion_weight=None, store=None, device=device,
                                        dtype=dtype, dataset=dataset)
    run_demo(console, retriever=retriever, k=k, device=device, rerank_fn=rerank_fn, rerank_depth=rerank_depth,
             dataset=dataset)
    if extra is not None:
        console.print(extra())


def make_rerank_hook(mode: str, *, model: str | None, fusion_weight: float | None, store: Path | None,
                     device: str, dtype: str, dataset: Any) -> tuple[Any, Callable[[], dict[str, Any]] | None]:
    """(rerank_fn, extra) from the reranker package, or (None, None) for `--rerank none`."""
    if mode not in RERANK_MODES:
        raise KvrankError(f"--rerank {mode!r} is not a reranking mode; use one of {', '.join(RERANK_MODES)}")
    if mode == "none":
        return None, None
    try:
        from kvrank.reranker.pipeline import make_rerank_fn
    except ImportError as err:
        raise KvrankError(f"reranking is not available in this installation ({err}); run with --rerank none") \
            from None
    return make_rerank_fn(mode=mode, model=model, fusion_weight=fusion_weight, store=store, device=device,
                          dtype=dtype, dataset=dataset)


def print_report(report: Any) -> None:
    from kvrank.eval.report import report_tables

    for renderable in report_tables(report):
        console.print(renderable)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
