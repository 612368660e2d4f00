"""Scale-out on Ray (the `ray` extra): the single-process work of `kvrank index`, `warm`, `eval` and `serve`,
spread over a Ray cluster. Nothing here has its own ranking or storage logic: every worker builds what the
single-process command builds from the same frozen `PipelineConfig` and calls the same functions.

    connect.py   RayConfig (`--ray auto|ADDRESS|local:N` and the worker settings), connecting, `{node}` stores
    jobs.py      Ray Data jobs: corpus embeddings (index), passage prefill (warm), query search (eval)
    serve.py     Ray Serve: the FastAPI app of `kvrank serve` as the ingress of N replicas

`ray` is imported only inside these modules' functions, so `import kvrank.cluster` works without it.
"""

from kvrank.cluster.connect import NODE_FIELD, RayConfig, connected, node_store, require_ray

__all__ = ["NODE_FIELD", "RayConfig", "connected", "node_store", "require_ray"]
