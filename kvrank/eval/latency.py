"""Per-stage latency: record milliseconds per query and stage, report p50 / p95 after warm-up."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


class StageTimer:
    """Collect per-query timings per stage. The first `warmup` samples of each stage are left out of the stats
    (model loading, lazy allocation and cold caches would otherwise dominate p95 on small query sets)."""

    def __init__(self, warmup: int = 1) -> None:
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.warmup = warmup
        self.samples: dict[str, list[float]] = {}

    def add(self, stage: str, ms: float) -> None:
        self.samples.setdefault(stage, []).append(float(ms))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, (time.perf_counter() - start) * 1000.0)

    def summary(self) -> dict[str, dict[str, float]]:
        """stage -> {"p50", "p95", "mean", "n"} in ms over the post-warm-up samples (all samples if there
        are no more than `warmup` of them)."""
        out: dict[str, dict[str, float]] = {}
        for stage, values in self.samples.items():
            kept = values[self.warmup :] if len(values) > self.warmup else values
            array = np.asarray(kept, dtype=np.float64)
            out[stage] = {
                "p50": float(np.percentile(array, 50)),
                "p95": float(np.percentile(array, 95)),
                "mean": float(array.mean()),
                "n": len(kept),
            }
        return out
