"""Pareto report of stored-KV formats: bytes per passage token, scoring time, nDCG@10 (ql, attn, fused) and the
change against the uncompressed layout, on real collections with the offline SmolLM2.

Every candidate passage is prefilled once in fp32 into a cache store (resumable). A format's stored entries are
then exactly `codec.encode(fp32 prefill)`, which is what `BlockEngine.prefill` stores for that format, so each
format is scored through the real path (`BlockReranker.score` over its own store, zero prefills) without
prefilling again. Fitted formats are fitted on `--calibration` passages sampled from the corpus, as `kvrank warm`
does.

  python benchmarks/kv_formats.py quality --data ../shared/data/trec-dl-2019 \
      --candidates ../shared/data/trec-dl-2019/bm25_top100.trec --depth 20 --out out/kvf/dl19.json
  python benchmarks/kv_formats.py quality --data ../shared/data/scifact --retriever hybrid --depth 10 \
      --max-queries 100 --out out/kvf/scifact.json
  python benchmarks/kv_formats.py speed --data ../shared/data/trec-dl-2019 \
      --candidates ../shared/data/trec-dl-2019/bm25_top100.trec --out out/kvf/speed.json
  python benchmarks/kv_formats.py report out/kvf/dl19.json out/kvf/scifact.json --speed out/kvf/speed.json \
      --png docs/kv_formats.png
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from interleave import Ratio, fix_threads, interleaved
from scipy.stats import kendalltau
from tqdm import tqdm

from kvrank.attention.kvformat import KVFormat, fit_basis
from kvrank.defaults import DEFAULT_FUSION_WEIGHT
from kvrank.eval.data import load_dataset, read_run
from kvrank.eval.metrics import evaluate, per_query
from kvrank.io import atomic_write_text
from kvrank.reranker.fusion import fuse
from kvrank.reranker.model import load_lm
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.retriever.factory import build_or_load
from kvrank.store.disk import DiskKVStore, StoreIdentity
from kvrank.store.formats import calibration_sample
from kvrank.store.kv import MemoryKVStore, PassageKV, kv_key
from kvrank.types import Passage, ScoredDoc

DEFAULT_FORMATS = ("none,int8,int4,rank96,rank64,rank32,rank96+int8,rank64+int8,rank32+int8,rank96+int4,"
                   "rank64+int4,rank48+int4,heads1,heads1+int8,heads1+int4,layers15+int8,layers8+int8")


class Bench:
    """The model, an fp32 cache of every passage's KV, and a reranker per format built on them."""

    def __init__(self, cache: Path, max_passage_tokens: int = 192):
        self.lm = load_lm("smollm2")
        self.base_config = RerankerConfig(kv_format="none",
                                          mode="ql", storage_dtype="float32", max_passage_tokens=max_passage_tokens)
        probe = BlockReranker(self.base_config, store=MemoryKVStore(max_bytes=0), lm=self.lm)
        identity = StoreIdentity(probe.engine.fingerprint, probe.storage_tag, model="smollm2")
        self.fp32 = BlockReranker(self.base_config, store=DiskKVStore(cache, identity), lm=self.lm)
        self.start = len(self.fp32.prefix_ids)

    def prefill(self, passages: list[Passage], desc: str) -> None:
        """fp32 KV of every passage into the cache (what is there already is skipped)."""
        from kvrank.store.warm import warm

        with tqdm(total=len(passages), desc=desc) as bar:
            warm(self.fp32, passages, lambda n, _: bar.update(n))

    def fp32_kv(self, passages: list[Passage]) -> list[PassageKV]:
        return self.fp32.passage_kv(passages)[0]

    def reranker(self, name: str, calibration: list[Passage], mode: str, **config) -> BlockReranker:
        fmt = KVFormat.parse(name)
        basis = None
        if fmt.fitted:
            blocks = self.fp32_kv(calibration)
            basis = fit_basis(fmt, [b.keys for b in blocks], [b.values for b in blocks], self.start,
                              self.fp32.engine.rope)
        settings = RerankerConfig(mode=mode, kv_format=name, max_passage_tokens=self.base_config.max_passage_tokens,
                                  **config)
        return BlockReranker(settings, store=MemoryKVStore(max_bytes=1 << 40), lm=self.lm, basis=basis)

    def stage(self, rr: BlockReranker, passages: list[Passage]) -> tuple[int, int]:
        """Put each passage's `rr`-format entry (encoded from the fp32 cache) into `rr`'s store; (bytes, tokens)."""
        nbytes = tokens = 0
        for p, kv in zip(passages, self.fp32_kv(passages)):
            key = kv_key(rr.engine.fingerprint, rr.prefix_ids, rr.block_ids(p), rr.storage_tag)
            k, v, aux = rr.engine.codec.encode(kv.keys, kv.values, start=self.start)
            entry = PassageKV(key=key, keys=k, values=v, aux=aux)
            rr.store.put(entry)
            nbytes += entry.nbytes
            tokens += entry.num_tokens
        return nbytes, tokens


