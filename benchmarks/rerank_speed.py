"""Query-time cost of reranking K candidates of ~200 tokens, three ways, timed side by side in one run:

  (a) full recompute: one forward over prefix + passage + query for every candidate (batched)
  (b) stored-KV ql:   the passages' KV come from the store; only the query tokens run, one row per candidate
  (c) stored-KV attn: all K blocks in one row, the query (and the content-free query) run once

Prints ms/query, speedups over (a), FLOPs per query (torch's FlopCounterMode on one pass) and stored bytes per
passage token, and writes docs/BENCHMARKS.md with a PNG plot.

  python benchmarks/rerank_speed.py [--ks 10 20 50 100] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.store.kv import MemoryKVStore
from kvrank.types import Passage

WORDS = ("protein cell gene tumour patient dose trial effect risk cohort signal pathway receptor model data "
         "analysis result increase level response study group control sample rate").split()
QUERY = "does vitamin d supplementation reduce the risk of fractures in older adults"


def passages(k: int, tokens: int, tokenizer) -> list[Passage]:
    out = []
    for i in range(k):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(tokens)]
        text = " ".join(words)
        ids = tokenizer(text, add_special_tokens=False).input_ids[:tokens]
        out.append(Passage(f"p{i}", "", tokenizer.decode(ids)))
    return out


def timed(fn, reps: int) -> float:
    """Best of `reps` runs in ms: on a shared machine the minimum is the least disturbed measurement."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="docs/BENCHMARKS.md")
    args = parser.parse_args()

    ql = BlockReranker(RerankerConfig(mode="ql", max_passage_tokens=args.tokens), store=MemoryKVStore())
    lm = ql.lm
    attn = BlockReranker(RerankerConfig(mode="attn", max_passage_tokens=args.tokens), store=ql.store, lm=lm)
    tok = lm.tokenizer
    q_ids, _, _ = ql.query_ids(QUERY)

    def full(cands: list[Passage]) -> None:
        with torch.no_grad():
            for i in range(0, len(cands), ql.config.batch_size):
                seqs = [ql.prefix_ids + ql.block_ids(p) + q_ids for p in cands[i:i + ql.config.batch_size]]
                width = max(map(len, seqs))
                ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
                lm.model(input_ids=ids, attention_mask=mask)

    rows = []
    for k in args.ks:
        cands = passages(k, args.tokens, tok)
        blocks, _ = ql.passage_kv(cands)  # warm the store: (b) and (c) then read stored KV only
        n_tokens = sum(b.num_tokens for b in blocks)
        reps_full = 1 if k >= 50 else args.reps
        ms_full = timed(lambda: full(cands), reps_full)
        ms_ql = timed(lambda: ql.score(QUERY, cands), args.reps)
        ms_attn = timed(lambda: attn.score(QUERY, cands), args.reps)
        one = cands[:1]
        f_full = flops(lambda: full(one)) * k  # independent sequences: exactly linear in K
        f_ql = flops(lambda: ql.score(QUERY, cands))
        f_attn = flops(lambda: attn.score(QUERY, cands))
        rows.append(dict(k=k, tokens=n_tokens / k, full=ms_full, ql=ms_ql, attn=ms_attn, f_full=f_full, f_ql=f_ql,
                         f_attn=f_attn, bytes_per_token=sum(b.nbytes for b in blocks) / n_tokens))
        print(f"K={k:4d}  full {ms_full:9.0f} ms  ql {ms_ql:8.0f} ms ({ms_full / ms_ql:5.1f}x)  "
              f"attn {ms_attn:7.0f} ms ({ms_full / ms_attn:6.1f}x)  GFLOPs full/ql/attn "
              f"{f_full / 1e9:.0f}/{f_ql / 1e9:.1f}/{f_attn / 1e9:.1f}", flush=True)
    write_report(args, rows, lm)


def write_report(args, rows, lm) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_name("rerank_speed.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [r["k"] for r in rows]
    for key, label in (("full", "(a) full recompute"), ("ql", "(b) stored-KV ql"), ("attn", "(c) stored-KV attn")):
        ax.plot(ks, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel(f"candidates K (~{args.tokens} tokens each)"), ax.set_ylabel("ms per query")
    ax.set_title(f"{lm.name}: query-time cost, {torch.get_num_threads()} CPU threads")
    ax.legend(), ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    cfg = lm.config
    lines = [
        "# Benchmarks: query-time cost of reranking from stored passage KV",
        "",
        f"Command: `python benchmarks/rerank_speed.py --ks {' '.join(map(str, args.ks))} --tokens {args.tokens} "
        f"--reps {args.reps}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads, fp32 compute, fp16 stored KV. Model: "
        f"{lm.name} ({cfg.model_type}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query / "
        f"{cfg.num_key_value_heads} KV heads). Query: {len(QUERY.split())} words. Best of {args.reps} runs "
        "(1 run for full recompute at K >= 50). FLOPs from `torch.utils.flop_counter` on one pass "
        "(full recompute: one candidate x K).",
        "",
        "| K | passage tokens | (a) full ms | (b) ql ms | (c) attn ms | ql speedup | attn speedup | "
        "GFLOPs (a) | GFLOPs (b) | GFLOPs (c) | stored bytes / token |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['k']} | {r['tokens']:.0f} | {r['full']:.0f} | {r['ql']:.0f} | {r['attn']:.0f} | "
                     f"{r['full'] / r['ql']:.1f}x | {r['full'] / r['attn']:.1f}x | {r['f_full'] / 1e9:.0f} | "
                     f"{r['f_ql'] / 1e9:.1f} | {r['f_attn'] / 1e9:.1f} | {r['bytes_per_token']:.0f} |")
    load = os.getloadavg()
    lines += ["", f"Load average at the end of the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on "
              f"{os.cpu_count()} cores. Times on a shared machine are noisy; the FLOP columns are not.", "",
              f"![query-time cost]({png.name})", ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
