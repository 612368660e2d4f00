"""What every command shares: consoles, the error handler, option declarations and the config builders.

Every user-input problem surfaces as a `KvrankError`, printed in red without a traceback, exit code 2.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from kvrank.defaults import (
    DEFAULT_BM25_B,
    DEFAULT_BM25_K1,
    DEFAULT_DENSE_INDEX,
    DEFAULT_DEVICE,
    DEFAULT_ENCODE_BATCH_SIZE,
    DEFAULT_HYBRID_FUSION,
    DEFAULT_HYBRID_WEIGHT,
    SEARCH_MODES,
)
from kvrank.errors import KvrankError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(func: F) -> F:
    """Turn KvrankError (and OS errors on user paths) into a red one-line message and exit code 2. A library
    error names the argument at fault (`err.param`) and its hints use keyword syntax (`head='none'`); both are
    shown as this command's options (`--head none`)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KvrankError as err:
            message = in_flags(err, command_flags(func))
            err_console.print(f"[bold red]error:[/bold red] [red]{escape(message)}[/red]")
            raise typer.Exit(2) from None
        except OSError as err:
            err_console.print(f"[bold red]error:[/bold red] [red]{escape(str(err))}[/red] (check the path and "
                              "its permissions)")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


# Library argument names whose option is named otherwise (as a command's parameter or flag); the rest share
# theirs (`kv_format` is `kv_format: KVFormatOpt`, shown as `--kv-format`). A command's own parameter of the same
# name comes first: in `kvrank train`, `mode` is `--mode`. Fields of nested configs are `Class.field`.
PARAM_ALIASES = {
    "store_dir": "store",
    "source": "data",
    "mode": "rerank",
    "DenseConfig.model": "dense_model",
    "DenseConfig.index_type": "dense_index",
    "DenseConfig.batch_size": "batch_size",
    "FusionConfig.method": "hybrid_fusion",
    "FusionConfig.weight": "hybrid_weight",
    "RayConfig.address": "ray",
    "RayConfig.workers": "ray_workers",
    "RayConfig.batch_size": "ray_batch_size",
    "RayConfig.cpus_per_worker": "ray_cpus_per_worker",
    "RayConfig.gpus_per_worker": "ray_gpus_per_worker",
}


def command_flags(command: Callable[..., Any]) -> dict[str, str]:
    """Each parameter of a typer command -> the flag that sets it (its option's first name, or an argument's
    metavar), as typer reads the signature; an option's other names too (`dense_model` for `--dense-model`)."""
    from typer.models import ArgumentInfo, OptionInfo
    from typer.utils import get_params_from_function

    flags: dict[str, str] = {}
    for name, meta in get_params_from_function(command).items():
        info = meta.default
        if isinstance(info, OptionInfo):
            decls = [decl for decl in info.param_decls or () if decl.startswith("--")]
            flags[name] = decls[0] if decls else "--" + name.replace("_", "-")
            for decl in decls[1:]:
                flags.setdefault(decl[2:].replace("-", "_"), flags[name])
        elif isinstance(info, ArgumentInfo):
            flags[name] = info.metavar or name.upper()
    return flags


def flag_for(param: str, flags: dict[str, str]) -> str | None:
    """The command's flag for a library argument name, or None when the command has no option for it."""
    if param in flags:
        return flags[param]
    alias = PARAM_ALIASES.get(param)
    return flags.get(alias) if alias is not None else None


_KEYWORD = re.compile(r"(?<![\w.-])([a-z_][a-z0-9_]*)=('[^']*'|\"[^\"]*\")")  # head='none'
_IDENTIFIER = re.compile(  # store_dir, kv_format, RayConfig.workers
    r"(?<![\w.'\"-])(?:[A-Z][A-Za-z]*\.[a-z_]+|[a-z][a-z0-9]*(?:_[a-z0-9]+)+)(?![\w'\"-]|=)")


