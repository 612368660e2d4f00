"""Ray Serve: the FastAPI app of `kvrank serve` (`api.app.create_app`) as the ingress of N replicas.

    kvrank serve --ray auto --replicas 2 --data DIR --store DIR     (this command blocks; Ctrl-C/SIGTERM stop it)
    serve run docs/serve.yaml                                       (the same application, from a Serve config)
    serve run kvrank.cluster.serve:build_app replicas=2 data=DIR    (or with `serve run` arguments)

Each replica builds its own pipeline from the same `Settings` (`api.server.build_pipeline`, what `kvrank serve`
builds) and runs the unchanged app: its own micro-batching model worker, started and drained by the app's
lifespan, which Serve runs on each replica. The replica's id is in `/readyz` and in every response's
`X-Kvrank-Replica` header; `/readyz` answers 200 only when that replica's pipeline and worker are ready.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from kvrank.api.settings import Settings
from kvrank.cluster.connect import (
    DEFAULT_RAY_CPUS,
    DEFAULT_RAY_GPUS,
    RayConfig,
    connected,
    current_node,
    node_store,
    require_ray,
    worker_errors,
)
from kvrank.errors import KvrankError

logger = logging.getLogger(__name__)
APP_NAME = "kvrank"
DRAIN_MARGIN_S = 5.0  # replicas get the request timeout plus this to finish in-flight requests on shutdown


def deployment(settings: Settings, replicas: int = 1, *, cpus: float = DEFAULT_RAY_CPUS,
               gpus: float = DEFAULT_RAY_GPUS) -> Any:
    """The Serve application: `replicas` copies of the API over `settings`, each reserving `cpus` and `gpus`."""
    if replicas < 1:
        raise KvrankError(f"replicas must be >= 1, got {replicas}", param="replicas")
    require_ray()
    from ray import serve

    from kvrank.api.app import create_app
    from kvrank.api.page import Judgements
    from kvrank.api.server import build_pipeline, served_dataset

    class KvrankReplica:
        """One copy of the API. Serve builds the app after the constructor (`__serve_build_asgi_app__`), so the
        app is made over this replica's own pipeline."""

        def __init__(self, settings: Settings):
            store = node_store(settings.store, current_node())  # `{node}`: this node's own store folder
            self.settings = settings.model_copy(update={"store": store})
            dataset = served_dataset(self.settings)
            self.pipeline = build_pipeline(self.settings, dataset)
            self.judgements = Judgements.from_dataset(dataset)  # what the search page marks

        def __serve_build_asgi_app__(self) -> Any:
            replica = serve.get_replica_context().replica_id.unique_id
            return create_app(self.pipeline, self.settings, replica=replica, judgements=self.judgements)

        def __del__(self) -> None:  # Serve calls it on shutdown, after the app's lifespan has drained the worker
            self.pipeline.close()

    api = serve.deployment(name="kvrank-api", num_replicas=replicas,
                           ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
                           graceful_shutdown_timeout_s=settings.request_timeout_s + DRAIN_MARGIN_S,
                           max_ongoing_requests=settings.queue_size + settings.max_batch_queries)
    return api(serve.ingress()(KvrankReplica)).bind(settings)


def build_app(args: dict[str, Any]) -> Any:
    """The application builder of `serve run kvrank.cluster.serve:build_app` and docs/serve.yaml: `replicas`,
    `cpus_per_replica`, `gpus_per_replica`, and any `Settings` field (the rest come from KVRANK_* variables)."""
    options = dict(args)
    replicas = int(options.pop("replicas", 1))
    cpus = float(options.pop("cpus_per_replica", DEFAULT_RAY_CPUS))
    gpus = float(options.pop("gpus_per_replica", DEFAULT_RAY_GPUS))
    return deployment(Settings(**options), replicas, cpus=cpus, gpus=gpus)


def serve_forever(settings: Settings, ray_config: RayConfig, replicas: int) -> None:
    """`kvrank serve --ray`: run the application on `settings.host:port` until SIGINT/SIGTERM, then shut Serve
    down (replicas finish their in-flight requests first)."""
    from ray import serve

    stop = threading.Event()
    with connected(ray_config):
        # Replaces the SIGTERM handler `ray.init` installs, which aborts the process without shutting Serve down.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        app = deployment(settings, replicas, cpus=ray_config.cpus_per_worker, gpus=ray_config.gpus_per_worker)
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            with worker_errors():  # a replica that cannot build its pipeline: the CLI's one-line error
                serve.run(app, name=APP_NAME, route_prefix="/")
            logger.warning("kvrank API on Ray Serve: %d replicas at http://%s:%d", replicas, settings.host,
                           settings.port)
            while not stop.wait(1.0):  # wakes for the signal handler
                pass
        finally:
            serve.shutdown()
