"""`kvrank serve`: the search API over HTTP (settings from options, then KVRANK_* variables, then defaults)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kvrank.cli.common import AdapterOpt, KVFormatOpt, RemoteStore, RerankModel, friendly_errors
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
) -> None:
    """Serve /v1/search and /v1/rerank over HTTP (settings also from KVRANK_* variables; see README)."""
    from pydantic import ValidationError

    from kvrank.api.server import serve as run_server
    from kvrank.api.settings import Settings

    given: dict[str, Any] = {
        "data": data, "index_dir": index_dir, "retriever": retriever, "store": store, "remote_store": remote_store,
        "model": model, "rerank_mode": rerank, "fusion_weight": fusion_weight, "host": host, "port": port,
        "device": device, "kv_format": kv_format, "adapter": adapter}
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        raise KvrankError(f"setting {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    run_server(settings)
