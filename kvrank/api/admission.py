"""Admission: the one way a request's model work reaches the model worker.

`Admission.run(work, request)` estimates the work (`Service.estimate`: passage tokens the store lacks, rows to
score), admits it to the `Batcher` or refuses it at once (503 with Retry-After: queue full, or the queued work
would not let it finish before `request_timeout_s`), then waits for the worker until the deadline (504) or until
the client goes away (the job is dropped, 499). A library error (`KvrankError`) is a 422 naming its field.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from starlette.requests import Request

from kvrank.api.batching import Batcher, Closed, Expired, Overloaded, QueueFull
from kvrank.api.errors import ApiError, invalid
from kvrank.api.metrics import Metrics
from kvrank.api.service import Outcome, RerankWork, SearchWork, Service
from kvrank.api.settings import Settings
from kvrank.errors import KvrankError

logger = logging.getLogger(__name__)


class Admission:
    """The model worker (`Batcher` over `Service.process`) and the requests' way to it. `start` and `close` follow
    the app's lifespan; `ready` is false before `start`, after `close`, or if the worker died."""

    def __init__(self, service: Service, settings: Settings, metrics: Metrics):
        self.service, self.settings, self.metrics = service, settings, metrics
        self.batcher = Batcher(service.process, max_batch=settings.max_batch_queries,
                               max_wait_s=settings.batch_wait_ms / 1e3, queue_size=settings.queue_size)
        self.batcher.on_batch = metrics.observe_batch
        metrics.watch_admission(self.batcher, lambda: service.rows_dropped)
        self.started = False

    @property
    def ready(self) -> bool:
        return self.started and self.batcher.alive

    def start(self) -> None:
        self.batcher.start()
        self.started = True

    async def close(self) -> None:
        """Refuse new work, let the queued jobs finish (up to `request_timeout_s`), stop the worker."""
        timeout = self.settings.request_timeout_s
        if not await asyncio.to_thread(self.batcher.close, timeout):
            logger.warning("model worker still busy after %.0f s; exiting anyway", timeout)

    async def run(self, work: SearchWork | RerankWork, request: Request,
                  params: Mapping[str, str] | None = None) -> Outcome:
        """The worker's outcome for `work`, or an `ApiError` (503, 504, 499; 422 for a `KvrankError`, its
        `param` translated to the request's field by `params`)."""
        settings, rejected = self.settings, self.metrics.rejected
        deadline = time.perf_counter() + settings.request_timeout_s  # from the request's arrival
        if not self.ready:
            rejected.labels("not_ready").inc()
            raise ApiError(503, "not_ready", "the model worker is not running (starting or shutting down)",
                           headers={"Retry-After": "5"})
        try:
            cost = await asyncio.to_thread(self.service.estimate, work)
            job = self.batcher.submit(work, cost, deadline)
        except KvrankError as err:
            raise invalid(err, params or {}) from None
        except QueueFull as err:
            rejected.labels("queue_full").inc()
            raise ApiError(503, "overloaded", f"{err}; retry after {err.retry_after_s} s or raise "
                           "KVRANK_QUEUE_SIZE", limit="queue_size",
                           headers={"Retry-After": str(err.retry_after_s)}) from None
        except Overloaded as err:
            rejected.labels("deadline").inc()
            raise ApiError(503, "overloaded", f"{err} (request_timeout_s={settings.request_timeout_s:g}); retry "
                           f"after {err.retry_after_s} s", limit="request_timeout_s",
                           headers={"Retry-After": str(err.retry_after_s)}) from None
        except Closed:
            rejected.labels("shutting_down").inc()
            raise ApiError(503, "not_ready", "the server is shutting down", headers={"Retry-After": "5"}) from None
        future = asyncio.wrap_future(job.future)
        future.add_done_callback(_retrieve)  # a result nobody awaits any more is not an error to log
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            finished, _ = await asyncio.wait({future, gone}, timeout=max(0.0, deadline - time.perf_counter()),
                                             return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if future in finished:
            try:
                return future.result()
            except Expired:
                pass  # answered 504 below, at once
            except KvrankError as err:
                raise invalid(err, params or {}) from None
        self.batcher.cancel(job)
        if gone in finished and future not in finished:
            rejected.labels("disconnected").inc()
            raise ApiError(499, "client_closed", "the client closed the connection before the answer")
        rejected.labels("timeout").inc()
        self.metrics.expired.inc()
        raise ApiError(504, "timeout", f"the request took longer than request_timeout_s="
                       f"{settings.request_timeout_s:g} s (KVRANK_REQUEST_TIMEOUT_S)",
                       limit="request_timeout_s") from None


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body is read by now; the server's next message
    is `http.disconnect`, sent when the client goes away or after the response)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
