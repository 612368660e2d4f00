"""The Python API: `Reranker` ranks the documents you give it; `Searcher` retrieves from a corpus, then reranks.

Both are faces of the one `SearchPipeline` (kvrank/pipeline.py) that `kvrank eval` and `kvrank serve` build, with
the same defaults (kvrank/defaults.py), so a library call ranks exactly as the CLI and the HTTP API do:
`Reranker.rank` as `POST /v1/rerank`, `Searcher.search` as `POST /v1/search` and `kvrank eval`.

    >>> import kvrank
    >>> reranker = kvrank.Reranker()
    >>> hits = reranker.rank("largest planet", ["Paris is the capital of France.", "Jupiter is the largest planet."])
    >>> [hit["corpus_id"] for hit in hits]
    [1, 0]
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvrank.defaults import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_FUSION_WEIGHT,
    DEFAULT_HEAD,
    DEFAULT_KV_FORMAT,
    DEFAULT_MAX_PASSAGE_TOKENS,
    DEFAULT_MODE,
    DEFAULT_MODEL,
    DEFAULT_RERANK_DEPTH,
    DEFAULT_RETRIEVER,
    DEFAULT_TOP_K,
    NO_RERANK,
    RERANK_MODES,
    SEARCH_MODES,
)
from kvrank.errors import KvrankError
from kvrank.reranker.model import LoadedLM
from kvrank.types import Dataset, Passage, Query

if TYPE_CHECKING:
    from kvrank.pipeline import PipelineConfig

Document = str | Mapping[str, Any]  # a text, or {"text": ..., "title"?: ..., "id"?: ..., "score"?: ...}

__all__ = ["Document", "Hit", "Reranker", "Searcher"]


@dataclass(frozen=True)
class Hit:
    """One search result, as `POST /v1/search` returns it: the passage, its final `score` (higher is better) if it
    was reranked, and its first-stage score. A hit below the reranked ones keeps the first stage's order and has
    no final score (None); with mode `none` every hit's score is the first stage's."""

    doc_id: str
    score: float | None
    title: str
    text: str
    reranked: bool
    first_stage_score: float


class Reranker:
    """Scores documents for a query with a causal LM over stored passage KV (block attention).

    Args:
        model: the reranker LM, a registry name (`smollm2`, `gemma3-270m`), a local path or hub id, or a loaded
            `LoadedLM`.
        mode: the scoring mode: `ql` (query likelihood), `attn` (attention mass), `yesno` or `cascade`.
        store: a folder for the passage KV store: a document seen before, by this process or another one, costs
            no prefill. None keeps the KV in memory for this object's lifetime.
        kv_format: the stored KV layout; `auto` is the store's own format, else the model's recommendation (int8).
        head: the scoring head used when documents carry a first-stage `score` (`auto`: the one shipped for the
            model, `none`, or a folder from `kvrank train --head`). Documents without one are ranked by the
            mode's own scores, as `POST /v1/rerank` ranks them.
        device: `cpu`, `cuda` or `mps`.
        dtype: the compute dtype of the LM.
        max_passage_tokens: each document is cut to this many tokens.
        adapter: a query-side adapter folder from `kvrank train`.
        remote_store: a KV tier shared by several machines behind `store` (an fsspec URL; the `ray` extra).

    Examples:
        >>> reranker = Reranker()
        >>> hits = reranker.rank("largest planet", ["Paris is the capital of France.",
        ...                                         "Jupiter is the largest planet."], top_k=1, return_documents=True)
        >>> hits[0]["text"]
        'Jupiter is the largest planet.'
    """

    def __init__(self, model: str | LoadedLM = DEFAULT_MODEL, mode: str = DEFAULT_MODE, *,
                 store: str | Path | None = None, kv_format: str = DEFAULT_KV_FORMAT,
                 head: str | Path | None = DEFAULT_HEAD, device: str = DEFAULT_DEVICE, dtype: str = DEFAULT_DTYPE,
                 max_passage_tokens: int = DEFAULT_MAX_PASSAGE_TOKENS, adapter: str | Path | None = None,
                 remote_store: str | None = None) -> None:
        from kvrank.pipeline import build_scorer

        _check_mode(mode, RERANK_MODES)
        lm = model if isinstance(model, LoadedLM) else None
        config = pipeline_config(mode=mode, model=model, store=store,
                                 kv_format=kv_format, head=head, device=device, dtype=dtype,
                                 max_passage_tokens=max_passage_tokens, adapter=adapter, remote_store=remote_store)
        with library_words():
            self.pipeline = build_scorer(config, lm=lm)

    @property
    def mode(self) -> str:
        return self.pipeline.mode

    @property
    def prefills(self) -> int:
        """Documents prefilled (not found in the store) since this reranker was made."""
        assert self.pipeline.reranker is not None
        return self.pipeline.reranker.prefills

    def score(self, query: str, documents: Sequence[Document]) -> list[float]:
        """One score per document, in input order (higher is better)."""
        query = _check_query(query)
        passages, first = _passages(documents)
        if not passages:
            return []
        return self.pipeline.score_with_head(query, passages, first)

    def rank(self, query: str, documents: Sequence[Document], top_k: int | None = None,
             return_documents: bool = False) -> list[dict[str, Any]]:
        """The documents best first, as sentence-transformers' `CrossEncoder.rank` returns them.

        Each hit is `{"corpus_id": index in documents, "score": float}`, plus `"text"` (and a dict document's
        `"id"` and `"title"`) with `return_documents=True`. `top_k` keeps the best `top_k`.
        """
        check_count("top_k", top_k, none="for all")
        scores = self.score(query, documents)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:top_k]
        hits: list[dict[str, Any]] = []
        for i in order:
            hit: dict[str, Any] = {"corpus_id": i, "score": scores[i]}
            if return_documents:
                doc = documents[i]
                hit["text"] = doc if isinstance(doc, str) else doc["text"]
                if not isinstance(doc, str):
                    hit |= {key: doc[key] for key in ("id", "title") if key in doc}
            hits.append(hit)
        return hits

    def close(self) -> None:
        """Close the KV store (a disk store's index); the reranker cannot score afterwards."""
        self.pipeline.close()

    def __enter__(self) -> Reranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Searcher:
    """Retrieve from a corpus, then rerank the top `rerank_depth` hits: what `kvrank eval` evaluates and
    `POST /v1/search` serves.

    Args:
        data: a BEIR folder, an ir_datasets id (`beir/scifact/test`), a `kvrank.Dataset`, or an iterable of
            documents (texts, or dicts with `text` and optional `id` and `title`; ids default to the position).
        retriever: the first stage: `bm25`, `dense` or `hybrid`.
        mode: the reranker's scoring mode, or `none` for the first stage alone.
        rerank_depth: first-stage hits reranked per query.
        fusion_weight: the first stage's share of the final score when no scoring head ranks the mode
            (None: the reranker's scores alone).
        model: as `Reranker`.
        store: as `Reranker`.
        kv_format: as `Reranker`.
        head: as `Reranker`; here the first stage's scores are at hand, so the shipped head ranks `ql`'s results.
        device: as `Reranker`.
        dtype: as `Reranker`.
        max_passage_tokens: as `Reranker`.
        index_dir: a first-stage index folder (`kvrank index`); None: a per-corpus cache.
        adapter: as `Reranker`.
        remote_store: as `Reranker`.

    Examples:
        >>> searcher = Searcher(["Jupiter is the largest planet.", "Paris is the capital of France."])
        >>> [hit.doc_id for hit in searcher.search("largest planet", top_k=1)]
        ['0']
    """

    def __init__(self, data: str | Path | Dataset | Iterable[Document], retriever: str = DEFAULT_RETRIEVER,
                 mode: str = DEFAULT_MODE, *, model: str | LoadedLM = DEFAULT_MODEL, store: str | Path | None = None,
                 kv_format: str = DEFAULT_KV_FORMAT, head: str | Path | None = DEFAULT_HEAD,
                 device: str = DEFAULT_DEVICE, dtype: str = DEFAULT_DTYPE,
                 max_passage_tokens: int = DEFAULT_MAX_PASSAGE_TOKENS, rerank_depth: int = DEFAULT_RERANK_DEPTH,
                 fusion_weight: float | None = DEFAULT_FUSION_WEIGHT, index_dir: str | Path | None = None,
                 adapter: str | Path | None = None, remote_store: str | None = None) -> None:
        from kvrank.pipeline import build

        _check_mode(mode, SEARCH_MODES)
        lm = model if isinstance(model, LoadedLM) else None
        config = pipeline_config(retriever=retriever, mode=mode, model=model,
                                 store=store, kv_format=kv_format, head=head, device=device, dtype=dtype,
                                 max_passage_tokens=max_passage_tokens, rerank_depth=rerank_depth,
                                 fusion_weight=fusion_weight, index_dir=index_dir, adapter=adapter,
                                 remote_store=remote_store)
        with library_words():
            self.dataset = _dataset(data)
            self.pipeline = build(config, self.dataset, lm=lm)

    def search(self, query: str, top_k: int = DEFAULT_TOP_K) -> list[Hit]:
        """The best `top_k` passages for `query`, best first."""
        return self.search_many([query], top_k)[0]

    def search_many(self, queries: Sequence[str], top_k: int = DEFAULT_TOP_K) -> list[list[Hit]]:
        """`search` for several queries at once (their reranking shares forward passes)."""
        if isinstance(queries, str):
            raise KvrankError("queries must be a list of strings, got one string; call search() for one query",
                              param="queries")
        check_count("top_k", top_k)
        texts = [_check_query(q) for q in queries]
        depth = self.pipeline.config.rerank_depth
        # as `POST /v1/search`: the first stage's top max(top_k, depth), the top `depth` of them reranked
        results = self.pipeline.search([Query(str(i), q) for i, q in enumerate(texts)], k=max(top_k, depth))
        corpus = self.pipeline.corpus
        out = []
        for result in results:
            first = {d.doc_id: d.score for d in result.first_stage}
            hits = []
            for i, doc in enumerate(result.hits[:top_k]):
                reranked = i < result.reranked
                score = doc.score if reranked else (first[doc.doc_id] if not result.reranked else None)
                passage = corpus[doc.doc_id]
                hits.append(Hit(doc.doc_id, score, passage.title, passage.text, reranked, first[doc.doc_id]))
            out.append(hits)
        return out

    def close(self) -> None:
        self.pipeline.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pipeline_config(*, retriever: str | None = None, mode: str = DEFAULT_MODE, model: str | LoadedLM = DEFAULT_MODEL,
                    store: str | Path | None = None, kv_format: str | None = DEFAULT_KV_FORMAT,
                    head: str | Path | None = DEFAULT_HEAD, device: str = DEFAULT_DEVICE, dtype: str = DEFAULT_DTYPE,
                    max_passage_tokens: int = DEFAULT_MAX_PASSAGE_TOKENS, rerank_depth: int = DEFAULT_RERANK_DEPTH,
                    fusion_weight: float | None = DEFAULT_FUSION_WEIGHT, index_dir: str | Path | None = None,
                    adapter: str | Path | None = None, remote_store: str | None = None) -> PipelineConfig:
    """The `PipelineConfig` of the Python API's and the server's arguments (every other setting its default),
    each argument checked by name."""
    from kvrank.pipeline import PipelineConfig
    from kvrank.reranker.reranker import RerankerConfig
    from kvrank.retriever import DenseConfig, RetrieverConfig

    if not isinstance(model, (str, LoadedLM)):
        raise KvrankError(f"model must be a model name, a path or a LoadedLM, got {type(model).__name__}",
                          param="model")
    _check_device(device)
    check_count("max_passage_tokens", max_passage_tokens)
    check_count("rerank_depth", rerank_depth)
    if fusion_weight is not None and (isinstance(fusion_weight, bool) or not isinstance(fusion_weight, (int, float))
                                      or not 0.0 <= fusion_weight <= 1.0):
        raise KvrankError(f"fusion_weight must be a number in [0, 1] (or None: the reranker's scores alone), got "
                          f"{fusion_weight!r}", param="fusion_weight")

    name = model if isinstance(model, str) else model.name
    reranker = None if mode == NO_RERANK else RerankerConfig(
        mode=mode, model=name, device=device, dtype=dtype, max_passage_tokens=max_passage_tokens)
    with library_words():
        return PipelineConfig(retriever=retriever,
                              retriever_config=RetrieverConfig(dense=DenseConfig(device=device), show_progress=False),
                              index_dir=_path(index_dir), reranker=reranker, adapter=_path(adapter), head=head,
                              kv_format=kv_format, store_dir=_path(store), remote_store=remote_store,
                              rerank_depth=rerank_depth, fusion_weight=fusion_weight)


# The library's name for a setting that the layers below name otherwise (the store folder, the data source).
LIBRARY_NAMES = {"store_dir": "store", "source": "data"}


@contextlib.contextmanager
def library_words() -> Iterator[None]:
    """Errors raised below the Python API name its own arguments: `store`, not the config's `store_dir`."""
    try:
        yield
    except KvrankError as err:
        if err.param not in LIBRARY_NAMES:
            raise
        name = LIBRARY_NAMES[err.param]
        message = re.sub(rf"\b{err.param}\b", name, str(err))
        raise KvrankError(message, param=name) from None


def _check_device(device: object) -> None:
    import torch

    try:
        parsed = torch.device(device)  # type: ignore[call-overload]
    except (RuntimeError, TypeError):
        raise KvrankError(f"device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps",
                          param="device") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise KvrankError(f"device {device!r}: no CUDA device is available to this torch build; use cpu",
                          param="device")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise KvrankError(f"device {device!r}: MPS is not available here; use cpu", param="device")


# ---------------------------------------------------------------------------------------------- input checks
def check_count(name: str, value: object, *, none: str | None = None) -> None:
    """Refuse `value` unless it is an integer >= 1 (a bool is not), or None where `none` says what None means."""
    if value is None and none is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        also = f" (or None {none})" if none is not None else ""
        raise KvrankError(f"{name} must be an integer >= 1{also}, got {value!r}", param=name)


def _check_mode(mode: str, allowed: Sequence[str]) -> None:
    if mode not in allowed:
        raise KvrankError(f"mode {mode!r} is not one of {', '.join(allowed)}", param="mode")


def _check_query(query: object) -> str:
    if not isinstance(query, str):
        raise KvrankError(f"query must be a string, got {type(query).__name__}", param="query")
    if not query.strip():
        raise KvrankError("query is empty; pass the text to rank the documents for", param="query")
    return query


def _passages(documents: Sequence[Document]) -> tuple[list[Passage], list[float] | None]:
    """Passages of the documents (ids are positions unless a dict names one) and their first-stage scores when
    every document carries one."""
    if isinstance(documents, (str, Mapping)) or not isinstance(documents, Sequence):
        raise KvrankError(f"documents must be a list of strings or dicts, got {type(documents).__name__}",
                          param="documents")
    passages, scores = [], []
    for i, doc in enumerate(documents):
        if isinstance(doc, str):
            passages.append(Passage(str(i), "", doc))
            continue
        if not isinstance(doc, Mapping):
            raise KvrankError(f"documents[{i}] is a {type(doc).__name__}; pass a string or a dict with 'text'",
                              param="documents")
        text, title = doc.get("text"), doc.get("title") or ""
        if not isinstance(text, str):
            raise KvrankError(f"documents[{i}] has no 'text' string (keys: {', '.join(map(str, doc)) or 'none'}); "
                              "each dict document needs one", param="documents")
        if not isinstance(title, str):
            raise KvrankError(f"documents[{i}]['title'] must be a string, got {type(title).__name__}",
                              param="documents")
        doc_id = doc.get("id")
        passages.append(Passage(str(i if doc_id is None else doc_id), title, text))
        if "score" in doc:
            score = doc["score"]
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise KvrankError(f"documents[{i}]['score'] must be a finite number (the first stage's score), got "
                                  f"{score!r}", param="documents")
            scores.append(float(score))
    if scores and len(scores) != len(passages):
        raise KvrankError(f"{len(scores)} of the {len(passages)} documents carry a first-stage 'score'; give every "
                          "document one (the scoring head ranks them) or none (the mode's scores rank them)",
                          param="documents")
    return passages, (scores or None)


def _dataset(data: str | Path | Dataset | Iterable[Document]) -> Dataset:
    """A dataset of a BEIR folder or ir_datasets id (`load_dataset`), or one made of the given documents."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, Path)):
        from kvrank.eval.data import load_corpus, load_dataset

        folder = Path(data).expanduser()
        judged = (folder / "queries.jsonl").is_file() and (folder / "qrels" / "test.tsv").is_file()
        if (folder / "corpus.jsonl").is_file() and not judged:
            return load_corpus(folder)  # a corpus to search needs no queries or judgements
        return load_dataset(data)
    if isinstance(data, Mapping) or not isinstance(data, Iterable):
        raise KvrankError(f"data must be a BEIR folder, an ir_datasets id or a list of documents, got "
                          f"{type(data).__name__}", param="data")
    passages, _ = _passages(list(data))
    corpus: dict[str, Passage] = {}
    for i, passage in enumerate(passages):
        if passage.doc_id in corpus:
            raise KvrankError(f"data[{i}] repeats the id {passage.doc_id!r}; document ids must be unique",
                              param="data")
        corpus[passage.doc_id] = passage
    if not corpus:
        raise KvrankError("data holds no documents; a search needs at least one", param="data")
    return Dataset(name="documents", corpus=corpus, queries={}, source="documents")


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value).expanduser()
