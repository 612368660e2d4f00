"""Timing variants so their ratios hold on a shared machine (used by every benchmark that compares variants).

Every variant runs the same number of repetitions, interleaved (A B C A B C ...), so drift in the machine's load
hits all of them alike. A speed ratio is taken pair by pair (rep i of A over rep i of B) and reported as the median
with the min-max of the per-pair ratios. The load average is recorded before and after, and the thread count is
fixed and printed. Each rep records wall-clock time and the process's CPU time: on a machine shared with other jobs
wall time includes waiting for a core, and when the variants take very different times (minutes vs seconds) they
sample different moments of that wait even when interleaved; CPU time counts only the work done.

    from interleave import fix_threads, interleaved
    fix_threads(1)
    run = interleaved({"full": full, "ql": ql}, reps=3)
    print(run.header())
    print(run.ratio("full", "ql"))  # e.g. "8.6x (8.1-9.0, 3 pairs)"
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

# `python benchmarks/x.py` puts benchmarks/ on sys.path, not the checkout, so `import kvrank` would find the
# installed one (an editable install of another worktree): the scripts that import this module measure the kvrank
# of the checkout they are in.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fix_threads(threads: int) -> int:
    """Pin torch's intra-op threads (and the OpenMP/MKL variables child processes inherit)."""
    if threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    return threads


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


@dataclass(frozen=True)
class Ratio:
    """Per-pair ratios of one variant's times over another's."""

    pairs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.pairs)

    def __str__(self) -> str:
        digits = 2 if self.median < 3 else 1
        return (f"{self.median:.{digits}f}x ({min(self.pairs):.{digits}f}-{max(self.pairs):.{digits}f}, "
                f"{len(self.pairs)} pairs)")


@dataclass
class Interleaved:
    """Seconds per repetition of each variant, measured in interleaved rounds."""

    seconds: dict[str, list[float]]
    cpu_seconds: dict[str, list[float]]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))

    def median_ms(self, name: str, cpu: bool = False) -> float:
        return statistics.median((self.cpu_seconds if cpu else self.seconds)[name]) * 1e3

    def ratio(self, slow: str, fast: str, cpu: bool = False) -> Ratio:
        """How many times longer `slow` took than `fast` (wall clock, or CPU time), pair by pair."""
        times = self.cpu_seconds if cpu else self.seconds
        return Ratio([a / b for a, b in zip(times[slow], times[fast])])

    def header(self) -> str:
        reps = len(next(iter(self.seconds.values())))
        return (f"{machine()}; {reps} interleaved reps of {', '.join(self.seconds)}; load average before "
                f"{_load(self.load_before)}, after {_load(self.load_after)} (1/5/15 min), {self.started}")


def _load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.1f}" for x in load)


def interleaved(variants: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> Interleaved:
    """Run each variant `warmup` times, then `reps` rounds of every variant in turn; time each run."""
    if reps < 1:
        raise SystemExit(f"--reps must be >= 1, got {reps}")
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    run = Interleaved({name: [] for name in variants}, {name: [] for name in variants}, load_average())
    for _ in range(reps):
        for name, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            run.seconds[name].append(time.perf_counter() - t0)
            run.cpu_seconds[name].append(time.process_time() - c0)
    run.load_after = load_average()
    return run
