"""`kvrank serve`: the search API over HTTP (settings from options, then KVRANK_* variables, then defaults)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kvrank.cli.common import (
    AdapterOpt,
    KVFormatOpt,
    RayAddress,
    RayCpus,
    RayGpus,
    RemoteStore,
    RerankModel,
    friendly_errors,
)
from kvrank.cluster.connect import DEFAULT_RAY_CPUS, DEFAULT_RAY_GPUS
from kvrank.defaults import RERANK_MODES
from kvrank.errors import KvrankError


@friendly_errors
def serve(
    data: Annotated[str | None, typer.Option("--data", help="Corpus (BEIR folder); default: the demo corpus.")] = None,
    index_dir: Annotated[Path | None, typer.Option("--index-dir", help="Index folder from `kvrank index`.")] = None,
    retriever: Annotated[str | None, typer.Option("--retriever", help="bm25, dense or hybrid.")] = None,
    store: Annotated[Path | None, typer.Option("--store", help="Passage KV store folder.")] = None,
    remote_store: RemoteStore = None,
    model: RerankModel = None,
    rerank: Annotated[str | None, typer.Option("--rerank", help=f"Default mode: {', '.join(RERANK_MODES)}.")] = None,
    fusion_weight: Annotated[float | None, typer.Option(
        "--fusion-weight", help="Default rerank fusion weight (the first stage's share); as `kvrank eval`.")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (default 8000).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="Device for the models.")] = None,
    kv_format: KVFormatOpt = None,
    adapter: AdapterOpt = None,
    head: Annotated[str | None, typer.Option("--head", help="Scoring head: auto (default), none, or a folder from "
                                             "`kvrank train --head`; as `kvrank eval --head`.")] = None,
    ray: RayAddress = None,
    replicas: Annotated[int, typer.Option("--replicas", help="With --ray: Ray Serve replicas, each with its own "
                                          "pipeline and model.", rich_help_panel="Ray")] = 1,
    ray_cpus_per_worker: RayCpus = DEFAULT_RAY_CPUS,
    ray_gpus_per_worker: RayGpus = DEFAULT_RAY_GPUS,
) -> None:
    """Serve /v1/search, /v1/rerank and /rerank over HTTP (settings also from KVRANK_* variables; see
    docs/guide/serving.md). With --ray, Ray Serve runs --replicas copies of the API behind one address."""
    from pydantic import ValidationError

    from kvrank.api.server import serve as run_server
    from kvrank.api.settings import Settings

    if ray is None and replicas != 1:
        raise KvrankError(f"--replicas {replicas} needs --ray: one process serves one copy of the API; pass --ray "
                          "auto (or local:N) to run replicas on Ray Serve")
    given: dict[str, Any] = {
        "data": data, "index_dir": index_dir, "retriever": retriever, "store": store, "remote_store": remote_store,
        "model": model, "rerank_mode": rerank, "fusion_weight": fusion_weight, "host": host, "port": port,
        "device": device, "kv_format": kv_format, "adapter": adapter,
        "head": head}
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        raise KvrankError(f"setting {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if ray is None:
        run_server(settings)
        return
    from kvrank.cluster import RayConfig
    from kvrank.cluster.serve import serve_forever

    serve_forever(settings, RayConfig(ray, cpus_per_worker=ray_cpus_per_worker, gpus_per_worker=ray_gpus_per_worker),
                  replicas)
