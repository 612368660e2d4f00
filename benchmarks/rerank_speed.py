"""Query-time cost of reranking K candidates of ~200 tokens, three ways, interleaved in one run:

  (a) full recompute: one forward over prefix + passage + query for every candidate (batched), with logits only
                      at the query positions (what a full-recompute ql reranker needs)
  (b) stored-KV ql:   the passages' KV come from the store; only the query tokens run, one row per candidate
  (c) stored-KV attn: all K blocks in one row, the query (and the content-free query) run once

Every variant runs the same number of reps, interleaved (a b c a b c ...); speedups are per-pair ratios (median and
min-max), on wall-clock and on CPU time (see benchmarks/interleave.py). FLOPs per query come from
`kvrank.flops.count_flops` (torch's FlopCounterMode with CPU SDPA included) on one pass; achieved GFLOPS = FLOPs /
median CPU time. Writes a Markdown table (`--out`) with a PNG plot; the published figures are in
docs/results/speed.md.

  python benchmarks/rerank_speed.py [--ks 20 100] [--tokens 200] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from interleave import Interleaved, fix_threads, interleaved

from kvrank.flops import count_flops
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.store.kv import MemoryKVStore
from kvrank.types import Passage

WORDS = ("protein cell gene tumour patient dose trial effect risk cohort signal pathway receptor model data "
         "analysis result increase level response study group control sample rate").split()
QUERY = "does vitamin d supplementation reduce the risk of fractures in older adults"
VARIANTS = ("full", "ql", "attn")


def passages(k: int, tokens: int, tokenizer) -> list[Passage]:
    out = []
    for i in range(k):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(tokens)]
        text = " ".join(words)
        ids = tokenizer(text, add_special_tokens=False).input_ids[:tokens]
        out.append(Passage(f"p{i}", "", tokenizer.decode(ids)))
    return out


class Setup:
    """The model, the two stored-KV rerankers over one store, and full recompute as a plain batched forward."""

    def __init__(self, tokens: int):
        self.ql = BlockReranker(RerankerConfig(kv_format="none",
                                               mode="ql", max_passage_tokens=tokens), store=MemoryKVStore())
        self.lm = self.ql.lm
        self.attn = self.ql.variant(mode="attn")
        self.q_ids, _, _ = self.ql.query_ids(QUERY)

    def full(self, cands: list[Passage]) -> None:
        ql, lm = self.ql, self.lm
        with torch.no_grad():
            for i in range(0, len(cands), ql.config.batch_size):
                seqs = [ql.prefix_ids + ql.block_ids(p) + self.q_ids for p in cands[i:i + ql.config.batch_size]]
                width = max(map(len, seqs))
                ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
                lm.model(input_ids=ids, attention_mask=mask, logits_to_keep=len(self.q_ids))

    def variants(self, cands: list[Passage]) -> dict:
        return {"full": lambda: self.full(cands), "ql": lambda: self.ql.score(QUERY, cands),
                "attn": lambda: self.attn.score(QUERY, cands)}


def measure(setup: Setup, k: int, tokens: int, reps: int) -> dict:
    cands = passages(k, tokens, setup.lm.tokenizer)
    blocks, _ = setup.ql.passage_kv(cands)  # warm the store: (b) and (c) then read stored KV only
    n_tokens = sum(b.num_tokens for b in blocks)
    variants = setup.variants(cands)
    setup.full(cands[:1])  # warm-up without a whole full-recompute pass
    variants["ql"](), variants["attn"]()
    run = interleaved(variants, reps, warmup=0)
    flops = {"full": count_flops(lambda: setup.full(cands[:1]))[1] * k,  # independent sequences: linear in K
             "ql": count_flops(variants["ql"])[1], "attn": count_flops(variants["attn"])[1]}
    row = dict(k=k, tokens=n_tokens / k, run=run, flops=flops,
               bytes_per_token=sum(b.nbytes for b in blocks) / n_tokens)
    print(run.header())
    print(f"K={k:4d}  " + "  ".join(f"{v} {run.median_ms(v):8.0f} ms (CPU {run.median_ms(v, cpu=True):8.0f}) "
                                    f"{flops[v] / 1e9:7.1f} GF {gflops(row, v):5.1f} GFLOPS" for v in VARIANTS)
          + f"  wall full/ql {run.ratio('full', 'ql')} full/attn {run.ratio('full', 'attn')}"
          + f"  CPU full/ql {run.ratio('full', 'ql', cpu=True)} full/attn {run.ratio('full', 'attn', cpu=True)}"
          + f"  wall ql/attn {run.ratio('ql', 'attn')}"
          + f"  GFLOPS of full: ql {gflops_share(row, 'ql')} attn {gflops_share(row, 'attn')}", flush=True)
    return row


def gflops(row: dict, variant: str) -> float:
    run: Interleaved = row["run"]
    return row["flops"][variant] / (run.median_ms(variant, cpu=True) / 1e3) / 1e9


def gflops_share(row: dict, variant: str) -> str:
    """`variant`'s GFLOPS over full recompute's, pair by pair on CPU time: median (min-max)."""
    scale = row["flops"][variant] / row["flops"]["full"]
    pairs = [scale * r for r in row["run"].ratio("full", variant, cpu=True).pairs]
    return f"{statistics.median(pairs):.0%} ({min(pairs):.0%}-{max(pairs):.0%})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ks", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="out/rerank_speed.md", help="the report; its figure goes beside it")
    args = parser.parse_args()
    fix_threads(args.threads)
    setup = Setup(args.tokens)
    rows = [measure(setup, k, args.tokens, args.reps) for k in args.ks]
    write_report(args, rows, setup.lm)


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
        ax.plot(ks, [r["run"].median_ms(key) for r in rows], marker="o", label=label)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel(f"candidates K (~{args.tokens} tokens each)"), ax.set_ylabel("ms per query (median)")
    ax.set_title(f"{lm.name}: query-time cost, {torch.get_num_threads()} CPU threads")
    ax.legend(), ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    cfg = lm.config
    command = (f"python benchmarks/rerank_speed.py --ks {' '.join(map(str, args.ks))} --tokens {args.tokens} "
               f"--reps {args.reps} --threads {args.threads}")
    lines = [
        "# Benchmarks: query-time cost of reranking from stored passage KV",
        "",
        f"Command: `{command}`",
        "",
        f"Model: {lm.name} ({cfg.model_type}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query / "
        f"{cfg.num_key_value_heads} KV heads), fp32 compute, fp16 stored KV. Query: {len(QUERY.split())} words. "
        "The three variants ran interleaved (a b c a b c ...), the same number of reps each; times are medians, "
        "speedups the median (min-max) of per-pair ratios (\"attn over ql\": how many times faster `attn` ran than "
        "`ql` in the same pair), on wall-clock time and on the process's CPU time "
        "(on a shared machine wall time includes waiting for a core). FLOPs from `kvrank.flops.count_flops` "
        "(torch's FlopCounterMode, CPU SDPA included) on one pass (full recompute: one candidate x K); achieved "
        "GFLOPS = FLOPs / median CPU time; \"GFLOPS vs full\" is each pair's GFLOPS over full recompute's in the "
        "same pair (CPU time), median (min-max).",
        "",
    ]
    for r in rows:
        lines.append(f"- K={r['k']}: {r['run'].header()}")
    lines += [
        "",
        "| K | passage tokens | (a) full ms | (b) ql ms | (c) attn ms | ql speedup wall / CPU | "
        "attn speedup wall / CPU | attn over ql wall / CPU | GFLOPs (a) / (b) / (c) | GFLOPS (a) / (b) / (c) | "
        "GFLOPS vs full (b) / (c) | stored bytes / token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        run = r["run"]
        lines.append(
            f"| {r['k']} | {r['tokens']:.0f} | {run.median_ms('full'):.0f} | {run.median_ms('ql'):.0f} | "
            f"{run.median_ms('attn'):.0f} | {run.ratio('full', 'ql')} / {run.ratio('full', 'ql', cpu=True)} | "
            f"{run.ratio('full', 'attn')} / {run.ratio('full', 'attn', cpu=True)} | "
            f"{run.ratio('ql', 'attn')} / {run.ratio('ql', 'attn', cpu=True)} | "
            + " / ".join(f"{r['flops'][v] / 1e9:.1f}" for v in VARIANTS) + " | "
            + " / ".join(f"{gflops(r, v):.1f}" for v in VARIANTS)
            + f" | {gflops_share(r, 'ql')} / {gflops_share(r, 'attn')} | {r['bytes_per_token']:.0f} |")
    lines += ["", f"![query-time cost]({png.name})", ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