def in_flags(err: KvrankError, flags: dict[str, str]) -> str:
    """A library error's message in the command's words. Names of arguments become the command's options where
    it has them: keyword hints (`pass head='none'` -> `pass --head none`), names with an underscore anywhere
    (`store_dir` -> `--store`), a config's fields (`RayConfig.workers` -> `--ray-workers`), and the argument at
    fault (`err.param`) where it starts the message (`k must be >= 1` -> `--k must be >= 1`); where the message
    names it nowhere, its option leads (`--head: ...`)."""

    def keyword(match: re.Match[str]) -> str:
        flag = flag_for(match[1], flags)
        return f"{flag} {match[2].strip(chr(39) + chr(34))}" if flag else match[0]

    message = _KEYWORD.sub(keyword, str(err))
    message = _IDENTIFIER.sub(lambda match: flag_for(match[0], flags) or match[0], message)
    flag = flag_for(err.param, flags) if err.param else None
    if flag is None:
        return message
    assert err.param is not None
    if subject := re.match(rf"{re.escape(err.param)}(?![\w-])", message):
        return flag + message[subject.end():]
    return message if re.search(rf"{re.escape(flag)}(?![\w-])", message) else f"{flag}: {message}"


def warn_deprecated(old: str, new: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {old} is deprecated; use {new}")


# ------------------------------------------------------------------------------------------ shared options
Data = Annotated[str, typer.Option("--data", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv) or "
                                   "ir_datasets id (e.g. beir/scifact/test).")]
Retrieval = Annotated[str, typer.Option("--retriever", help="First stage: bm25, dense or hybrid.")]
IndexDir = Annotated[Path | None, typer.Option(
    "--index-dir", help="Index folder from `kvrank index`; default: a per-corpus cache (~/.cache/kvrank or "
    "$KVRANK_CACHE_DIR).")]
