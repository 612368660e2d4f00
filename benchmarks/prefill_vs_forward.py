"""Passage prefill (block KV for the store) vs a plain transformers forward over the same tokens, interleaved.

Both variants run the same number of reps, alternating (plain, prefill, plain, prefill, ...); the ratio is the median
(min-max) of per-pair ratios (wall clock and CPU time), with the load average before and after and a fixed thread count.

  python benchmarks/prefill_vs_forward.py [--passages 16] [--tokens 192] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch
from interleave import fix_threads, interleaved

from kvrank.reranker.blocks import BlockEngine
from kvrank.reranker.model import load_lm
from kvrank.store.kv import KVKey


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=192)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    fix_threads(args.threads)
    lm = load_lm("smollm2")
    engine = BlockEngine(lm, batch_size=args.passages)
    prefix = lm.tokenizer("Passage:", add_special_tokens=False).input_ids
    torch.manual_seed(0)
    blocks = [torch.randint(100, 40000, (args.tokens,)).tolist() for _ in range(args.passages)]
    keys = [KVKey(str(i)) for i in range(args.passages)]
    ids = torch.tensor([prefix + b for b in blocks])

    def plain() -> None:
        with torch.no_grad():
            lm.model(input_ids=ids, logits_to_keep=1)

    run = interleaved({"plain": plain, "prefill": lambda: engine.prefill(prefix, blocks, keys)}, args.reps)
    tokens = args.passages * (len(prefix) + args.tokens)
    print(run.header())
    print(f"{args.passages} passages x {args.tokens} tokens: plain forward {run.median_ms('plain') / 1e3:.2f} s "
          f"({tokens / run.median_ms('plain') * 1e3:.0f} tok/s), prefill {run.median_ms('prefill') / 1e3:.2f} s "
          f"({tokens / run.median_ms('prefill') * 1e3:.0f} tok/s); prefill/plain wall {run.ratio('prefill', 'plain')}, "
          f"CPU time {run.ratio('prefill', 'plain', cpu=True)}")


if __name__ == "__main__":
    main()
