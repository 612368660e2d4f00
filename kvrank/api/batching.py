"""Micro-batching: one worker thread owns the model; requests wait in a bounded queue and are taken in batches.

The event loop never runs model code: a request `submit`s a job and awaits its future. The worker takes the
oldest job, then everything else already queued, and, while the batch is short of `max_batch`, waits up to
`max_wait_s` for more; `process(batch)` then serves the whole batch (one retrieval call, shared forward passes).
A full queue refuses new jobs (`QueueFull`, answered 503 with Retry-After); a job whose request timed out before
the worker reached it is skipped. `close()` refuses new jobs, lets the worker finish every queued one, and joins.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `queue_size` jobs; `retry_after_s` estimates when one will have left."""

    def __init__(self, size: int, retry_after_s: int):
        super().__init__(f"the request queue is full ({size} waiting; queue_size)")
        self.retry_after_s = retry_after_s


class Closed(Exception):
    """The batcher is shutting down and takes no new jobs."""


@dataclass
class Job:
    """One request's work; `process` sets `future`'s result or exception."""

    payload: Any
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0


class Batcher:
    def __init__(self, process: Callable[[Sequence[Job]], None], max_batch: int = 8, max_wait_s: float = 0.005,
                 queue_size: int = 64, name: str = "kvrank-model"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.process = process
        self.max_batch, self.max_wait_s, self.queue_size = max_batch, max_wait_s, queue_size
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = 0  # jobs being processed now
        self._batch_s = 0.0  # moving average of a batch's duration (Retry-After estimate)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.batches = 0
        self.on_batch: Callable[[int, float], None] | None = None  # (jobs, seconds) after each batch

    # ------------------------------------------------------------------ request side (event loop thread)
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def depth(self) -> int:
        """Jobs queued and not yet taken by the worker."""
        return len(self._jobs)

    @property
    def in_flight(self) -> int:
        return len(self._jobs) + self._busy

    def submit(self, payload: Any) -> Job:
        job = Job(payload)
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            if len(self._jobs) >= self.queue_size:
                raise QueueFull(len(self._jobs), self.retry_after_s())
            self._jobs.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> bool:
        """Give up a job the worker has not taken (its request timed out): it leaves the queue at once."""
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)
        return job.future.cancel()

    def retry_after_s(self) -> int:
        """Seconds until the queue has drained by one batch's worth, at the recent batch duration (>= 1)."""
        batches_ahead = len(self._jobs) / self.max_batch + 1
        return max(1, round(batches_ahead * self._batch_s + 0.5))

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new jobs, finish the queued ones, stop the worker; True when it stopped within `timeout`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ worker thread
    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if not self._jobs:
                return None  # closed and drained
            batch = [self._jobs.popleft()]
            deadline = time.perf_counter() + self.max_wait_s
            while len(batch) < self.max_batch:
                if self._jobs:
                    batch.append(self._jobs.popleft())
                    continue
                left = deadline - time.perf_counter()
                if left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            # A request that timed out (its future cancelled) before now is dropped; the rest are claimed.
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            self._busy = len(batch)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            start = time.perf_counter()
            for job in batch:
                job.started = start
            try:
                self.process(batch)
            except Exception as err:  # never let one batch end the worker
                logger.exception("model worker: a batch of %d failed", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)
            finally:
                for job in batch:  # a process() that forgot a job must not leave its request hanging
                    if not job.future.done():
                        job.future.set_exception(RuntimeError("the batch ended without a result for this job"))
                seconds = time.perf_counter() - start
                self._batch_s = seconds if self.batches == 0 else 0.8 * self._batch_s + 0.2 * seconds
                self.batches += 1
                with self._cond:
                    self._busy = 0
                if self.on_batch is not None:
                    self.on_batch(len(batch), seconds)
