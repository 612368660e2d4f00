"""The `kvrank` command line: `index`, `eval`, `demo` and `serve`.

Every user-input problem surfaces as a `KvrankError`, printed in red without a traceback, exit code 2.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from kvrank.errors import KvrankError
from kvrank.reranker.fusion import DEFAULT_FUSION_WEIGHT

logger = logging.getLogger(__name__)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="kvrank: retrieve-then-rerank search. `kvrank demo` shows it on an embedded corpus.",
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

RERANK_MODES = ("none", "ql", "attn", "yesno", "cascade")  # "none" + kvrank.reranker.reranker.MODES
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
            err_console.print(
                f"[bold red]error:[/bold red] [red]{escape(str(err))}[/red] (check the path and "
                "its permissions)"
            )
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")) -> None:
    level = logging.INFO if verbose else logging.WARNING
    handler = RichHandler(console=err_console, show_path=False, level=level)  # some libraries force DEBUG
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)


def _retriever_config(
    model: str | None,
    device: str,
    batch_size: int,
    dense_index: str,
    fusion: str,
    hybrid_weight: float,
    bm25_k1: float = 1.5,
    bm25_b: float = 0.75,
    show_progress: bool = True,
) -> Any:
    from kvrank.retriever import BM25Config, DenseConfig, FusionConfig, RetrieverConfig

    return RetrieverConfig(
        bm25=BM25Config(k1=bm25_k1, b=bm25_b),
        dense=DenseConfig(model=model, device=device, batch_size=batch_size, index_type=dense_index),
        fusion=FusionConfig(method=fusion, weight=hybrid_weight),
        show_progress=show_progress,
    )


# Options shared by several commands.
Retrieval = Annotated[str, typer.Option("--retriever", help="First stage: bm25, dense or hybrid.")]
Device = Annotated[str, typer.Option("--device", help="Device for the models (cpu, cuda, mps).")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Passages per encoding batch when building.")]
DenseIndex = Annotated[str, typer.Option("--dense-index", help="flat (exact) or hnsw (approximate).")]
BM25K1 = Annotated[float, typer.Option("--bm25-k1", help="BM25 term-frequency saturation.")]
BM25B = Annotated[float, typer.Option("--bm25-b", help="BM25 length normalisation.")]
StoreDir = Annotated[
    Path | None, typer.Option("--store", help="Passage KV store folder for the reranker (default: in memory).")
]
Rerank = Annotated[str, typer.Option("--rerank", help="Reranking: none, ql, attn, yesno or cascade.")]
RerankDepth = Annotated[
    int, typer.Option("--rerank-depth", help="How many first-stage candidates to rerank.")
]
RerankModel = Annotated[str | None, typer.Option("--model", help="Reranker model (path or id).")]
Dtype = Annotated[str, typer.Option("--dtype", help="Reranker dtype (float32, bfloat16, float16).")]
KVFormatOpt = Annotated[str | None, typer.Option(
    "--kv-format", help="Stored passage-KV layout: none, or components joined by '+' (int8|int4, rank<R>, "
    "heads<N>, layers<L>), or auto: the one recommended for the model (docs/KV_FORMATS.md); default: the "
    "store's own format, else auto.")]
CalibrationOpt = Annotated[int, typer.Option(
    "--calibration-passages", help="Corpus passages a fitted --kv-format (rank/heads) is fitted on.")]


@app.command()
@friendly_errors
def index(
    data: Annotated[
        str,
        typer.Option(
            "--data", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv) or ir_datasets id."
        ),
    ],
    index_dir: Annotated[
        Path, typer.Option("--index-dir", help="Folder to write the index into (bm25/, dense/).")
    ],
    retriever: Retrieval = "hybrid",
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "--dense-model",
            help="Dense model: local path or hub id (default: the bundled all-MiniLM-L6-v2).",
        ),
    ] = None,
    device: Device = "cpu",
    batch_size: BatchSize = 64,
    dense_index: DenseIndex = "flat",
    bm25_k1: BM25K1 = 1.5,
    bm25_b: BM25B = 0.75,
) -> None:
    """Build (or rebuild) the first-stage index of a corpus; writes are atomic."""
    from kvrank.eval.data import load_dataset
    from kvrank.retriever import build_or_load

    dataset = load_dataset(data)
    config = _retriever_config(model, device, batch_size, dense_index, "rrf", 0.5, bm25_k1, bm25_b)
    start = time.perf_counter()
    built = build_or_load(retriever, dataset, index_dir, config, rebuild=True)
    console.print(
        f"[green]indexed[/green] {len(dataset.corpus)} passages of {escape(dataset.name)} with "
        f"{escape(built.name)} into {escape(str(index_dir))} in {time.perf_counter() - start:.1f} s"
    )


@app.command("eval")
@friendly_errors
def eval_cmd(
    data: Annotated[
        str, typer.Option("--data", help="BEIR folder or ir_datasets id (e.g. beir/scifact/test).")
    ],
    index_dir: Annotated[
        Path | None,
        typer.Option(
            "--index-dir",
            help="Index folder from `kvrank index`; "
            "default: a per-corpus cache (~/.cache/kvrank or "
            "$KVRANK_CACHE_DIR).",
        ),
    ] = None,
    retriever: Annotated[
        str | None, typer.Option("--retriever", help="bm25 (default), dense or hybrid.")
    ] = None,
    candidates: Annotated[
        Path | None,
        typer.Option(
            "--candidates", help="First-stage candidates from a TREC run file instead of a retriever."
        ),
    ] = None,
    max_queries: Annotated[
        int | None,
        typer.Option("--max-queries", help="Evaluate the first N test queries in sorted id order."),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
    run_path: Annotated[
        Path | None, typer.Option("--run", help="Write the final ranking as a TREC run.")
    ] = None,
    k: Annotated[int, typer.Option("--k", help="Candidates per query from the first stage.")] = 100,
    dense_model: Annotated[
        str | None, typer.Option("--dense-model", help="Dense retriever model (path or hub id).")
    ] = None,
    dense_index: DenseIndex = "flat",
    fusion: Annotated[
        str, typer.Option("--fusion", help="Hybrid fusion: rrf (k=60) or interpolate.")
    ] = "rrf",
    hybrid_weight: Annotated[
        float, typer.Option("--hybrid-weight", help="Dense weight for --fusion interpolate.")
    ] = 0.5,
    batch_size: BatchSize = 64,
    bm25_k1: BM25K1 = 1.5,
    bm25_b: BM25B = 0.75,
    rerank: Rerank = "none",
    rerank_depth: RerankDepth = 20,
    model: RerankModel = None,
    fusion_weight: Annotated[
        float,
        typer.Option(
            "--fusion-weight",
            help="First-stage share of the fused score, per-query z-scores (0: the reranker alone). "
            "Default chosen on the dev sets (docs/RERANKING.md).",
        ),
    ] = DEFAULT_FUSION_WEIGHT,
    store: StoreDir = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    kv_format: KVFormatOpt = None,
    calibration_passages: CalibrationOpt = 64,
) -> None:
    """Evaluate first-stage retrieval (and reranking) on a test collection: nDCG@10, RR@10, R@100, latency."""
    from kvrank.eval.data import load_dataset, read_run, write_run
    from kvrank.eval.pipeline import run_eval
    from kvrank.retriever import build_or_load

    if candidates is not None and retriever is not None:
        raise KvrankError(
            "--candidates and --retriever are alternatives: the candidates run is the first stage; "
            "drop one of them"
        )
    dataset = load_dataset(data)
    settings: dict[str, Any] = {"rerank_mode": rerank}
    if candidates is not None:
        first_stage: Any = read_run(candidates)
        name = f"candidates:{candidates.name}"
        settings["candidates"] = str(candidates)
    else:
        kind = retriever or "bm25"
        config = _retriever_config(
            dense_model, device, batch_size, dense_index, fusion, hybrid_weight, bm25_k1, bm25_b
        )
        first_stage = build_or_load(kind, dataset, index_dir, config)
        name = first_stage.name
        settings |= {
            "retriever_kind": kind,
            "index_dir": str(index_dir) if index_dir else None,
            "retriever_config": dataclasses.asdict(config),
        }
    rerank_fn, extra = make_rerank_hook(
        rerank,
        model=model,
        fusion_weight=fusion_weight,
        store=store,
        device=device,
        dtype=dtype,
        dataset=dataset,
        kv_format=kv_format,
        calibration_passages=calibration_passages,
    )
    if rerank != "none":
        settings |= {
            "rerank_model": model,
            "kv_format": kv_format,
            "fusion_weight": fusion_weight,
            "store": str(store) if store else None,
            "device": device,
            "dtype": dtype,
        }
    report = run_eval(
        dataset,
        first_stage,
        k=k,
        max_queries=max_queries,
        rerank_fn=rerank_fn,
        rerank_depth=rerank_depth,
        first_stage_name=name,
        settings=settings,
        show_progress=True,
    )
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
    retriever: Retrieval = "hybrid",
    k: Annotated[int, typer.Option("--k", help="Results shown per query.")] = 5,
    rerank: Rerank = "ql",
    rerank_depth: Annotated[int, typer.Option("--rerank-depth", help="Candidates reranked per query.")] = 10,
    model: RerankModel = None,
    store: StoreDir = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
) -> None:
    """Index the embedded demo corpus, search its queries, rerank them with the block-attention reranker (the
    offline SmolLM2 by default) and run them again to show passage KV reuse; ranked results and timings."""
    from kvrank.demo import demo_dataset, run_demo

    dataset = demo_dataset()
    rerank_fn, extra = make_rerank_hook(
        rerank, model=model, fusion_weight=DEFAULT_FUSION_WEIGHT, store=store, device=device, dtype=dtype,
        dataset=dataset,
    )
    run_demo(
        console,
        retriever=retriever,
        k=k,
        device=device,
        rerank_fn=rerank_fn,
        rerank_depth=rerank_depth,
        dataset=dataset,
        kv_stats=extra,
    )


def make_rerank_hook(
    mode: str,
    *,
    model: str | None,
    fusion_weight: float | None,
    store: Path | None,
    device: str,
    dtype: str,
    dataset: Any,
    kv_format: str | None = None,
    calibration_passages: int = 64,
) -> tuple[Any, Callable[[], dict[str, Any]] | None]:
    """(rerank_fn, extra) from the reranker package, or (None, None) for `--rerank none`."""
    if mode not in RERANK_MODES:
        raise KvrankError(f"--rerank {mode!r} is not a reranking mode; use one of {', '.join(RERANK_MODES)}")
    if mode == "none":
        return None, None
    try:
        from kvrank.reranker.pipeline import make_rerank_fn
    except ImportError as err:
        raise KvrankError(
            f"reranking is not available in this installation ({err}); run with --rerank none"
        ) from None
    return make_rerank_fn(
        mode=mode,
        model=model,
        fusion_weight=fusion_weight,
        store=str(store) if store is not None else None,
        device=device,
        dtype=dtype,
        dataset=dataset,
        calibration_passages=calibration_passages,
        **({"kv_format": kv_format} if kv_format is not None else {}),
    )


def print_report(report: Any) -> None:
    from kvrank.eval.report import report_tables

    for renderable in report_tables(report):
        console.print(renderable)


@app.command()
@friendly_errors
def serve(
    data: Annotated[str | None, typer.Option("--data", help="Corpus (BEIR folder); default: the demo corpus.")] = None,
    index_dir: Annotated[Path | None, typer.Option("--index-dir", help="Index folder from `kvrank index`.")] = None,
    retriever: Annotated[str | None, typer.Option("--retriever", help="bm25, dense or hybrid.")] = None,
    store: Annotated[Path | None, typer.Option("--store", help="Passage KV store folder.")] = None,
    model: RerankModel = None,
    rerank: Annotated[str | None, typer.Option("--rerank", help="Default mode: ql, attn, yesno, cascade.")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (default 8000).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="Device for the models.")] = None,
    kv_format: KVFormatOpt = None,
) -> None:
    """Serve /v1/search and /v1/rerank over HTTP (settings also from KVRANK_* variables; see README)."""
    from pydantic import ValidationError

    from kvrank.api.server import serve as run_server
    from kvrank.api.settings import Settings

    given = {"data": data, "index_dir": index_dir, "retriever": retriever, "store": store, "model": model,
             "rerank_mode": rerank, "host": host, "port": port, "device": device, "kv_format": kv_format}
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        raise KvrankError(f"setting {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    run_server(settings)


# Passage KV store commands live in kvrank/store_cli.py.
from kvrank.store_cli import store_app, warm  # noqa: E402

app.command("warm")(warm)
app.add_typer(store_app, name="store")


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
