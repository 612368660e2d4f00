"""Rerank quality on real collections: ql, attn (uniform and distilled weights), fusion, and the attn->ql cascade.

Two steps, so the expensive part (passage prefill with the offline SmolLM2) runs once per query set:

  collect  score every query's first-stage top-K once, from one stored KV per passage: ql scores and the
           per-(layer, head, block) attention mass of the query and of the content-free query. Resumable.
  report   metrics (ir_measures) for every scoring variant from the collected file; attn weights are fitted by
           distillation from ql on *other* queries (--fit: files collected on unlabelled queries), never qrels.

  python benchmarks/rerank_quality.py collect --data ../shared/data/trec-dl-2019 \
      --candidates ../shared/data/trec-dl-2019/bm25_top100.trec --depth 20 --out out/quality/dl19.pt
  python benchmarks/rerank_quality.py report out/quality/dl19.pt --fit out/quality/cranfield.pt
  python benchmarks/rerank_quality.py fit out/quality/scifact_train.pt   # ship weights for --rerank attn
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kvrank.eval.conventions import convention_for
from kvrank.eval.data import load_dataset, read_run
from kvrank.eval.metrics import evaluate
from kvrank.io import atomic_write_bytes
from kvrank.reranker.fusion import fuse
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.reranker.templates import TEMPLATES
from kvrank.retriever.factory import build_or_load
from kvrank.store.kv import MemoryKVStore
from kvrank.types import ScoredDoc


def collect(args: argparse.Namespace) -> None:
    dataset = load_dataset(args.data)
    if args.queries == "test":
        queries = dataset.sorted_queries(args.max_queries)
    else:  # unlabelled queries (e.g. SciFact's train claims) for distillation
        queries = sorted(dataset.extra_queries.values(), key=lambda q: q.query_id)[: args.max_queries]
    if args.candidates:
        first = read_run(args.candidates)
    else:
        first = build_or_load(args.retriever, dataset).search(queries, args.depth)
    out = Path(args.out)
    state = torch.load(out) if out.exists() else {"meta": vars(args), "queries": {}}
    config = RerankerConfig(kv_format="none",
                            mode="attn", max_passage_tokens=args.max_passage_tokens, storage_dtype="float16",
                            template=TEMPLATES[args.template], batch_size=args.batch_size)
    reranker = BlockReranker(config, store=MemoryKVStore(max_bytes=0))  # each passage is used once here
    ql_scorer = reranker.variant(mode="ql")  # the same template, model and store: ql over the same blocks
    todo = [q for q in queries if q.query_id not in state["queries"]]
    if args.reverse:  # a second process can work from the other end into its own file; `report` merges files
        todo.reverse()
    t0, done = time.perf_counter(), 0
    for query in tqdm(todo, desc=f"collect {out.stem}"):
        cands = first.get(query.query_id, [])[: args.depth]
        if not cands:
            continue
        blocks, _ = reranker.passage_kv([dataset.corpus[d.doc_id] for d in cands])
        ql = ql_scorer.score_blocks([query.text], [blocks])[0]
        q_mass, free_mass = reranker.attention_mass(query.text, blocks)
        state["queries"][query.query_id] = {
            "docs": [d.doc_id for d in cands], "first": [d.score for d in cands], "ql": ql,
            "mass": q_mass.half(), "free": free_mass.half(), "tokens": [b.num_tokens for b in blocks]}
        done += 1
        if done % 10 == 0 or done == len(todo):
            _save(state, out)
    _save(state, out)
    print(f"collected {done} queries in {time.perf_counter() - t0:.0f}s -> {out}")


def _save(state: dict, out: Path) -> None:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(out, buf.getvalue())


def _features(entry: dict, kind: str) -> torch.Tensor:
    mass, free = entry["mass"].float(), entry["free"].float()  # (L, H, K)
    return mass - free if kind == "calibrated" else mass


def _zscore_per_query(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-6)


def fit_weights(files: list[Path], kind: str, ridge: float = 1.0) -> torch.Tensor:
    """Least squares (ridge) from per-(layer, head) features to per-query z-scored ql scores: [L, H]."""
    xs, ys = [], []
    for path in files:
        for entry in torch.load(path)["queries"].values():
            feats = _features(entry, kind)  # (L, H, K)
            xs.append(feats.flatten(0, 1).T - feats.flatten(0, 1).T.mean(0))  # (K, L*H), centred per query
            ys.append(_zscore_per_query(torch.tensor(entry["ql"])))
    x, y = torch.cat(xs), torch.cat(ys)
    w = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1]), x.T @ y)
    return w.reshape(feats.shape[0], feats.shape[1])


def report(args: argparse.Namespace) -> dict:
    state = torch.load(args.features[0])
    for extra_file in args.features[1:]:  # shards of the same collection
        state["queries"].update(torch.load(extra_file)["queries"])
    meta = state["meta"]
    dataset = load_dataset(meta["data"])
    qids = set(state["queries"])
    qrels = [q for q in dataset.qrels if q.query_id in qids]
    level = convention_for(dataset).rel_level  # the collection's relevance level for RR and R

    def run_of(score_fn) -> dict[str, list[ScoredDoc]]:
        run = {}
        for qid, e in state["queries"].items():
            scores = score_fn(e)
            run[qid] = sorted((ScoredDoc(qid, d, float(s)) for d, s in zip(e["docs"], scores)),
                              key=lambda x: -x.score)
        return run

    def first_docs(qid, e):
        return [ScoredDoc(qid, d, s) for d, s in zip(e["docs"], e["first"])]

    results: dict[str, dict] = {}
    results["first stage"] = evaluate(run_of(lambda e: e["first"]), qrels, rel_level=level)
    ql_run = run_of(lambda e: e["ql"])
    results["ql"] = evaluate(ql_run, qrels, rel_level=level)
    for w in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
        fused = {qid: fuse(ql_run[qid], first_docs(qid, e), w)
                 for qid, e in state["queries"].items()}
        results[f"ql + first stage (w={w})"] = evaluate(fused, qrels, rel_level=level)
    for kind in ("raw", "calibrated"):
        results[f"attn uniform, {kind}"] = evaluate(run_of(lambda e, k=kind: _features(e, k).mean((0, 1))), qrels,
                                                    rel_level=level)
    n_layers = next(iter(state["queries"].values()))["mass"].shape[0]
    thirds = {"early": range(0, n_layers // 3), "middle": range(n_layers // 3, 2 * n_layers // 3),
              "late": range(2 * n_layers // 3, n_layers)}
    for name, layers in thirds.items():
        results[f"attn {name} layers, calibrated"] = evaluate(
            run_of(lambda e, ls=list(layers): _features(e, "calibrated")[ls].mean((0, 1))), qrels, rel_level=level)
    if args.fit:
        for kind in ("raw", "calibrated"):
            w = fit_weights([Path(f) for f in args.fit], kind)
            results[f"attn distilled, {kind}"] = evaluate(
                run_of(lambda e, k=kind, w=w: torch.einsum("lh,lhk->k", w, _features(e, k))), qrels,
                rel_level=level)
            # cascade: distilled attn keeps its top `--cascade` of the K candidates, ql reorders them
            cascade = {}
            for qid, e in state["queries"].items():
                attn = torch.einsum("lh,lhk->k", w, _features(e, kind))
                keep = attn.argsort(descending=True)[: args.cascade].tolist()
                head = sorted(keep, key=lambda i: -e["ql"][i])
                tail = [i for i in attn.argsort(descending=True).tolist() if i not in keep]
                n = len(head) + len(tail)
                cascade[qid] = [ScoredDoc(qid, e["docs"][i], float(n - r)) for r, i in enumerate(head + tail)]
            results[f"cascade attn({kind}) top-{args.cascade} -> ql"] = evaluate(cascade, qrels, rel_level=level)
    print(f"\n{meta['data']}  queries={len(qids)}  depth={meta['depth']}  template={meta['template']}  "
          f"max_passage_tokens={meta['max_passage_tokens']}")
    print(f"{'variant':48s} {'nDCG@10':>8s} {'RR@10':>8s} {'R@100':>8s}")
    for name, m in results.items():
        print(f"{name:48s} {m['nDCG@10']:8.4f} {m['RR@10']:8.4f} {m['R@100']:8.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return results


def write_weights(args: argparse.Namespace) -> None:
    """Fit attn weights by distillation from ql on the given files and ship them for the reranker's "auto"."""
    from kvrank.reranker.model import fingerprint as model_fingerprint
    from kvrank.reranker.model import load_lm

    metas = [torch.load(f)["meta"] for f in args.fit]
    templates = {m["template"] for m in metas}
    if len(templates) != 1:
        raise SystemExit(f"files were collected with different templates {templates}; fit one template at a time")
    template = templates.pop()
    w = fit_weights([Path(f) for f in args.fit], args.kind)
    fp = model_fingerprint(load_lm(args.model).model)
    n_queries = sum(len(torch.load(f)["queries"]) for f in args.fit)
    out = Path("kvrank/reranker/weights") / f"{fp}-{template}.json"
    out.write_text(json.dumps({
        "model": args.model, "fingerprint": fp, "template": template, "features": args.kind,
        # the collection by name (a folder's name), never the path it was read from on this machine
        "fitted_on": [{"data": Path(m["data"]).name or m["data"], "queries": m["queries"], "depth": m["depth"]}
                      for m in metas],
        "n_queries": n_queries, "method": "ridge regression (lambda=1) onto per-query z-scored ql scores",
        "weights": [[round(x, 6) for x in row] for row in w.tolist()]}, indent=1))
    print(f"wrote {out} from {n_queries} unlabelled queries")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--data", required=True)
    c.add_argument("--candidates")
    c.add_argument("--retriever", default="hybrid")
    c.add_argument("--depth", type=int, default=20)
    c.add_argument("--max-queries", type=int)
    c.add_argument("--queries", choices=["test", "extra"], default="test")
    c.add_argument("--template", default="ql-passage-query", choices=sorted(TEMPLATES))
    c.add_argument("--max-passage-tokens", type=int, default=192)
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--out", required=True)
    c.add_argument("--reverse", action="store_true", help="work through the queries from the last one")
    r = sub.add_parser("report")
    r.add_argument("features", nargs="+")
    r.add_argument("--fit", nargs="*", default=[])
    r.add_argument("--cascade", type=int, default=10)
    r.add_argument("--json")
    f = sub.add_parser("fit")
    f.add_argument("fit", nargs="+")
    f.add_argument("--kind", choices=["raw", "calibrated"], default="calibrated")
    f.add_argument("--model", default="smollm2")
    args = parser.parse_args()
    {"collect": collect, "report": report, "fit": write_weights}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
