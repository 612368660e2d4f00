"""Which Ray to run on, how many workers and what each gets; connecting; per-node store folders."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from kvrank.errors import KvrankError

INSTALL_HINT = "pip install 'kvrank[ray]'"
NODE_FIELD = "{node}"  # in store_dir: replaced on each worker by its Ray node's short id
NODE_ID_CHARS = 12  # a Ray node id is 56 hex characters; 12 tell the nodes of any real cluster apart
MAX_RESTARTS = 3  # a worker killed mid-job (OOM, preemption) is restarted this often ...
MAX_TASK_RETRIES = 3  # ... and its batch retried; bounded, so a batch that always kills its worker fails the job
DEFAULT_RAY_WORKERS = 2
DEFAULT_RAY_BATCH_SIZE = 64
DEFAULT_RAY_CPUS = 1.0
DEFAULT_RAY_GPUS = 0.0
_ADDRESS = re.compile(r"ray://\S+|[\w.-]+:\d+")
_LOCAL = re.compile(r"local:(\d+)")


def require_ray() -> ModuleType:
    """The `ray` module, or a one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise KvrankError(f"running on Ray needs Ray, which is not installed; {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class RayConfig:
    """`address`: `auto` (the cluster this machine belongs to), `ray://HOST:PORT` (Ray Client), `HOST:PORT` (a
    head node's GCS) or `local:N` (start a Ray of N CPUs in this process). `batch_size` rows (passages or
    queries) go to a worker per call; `workers` actors each hold one model, with `cpus_per_worker` CPUs and
    `gpus_per_worker` GPUs reserved."""

    address: str
    workers: int = DEFAULT_RAY_WORKERS
    batch_size: int = DEFAULT_RAY_BATCH_SIZE
    cpus_per_worker: float = DEFAULT_RAY_CPUS
    gpus_per_worker: float = DEFAULT_RAY_GPUS

    def __post_init__(self) -> None:
        if not (self.address == "auto" or _ADDRESS.fullmatch(self.address) or _LOCAL.fullmatch(self.address)):
            raise KvrankError(f"RayConfig.address {self.address!r} is not a Ray address; pass auto (this machine's "
                              "cluster), ray://HOST:PORT, HOST:PORT (a head node) or local:N (a local Ray of N CPUs)",
                              param="RayConfig.address")
        if self.local_cpus == 0:
            raise KvrankError("RayConfig.address local:0 starts a Ray without CPUs; pass local:N with N >= 1",
                              param="RayConfig.address")
        for name, least in (("workers", 1), ("batch_size", 1), ("cpus_per_worker", 0), ("gpus_per_worker", 0)):
            if (value := getattr(self, name)) < least:
                raise KvrankError(f"RayConfig.{name} must be >= {least}, got {value}", param=f"RayConfig.{name}")

    @property
    def local_cpus(self) -> int | None:
        """N of `local:N`; None for a cluster address."""
        match = _LOCAL.fullmatch(self.address)
        return int(match.group(1)) if match else None


@contextmanager
def connected(config: RayConfig) -> Iterator[None]:
    """Connected to the Ray `config` names for the duration of the block (and disconnected after). A process
    already connected (a test's cluster, a driver started by `ray job submit` that called `ray.init`) is used
    as it is."""
    ray = require_ray()
    if ray.is_initialized():
        yield
        return
    cpus = config.local_cpus
    try:
        if cpus is not None:
            ray.init(num_cpus=cpus, include_dashboard=False)
        else:
            ray.init(address=config.address)
    except ConnectionError as err:  # no cluster at the address (ray raises ConnectionError with its own hint)
        raise KvrankError(f"RayConfig.address {config.address}: could not connect to a Ray cluster ({err}); start "
                          "one with `ray start --head`, or pass local:N to start a local Ray",
                          param="RayConfig.address") from None
    try:
        yield
    finally:
        ray.shutdown()


def node_store(store: Path | None, node_id: str) -> Path | None:
    """`store` with `{node}` replaced by the short form of `node_id`: each Ray node keeps its own store folder,
    so two nodes on one machine (a test cluster) never share a SQLite index."""
    if store is None or NODE_FIELD not in str(store):
        return store
    return Path(str(store).replace(NODE_FIELD, node_id[:NODE_ID_CHARS]))


def current_node() -> str:
    """This worker's Ray node id (in a Ray worker process)."""
    return str(require_ray().get_runtime_context().get_node_id())


@contextmanager
def worker_errors() -> Iterator[None]:
    """A `KvrankError` raised on a worker (a bad model path, a store of another model) reaches the user as the
    same one-line error as in a single process, not as Ray's wrapped traceback."""
    try:
        yield
    except Exception as err:
        if (cause := _worker_cause(err)) is not None:
            raise KvrankError(str(cause), param=cause.param) from None  # with the argument at fault
        message = worker_error(err)
        if message is None:
            raise
        raise KvrankError(message) from None


def _worker_cause(err: BaseException) -> KvrankError | None:
    """The worker's own `KvrankError` that a failed batch carries (`RayTaskError.cause`), if any."""
    cause: BaseException | None = err
    while cause is not None and hasattr(cause, "cause"):
        cause = cause.cause
    return cause if type(cause) is KvrankError else None


def worker_error(err: BaseException) -> str | None:
    """The message of the `KvrankError` behind a Ray error, if one is. A failed batch carries the worker's
    exception (`RayTaskError.cause`); an actor whose constructor failed only carries its traceback as text."""
    if (cause := _worker_cause(err)) is not None:
        return str(cause)
    prefix = f"{KvrankError.__module__}.{KvrankError.__name__}: "
    lines = [line for line in str(err).splitlines() if line.startswith(prefix)]
    return lines[-1].removeprefix(prefix) if lines else None
