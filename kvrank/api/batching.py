"""Deadline- and cost-aware micro-batching: one worker thread owns the model; requests wait in a bounded queue.

Each request comes with its `Cost` (passage tokens to prefill, i.e. not in the KV store, and query-side rows to
score) and a deadline (arrival + `request_timeout_s`). `CostModel` turns a cost into seconds with throughput
constants calibrated online from the batches the worker runs (EWMA of seconds per prefilled token, per scored
row and per batch), so the estimate follows the machine, the model and the load it shares the machine with.

- **Admission** (`submit`): a request is queued only if the work ahead of it (what is left of the running batch
  and every queued job) plus its own estimate finishes before its deadline; otherwise `Overloaded` at once, with
  a Retry-After of when enough of that work will have drained. (Admission and batch growth plan with estimates
  `SAFETY` times the calibrated ones.) An idle worker admits anything (the estimate may be
  wrong; nothing else is delayed by trying). A queue of `queue_size` jobs refuses more (`QueueFull`).
- **Batches by cost** (`_take`): the oldest live job starts a batch; the next ones join while the batch's estimate
  still finishes before the earliest deadline in it and it holds fewer than `max_batch` jobs.
- **No wasted work**: a job whose request timed out or whose client went away (`cancel`) is dropped before it runs,
  and so is one that can no longer finish before its deadline (its request is answered at once: `Expired`).
  `process` checks `Job.abandoned` between stages, so a batch in progress finishes only the rows someone still
  waits for (passage KV already computed is stored anyway). A job completed after its client gave up counts as
  wasted (`counts.wasted`), which this design keeps at 0 barring a race within one stage.

`close()` refuses new jobs, lets the worker finish every queued one, and joins.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Starting throughput constants (replaced by measurements after the first batches): SmolLM2-135M in float32 on
# two busy CPU cores prefills ~100 passage tokens/s and scores ~10 query rows/s; a batch costs ~20 ms besides.
START_S_PER_TOKEN = 0.01
START_S_PER_ROW = 0.1
START_S_PER_BATCH = 0.02
EWMA = 0.3  # weight of the newest batch in the calibrated constants
# Admission and batch growth plan with estimates this much longer than the calibrated ones: a machine shared with
# other jobs runs a batch up to ~25 % slower than the last ones, and a 504 costs more than a 503 retried later.
SAFETY = 1.25


@dataclass(frozen=True)
class Cost:
    """The model work of a request: passage tokens to prefill (store misses) and query-side rows to score."""

    prefill_tokens: int = 0
    rows: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.prefill_tokens + other.prefill_tokens, self.rows + other.rows)


@dataclass(frozen=True)
class Measured:
    """What `process` reports about a batch it ran: the work really done and the seconds of its two stages."""

    cost: Cost
    prefill_s: float
    scoring_s: float


class CostModel:
    """Seconds of model work per `Cost`, calibrated online (`observe`) from measured batches."""

    def __init__(self, s_per_token: float = START_S_PER_TOKEN, s_per_row: float = START_S_PER_ROW,
                 s_per_batch: float = START_S_PER_BATCH, safety: float = SAFETY):
        self.s_per_token, self.s_per_row, self.s_per_batch = s_per_token, s_per_row, s_per_batch
        self.safety = safety
        self.batches = 0
        self._measured: set[str] = set()  # constants measured at least once

    def seconds(self, cost: Cost, batches: int = 1) -> float:
        return cost.prefill_tokens * self.s_per_token + cost.rows * self.s_per_row + batches * self.s_per_batch

    def observe(self, measured: Measured, total_s: float) -> None:
        """Fold one batch into the constants: its prefill seconds per prefilled token, scoring seconds per row,
        and the rest of its time (lookups, tokenizing, bookkeeping) per batch."""
        cost = measured.cost
        if cost.prefill_tokens > 0:
            self.s_per_token = self._fold(self.s_per_token, measured.prefill_s / cost.prefill_tokens, "token")
        if cost.rows > 0:
            self.s_per_row = self._fold(self.s_per_row, measured.scoring_s / cost.rows, "row")
        other = max(0.0, total_s - measured.prefill_s - measured.scoring_s)
        self.s_per_batch = self._fold(self.s_per_batch, other, "batch")
        self.batches += 1

    def _fold(self, old: float, new: float, name: str) -> float:
        """The first measurement replaces the starting value (which only has to be sane); later ones are
        averaged in."""
        if name not in self._measured:
            self._measured.add(name)
            return new
        return _ewma(old, new)


def _ewma(old: float, new: float) -> float:
    return (1 - EWMA) * old + EWMA * new


class QueueFull(Exception):
    """The queue holds `queue_size` jobs; `retry_after_s` estimates when one will have left."""

    def __init__(self, size: int, retry_after_s: int):
        super().__init__(f"the request queue is full ({size} waiting; queue_size)")
        self.retry_after_s = retry_after_s


class Overloaded(Exception):
    """The work queued ahead would not let this request finish before its deadline."""

    def __init__(self, wait_s: float, own_s: float, budget_s: float, retry_after_s: int):
        super().__init__(f"the server would not finish this request in time: {wait_s:.1f} s of queued work ahead "
                         f"and {own_s:.1f} s of its own exceed the {budget_s:.1f} s left before its deadline")
        self.retry_after_s = retry_after_s


class Expired(Exception):
    """The job could no longer finish before its deadline when the worker reached it; it was not run."""


class Closed(Exception):
    """The batcher is shutting down and takes no new jobs."""


@dataclass
class Job:
    """One request's work; `process` sets `future`'s result or exception and skips work once `abandoned`."""

    payload: Any
    cost: Cost = field(default_factory=Cost)
    deadline: float = math.inf  # time.perf_counter() by which the request must be answered
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    abandoned: bool = False  # its request timed out or its client disconnected: nobody waits for the result


@dataclass
class Counts:
    """What the batcher did since it started (read by /metrics)."""

    admitted: int = 0
    rejected_full: int = 0
    rejected_deadline: int = 0
    expired: int = 0  # dropped by the worker: could not finish before the deadline
    dropped: int = 0  # dropped by the worker: the request had timed out or its client had gone
    wasted: int = 0  # completed although nobody waited for them any more
    estimated_s: float = 0.0  # the cost model's estimates of the batches run ...
    actual_s: float = 0.0  # ... and their measured durations


class Batcher:
    def __init__(self, process: Callable[[Sequence[Job]], Measured | None], max_batch: int = 8,
                 max_wait_s: float = 0.005, queue_size: int = 64, name: str = "kvrank-model",
                 cost_model: CostModel | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.process = process
        self.max_batch, self.max_wait_s, self.queue_size = max_batch, max_wait_s, queue_size
        self.costs = cost_model or CostModel()
        self.counts = Counts()
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = 0  # jobs being processed now
        self._busy_until = 0.0  # the running batch's estimated end (perf_counter)
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

    def estimate_s(self, cost: Cost) -> float:
        return self.costs.seconds(cost)

    def submit(self, payload: Any, cost: Cost | None = None, deadline: float = math.inf) -> Job:
        """Queue a job, or refuse it: `Closed`, `QueueFull`, or `Overloaded` (it would not finish by `deadline`)."""
        job = Job(payload, cost or Cost(), deadline)
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            if len(self._jobs) >= self.queue_size:
                self.counts.rejected_full += 1
                raise QueueFull(len(self._jobs), self._retry_after(self._drain_s(head_only=True)))
            now = time.perf_counter()
            ahead, own = self._drain_s(), self.estimate_s(job.cost)
            busy = self._busy > 0 or bool(self._jobs)
            if busy and now + (ahead + own) * self.costs.safety > deadline:
                self.counts.rejected_deadline += 1
                budget = deadline - now
                # Enough of the work ahead has drained once what is left of it plus this job fits in a new
                # request's whole budget (the deadline measured from its arrival).
                raise Overloaded(ahead, own, budget, self._retry_after(ahead + own - budget / self.costs.safety))
            self._jobs.append(job)
            self.counts.admitted += 1
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> bool:
        """Nobody waits for `job` any more (its request timed out, or the client went away): it leaves the queue
        at once, or a batch running it skips what is left of it. True if it had not started."""
        job.abandoned = True
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)
                self.counts.dropped += 1
        return job.future.cancel()

    def retry_after_s(self) -> int:
        """Seconds until the head of the queue will have left, at the calibrated cost (>= 1)."""
        with self._cond:
            return self._retry_after(self._drain_s(head_only=True))

    @staticmethod
    def _retry_after(seconds: float) -> int:
        return max(1, math.ceil(seconds))

    def _drain_s(self, head_only: bool = False) -> float:
        """Estimated seconds until the running batch and the queued jobs (or only the first) are done (with the
        lock held)."""
        left = max(0.0, self._busy_until - time.perf_counter()) if self._busy else 0.0
        jobs = list(self._jobs)[:1] if head_only else self._jobs
        return left + sum(self.estimate_s(j.cost) for j in jobs)

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new jobs, finish the queued ones, stop the worker; True when it stopped within `timeout`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ worker thread
    def _live(self, job: Job, now: float) -> bool:
        """Whether the job is still worth running; a dead one is answered (or was) and counted (lock held). A
        job the estimate says could never have finished in time (it was admitted by an idle worker) still runs
        when the wait did not make it late: the estimate may be wrong."""
        if job.abandoned or job.future.cancelled():
            self.counts.dropped += 1
            return False
        own = self.estimate_s(job.cost)
        if now >= job.deadline or (now + own > job.deadline and job.enqueued + own <= job.deadline):
            self.counts.expired += 1
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(Expired("the request could no longer finish before its deadline"))
            return False
        return True

    def _take(self) -> list[Job] | None:
        with self._cond:
            batch: list[Job] = []
            while not batch:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return None  # closed and drained
                job = self._jobs.popleft()
                if self._live(job, time.perf_counter()):
                    batch.append(job)
            cost, deadline = batch[0].cost, batch[0].deadline
            wait_until = time.perf_counter() + self.max_wait_s
            while len(batch) < self.max_batch:
                if self._jobs:
                    job = self._jobs[0]
                    now = time.perf_counter()
                    if not self._live(job, now):
                        self._jobs.popleft()
                        continue
                    # The batch grows only while it still finishes before the earliest deadline in it.
                    if now + self.costs.seconds(cost + job.cost) * self.costs.safety > min(deadline, job.deadline):
                        break
                    self._jobs.popleft()
                    batch.append(job)
                    cost, deadline = cost + job.cost, min(deadline, job.deadline)
                    continue
                left = wait_until - time.perf_counter()
                if left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            # A request that timed out (its future cancelled) just now is dropped; the rest are claimed.
            claimed = [job for job in batch if job.future.set_running_or_notify_cancel()]
            self.counts.dropped += len(batch) - len(claimed)
            self._busy = len(claimed)
            self._busy_until = time.perf_counter() + self.costs.seconds(sum((j.cost for j in claimed), Cost()))
            return claimed

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            start = time.perf_counter()
            estimate = self.costs.seconds(sum((j.cost for j in batch), Cost()))
            for job in batch:
                job.started = start
            measured: Measured | None = None
            try:
                measured = self.process(batch)
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
                with self._cond:
                    self._busy = 0
                    self.batches += 1
                    self.counts.wasted += sum(1 for j in batch if j.abandoned and j.future.exception() is None)
                    if measured is not None:
                        self.costs.observe(measured, seconds)
                        self.counts.estimated_s += estimate
                        self.counts.actual_s += seconds
                if self.on_batch is not None:
                    self.on_batch(len(batch), seconds)