def _candidates(args: argparse.Namespace, dataset) -> dict[str, list[ScoredDoc]]:
    queries = dataset.sorted_queries(args.max_queries)
    if args.candidates:
        run = read_run(args.candidates)
    else:
        run = build_or_load(args.retriever, dataset).search(queries, args.depth)
    return {q.query_id: run[q.query_id][: args.depth] for q in queries if run.get(q.query_id)}


def quality(args: argparse.Namespace) -> None:
    dataset = load_dataset(args.data)
    first = _candidates(args, dataset)
    queries = {q.query_id: q for q in dataset.sorted_queries(args.max_queries)}
    passages = {d.doc_id: dataset.corpus[d.doc_id] for docs in first.values() for d in docs}
    calibration = calibration_sample(list(dataset.corpus.values()), args.calibration)
    bench = Bench(Path(args.cache))
    bench.prefill(calibration + list(passages.values()), "fp32 prefill")
    out = Path(args.out)
    state = json.loads(out.read_text()) if out.exists() else {"meta": _meta(args), "formats": {}}
    qrels = [q for q in dataset.qrels if q.query_id in first]
    for name in args.formats.split(","):
        fmt = KVFormat.parse(name)
        if fmt.name in state["formats"]:
            continue
        modes = ["attn"] if fmt.layers else ["ql", "attn"]
        rr = bench.reranker(fmt.name, calibration, modes[0])
        nbytes, tokens = bench.stage(rr, list(passages.values()))
        result: dict = {"bytes_per_token": nbytes / tokens, "tokens": tokens, "passages": len(passages)}
        scores: dict[str, dict[str, list[float]]] = {}
        for mode in modes:
            scorer = rr.variant(mode=mode)  # the same store, basis and blocks (ql and attn share the template)
            t0 = time.perf_counter()
            scores[mode] = {qid: scorer.score(queries[qid].text, [passages[d.doc_id] for d in docs])
                            for qid, docs in tqdm(first.items(), desc=f"{fmt.name} {mode}")}
            assert scorer.prefills == 0, "every entry was staged: no prefill may happen"
            result[f"{mode}_s_per_query"] = (time.perf_counter() - t0) / len(first)
        runs = {mode: _run(first, s) for mode, s in scores.items()}
        if "ql" in runs:
            runs["fused"] = {qid: fuse(runs["ql"][qid], first[qid], DEFAULT_FUSION_WEIGHT) for qid in first}
        for mode, run in runs.items():
            result[mode] = evaluate(run, qrels)["nDCG@10"]
            result[f"{mode}_per_query"] = {q: m["nDCG@10"] for q, m in per_query(run, qrels).items()}
        result["scores"] = scores
        if fmt.name == "none":  # SQA-style: attn reading only the N heads with the largest distilled weights
            result["attn_heads"] = {}
            for n in args.attn_heads:
                scorer = rr.variant(mode="attn", attn_heads=n)
                t0 = time.perf_counter()
                sqa = {qid: scorer.score(queries[qid].text, [passages[d.doc_id] for d in docs])
                       for qid, docs in tqdm(first.items(), desc=f"attn_heads={n}")}
                result["attn_heads"][n] = {"attn": evaluate(_run(first, sqa), qrels)["nDCG@10"],
                                           "read_layers": scorer.read_layers(),
                                           "attn_s_per_query": (time.perf_counter() - t0) / len(first)}
        state["formats"][fmt.name] = result
        atomic_write_text(out, json.dumps(state))
        print(f"{fmt.name:16s} {result['bytes_per_token']:9.0f} B/token  " +
              "  ".join(f"{m} {result[m]:.4f}" for m in runs), flush=True)
    state["meta"]["first_stage"] = evaluate(first, qrels)["nDCG@10"]
    atomic_write_text(out, json.dumps(state))


