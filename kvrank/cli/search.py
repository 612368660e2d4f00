"""`kvrank index` and `kvrank eval`: build a first-stage index; evaluate a pipeline on a test collection."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from kvrank.cli.common import (
    BM25B,
    BM25K1,
    AdapterOpt,
    BatchSize,
    CalibrationOpt,
    Data,
    DenseIndex,
    DenseModel,
    Device,
    Dtype,
    FusionWeight,
    HeadOpt,
    HybridFusion,
    HybridFusionOld,
    HybridWeight,
    IndexDir,
    KVFormatOpt,
    RayAddress,
    RayBatchSize,
    RayCpus,
    RayGpus,
    RayWorkers,
    RemoteStore,
    Rerank,
    RerankDepth,
    RerankModel,
    Retrieval,
    StoreDir,
    console,
    friendly_errors,
    hybrid_fusion,
    ray_config,
    reranker_config,
    retriever_config,
)
from kvrank.cluster.connect import DEFAULT_RAY_BATCH_SIZE, DEFAULT_RAY_CPUS, DEFAULT_RAY_GPUS, DEFAULT_RAY_WORKERS
from kvrank.defaults import (
    DEFAULT_BM25_B,
    DEFAULT_BM25_K1,
    DEFAULT_CALIBRATION_PASSAGES,
    DEFAULT_DENSE_INDEX,
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_ENCODE_BATCH_SIZE,
    DEFAULT_EVAL_RETRIEVER,
    DEFAULT_FUSION_WEIGHT,
    DEFAULT_HEAD,
    DEFAULT_HYBRID_FUSION,
    DEFAULT_HYBRID_WEIGHT,
    DEFAULT_K,
    DEFAULT_MODE,
    DEFAULT_RERANK_DEPTH,
    DEFAULT_RETRIEVER,
    NO_RERANK,
)
from kvrank.errors import KvrankError

if TYPE_CHECKING:
    from kvrank.eval.profile import CallProfile


@friendly_errors
def index(
    data: Data,
    index_dir: Annotated[Path, typer.Option("--index-dir", help="Folder to write the index into (bm25/, dense/).")],
    retriever: Retrieval = DEFAULT_RETRIEVER,
    model: Annotated[str | None, typer.Option(
        "--model", "--dense-model", help="Dense model: local path or hub id (default: the bundled "
        "all-MiniLM-L6-v2).")] = None,
    device: Device = DEFAULT_DEVICE,
    batch_size: BatchSize = DEFAULT_ENCODE_BATCH_SIZE,
    dense_index: DenseIndex = DEFAULT_DENSE_INDEX,
    bm25_k1: BM25K1 = DEFAULT_BM25_K1,
    bm25_b: BM25B = DEFAULT_BM25_B,
    ray: RayAddress = None,
    ray_workers: RayWorkers = DEFAULT_RAY_WORKERS,
    ray_batch_size: RayBatchSize = DEFAULT_RAY_BATCH_SIZE,
    ray_cpus_per_worker: RayCpus = DEFAULT_RAY_CPUS,
    ray_gpus_per_worker: RayGpus = DEFAULT_RAY_GPUS,
) -> None:
    """Build (or rebuild) the first-stage index of a corpus; writes are atomic. With --ray, Ray workers compute
    the dense embeddings and this process assembles the index."""
    from kvrank.eval.data import load_dataset
    from kvrank.retriever import build_or_load

    on_ray = ray_config(ray, ray_workers, ray_batch_size, ray_cpus_per_worker, ray_gpus_per_worker)
    dataset = load_dataset(data)
    config = retriever_config(model=model, device=device, batch_size=batch_size, dense_index=dense_index,
                              bm25_k1=bm25_k1, bm25_b=bm25_b)
    start = time.perf_counter()
    vectors = None
    if on_ray is not None and retriever in ("dense", "hybrid"):
        from kvrank.cluster import connected
        from kvrank.cluster.jobs import embed_passages

        with connected(on_ray):
            vectors = embed_passages(on_ray, config.dense, dataset.corpus)
    built = build_or_load(retriever, dataset, index_dir, config, rebuild=True, vectors=vectors)
    console.print(f"[green]indexed[/green] {len(dataset.corpus)} passages of {escape(dataset.name)} with "
                  f"{escape(built.name)} into {escape(str(index_dir))} in {time.perf_counter() - start:.1f} s")


@friendly_errors
def eval_cmd(
    data: Data,
    index_dir: IndexDir = None,
    retriever: Annotated[str | None, typer.Option(
        "--retriever", help=f"{DEFAULT_EVAL_RETRIEVER} (default), dense or hybrid.")] = None,
    candidates: Annotated[Path | None, typer.Option(
        "--candidates", help="First-stage candidates from a TREC run file (.gz too) instead of a retriever.")] = None,
    max_queries: Annotated[int | None, typer.Option(
        "--max-queries", help="Evaluate the first N test queries in sorted id order.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
    html_path: Annotated[Path | None, typer.Option(
        "--html", help="Write the report as one self-contained HTML file (plots inline) here.")] = None,
    run_path: Annotated[Path | None, typer.Option("--run", help="Write the final ranking as a TREC run.")] = None,
    k: Annotated[int, typer.Option("--k", help="Candidates per query from the first stage.")] = DEFAULT_K,
    metrics: Annotated[list[str] | None, typer.Option(
        "--metrics", help="ir_measures measures to report, space- or comma-separated, e.g. 'nDCG@10 AP@1000 "
        "P@10' (default: nDCG@10 RR@10 R@100, plus AP@1000 on TREC DL). Cut-offs beyond --k see only the "
        "run's k documents.", show_default=False)] = None,
    rel_level: Annotated[int | None, typer.Option(
        "--rel-level", help="Lowest relevance grade that binary measures (RR, R, P, AP) count as relevant "
        "(default: the collection's convention: 2 on TREC DL passage, 1 on BEIR).", show_default=False)] = None,
    dense_model: DenseModel = None,
    dense_index: DenseIndex = DEFAULT_DENSE_INDEX,
    fusion: HybridFusion = DEFAULT_HYBRID_FUSION,
    fusion_old: HybridFusionOld = None,
    hybrid_weight: HybridWeight = DEFAULT_HYBRID_WEIGHT,
    batch_size: BatchSize = DEFAULT_ENCODE_BATCH_SIZE,
    bm25_k1: BM25K1 = DEFAULT_BM25_K1,
    bm25_b: BM25B = DEFAULT_BM25_B,
    rerank: Rerank = DEFAULT_MODE,
    rerank_depth: RerankDepth = DEFAULT_RERANK_DEPTH,
    model: RerankModel = None,
    fusion_weight: FusionWeight = DEFAULT_FUSION_WEIGHT,
    store: StoreDir = None,
    remote_store: RemoteStore = None,
    device: Device = DEFAULT_DEVICE,
    dtype: Dtype = DEFAULT_DTYPE,
    kv_format: KVFormatOpt = None,
    calibration_passages: CalibrationOpt = DEFAULT_CALIBRATION_PASSAGES,
    adapter: AdapterOpt = None,
    head: HeadOpt = DEFAULT_HEAD,
    ray: RayAddress = None,
    ray_workers: RayWorkers = DEFAULT_RAY_WORKERS,
    ray_batch_size: RayBatchSize = DEFAULT_RAY_BATCH_SIZE,
    ray_cpus_per_worker: RayCpus = DEFAULT_RAY_CPUS,
    ray_gpus_per_worker: RayGpus = DEFAULT_RAY_GPUS,
    profile: Annotated[int, typer.Option(
        "--profile", help="After the evaluation, profile one more search of each of the first N evaluated queries "
        "(warm: their KV is stored) and print its stages and top torch operators with FLOPs.")] = 0,
) -> None:
    """Evaluate first-stage retrieval (and reranking) on a test collection: nDCG@10, RR@10, R@100 (or --metrics)
    at the collection's relevance level, a paired significance test of reranked vs first stage, latency. With
    --ray, Ray workers search the queries (each with its own pipeline); the report and run are the same."""
    from kvrank.eval.conventions import resolve
    from kvrank.eval.data import load_dataset, write_run
    from kvrank.eval.metrics import parse_metrics
    from kvrank.eval.profile import format_profile, profile_queries
    from kvrank.eval.runner import eval_queries, run_eval
    from kvrank.pipeline import PipelineConfig, build

    if candidates is not None and retriever is not None:
        raise KvrankError("--candidates and --retriever are alternatives: the candidates run is the first stage; "
                          "drop one of them")
    if profile < 0:
        raise KvrankError(f"--profile must be >= 0 (the number of queries to profile; 0: none), got {profile}")
    if profile and ray is not None:
        raise KvrankError("--profile profiles searches in this process, --ray runs them on workers; drop one of "
                          "them")
    if html_path is not None and html_path.is_dir():  # refused before the evaluation, not after it
        raise KvrankError(f"--html {html_path} is a folder; pass a file name such as {html_path / 'report.html'}")
    on_ray = ray_config(ray, ray_workers, ray_batch_size, ray_cpus_per_worker, ray_gpus_per_worker)
    reranker = reranker_config(rerank, model=model, device=device, dtype=dtype)
    measures = parse_metrics(metrics) if metrics else None  # before loading: a typo fails fast
    dataset = load_dataset(data)
    convention = resolve(dataset, rel_level, measures)
    settings: dict[str, Any] = {"rerank_mode": rerank}
    first_config = retriever_config(model=dense_model, device=device, batch_size=batch_size,
                                    dense_index=dense_index, fusion=hybrid_fusion(fusion, fusion_old),
                                    hybrid_weight=hybrid_weight, bm25_k1=bm25_k1, bm25_b=bm25_b)
    kind = None if candidates is not None else retriever or DEFAULT_EVAL_RETRIEVER
    if candidates is not None:
        settings["candidates"] = str(candidates)
    else:
        settings |= {"retriever_kind": kind, "index_dir": str(index_dir) if index_dir else None,
                     "retriever_config": dataclasses.asdict(first_config)}
    config = PipelineConfig(retriever=kind, retriever_config=first_config, index_dir=index_dir,
                            candidates=candidates, reranker=reranker, adapter=adapter, head=head, kv_format=kv_format,
                            store_dir=store, remote_store=remote_store,
                            calibration_passages=calibration_passages, k=k, rerank_depth=rerank_depth,
                            fusion_weight=fusion_weight)
    if reranker is not None:
        settings |= {"rerank_model": model, "kv_format": kv_format, "fusion_weight": fusion_weight,
                     "store": str(store) if store else None, "remote_store": remote_store, "device": device,
                     "dtype": dtype}
    profiles: list[CallProfile] = []
    if on_ray is not None:
        from kvrank.cluster import connected, jobs

        with connected(on_ray):
            report = jobs.run_eval(on_ray, config, dataset, max_queries=max_queries, settings=settings,
                                   convention=convention)
        if adapter is not None:
            settings["adapter"] = {"path": str(adapter), "digest": report.extra["reranker"]["adapter"]}
        _note_head(settings, head, report.extra.get("reranker", {}).get("head"), fusion_weight)
    else:
        with build(config, dataset) as pipeline:
            if adapter is not None:
                settings["adapter"] = {"path": str(adapter), "digest": pipeline.adapter_digest}
            _note_head(settings, head, pipeline.head_digest, fusion_weight)
            report = run_eval(dataset, pipeline, max_queries=max_queries, settings=settings, show_progress=True,
                              convention=convention)
            if profile:
                profiles = profile_queries(pipeline, eval_queries(dataset, max_queries)[:profile])
    print_report(report)
    for call in profiles:
        console.print("\n" + format_profile(call), markup=False, highlight=False, soft_wrap=True)
    if json_path is not None:
        report.write_json(json_path)
        console.print(f"wrote {escape(str(json_path))}")
    if html_path is not None:
        from kvrank.eval.html import write_html

        label = f"{report.dataset} {report.retriever}" + (f" + {rerank}" if rerank != NO_RERANK else "")
        console.print(f"wrote {escape(str(write_html([report], html_path, [label])))}")
    if run_path is not None:
        write_run(report.run, run_path, tag=f"kvrank-{rerank}" if rerank != NO_RERANK else "kvrank")
        console.print(f"wrote {escape(str(run_path))}")


def print_report(report: Any) -> None:
    from kvrank.eval.report import report_tables

    for renderable in report_tables(report):
        console.print(renderable)


def _note_head(settings: dict[str, Any], option: str, digest: str | None, fusion_weight: float | None) -> None:
    """Record the scoring head that ranked the results (it replaces fusion, so no fusion weight applied); say so
    when a fusion weight other than the default was asked for."""
    if digest is None:
        return
    settings["head"] = {"option": option, "digest": digest}
    settings["fusion_weight"] = None
    if fusion_weight != DEFAULT_FUSION_WEIGHT:
        console.print(f"[yellow]note[/yellow]: the scoring head {digest} ranks these results, so --fusion-weight "
                      f"{fusion_weight} does not apply; pass --head none to fuse")
