"""Where the time of one query goes: its stages and the torch operators that ran, with FLOPs and GFLOPS.

`profile_call` runs a call once under a FLOP counter (`kvrank.flops.count_flops`) and once under torch.profiler;
`format_profile` renders the result as Markdown tables. `kvrank eval --profile N` uses them on the first N
evaluated queries; benchmarks/profile_query.py on synthetic candidates.

Stages are the `record_function` spans the pipeline and the reranker open (`kvrank.retrieve`, `kvrank.rerank`,
`kvrank.kv_lookup`, `kvrank.prefill`, `kvrank.scoring`, `kvrank.assemble_kv`, `kvrank.masks`, `kvrank.forward`);
they nest, so their times overlap. Operators are listed by self CPU time (time in the operator itself, not in the
operators it calls).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.profiler import ProfilerActivity, profile

from kvrank.flops import count_flops

if TYPE_CHECKING:
    from kvrank.pipeline import SearchPipeline
    from kvrank.types import Query

STAGES = ("kvrank.retrieve", "kvrank.rerank", "kvrank.kv_lookup", "kvrank.prefill", "kvrank.scoring",
          "kvrank.assemble_kv", "kvrank.masks", "kvrank.forward", "kvrank.head")


@dataclass(frozen=True)
class Stage:
    name: str
    calls: int
    ms: float  # wall time inside the span, children included


@dataclass(frozen=True)
class Operator:
    name: str
    calls: int
    self_ms: float
    share: float  # of all operators' self time
    flops: int  # 0 for operators that do no counted arithmetic


@dataclass(frozen=True)
class CallProfile:
    """One profiled call: wall time under the profiler, counted FLOPs, stages and the top operators."""

    label: str
    wall_ms: float
    flops: int
    stages: list[Stage]
    operators: list[Operator]
    operator_ms: float  # all operators' self time

    @property
    def gflops(self) -> float:
        return self.flops / (self.wall_ms / 1e3) / 1e9 if self.wall_ms else 0.0


def profile_call(fn: Callable[[], object], label: str, top: int = 12, trace: Path | None = None) -> CallProfile:
    """Profile `fn()` (which should already be warm: run it once before). `top` operators are kept; `trace`
    (a .json path) also gets a Chrome trace."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    _, flops, per_op = count_flops(fn)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # the call ran kernels on a GPU
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        if cuda:  # wall time includes the kernels, not just their launches
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    stages = [Stage(name.removeprefix("kvrank."), by_name[name].count, by_name[name].cpu_time_total / 1e3)
              for name in STAGES if name in by_name]
    ops = sorted((e for e in events if not e.key.startswith("kvrank.")), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    operators = [Operator(e.key, e.count, e.self_cpu_time_total / 1e3,
                          e.self_cpu_time_total / total if total else 0.0,
                          per_op.get(e.key.replace("::", "."), 0)) for e in ops[:top]]
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    return CallProfile(label, wall, flops, stages, operators, total / 1e3)


def format_profile(p: CallProfile) -> str:
    """Markdown: a heading with wall time, FLOPs and GFLOPS, the stages table and the operators table."""
    lines = [f"## {p.label}: {p.wall_ms:.0f} ms under the profiler, {p.flops / 1e9:.2f} GFLOPs "
             f"({p.gflops:.1f} GFLOPS)", "", "| stage | calls | ms |", "|---|---|---|"]
    lines += [f"| {s.name} | {s.calls} | {s.ms:.1f} |" for s in p.stages]
    lines += ["", "| operator | calls | self ms | share | GFLOPs | GFLOPS |", "|---|---|---|---|---|---|"]
    for op in p.operators:
        rate = f"{op.flops / (op.self_ms / 1e3) / 1e9:.1f}" if op.flops and op.self_ms else ""
        gf = f"{op.flops / 1e9:.2f}" if op.flops else ""
        lines.append(f"| {op.name} | {op.calls} | {op.self_ms:.1f} | {op.share:.0%} | {gf} | {rate} |")
    lines.append(f"\n(all operators: {p.operator_ms:.0f} ms self CPU time)")
    return "\n".join(lines)


def profile_queries(pipeline: SearchPipeline, queries: Sequence[Query], top: int = 12) -> list[CallProfile]:
    """Profile one `pipeline.search` of each query (run after an evaluation, the queries' passage KV is stored:
    this is the warm query-time path)."""
    out = []
    for query in queries:
        def search(query: Query = query) -> object:
            return pipeline.search([query])

        label = f"query {query.query_id}, rerank {pipeline.mode}, depth {pipeline.config.rerank_depth}"
        out.append(profile_call(search, label, top))
    return out