Device = Annotated[str, typer.Option("--device", help="Device for the models (cpu, cuda, mps).")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Passages per encoding batch when building.")]
DenseModel = Annotated[str | None, typer.Option("--dense-model", help="Dense retriever model (path or hub id).")]
DenseIndex = Annotated[str, typer.Option("--dense-index", help="flat (exact) or hnsw (approximate).")]
HybridFusion = Annotated[str, typer.Option(
    "--hybrid-fusion", help="How the hybrid first stage joins BM25 and dense: rrf (k=60) or interpolate.")]
HybridFusionOld = Annotated[str | None, typer.Option("--fusion", hidden=True,
                                                     help="Deprecated: --hybrid-fusion.")]
HybridWeight = Annotated[float, typer.Option("--hybrid-weight", help="Dense weight for --hybrid-fusion "
                                             "interpolate.")]
BM25K1 = Annotated[float, typer.Option("--bm25-k1", help="BM25 term-frequency saturation.")]
BM25B = Annotated[float, typer.Option("--bm25-b", help="BM25 length normalisation.")]
StoreDir = Annotated[Path | None, typer.Option(
    "--store", help="Passage KV store folder for the reranker (default: in memory).")]
RemoteStore = Annotated[str | None, typer.Option(
    "--remote-store", envvar="KVRANK_REMOTE_STORE", help="Passage KV shared by several nodes, behind --store (or "
    "memory): an fsspec URL such as s3://bucket/prefix or file:///mnt/shared/kvrank. Reads fall through to it, "
    "writes go to both (docs/concepts/store.md). Needs the ray extra.")]
Rerank = Annotated[str, typer.Option("--rerank", help=f"Reranking: {', '.join(SEARCH_MODES)}.")]
RerankDepth = Annotated[int, typer.Option("--rerank-depth", help="How many first-stage candidates to rerank.")]
RerankModel = Annotated[str | None, typer.Option("--model", help="Reranker model (path or id).")]
Dtype = Annotated[str, typer.Option("--dtype", help="Reranker dtype (float32, bfloat16, float16).")]
FusionWeight = Annotated[float, typer.Option(
    "--fusion-weight", help="Rerank fusion: the first stage's share of the final score, per-query z-scores "
    "(0: the reranker alone). Default chosen on the dev sets (docs/concepts/reranking.md).")]
KVFormatOpt = Annotated[str | None, typer.Option(
    "--kv-format", help="Stored passage-KV layout: none, or components joined by '+' (int8|int4, rank<R>, "
    "heads<N>, layers<L>), or auto: the one recommended for the model (docs/concepts/kv-formats.md); default: the "
    "store's own format, else auto.")]
AdapterOpt = Annotated[Path | None, typer.Option(
    "--adapter", help="A query-side adapter folder from `kvrank train` / `kvrank tune`, for the reranker's model, mode "
    "and template (stored passage KV stays valid).")]
HeadOpt = Annotated[str, typer.Option(
    "--head", help="Scoring head that replaces rerank fusion in its mode (ql): auto (the head shipped for the "
    "reranker's model, if any; docs/guide/training.md), none (fusion with --fusion-weight), or a folder from "
    "`kvrank train --head`.")]
CalibrationOpt = Annotated[int, typer.Option(
    "--calibration-passages", help="Corpus passages a fitted --kv-format (rank/heads) is fitted on.")]

# Ray (the `ray` extra; kvrank/cluster): `--ray` turns index, warm and eval into Ray Data jobs.
RayAddress = Annotated[str | None, typer.Option(
    "--ray", help="Run on Ray: auto (the cluster this machine belongs to), ray://HOST:PORT or HOST:PORT (a head "
    "node), or local:N (start a local Ray with N CPUs). Needs pip install 'kvrank\\[ray]'.", rich_help_panel="Ray")]
RayWorkers = Annotated[int, typer.Option("--ray-workers", help="Ray workers (actors), each with its own model.",
                                         rich_help_panel="Ray")]
RayBatchSize = Annotated[int, typer.Option("--ray-batch-size", help="Passages or queries per call to a Ray worker.",
                                           rich_help_panel="Ray")]
RayCpus = Annotated[float, typer.Option("--ray-cpus-per-worker", help="CPUs reserved for each Ray worker.",
                                        rich_help_panel="Ray")]
RayGpus = Annotated[float, typer.Option("--ray-gpus-per-worker", help="GPUs reserved for each Ray worker (e.g. 1, "
                                        "or 0.5 to share one); pair with --device cuda.", rich_help_panel="Ray")]


def ray_config(address: str | None, workers: int, batch_size: int, cpus: float, gpus: float) -> Any:
    """The `RayConfig` of the `--ray*` options, or None without `--ray` (a single process)."""
    if address is None:
        return None
    from kvrank.cluster import RayConfig

    return RayConfig(address, workers=workers, batch_size=batch_size, cpus_per_worker=cpus, gpus_per_worker=gpus)


def hybrid_fusion(new: str, old: str | None) -> str:
    """`--hybrid-fusion`, or the deprecated `--fusion` (with a warning)."""
    if old is None:
        return new
    warn_deprecated("--fusion", "--hybrid-fusion")
    return old


def retriever_config(*, model: str | None = None, device: str = DEFAULT_DEVICE,
                     batch_size: int = DEFAULT_ENCODE_BATCH_SIZE, dense_index: str = DEFAULT_DENSE_INDEX,
                     fusion: str = DEFAULT_HYBRID_FUSION, hybrid_weight: float = DEFAULT_HYBRID_WEIGHT,
                     bm25_k1: float = DEFAULT_BM25_K1, bm25_b: float = DEFAULT_BM25_B,
                     show_progress: bool = True) -> Any:
    from kvrank.retriever import BM25Config, DenseConfig, FusionConfig, RetrieverConfig

    return RetrieverConfig(
        bm25=BM25Config(k1=bm25_k1, b=bm25_b),
        dense=DenseConfig(model=model, device=device, batch_size=batch_size, index_type=dense_index),
        fusion=FusionConfig(method=fusion, weight=hybrid_weight),
        show_progress=show_progress,
    )


def reranker_config(mode: str, *, model: str | None, device: str, dtype: str, **options: Any) -> Any:
    """The reranker settings for `--rerank MODE`, or None for `--rerank none`."""
    from kvrank.defaults import NO_RERANK

    if mode not in SEARCH_MODES:
        raise KvrankError(f"--rerank {mode!r} is not a reranking mode; use one of {', '.join(SEARCH_MODES)}")
    if mode == NO_RERANK:
        return None
    from kvrank.reranker.reranker import RerankerConfig

    if model:
        options["model"] = model
    return RerankerConfig(mode=mode, device=device, dtype=dtype, **options)
