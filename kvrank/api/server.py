"""`kvrank serve`: build the pipeline `Settings` describe (the same `build` as `kvrank eval`), then run uvicorn.

Building happens before the port is bound, so a bad path or a store of another model ends the command with the
CLI's one-line error instead of a server that never becomes ready.
"""

from __future__ import annotations

import logging

from kvrank.api.settings import Settings
from kvrank.pipeline import PipelineConfig, SearchPipeline, build
from kvrank.types import Dataset

logger = logging.getLogger(__name__)


def pipeline_config(settings: Settings) -> PipelineConfig:
    """The pipeline of `settings`, built as the Python API builds its own (`kvrank.library.pipeline_config`)."""
    from kvrank.library import pipeline_config as library_config

    # an explicit format, else an existing store's own, else the default (auto)
    kv_format = settings.kv_format if "kv_format" in settings.model_fields_set else None
    config: PipelineConfig = library_config(
        retriever=settings.retriever, mode=settings.rerank_mode, model=settings.model, device=settings.device,
        dtype=settings.dtype, kv_format=kv_format, head=settings.head, store=settings.store,
        remote_store=settings.remote_store, adapter=settings.adapter, index_dir=settings.index_dir,
        rerank_depth=settings.rerank_depth, fusion_weight=settings.fusion_weight)
    return config


def served_dataset(settings: Settings) -> Dataset:
    """The corpus `settings` name (`data`), else the embedded demo corpus."""
    from kvrank.demo import demo_dataset
    from kvrank.eval.data import load_dataset

    return load_dataset(settings.data) if settings.data else demo_dataset()


def build_pipeline(settings: Settings, dataset: Dataset | None = None) -> SearchPipeline:
    return build(pipeline_config(settings), dataset or served_dataset(settings))


def serve(settings: Settings, pipeline: SearchPipeline | None = None) -> None:
    """Blocks until SIGINT/SIGTERM; in-flight requests finish first (up to `request_timeout_s` + 5 s)."""
    import uvicorn

    from kvrank.api.app import create_app
    from kvrank.api.page import Judgements

    # The page marks judged hits from the served dataset's qrels; a caller's own pipeline brings no dataset.
    judgements = None
    if pipeline is None:
        dataset = served_dataset(settings)
        pipeline = build_pipeline(settings, dataset)
        judgements = Judgements.from_dataset(dataset)
    with pipeline:
        app = create_app(pipeline, settings, judgements=judgements)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False,
                    timeout_graceful_shutdown=int(settings.request_timeout_s) + 5)
