"""How query-time reranking scales with CPU threads: each variant at each thread count, interleaved in one run.

Variants (as in rerank_speed.py): `ql` and `attn` over K stored passages, and full recompute of `--full-k` candidates
(a dense-GEMM reference: how far the machine's matmuls scale). Rounds run every (variant, threads) pair in turn
(ql@1 ql@2 attn@1 attn@2 full@1 full@2, ql@1 ...), so load drift hits all alike; the speedup of n threads over one
is the median (min-max) of per-round ratios of wall-clock time.

  python benchmarks/thread_scaling.py [--k 100] [--threads 1 2] [--reps 5] [--full-k 8]
"""

from __future__ import annotations

import argparse
import os

import torch
from interleave import interleaved
from rerank_speed import QUERY, Setup, passages

from kvrank.attention import native


def at_threads(fn, threads: int):
    def run() -> None:
        torch.set_num_threads(threads)
        fn()
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--full-k", type=int, default=8, help="candidates of the full-recompute reference")
    args = parser.parse_args()
    if min(args.threads) < 1 or 1 not in args.threads:
        raise SystemExit(f"--threads must be >= 1 and include 1 (the baseline), got {args.threads}")
    if min(args.k, args.full_k, args.reps) < 1:
        raise SystemExit(f"--k, --full-k and --reps must be >= 1, got {args.k}, {args.full_k}, {args.reps}")
    os.environ["OMP_NUM_THREADS"] = str(max(args.threads))  # an upper bound; each variant sets its own count

    setup = Setup(args.tokens)
    cands = passages(args.k, args.tokens, setup.lm.tokenizer)
    setup.ql.passage_kv(cands)  # warm the store: ql and attn then read stored KV only
    base = {"ql": lambda: setup.ql.score(QUERY, cands), "attn": lambda: setup.attn.score(QUERY, cands),
            "full": lambda: setup.full(cands[:args.full_k])}
    variants = {f"{name}@{t}": at_threads(fn, t) for name, fn in base.items() for t in args.threads}
    run = interleaved(variants, args.reps, warmup=1)

    torch.set_num_threads(max(args.threads))  # the header names one count: each variant's own is in its name
    print(run.header().replace(f"{max(args.threads)} threads", "threads as named"))
    print(f"kvrank native attn kernel: {'used' if native.available() else 'not available (ATen loop)'}; "
          f"K={args.k} passages of ~{args.tokens} tokens; full recompute over {args.full_k} candidates")
    print()
    others = [t for t in args.threads if t != 1]
    print("| variant | " + " | ".join(f"{t} thread{'s' * (t > 1)} ms" for t in args.threads) + " | "
          + " | ".join(f"{t} threads over 1" for t in others) + " |")
    print("|---" * (1 + len(args.threads) + len(others)) + "|")
    for name in base:
        times = " | ".join(f"{run.median_ms(f'{name}@{t}'):.0f}" for t in args.threads)
        ratios = " | ".join(str(run.ratio(f"{name}@1", f"{name}@{t}")) for t in others)
        print(f"| {name} | {times} | {ratios} |")


if __name__ == "__main__":
    main()
