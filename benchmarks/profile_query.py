"""Where the time of one query goes: a per-stage and per-operation breakdown of `ql` and `attn` on this machine.

Builds K candidates of ~T tokens (the passages of benchmarks/rerank_speed.py), stores their KV, scores the query
once to warm up, then profiles one more `score` call per mode with torch.profiler and prints:
- stages: the reranker's own spans (kv_lookup, scoring > assemble_kv / masks / forward), wall ms;
- operations: the top torch operators by self CPU time, with their FLOPs (kvrank.flops.count_flops) and achieved
  GFLOPS where they do arithmetic;
- the pass's FLOPs and achieved GFLOPS in all.

  python benchmarks/profile_query.py [--modes ql attn] [--k 100] [--tokens 200] [--threads 1] [--trace DIR]

`--trace DIR` also writes a Chrome trace per mode (open in chrome://tracing or https://ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from interleave import fix_threads, load_average, machine
from rerank_speed import QUERY, passages
from torch.profiler import ProfilerActivity, profile

from kvrank.flops import count_flops
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.store.kv import MemoryKVStore

STAGES = ("kvrank.kv_lookup", "kvrank.prefill", "kvrank.scoring", "kvrank.assemble_kv", "kvrank.masks",
          "kvrank.forward")


def profile_mode(rr: BlockReranker, cands: list, top: int, trace: Path | None) -> None:
    rr.score(QUERY, cands)  # warm-up: shared prefix KV, RoPE tables, allocator
    _, flops, per_op = count_flops(lambda: rr.score(QUERY, cands))
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        rr.score(QUERY, cands)
    wall = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    print(f"\n## {rr.config.mode}: K={len(cands)}, {wall:.0f} ms under the profiler, {flops / 1e9:.2f} GFLOPs "
          f"({flops / (wall / 1e3) / 1e9:.1f} GFLOPS)")
    print("\n| stage | calls | ms |\n|---|---|---|")
    for e in events:
        if e.key in STAGES:
            print(f"| {e.key.removeprefix('kvrank.')} | {e.count} | {e.cpu_time_total / 1e3:.1f} |")
    print("\n| operation | calls | self ms | share | GFLOPs | GFLOPS |\n|---|---|---|---|---|---|")
    ops = sorted((e for e in events if not e.key.startswith("kvrank.")), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    for e in ops[:top]:
        f = per_op.get(e.key.replace("::", ".").replace("aten.", "aten."), 0)
        ms = e.self_cpu_time_total / 1e3
        rate = f"{f / (ms / 1e3) / 1e9:.1f}" if f and ms else ""
        print(f"| {e.key} | {e.count} | {ms:.1f} | {e.self_cpu_time_total / total:.0%} | "
              f"{f / 1e9:.2f} | {rate} |" if f else
              f"| {e.key} | {e.count} | {ms:.1f} | {e.self_cpu_time_total / total:.0%} | | |")
    if trace is not None:
        trace.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace / f"{rr.config.mode}-k{len(cands)}.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["ql", "attn"], choices=["ql", "attn", "yesno"])
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=12, help="operations listed per mode")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--trace", type=Path, default=None)
    args = parser.parse_args()
    fix_threads(args.threads)
    base = BlockReranker(RerankerConfig(mode=args.modes[0], model=args.model, max_passage_tokens=args.tokens),
                         store=MemoryKVStore())
    cands = passages(args.k, args.tokens, base.lm.tokenizer)
    base.passage_kv(cands)  # stored once: the profiled calls read stored KV only
    print(f"# One query, {args.model}: {machine()}; load average {'/'.join(f'{x:.1f}' for x in load_average())}")
    for mode in args.modes:
        profile_mode(base if mode == base.config.mode else base.variant(mode=mode), cands, args.top, args.trace)


if __name__ == "__main__":
    main()
