"""What bounds the `attn` pass's throughput: its arithmetic against everything else, next to full recompute.

In one process, on the candidates of benchmarks/rerank_speed.py:
1. full recompute of one batch of `--full-batch` candidates and the `attn` pass over K candidates run interleaved
   (`--reps` each, CPU time); each one's GFLOPS and, pair by pair, `attn`'s GFLOPS over full recompute's;
2. one more run of each under torch.profiler: the self time of every operator that does counted FLOPs (matmuls,
   CPU SDPA) with its GFLOPS, and the top operators that do none;
3. the bound: `attn`'s FLOPs over the time of its counted operators alone (what it would reach if everything else
   took no time) as a share of full recompute's GFLOPS, and how much time outside those operators a share of
   `--target` would leave, against how much the pass spends there now.

  python benchmarks/attn_bound.py [--k 100] [--tokens 200] [--reps 3] [--threads 1] [--full-batch 16]
"""

from __future__ import annotations

import argparse
import statistics

from interleave import fix_threads, interleaved
from rerank_speed import QUERY, Setup, passages

from kvrank.eval.profile import CallProfile, profile_call
from kvrank.flops import count_flops


def arithmetic(p: CallProfile) -> tuple[float, int]:
    """Self ms of the operators that do counted FLOPs, and those FLOPs."""
    ops = [op for op in p.operators if op.flops]
    return sum(op.self_ms for op in ops), sum(op.flops for op in ops)


def describe(p: CallProfile, top: int) -> str:
    lines = [f"{p.label}: {p.wall_ms:.0f} ms under the profiler, operators {p.operator_ms:.0f} ms self time"]
    for op in p.operators:
        if op.flops:
            lines.append(f"  {op.name:32s} {op.self_ms:8.1f} ms  {op.flops / 1e9:8.2f} GFLOPs  "
                         f"{op.flops / (op.self_ms / 1e3) / 1e9:5.1f} GFLOPS")
    rest = [op for op in p.operators if not op.flops][:top]
    lines += [f"  {op.name:32s} {op.self_ms:8.1f} ms  ({op.share:.0%} of operator time)" for op in rest]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full-batch", type=int, default=16, help="candidates in the full-recompute run")
    parser.add_argument("--target", type=float, default=0.6, help="share of full recompute's GFLOPS to test")
    parser.add_argument("--top", type=int, default=8, help="operators without FLOPs listed per pass")
    args = parser.parse_args()
    fix_threads(args.threads)
    setup = Setup(args.tokens)
    cands = passages(args.k, args.tokens, setup.lm.tokenizer)
    setup.ql.passage_kv(cands)  # stored: the attn pass reads stored KV only
    batch = cands[:args.full_batch]
    variants = {"full": lambda: setup.full(batch), "attn": lambda: setup.attn.score(QUERY, cands)}
    flops = {name: count_flops(fn)[1] for name, fn in variants.items()}
    run = interleaved(variants, args.reps)
    print(run.header())
    cpu = {name: run.median_ms(name, cpu=True) for name in variants}
    rate = {name: flops[name] / (cpu[name] / 1e3) / 1e9 for name in variants}
    shares = [flops["attn"] / flops["full"] * r for r in run.ratio("full", "attn", cpu=True).pairs]
    print(f"full recompute ({len(batch)} candidates): {cpu['full']:.0f} ms CPU, {flops['full'] / 1e9:.1f} GFLOPs, "
          f"{rate['full']:.1f} GFLOPS")
    print(f"attn (K={args.k}): {cpu['attn']:.0f} ms CPU, {flops['attn'] / 1e9:.1f} GFLOPs, {rate['attn']:.1f} GFLOPS;"
          f" of full recompute's GFLOPS, pair by pair: {statistics.median(shares):.0%} "
          f"({min(shares):.0%}-{max(shares):.0%})")
    profiles = {name: profile_call(fn, name, top=10_000) for name, fn in variants.items()}
    for p in profiles.values():
        print(describe(p, args.top))
    full_ms, full_flops = arithmetic(profiles["full"])
    attn_ms, attn_flops = arithmetic(profiles["attn"])
    full_mm = full_flops / (full_ms / 1e3) / 1e9
    attn_mm = attn_flops / (attn_ms / 1e3) / 1e9
    ceiling = flops["attn"] / (attn_ms / 1e3) / 1e9
    allowed = flops["attn"] / (args.target * rate["full"] * 1e9) * 1e3 - attn_ms
    print(f"counted operators: full recompute {full_mm:.1f} GFLOPS, attn {attn_mm:.1f} GFLOPS "
          f"({attn_mm / full_mm:.0%} of full's)")
    print(f"attn with no time outside its counted operators: {ceiling:.1f} GFLOPS = {ceiling / rate['full']:.0%} "
          f"of full recompute's {rate['full']:.1f}")
    print(f"{args.target:.0%} of full recompute's GFLOPS leaves {allowed:.0f} ms outside the counted operators; "
          f"the pass spends {cpu['attn'] - attn_ms:.0f} ms there now ({cpu['attn']:.0f} ms CPU - {attn_ms:.0f} ms "
          "in counted operators under the profiler)")


if __name__ == "__main__":
    main()