def _run(first: dict[str, list[ScoredDoc]], scores: dict[str, list[float]]) -> dict[str, list[ScoredDoc]]:
    return {qid: sorted((ScoredDoc(qid, d.doc_id, s) for d, s in zip(docs, scores[qid])), key=lambda x: -x.score)
            for qid, docs in first.items()}


def speed(args: argparse.Namespace) -> None:
    """ms/query of the scoring path (store lookup, decode, forward) at K candidates, formats interleaved; the
    ratio to the first format is the median (min-max) of per-pair ratios over queries and reps."""
    fix_threads(args.threads)
    dataset = load_dataset(args.data)
    first = _candidates(args, dataset)
    qids = list(first)[: args.queries]
    bench = Bench(Path(args.cache))
    calibration = calibration_sample(list(dataset.corpus.values()), args.calibration)
    needed = {d.doc_id: dataset.corpus[d.doc_id] for q in qids for d in first[q][: max(args.ks)]}
    bench.prefill(calibration + list(needed.values()), "fp32 prefill")
    names = [KVFormat.parse(n).name for n in args.formats.split(",")]
    results: dict[str, dict] = {n: {} for n in names}
    load = {"before": list(os.getloadavg())}
    for mode in ("ql", "attn"):
        rrs = {}
        for name in names:
            if KVFormat.parse(name).layers and mode != "attn":
                continue
            rrs[name] = bench.reranker(name, calibration, mode)
            bench.stage(rrs[name], list(needed.values()))
        if mode == "attn":
            for n in args.attn_heads:  # SQA-style budgets over the uncompressed store
                rrs[f"none@heads{n}"] = bench.reranker("none", calibration, mode, attn_heads=n)
                bench.stage(rrs[f"none@heads{n}"], list(needed.values()))
                results.setdefault(f"none@heads{n}", {})
        for k in args.ks:
            runs = []
            for qid in qids:  # per query, every format the same reps, interleaved (none int8 ... none int8 ...)
                cands = [needed[d.doc_id] for d in first[qid][:k]]
                text = dataset.queries[qid].text
                runs.append(interleaved({n: functools.partial(rr.score, text, cands) for n, rr in rrs.items()},
                                        reps=args.reps))
            base = names[0]
            for name in rrs:
                ms = statistics.median(t * 1e3 for run in runs for t in run.seconds[name])
                ratio = Ratio([a / b for run in runs for a, b in zip(run.seconds[name], run.seconds[base])])
                results[name][f"{mode}_ms_k{k}"] = ms
                results[name][f"{mode}_ratio_k{k}"] = [ratio.median, min(ratio.pairs), max(ratio.pairs)]
                print(f"{mode} K={k:3d} {name:16s} {ms:8.1f} ms/query  vs {base}: {ratio}", flush=True)
            load["after"] = list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps({"meta": {**_meta(args), "load_average": load},
                                                  "formats": results}, indent=2))


