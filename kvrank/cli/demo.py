"""`kvrank demo`: the embedded corpus, searched and reranked by the same pipeline `kvrank eval` builds."""

from __future__ import annotations

from typing import Annotated

import typer

from kvrank.cli.common import (
    AdapterOpt,
    Device,
    Dtype,
    HeadOpt,
    RemoteStore,
    Rerank,
    RerankDepth,
    RerankModel,
    Retrieval,
    StoreDir,
    console,
    friendly_errors,
    reranker_config,
    retriever_config,
)
from kvrank.defaults import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_HEAD,
    DEFAULT_MODE,
    DEFAULT_RERANK_DEPTH,
    DEFAULT_RETRIEVER,
)
from kvrank.errors import KvrankError


@friendly_errors
def demo(
    retriever: Retrieval = DEFAULT_RETRIEVER,
    k: Annotated[int, typer.Option("--k", help="Results shown per query.")] = 5,
    rerank: Rerank = DEFAULT_MODE,
    rerank_depth: RerankDepth = DEFAULT_RERANK_DEPTH,
    model: RerankModel = None,
    store: StoreDir = None,
    remote_store: RemoteStore = None,
    device: Device = DEFAULT_DEVICE,
    dtype: Dtype = DEFAULT_DTYPE,
    adapter: AdapterOpt = None,
    head: HeadOpt = DEFAULT_HEAD,
) -> None:
    """Index the embedded demo corpus, search its queries, rerank them with the block-attention reranker (the
    offline SmolLM2 by default) and run them again to show passage KV reuse; ranked results and timings."""
    from kvrank.demo import demo_dataset, run_demo
    from kvrank.pipeline import PipelineConfig, build

    if k < 1:
        raise KvrankError(f"--k must be >= 1, got {k}")
    dataset = demo_dataset()
    config = PipelineConfig(retriever=retriever, retriever_config=retriever_config(device=device),
                            reranker=reranker_config(rerank, model=model, device=device, dtype=dtype), store_dir=store,
                            remote_store=remote_store, adapter=adapter, head=head,
                            # hybrid fusion reads each retriever's top 100
                            k=max(k, rerank_depth, 100 if retriever == "hybrid" else k), rerank_depth=rerank_depth)
    with build(config, dataset) as pipeline:
        run_demo(console, pipeline, dataset, k=k)

