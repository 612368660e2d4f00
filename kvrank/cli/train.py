"""`kvrank train` and `kvrank tune`: learn a query-side adapter over stored passage KV (labels, or none)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from kvrank.cli.common import Device, Dtype, RemoteStore, RerankModel, console, friendly_errors, reranker_config
from kvrank.defaults import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_EVAL_RETRIEVER,
    DEFAULT_FUSION_WEIGHT,
    DEFAULT_MODE,
    DEFAULT_RERANK_DEPTH,
)
from kvrank.errors import KvrankError

Out = Annotated[Path, typer.Option("--out", help="Adapter folder to write (resumes a killed run in it).")]
Mode = Annotated[str, typer.Option("--mode", help="Scoring mode to train: ql, yesno or attn.")]
StoreOpt = Annotated[Path | None, typer.Option(
    "--store", help="Passage KV store folder: passages are prefilled once and reused every epoch (default: memory).")]
Negatives = Annotated[int, typer.Option("--negatives", help="Hard negatives per training query (first-stage hits).")]
Epochs = Annotated[int, typer.Option("--epochs", help="Passes over the training lists.")]
Lr = Annotated[float, typer.Option("--lr", help="AdamW learning rate.")]
Rank = Annotated[int, typer.Option("--rank", help="LoRA rank.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed (same seed and data: the same adapter).")]
Dev = Annotated[list[str] | None, typer.Option(
    "--dev", help="BEIR folder(s) evaluated after each epoch (test split, nDCG@10 of the fused ranking); the best "
    "epoch is kept, the base model included. Never a set you report as held out.")]
Retriever = Annotated[str, typer.Option("--retriever", help="First stage for negatives and dev: bm25, dense, hybrid.")]
Recipe = Annotated[str, typer.Option("--recipe", help="Pseudo-query recipe: title (title -> body) or cloze (a "
                                     "sentence -> the rest of its passage).")]


@friendly_errors
def train(
    data: Annotated[list[str], typer.Option("--data", help="BEIR folder(s) with judged queries to train on.")],
    out: Out,
    mode: Mode = DEFAULT_MODE,
    split: Annotated[str, typer.Option("--split", help="qrels split of --data to train on (qrels/<split>.tsv).")]
    = "train",
    candidates: Annotated[Path | None, typer.Option(
        "--candidates", help="First stage from a TREC run file instead of --retriever (one --data only).")] = None,
    retriever: Retriever = DEFAULT_EVAL_RETRIEVER,
    folds: Annotated[int | None, typer.Option("--folds", help="k-fold by query: train on all folds but --fold.")]
    = None,
    fold: Annotated[int, typer.Option("--fold", help="The held-out fold (0-based) with --folds.")] = 0,
    max_queries: Annotated[int | None, typer.Option("--max-queries", help="Train on the first N queries.")] = None,
    pseudo_queries: Annotated[int, typer.Option(
        "--pseudo-queries", help="Also make N label-free queries per corpus (see `kvrank tune`).")] = 0,
    recipe: Recipe = "title",
    negatives: Negatives = 7,
    epochs: Epochs = 2,
    lr: Lr = 2e-4,
    rank: Rank = 8,
    store: StoreOpt = None,
    remote_store: RemoteStore = None,
    dev: Dev = None,
    seed: Seed = 0,
    model: RerankModel = None,
    device: Device = DEFAULT_DEVICE,
    dtype: Dtype = DEFAULT_DTYPE,
    head: Annotated[bool, typer.Option(
        "--head", help="Fit a scoring head (LightGBM lambdarank over first-stage, dense and zero-shot --mode scores "
        "of each query's first-stage top --depth) instead of an adapter; --store may name one store per dataset "
        "with {dataset}.", rich_help_panel="Scoring head")] = False,
    depth: Annotated[int, typer.Option("--depth", help="With --head: candidates per query, as reranked.",
                                       rich_help_panel="Scoring head")] = DEFAULT_RERANK_DEPTH,
    trees: Annotated[int, typer.Option("--trees", help="With --head: boosting rounds on top of fusion.",
                                       rich_help_panel="Scoring head")] = 25,
) -> None:
    """Train a query-side adapter on judged queries: listwise loss over each query's positives and hard negatives
    (ql, yesno), or InfoNCE on attention mass (attn). Passage KV is frozen, stored and reused every epoch. With
    --head, fit a scoring head instead (seconds, once the lists' ql scores are computed)."""
    from kvrank.eval.data import load_dataset
    from kvrank.train.lists import folds as split_folds
    from kvrank.train.lists import labelled_lists, pseudo_lists

    _check_mode(mode)
    if candidates is not None and len(data) != 1:
        raise KvrankError("--candidates is a run for one dataset; pass one --data with it")
    jobs: list[Any] = []
    for source in data:
        dataset = load_dataset(source, split)
        queries = dataset.sorted_queries(max_queries)
        if folds is not None:
            queries, _ = split_folds(queries, folds, fold)
        jobs.append((dataset, queries))
    if head:
        _fit_head(jobs, out, mode=mode, candidates=candidates, retriever=retriever, depth=depth, trees=trees,
                  store=store, remote_store=remote_store, dev=dev, seed=seed, model=model, device=device,
                  dtype=dtype, recipe={"labels": split, "folds": folds, "fold": fold if folds else None})
        return
    if "{dataset}" in str(store):
        raise KvrankError("--store with {dataset} is for --head; an adapter trains over one store")
    _run(jobs, out, mode=mode, candidates=candidates, retriever=retriever, negatives=negatives, epochs=epochs, lr=lr,
         rank=rank, store=store, remote_store=remote_store, dev=dev, seed=seed, model=model, device=device,
         dtype=dtype,
         make_lists=lambda dataset, queries, first: (
             labelled_lists(dataset, first, negatives=negatives, queries=queries, seed=seed)
             + (pseudo_lists(dataset, first, recipe=recipe, n=pseudo_queries, negatives=negatives, seed=seed)
                if pseudo_queries else [])),
         recipe={"labels": split, "folds": folds, "fold": fold if folds else None,
                 "pseudo_queries": pseudo_queries, "recipe": recipe if pseudo_queries else None})


@friendly_errors
def tune(
    data: Annotated[list[str], typer.Option("--data", help="Corpus folder(s) (BEIR layout; qrels not needed).")],
    out: Out,
    recipe: Recipe = "title",
    queries: Annotated[int, typer.Option("--queries", help="Pseudo-queries made per corpus.")] = 200,
    mode: Mode = DEFAULT_MODE,
    retriever: Retriever = DEFAULT_EVAL_RETRIEVER,
    negatives: Negatives = 7,
    epochs: Epochs = 2,
    lr: Lr = 2e-4,
    rank: Rank = 8,
    store: StoreOpt = None,
    remote_store: RemoteStore = None,
    dev: Dev = None,
    seed: Seed = 0,
    model: RerankModel = None,
    device: Device = DEFAULT_DEVICE,
    dtype: Dtype = DEFAULT_DTYPE,
) -> None:
    """Adapt the reranker to a corpus without labels: pseudo-queries made from the corpus itself, their source
    passage as the positive and the first stage's other hits as negatives."""
    from kvrank.eval.data import load_corpus
    from kvrank.train.lists import pseudo_lists

    _check_mode(mode)
    jobs: list[Any] = [(load_corpus(source), []) for source in data]
    _run(jobs, out, mode=mode, candidates=None, retriever=retriever, negatives=negatives, epochs=epochs, lr=lr,
         rank=rank, store=store, remote_store=remote_store, dev=dev, seed=seed, model=model, device=device,
         dtype=dtype,
         make_lists=lambda dataset, _, first: pseudo_lists(dataset, first, recipe=recipe, n=queries,
                                                           negatives=negatives, seed=seed),
         recipe={"labels": None, "pseudo_queries": queries, "recipe": recipe})


def _fit_head(jobs: list[Any], out: Path, *, mode: str, candidates: Path | None, retriever: str, depth: int,
              trees: int, store: Path | None, remote_store: str | None, dev: list[str] | None, seed: int,
              model: str | None, device: str, dtype: str, recipe: dict[str, Any]) -> None:
    """`kvrank train --head`: lists (cached in `out`, resumable), then the trees, then the card."""
    import time

    from kvrank.eval.conventions import convention_for
    from kvrank.eval.data import load_dataset
    from kvrank.eval.metrics import evaluate
    from kvrank.pipeline import PipelineConfig, build_reranker
    from kvrank.reranker import head as heads
    from kvrank.retriever import build_or_load
    from kvrank.retriever.candidates import CandidatesRetriever
    from kvrank.retriever.dense import load_encoder
    from kvrank.train import head as training

    if mode not in ("ql", "attn"):
        raise KvrankError(f"--head learns from ql or attn scores; pass --mode ql or attn (got {mode!r})")
    if trees < 1:
        raise KvrankError(f"--trees must be >= 1, got {trees}")
    if depth < 2:
        raise KvrankError(f"--depth must be >= 2 (a head ranks lists), got {depth}")
    settings = reranker_config(mode, model=model, device=device, dtype=dtype)
    encoder = load_encoder(None)
    out.mkdir(parents=True, exist_ok=True)
    lm = None

    def lists_for(dataset: Any, queries: Any, first: Any, tag: str) -> list[Any]:
        nonlocal lm
        folder = Path(str(store).replace("{dataset}", dataset.name)) if store is not None else None
        reranker = build_reranker(PipelineConfig(reranker=settings, store_dir=folder, remote_store=remote_store),
                                  list(dataset.corpus.values()), lm=lm)
        lm = reranker.lm
        try:
            return training.head_lists(dataset, first, reranker, encoder, depth=depth, queries=queries,
                                       cache=out / f"lists-{dataset.name}-{tag}-{mode}.json")
        finally:
            reranker.store.close()

    start = time.perf_counter()
    lists, described = [], []
    for dataset, queries in jobs:
        first = (CandidatesRetriever.from_file(candidates, dataset) if candidates is not None
                 else build_or_load(retriever, dataset))
        made = lists_for(dataset, queries, first, recipe["labels"])
        lists += made
        described.append({"data": dataset.name, "source": dataset.source, "lists": len(made),
                          "digest": training.lists_digest(made)})
    booster = training.fit(lists, trees=trees, seed=seed)
    metrics: dict[str, Any] = {}
    for source in dev or []:
        dataset = load_dataset(source)
        held = lists_for(dataset, None, build_or_load(retriever, dataset), "dev")
        qrels = [q for q in dataset.qrels if q.query_id in {x.query_id for x in held}]
        level = convention_for(dataset).rel_level
        metrics[dataset.name] = {name: round(evaluate(training.rank_with(held, fn), qrels,
                                                      rel_level=level)["nDCG@10"], 4)
                                 for name, fn in training.rankings(booster).items()}
        console.print(f"dev {dataset.name} nDCG@10: " + ", ".join(f"{k} {v:.4f}"
                                                                  for k, v in metrics[dataset.name].items()))
    assert lm is not None
    card = heads.HeadCard(base_fingerprint=lm.fingerprint, base_model=settings.model, mode=mode,
                          template=settings.prompt.name, dense_model=encoder.fingerprint,
                          prior_weight=training.DEFAULT_PRIOR_WEIGHT, trees=trees, seed=seed,
                          first_stage="run" if candidates else retriever,
                          training={"sources": described, **recipe, "depth": depth,
                                    "first_stage": candidates.name if candidates else retriever},
                          metrics={"dev_nDCG@10": metrics, "dev_first_stage": retriever} if metrics else {})
    card = heads.save(out, booster, card)
    console.print(f"[green]head[/green] {escape(str(out))} (digest {card.digest}): {len(lists)} training lists, "
                  f"{trees} trees, {time.perf_counter() - start:.0f} s")


def _check_mode(mode: str) -> None:
    if mode not in ("ql", "yesno", "attn"):
        raise KvrankError(f"--mode {mode!r} cannot be trained; use ql, yesno or attn")


def _run(jobs: list[Any], out: Path, *, mode: str, candidates: Path | None, retriever: str, negatives: int,
         epochs: int, lr: float, rank: int, store: Path | None, remote_store: str | None, dev: list[str] | None,
         seed: int, model: str | None, device: str, dtype: str, make_lists: Any, recipe: dict[str, Any]) -> None:
    from kvrank.eval.data import load_dataset
    from kvrank.eval.runner import run_eval
    from kvrank.fingerprints import corpus_fingerprint
    from kvrank.pipeline import PipelineConfig, SearchPipeline, build_reranker
    from kvrank.reranker.adapter import AdapterCard
    from kvrank.retriever import build_or_load
    from kvrank.retriever.candidates import CandidatesRetriever
    from kvrank.train.trainer import TrainConfig
    from kvrank.train.trainer import train as train_adapter

    settings = reranker_config(mode, model=model, device=device, dtype=dtype)
    config = TrainConfig(epochs=epochs, lr=lr, seed=seed)  # checks the numbers before any work
    if rank < 1:
        raise KvrankError(f"--rank must be >= 1, got {rank}")
    lists, described = [], []
    for dataset, queries in jobs:
        first = (CandidatesRetriever.from_file(candidates, dataset) if candidates is not None
                 else build_or_load(retriever, dataset))
        made = make_lists(dataset, queries, first)
        lists += made
        described.append({"name": dataset.name, "source": dataset.source, "lists": len(made),
                          "corpus": corpus_fingerprint(dataset.corpus)[:16]})
    parts = ", ".join(f"{d['name']} {d['lists']}" for d in described)
    console.print(f"training lists: {len(lists)} ({parts})")
    corpus = [p for dataset, _ in jobs for p in dataset.corpus.values()]
    reranker = build_reranker(PipelineConfig(reranker=settings, store_dir=store, remote_store=remote_store), corpus)

    dev_fn = None
    if dev:
        dev_sets = [load_dataset(source) for source in dev]
        dev_firsts = [build_or_load(retriever, d) for d in dev_sets]
        dev_config = PipelineConfig(head="none", retriever=retriever, reranker=reranker.config,
                                    rerank_depth=DEFAULT_RERANK_DEPTH, fusion_weight=DEFAULT_FUSION_WEIGHT)

        def dev_fn(current: Any) -> dict[str, float]:
            metrics: dict[str, float] = {}
            for d, first in zip(dev_sets, dev_firsts):
                report = run_eval(d, SearchPipeline(dev_config, d.corpus, first, current))
                metrics[f"{d.name}/nDCG@10"] = report.metrics["nDCG@10"]
                metrics[f"{d.name}/first_stage_nDCG@10"] = report.first_stage_metrics["nDCG@10"]
            metrics["nDCG@10"] = sum(v for k, v in metrics.items() if k.endswith("/nDCG@10")
                                     and "first_stage" not in k) / len(dev_sets)
            console.print(f"dev: {', '.join(f'{k} {v:.4f}' for k, v in metrics.items())}")
            return metrics

    card = AdapterCard(base_fingerprint=reranker.lm.fingerprint, base_model=settings.model, mode=mode,
                       template=reranker.template.name, rank=rank, alpha=2 * rank, seed=seed,
                       training={"data": described, **recipe, "negatives": negatives,
                                 "first_stage": "candidates" if candidates else retriever})
    card, history = train_adapter(reranker, lists, config, out, card=card, dev=dev_fn)
    reranker.store.close()
    rate = history.kv_hits / max(1, history.kv_hits + history.kv_misses)
    console.print(f"[green]adapter[/green] {escape(str(out))} (digest {card.digest}): {history.queries} training "
                  f"queries in {history.seconds:.0f} s ({history.queries / max(history.seconds, 1e-9):.2f} q/s), "
                  f"passage-KV hit rate {rate:.1%}; best epoch {card.training['best_epoch']}")