def spectrum(args: argparse.Namespace) -> None:
    """Share of variance kept by the top-r principal directions of keys (pre-RoPE) and values, per layer, over the
    calibration passages (what `rank<R>` fits on)."""
    from kvrank.attention.kvformat import _flat, _unrotate

    dataset = load_dataset(args.data)
    calibration = calibration_sample(list(dataset.corpus.values()), args.calibration)
    bench = Bench(Path(args.cache))
    bench.prefill(calibration, "fp32 prefill")
    blocks = bench.fp32_kv(calibration)
    ranks = (16, 32, 64, 96, 128)
    print(f"{args.data}: {len(blocks)} calibration passages, {sum(b.num_tokens for b in blocks)} tokens")
    print("layer  " + "  ".join(f"K@{r:<3d}" for r in ranks) + "  " + "  ".join(f"V@{r:<3d}" for r in ranks))
    kept: dict[str, list[list[float]]] = {"keys": [], "values": []}
    for layer in range(bench.lm.num_layers):
        k = torch.cat([_flat(_unrotate(b.keys[layer].float(), bench.fp32.engine.rope, layer, bench.start))
                       for b in blocks])
        v = torch.cat([_flat(b.values[layer].float()) for b in blocks])
        row = []
        for name, x in (("keys", k), ("values", v)):
            x = x.double() - x.double().mean(0)
            share = torch.linalg.eigvalsh(x.T @ x).flip(0).cumsum(0)
            share = (share / share[-1]).tolist()
            kept[name].append([share[r - 1] for r in ranks])
            row += [f"{share[r - 1]:5.3f}" for r in ranks]
        print(f"{layer:5d}  " + "  ".join(row))
    print("mean   " + "  ".join(f"{statistics.fmean(x[i] for x in kept[n]):5.3f}"
                                 for n in ("keys", "values") for i in range(len(ranks))))


def layers(args: argparse.Namespace) -> None:
    """attn nDCG@10 when only layers < L are stored and read, for every L, from `rerank_quality.py collect` files
    (per-(layer, head) attention mass of every query): the score of `layers<L>` is exactly the shipped distilled
    weights restricted to those layers (a unit test checks this equality on the real code path)."""
    from kvrank.reranker.attn import WEIGHTS_DIR

    state = torch.load(args.features[0])
    for extra in args.features[1:]:
        state["queries"].update(torch.load(extra)["queries"])
    meta = state["meta"]
    shipped = next(WEIGHTS_DIR.glob(f"*-{meta['template']}.json"))
    weights = torch.tensor(json.loads(shipped.read_text())["weights"])  # (L, H)
    dataset = load_dataset(meta["data"])
    qrels = [q for q in dataset.qrels if q.query_id in state["queries"]]
    print(f"{meta['data']}  queries={len(state['queries'])}  depth={meta['depth']}  weights {shipped.name}")
    out = {}
    for n in range(1, weights.shape[0] + 1):
        run = {}
        for qid, e in state["queries"].items():
            feats = (e["mass"].float() - e["free"].float())[:n]  # calibrated, layers < n
            scores = torch.einsum("lh,lhk->k", weights[:n], feats).tolist()
            run[qid] = sorted((ScoredDoc(qid, d, s) for d, s in zip(e["docs"], scores)), key=lambda x: -x.score)
        out[n] = evaluate(run, qrels)["nDCG@10"]
        print(f"layers{n:<3d} attn nDCG@10 {out[n]:.4f}")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps({"meta": meta, "attn_by_layers": out}, indent=2))


def report(args: argparse.Namespace) -> None:
    sets = [json.loads(Path(f).read_text()) for f in args.files]
    speed_data = json.loads(Path(args.speed).read_text())["formats"] if args.speed else {}
    for data in sets:
        meta, formats = data["meta"], data["formats"]
        base = formats["none"]
        print(f"\n{meta['data']}  queries={len(base['ql_per_query'])}  depth={meta['depth']}  "
              f"first stage nDCG@10={meta.get('first_stage', float('nan')):.4f}")
        print(f"{'format':16s} {'B/token':>8s} {'x smaller':>9s} {'ql':>7s} {'d ql':>6s} {'attn':>7s} {'d attn':>6s} "
              f"{'fused':>7s} {'d fused':>7s} {'tau ql':>6s}")
        for name, r in formats.items():
            row = f"{name:16s} {r['bytes_per_token']:8.0f} {base['bytes_per_token'] / r['bytes_per_token']:9.1f}"
            for mode in ("ql", "attn", "fused"):
                if mode in r:
                    row += f" {r[mode]:7.4f} {100 * (r[mode] - base[mode]):+6.2f}"
                else:
                    row += f" {'-':>7s} {'-':>6s}"
            row += f" {_tau(r, base):6.3f}" if "ql" in r["scores"] else f" {'-':>6s}"
            print(row)
        for n, r in base.get("attn_heads", {}).items():
            print(f"SQA-style attn reading {n} heads (layers <= {max(r['read_layers'])}): nDCG@10 {r['attn']:.4f} "
                  f"({100 * (r['attn'] - base['attn']):+.2f}), {1e3 * r['attn_s_per_query']:.0f} ms/query vs "
                  f"{1e3 * base['attn_s_per_query']:.0f} reading all")
    if speed_data:
        print(f"\nscoring ms/query (median; ratio to the first format: median (min-max) of per-pair ratios), "
              f"{json.loads(Path(args.speed).read_text())['meta']['machine']}")
        for name, r in speed_data.items():
            print(f"{name:16s} " + "  ".join(f"{k} {v:7.1f}" if not isinstance(v, list) else
                                             f"{k} {v[0]:.2f}x ({v[1]:.2f}-{v[2]:.2f})" for k, v in r.items()))
    if args.png:
        _plot(sets, Path(args.png))


