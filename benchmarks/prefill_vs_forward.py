"""Passage prefill (block KV for the store) vs a plain transformers forward over the same tokens, side by side.

  python benchmarks/prefill_vs_forward.py [--passages 16] [--tokens 192] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from kvrank.reranker.blocks import BlockEngine
from kvrank.reranker.model import load_lm
from kvrank.store.kv import KVKey


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=192)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    lm = load_lm("smollm2")
    engine = BlockEngine(lm, batch_size=args.passages)
    prefix = lm.tokenizer("Passage:", add_special_tokens=False).input_ids
    torch.manual_seed(0)
    blocks = [torch.randint(100, 40000, (args.tokens,)).tolist() for _ in range(args.passages)]
    keys = [KVKey(str(i)) for i in range(args.passages)]
    ids = torch.tensor([prefix + b for b in blocks])
    plain, prefill = [], []
    with torch.no_grad():
        for _ in range(args.reps):  # alternate, so both see the same machine load
            t0 = time.perf_counter()
            lm.model(input_ids=ids, logits_to_keep=1)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            engine.prefill(prefix, blocks, keys)
            prefill.append(time.perf_counter() - t0)
    tokens = args.passages * (len(prefix) + args.tokens)
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.passages} passages x {args.tokens} tokens, best of {args.reps}")
    print(f"plain forward {min(plain):.2f} s ({tokens / min(plain):.0f} tok/s)  prefill {min(prefill):.2f} s "
          f"({tokens / min(prefill):.0f} tok/s)  prefill/plain {min(prefill) / min(plain):.2f}")


if __name__ == "__main__":
    main()
