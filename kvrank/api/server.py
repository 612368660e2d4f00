"""`kvrank serve`: load the corpus, index, model and KV store named by `Settings`, then run uvicorn.

Loading happens before the port is bound, so a bad path or a store of another model ends the command with the
CLI's one-line error instead of a server that never becomes ready.
"""

from __future__ import annotations

import logging

from kvrank.api.service import Components
from kvrank.api.settings import Settings
from kvrank.reranker.disk_store import DiskKVStore

logger = logging.getLogger(__name__)


def build_components(settings: Settings) -> Components:
    from kvrank.demo import demo_dataset
    from kvrank.eval.data import load_dataset
    from kvrank.reranker.formats import calibration_sample, store_format
    from kvrank.reranker.pipeline import reranker_with_store
    from kvrank.reranker.reranker import RerankerConfig
    from kvrank.retriever import RetrieverConfig, build_or_load

    dataset = load_dataset(settings.data) if settings.data else demo_dataset()
    retriever = build_or_load(settings.retriever, dataset, settings.index_dir,
                              RetrieverConfig(show_progress=False))
    kv_format = settings.kv_format
    if "kv_format" not in settings.model_fields_set and (recorded := store_format(settings.store)) is not None:
        kv_format = recorded  # an existing store's own layout unless one is asked for
    config = RerankerConfig(mode=settings.rerank_mode, model=settings.model, device=settings.device,
                            dtype=settings.dtype, kv_format=kv_format)
    reranker = reranker_with_store(config, settings.store,  # a corpus sample, taken only if a basis is fitted
                                   calibration=lambda: calibration_sample(list(dataset.corpus.values())))
    return Components(corpus=dataset.corpus, retriever=retriever, reranker=reranker, model_name=settings.model)


def serve(settings: Settings, components: Components | None = None) -> None:
    """Blocks until SIGINT/SIGTERM; in-flight requests finish first (up to `request_timeout_s` + 5 s)."""
    import uvicorn

    from kvrank.api.app import create_app

    components = components or build_components(settings)
    app = create_app(components, settings)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False,
                    timeout_graceful_shutdown=int(settings.request_timeout_s) + 5)
    finally:
        store = components.reranker.store
        if isinstance(store, DiskKVStore):
            store.close()
