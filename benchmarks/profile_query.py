"""Where the time of one query goes: a per-stage and per-operation breakdown of `ql` and `attn` on this machine.

Builds K candidates of ~T tokens (the passages of benchmarks/rerank_speed.py), stores their KV, scores the query
once to warm up, then profiles one more `score` call per mode with torch.profiler and prints:
- stages: the reranker's own spans (kv_lookup, scoring > assemble_kv / masks / forward), wall ms;
- operations: the top torch operators by self CPU time, with their FLOPs (kvrank.flops.count_flops) and achieved
  GFLOPS where they do arithmetic;
- the pass's FLOPs and achieved GFLOPS in all.
The tables come from kvrank.eval.profile, which `kvrank eval --profile N` prints for real queries.

  python benchmarks/profile_query.py [--modes ql attn] [--k 100] [--tokens 200] [--threads 1] [--trace DIR]

`--trace DIR` also writes a Chrome trace per mode (open in chrome://tracing or https://ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from interleave import fix_threads, load_average, machine
from rerank_speed import QUERY, passages

from kvrank.eval.profile import format_profile, profile_call
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.store.kv import MemoryKVStore


def profile_mode(rr: BlockReranker, cands: list, top: int, trace: Path | None) -> None:
    rr.score(QUERY, cands)  # warm-up: shared prefix KV, RoPE tables, allocator
    out = trace / f"{rr.config.mode}-k{len(cands)}.json" if trace is not None else None
    print("\n" + format_profile(profile_call(lambda: rr.score(QUERY, cands), f"{rr.config.mode}: K={len(cands)}",
                                              top, out)))


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
    base = BlockReranker(RerankerConfig(kv_format="none",
                                        mode=args.modes[0], model=args.model, max_passage_tokens=args.tokens),
                         store=MemoryKVStore())
    cands = passages(args.k, args.tokens, base.lm.tokenizer)
    base.passage_kv(cands)  # stored once: the profiled calls read stored KV only
    print(f"# One query, {args.model}: {machine()}; load average {'/'.join(f'{x:.1f}' for x in load_average())}")
    for mode in args.modes:
        profile_mode(base if mode == base.config.mode else base.variant(mode=mode), cands, args.top, args.trace)


if __name__ == "__main__":
    main()