def _tau(r: dict, base: dict) -> float:
    """Mean Kendall tau between this format's ql scores and the uncompressed ones, per query."""
    taus = [kendalltau(r["scores"]["ql"][q], base["scores"]["ql"][q]).statistic for q in base["scores"]["ql"]]
    return statistics.fmean(t for t in taus if t == t)


def _plot(sets: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 4.8), squeeze=False)
    for ax, data in zip(axes[0], sets):
        base = data["formats"]["none"]
        for mode, marker in (("ql", "o"), ("attn", "s")):
            pts = [(r["bytes_per_token"], 100 * (r[mode] - base[mode]), n)
                   for n, r in data["formats"].items() if mode in r]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=mode)
            for x, y, n in pts:
                ax.annotate(n, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.axvline(2048, color="grey", ls=":", lw=1)
        ax.axhline(-0.5, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("stored bytes per passage token (log)")
        ax.set_ylabel("nDCG@10 change vs uncompressed (points)")
        ax.set_title(Path(data["meta"]["data"]).name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=130)
    print(f"wrote {png}")


def _meta(args: argparse.Namespace) -> dict:
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
               f"threads {torch.get_num_threads()}")
    return {**{k: v for k, v in vars(args).items() if k != "func"}, "machine": machine,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True)
    for name, func in (("quality", quality), ("speed", speed)):
        p = sub.add_parser(name)
        p.set_defaults(func=func)
        p.add_argument("--data", required=True)
        p.add_argument("--candidates")
        p.add_argument("--retriever", default="bm25")
        p.add_argument("--depth", type=int, default=20)
        p.add_argument("--max-queries", type=int)
        p.add_argument("--formats", default=DEFAULT_FORMATS)
        p.add_argument("--calibration", type=int, default=64, help="calibration passages sampled from the corpus")
        p.add_argument("--cache", default="out/kvf/fp32-cache", help="fp32 KV cache store (resumable)")
        p.add_argument("--out", required=True)
        p.add_argument("--attn-heads", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16, 64],
                       help="SQA-style head budgets for attn (measured on the uncompressed format)")
        if name == "speed":
            p.add_argument("--queries", type=int, default=5)
            p.add_argument("--reps", type=int, default=1, help="interleaved reps per query (after one warm-up)")
            p.add_argument("--threads", type=int, default=1)
            p.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[20, 100])
    p = sub.add_parser("spectrum")
    p.set_defaults(func=spectrum)
    p.add_argument("--data", required=True)
    p.add_argument("--calibration", type=int, default=64)
    p.add_argument("--cache", default="out/kvf/fp32-cache")
    p = sub.add_parser("layers")
    p.set_defaults(func=layers)
    p.add_argument("features", nargs="+", help="rerank_quality.py collect files (shards of one collection)")
    p.add_argument("--json")
    p = sub.add_parser("report")
    p.set_defaults(func=report)
    p.add_argument("files", nargs="+")
    p.add_argument("--speed")
    p.add_argument("--png")
    args = parser.parse_args()
    if args.func is speed and args.depth < max(args.ks):
        args.depth = max(args.ks)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
