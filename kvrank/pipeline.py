"""The composition root: one config, one `build`, one `SearchPipeline.search`.

    PipelineConfig ──build(config, dataset)──> SearchPipeline
        first stage   retriever (bm25 | dense | hybrid, from its index) or candidates from a TREC run file
        reranker      the LM, the KV format (explicit, else the store's own or the remote tier's, else `auto`), its
                      basis (the store's own, else the remote's, else fitted on a corpus sample and shared), the
                      store opened with the reranker's identity (local, behind it a shared remote tier if set)
        head          a scoring head over first-stage, dense and `ql` scores (`auto`: the one shipped for the model)
    SearchPipeline.search(queries) -> [SearchResult]: retrieve, look up or prefill passage KV, score, then the
        head's ranking (in the head's mode) or fusion with the first stage

Every entry point calls `build` and then `search` (or `score` for caller-given documents): `kvrank eval` and the
demo (through `eval.run.run_eval`), `kvrank warm`, the API's model worker, the benchmarks. Nothing is attached
to a pipeline after it is built.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch.profiler import record_function

from kvrank.attention.kvformat import AUTO
from kvrank.defaults import (
    DEFAULT_CALIBRATION_PASSAGES,
    DEFAULT_FUSION_WEIGHT,
    DEFAULT_HEAD,
    DEFAULT_K,
    DEFAULT_RERANK_DEPTH,
    DEFAULT_RETRIEVER,
    NO_RERANK,
    RERANK_MODES,
    SEARCH_MODES,
)
from kvrank.errors import KvrankError
from kvrank.reranker import adapter as adapters
from kvrank.reranker import head as heads
from kvrank.reranker.fusion import fuse
from kvrank.reranker.model import LoadedLM, load_lm
from kvrank.reranker.reranker import BlockReranker, RerankerConfig, ScoredLists, fit_format_basis, resolve_auto
from kvrank.retriever import KINDS, Retriever, RetrieverConfig, build_or_load
from kvrank.retriever.candidates import CandidatesRetriever
from kvrank.retriever.dense import load_encoder
from kvrank.store.disk import DiskKVStore, StoreConfig
from kvrank.store.formats import (
    calibration_sample,
    check_format,
    resolve_basis,
    storage_tag,
    store_format,
)
from kvrank.store.kv import KVStore, MemoryKVStore, StoreIdentity
from kvrank.store.remote import RemoteFolder, RemoteTier
from kvrank.store.tiered import TieredKVStore
from kvrank.types import Dataset, Passage, Query, ScoredDoc

VARIANTS = 8  # rerankers kept for other (mode, max_passage_tokens) than the configured one (LRU)


class Default(enum.Enum):
    """The type of `DEFAULT`: "the config's value", where None is itself a meaningful value."""

    DEFAULT = "default"


DEFAULT = Default.DEFAULT


@dataclass(frozen=True)
class PipelineConfig:
    """Everything `build` needs. The first stage is a `retriever` kind (default: `DEFAULT_RETRIEVER`) or a
    `candidates` run file, not both; `reranker=None` searches with the first stage alone.

    `kv_format` is the stored layout and replaces `reranker.kv_format`: None or `auto` means the store's own format,
    else the model's measured recommendation; naming one that differs from an existing store's is refused.
    """

    retriever: str | None = None
    retriever_config: RetrieverConfig = field(default_factory=RetrieverConfig)
    index_dir: Path | None = None
    candidates: Path | None = None
    reranker: RerankerConfig | None = field(default_factory=RerankerConfig)
    adapter: Path | None = None  # a query-side adapter (`kvrank train`/`tune`) for the reranker's model and mode
    # a scoring head (`kvrank train --head`) that replaces fusion in its mode: a folder, `auto` (the heads shipped for
    # the reranker's model and template, if any) or `none`
    head: str | Path | None = DEFAULT_HEAD
    kv_format: str | None = None
    store_dir: Path | None = None  # a persistent KV store folder (`--store`); None: in memory
    store_config: StoreConfig = field(default_factory=StoreConfig)
    # a KV tier shared by several nodes behind the local store (`--remote-store`): an fsspec URL (s3://, file://)
    remote_store: str | None = None
    calibration_passages: int = DEFAULT_CALIBRATION_PASSAGES
    # search defaults (a `search` call may override them)
    k: int = DEFAULT_K
    rerank_depth: int = DEFAULT_RERANK_DEPTH
    fusion_weight: float | None = DEFAULT_FUSION_WEIGHT  # None: the reranker's scores alone, not z-scored

    def __post_init__(self) -> None:
        if self.retriever is not None and self.candidates is not None:
            raise KvrankError("candidates and retriever are alternatives: the candidates run is the first stage; "
                              "pass one of them", param="candidates")
        if self.retriever is not None and self.retriever not in KINDS:
            raise KvrankError(f"retriever {self.retriever!r} is not one of {', '.join(KINDS)}", param="retriever")
        _check_search(self.k, self.rerank_depth, self.fusion_weight)
        if self.calibration_passages < 1:
            raise KvrankError(f"calibration_passages must be >= 1, got {self.calibration_passages}",
                              param="calibration_passages")

    @property
    def mode(self) -> str:
        return self.reranker.mode if self.reranker is not None else NO_RERANK


@dataclass(frozen=True)
class SearchResult:
    """One query's answer. `hits` is the final ranking: the reranked head (`reranked` docs, fused with the first
    stage when a fusion weight is set), then the rest of the first stage in its order, scored below the head so
    that every evaluator sees the same order. `timings` holds milliseconds per stage (`retrieve` and a
    retriever's sub-stages; `rerank` and within it `kv_lookup`, `prefill`, `scoring`); stages shared by the
    queries of one call report the call's time."""

    query: Query
    hits: list[ScoredDoc]
    first_stage: list[ScoredDoc]
    reranked: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    kv_hits: int = 0
    kv_misses: int = 0


class SearchPipeline:
    """Retrieve, then rerank from stored passage KV. Made by `build`; thread-compatible (one caller at a time:
    the API calls it from its single model worker)."""

    def __init__(self, config: PipelineConfig, corpus: Mapping[str, Passage], first_stage: Retriever,
                 reranker: BlockReranker | None, heads_by_mode: Mapping[str, heads.ScoringHead] | None = None,
                 encoder: Any = None):
        if heads_by_mode and encoder is None and corpus:
            raise ValueError("a scoring head over a corpus needs the dense encoder its `dense` signal comes from")
        self.config = config
        self.corpus = corpus
        self.first_stage = first_stage
        self.reranker = reranker
        self.heads = dict(heads_by_mode or {})  # scoring heads by the mode whose scores they rank
        self.encoder = encoder
        self._vectors = (heads.PassageVectors(encoder, lambda d: corpus[d].contents, first_stage)
                         if self.heads and encoder is not None else None)
        self._variants: OrderedDict[tuple[str, int], BlockReranker] = OrderedDict()
        self._variants_lock = threading.Lock()  # the API's cost estimates ask for variants off the worker thread

    @property
    def store(self) -> KVStore | None:
        return self.reranker.store if self.reranker is not None else None

    @property
    def mode(self) -> str:
        return self.config.mode

    def search(self, queries: Sequence[Query], k: int | None = None, depth: int | None = None,
               mode: str | None = None, fusion_weight: float | None | Default = DEFAULT) -> list[SearchResult]:
        """The first stage's top `k` for each query, the top `depth` of those reranked in `mode` and fused with
        weight `fusion_weight` (`DEFAULT`: the config's values; `fusion_weight=None` keeps the reranker's
        scores)."""
        k = self.config.k if k is None else k
        depth = self.config.rerank_depth if depth is None else depth
        weight = self.config.fusion_weight if isinstance(fusion_weight, Default) else fusion_weight
        mode = mode or self.mode
        _check_search(k, depth, weight)
        if mode not in SEARCH_MODES:
            raise KvrankError(f"mode {mode!r} is not one of {', '.join(SEARCH_MODES)}", param="mode")
        reranker = self.reranker_for(mode) if mode != NO_RERANK else None
        if not queries:
            return []
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        with record_function("kvrank.retrieve"):
            run = self.first_stage.search(list(queries), k)
        if not getattr(self.first_stage, "precomputed", False):
            timings["retrieve"] = (time.perf_counter() - t0) * 1e3
        # A retriever may report its own sub-stages (the hybrid: retrieve.sparse, retrieve.dense).
        timings.update(getattr(self.first_stage, "last_timings", {}))
        ranked = [list(run.get(q.query_id, []))[:k] for q in queries]
        if reranker is None:
            return [SearchResult(q, r, r, 0, dict(timings)) for q, r in zip(queries, ranked)]

        t1 = time.perf_counter()
        windows = [[d for d in r[:depth] if d.doc_id in self.corpus] for r in ranked]
        todo = [i for i, window in enumerate(windows) if window]
        with record_function("kvrank.rerank"):
            scored = reranker.score_many([queries[i].text for i in todo],
                                         [[self.corpus[d.doc_id] for d in windows[i]] for i in todo])
        scores = scored.scores
        head_ms = None
        if mode in self.heads:  # the head's ranking replaces fusion
            t2 = time.perf_counter()
            with record_function("kvrank.head"):
                scores = [self._head_scores(self.heads[mode], queries[i].text,
                                            self._window_vectors(windows[i]), [d.score for d in windows[i]], s)
                          for i, s in zip(todo, scores)]
            weight, head_ms = None, (time.perf_counter() - t2) * 1e3
        rerank_ms = (time.perf_counter() - t1) * 1e3
        by_query = dict(zip(todo, range(len(todo))))
        results = []
        for i, (query, docs) in enumerate(zip(queries, ranked)):
            stage = {**timings, "rerank": rerank_ms}
            if i not in by_query:  # nothing rerankable in the head
                results.append(SearchResult(query, docs, docs, 0, stage))
                continue
            j = by_query[i]
            hits = _merge(query.query_id, windows[i], scores[j], docs[:depth], docs[depth:], weight)
            stage.update(scored.timings.as_dict())
            if head_ms is not None:
                stage["head"] = head_ms
            results.append(SearchResult(query, hits, docs, len(windows[i]), stage, scored.kv_hits[j],
                                        scored.kv_misses[j]))
        return results

    def _window_vectors(self, window: list[ScoredDoc]) -> Any:
        """(K, dim) unit-length embeddings of a reranked window's corpus passages (kept or read from the index)."""
        assert self._vectors is not None
        return self._vectors.get([d.doc_id for d in window])

    def _head_scores(self, head: heads.ScoringHead, query: str, vectors: Any, first: Sequence[float],
                     lm: Sequence[float]) -> list[float]:
        """A scoring head's scores for one query's candidates, given their (K, dim) embeddings, first-stage and LM
        scores in the same order."""
        dense = vectors @ self.encoder.encode([query])[0]  # (K,) cosines
        return [float(x) for x in head.score(first, dense.tolist(), lm)]

    def score(self, queries: Sequence[str], candidates: Sequence[Sequence[Passage]], mode: str | None = None,
              max_passage_tokens: int | None = None, waiting: Callable[[int], bool] | None = None) -> ScoredLists:
        """Rerank caller-given passages (no first stage): each query against its own list, in `mode`, with the
        reranker's scores alone. `waiting(i)` false skips scoring list `i` once its passage KV is stored (its
        caller gave up meanwhile)."""
        return self.reranker_for(mode or self.mode, max_passage_tokens).score_many(queries, candidates,
                                                                                   waiting=waiting)

    def score_with_head(self, query: str, passages: Sequence[Passage],
                        first: Sequence[float] | None = None) -> list[float]:
        """Scores of caller-given passages for one query, in their order: the scoring head's when the caller gives
        each passage's first-stage score (`first`) and a head ranks this pipeline's mode, else the mode's own (as
        `score`)."""
        lm = self.score([query], [passages]).scores[0]
        head = self.head
        if first is None or head is None or not lm:
            return lm
        if len(first) != len(passages):
            raise ValueError(f"{len(passages)} passages but {len(first)} first-stage scores")
        if self.encoder is None:  # loaded on the first use: plain documents never need it
            self.encoder = head_encoder(self.heads.values())
        return self._head_scores(head, query, self.encoder.encode([p.contents for p in passages]), first, lm)

    def reranker_for(self, mode: str, max_passage_tokens: int | None = None) -> BlockReranker:
        """The configured reranker, or a variant for another mode or a smaller token budget that shares its model,
        basis and store (kept in a small LRU)."""
        base = self.reranker
        if base is None:
            raise KvrankError(f"mode {mode!r} needs a reranker, but this pipeline was built without one "
                              "(mode 'none')", param="mode")
        if mode not in RERANK_MODES:
            raise KvrankError(f"mode {mode!r} is not one of {', '.join(RERANK_MODES)}", param="mode")
        card = base.adapter
        if card is not None and mode != card.mode:
            raise KvrankError(f"the reranker's adapter was trained for mode {card.mode!r}; rerank in that mode, "
                              "or build without the adapter to use other modes", param="mode")
        limit = base.config.max_passage_tokens
        tokens = min(max_passage_tokens or limit, limit)
        if (mode, tokens) == (base.config.mode, limit):
            return base
        key = (mode, tokens)
        with self._variants_lock:
            if key not in self._variants:
                self._variants[key] = base.variant(mode=mode, max_passage_tokens=tokens)
                while len(self._variants) > VARIANTS:
                    self._variants.popitem(last=False)
            self._variants.move_to_end(key)
            return self._variants[key]

    def describe(self) -> dict[str, Any]:
        """The reranker's settings and this run's KV use, as the eval report records them."""
        if self.reranker is None:
            return {}
        store, settings = self.reranker.store, self.reranker.config
        lifetime = {"kv_store": store.totals()} if store.location is not None else {}
        return {"kv_cache": store.stats().as_dict(), **lifetime, "prefills": self.reranker.prefills,
                "reranker": {"mode": settings.mode, "model": settings.model, "template": self.reranker.template.name,
                             "max_passage_tokens": settings.max_passage_tokens,
                             "storage_dtype": settings.storage_dtype, "kv_format": settings.format.name,
                             "fusion_weight": self.config.fusion_weight if self.head is None else None,
                             "adapter": self.adapter_digest, "head": self.head_digest}}

    @property
    def head(self) -> heads.ScoringHead | None:
        """The scoring head of the configured mode (None: that mode fuses)."""
        return self.heads.get(self.mode)

    def head_for(self, mode: str) -> heads.ScoringHead | None:
        """The scoring head that ranks `mode`'s results (None: fusion)."""
        return self.heads.get(mode)

    @property
    def adapter_digest(self) -> str | None:
        """The digest of the reranker's query-side adapter (None: the base model)."""
        card = self.reranker.adapter if self.reranker is not None else None
        return card.digest if card is not None else None

    @property
    def head_digest(self) -> str | None:
        """The digest of the scoring head in use (None: rerank fusion)."""
        return self.head.digest if self.head is not None else None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> SearchPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build(config: PipelineConfig, dataset: Dataset, *, lm: LoadedLM | None = None,
          first_stage: Retriever | None = None) -> SearchPipeline:
    """Assemble the pipeline `config` describes over `dataset`'s corpus. `lm` and `first_stage` may be given
    ready-made (tests pass tiny models); otherwise the LM is loaded and the retriever built or loaded."""
    if not dataset.corpus:
        raise KvrankError(f"{dataset.source or dataset.name}: the corpus is empty; a search needs documents")
    heads.check_option(config.head)  # a bad --head is refused before any index or model work
    if first_stage is None:
        first_stage = _first_stage(config, dataset)
    reranker = build_reranker(config, list(dataset.corpus.values()), lm=lm) if config.reranker else None
    found, encoder = _heads(config, reranker, first_stage_kind(first_stage))
    return SearchPipeline(config, dataset.corpus, first_stage, reranker, found, encoder)


def build_scorer(config: PipelineConfig, *, lm: LoadedLM | None = None) -> SearchPipeline:
    """A pipeline with no corpus and no first stage, which scores caller-given documents (`score`,
    `score_with_head`): what `kvrank.Reranker` is. Its heads are those for lists of unknown origin (`run`)."""
    heads.check_option(config.head)
    reranker = build_reranker(config, [], lm=lm)
    found = _resolve_heads(config, reranker, "run")
    mine = {mode: head for mode, head in found.items() if mode == reranker.config.mode}  # a scorer has one mode
    return SearchPipeline(config, {}, NoFirstStage(), reranker, mine)


class NoFirstStage:
    """The first stage of a pipeline without a corpus (`build_scorer`): it only scores given documents."""

    name = "none"
    kind = "run"

    def search(self, queries: list[Query], k: int) -> dict[str, list[ScoredDoc]]:
        raise KvrankError("this pipeline scores given documents only (it was built without a corpus); build one "
                          "over a corpus to search")


def first_stage_kind(first_stage: Retriever) -> str:
    """`bm25`, `dense` or `hybrid` for kvrank's retrievers; `run` for a run file or a first stage that does not
    say."""
    return str(getattr(first_stage, "kind", "run"))


def _heads(config: PipelineConfig, reranker: BlockReranker | None,
           first_stage: str) -> tuple[dict[str, heads.ScoringHead], Any]:
    """The scoring heads `config.head` names for this reranker (checked against it) and this kind of first stage,
    and their dense encoder."""
    found = _resolve_heads(config, reranker, first_stage)
    return (found, head_encoder(found.values())) if found else ({}, None)


def _resolve_heads(config: PipelineConfig, reranker: BlockReranker | None,
                   first_stage: str) -> dict[str, heads.ScoringHead]:
    if reranker is None:
        return {}
    adapter = reranker.adapter.digest if reranker.adapter is not None else None
    return heads.resolve(config.head, fingerprint=reranker.lm.fingerprint, mode=reranker.config.mode,
                         template=reranker.template.name, adapter=adapter, first_stage=first_stage)


def head_encoder(found: Iterable[heads.ScoringHead]) -> Any:
    """The dense encoder whose cosines the heads read (the default one), checked against each head's card."""
    encoder = load_encoder(None)
    for head in found:
        if encoder.fingerprint != head.card.dense_model:
            raise KvrankError(f"the scoring head was trained on dense scores of encoder {head.card.dense_model}, "
                              f"but the default encoder here is {encoder.fingerprint}; pass head='none'",
                              param="head")
    return encoder


def build_reranker(config: PipelineConfig, corpus: Sequence[Passage], *, lm: LoadedLM | None = None) -> BlockReranker:
    """The reranker alone (what `kvrank warm` needs): model, resolved KV format, basis, and the store opened with
    the reranker's identity, so a store of another model or format is refused before any work."""
    if config.reranker is None:
        raise KvrankError("this pipeline has no reranker (mode 'none'); pass a mode such as ql", param="mode")
    remote = RemoteFolder(config.remote_store) if config.remote_store else None
    named = config.kv_format if config.kv_format != AUTO else None  # auto: the store's own, else the recommended
    settings = replace(config.reranker, kv_format=named or store_format(config.store_dir, remote) or AUTO)
    card = adapters.read_card(config.adapter) if config.adapter is not None else None
    if card is not None:  # refused before the model is even loaded
        card.check(mode=settings.mode, template=settings.prompt.name, where=f"adapter {config.adapter}")
    lm = lm or load_lm(settings.model, device=settings.device, dtype=settings.dtype)
    if config.adapter is not None and lm.adapter is None:
        adapters.load(config.adapter, lm, mode=settings.mode, template=settings.prompt.name)
    settings = resolve_auto(settings, lm)
    fmt = settings.format
    check_format(fmt, settings.mode, lm)
    basis = resolve_basis(fmt, config.store_dir,  # a corpus sample, taken only if a basis has to be fitted
                          calibration=lambda: _calibration(fmt.name, corpus, config.calibration_passages),
                          fit=lambda passages: fit_format_basis(settings, lm, passages), remote=remote)
    identity = StoreIdentity(fingerprint=lm.fingerprint,
                             storage_tag=storage_tag(settings.storage_dtype, settings.dtype, fmt, basis),
                             model=settings.model)
    return BlockReranker(settings, store=open_store(config, identity), lm=lm, basis=basis)


def _calibration(fmt: str, corpus: Sequence[Passage], count: int) -> list[Passage]:
    if not corpus:
        raise KvrankError(f"kv_format {fmt!r} is fitted on corpus passages, and there is none here: pass a store "
                          "that holds a fitted basis (`kvrank warm`), or a format that needs no fitting such as int8",
                          param="kv_format")
    return calibration_sample(corpus, count)


def open_store(config: PipelineConfig, identity: StoreIdentity) -> KVStore:
    """The node-local store (`store_dir`, else memory), behind which a shared `remote_store` tier if one is set;
    each refuses KV of another identity. The remote is checked first, so a refused one creates no local store."""
    remote = RemoteTier(config.remote_store, identity) if config.remote_store is not None else None
    local: KVStore = (MemoryKVStore(identity=identity) if config.store_dir is None
                      else DiskKVStore(config.store_dir, identity, config.store_config))
    return local if remote is None else TieredKVStore(local, remote)


def _first_stage(config: PipelineConfig, dataset: Dataset) -> Retriever:
    if config.candidates is not None:
        return CandidatesRetriever.from_file(config.candidates, dataset)
    return build_or_load(config.retriever or DEFAULT_RETRIEVER, dataset, config.index_dir, config.retriever_config)


def _merge(query_id: str, head: list[ScoredDoc], scores: list[float], window: list[ScoredDoc],
           tail: list[ScoredDoc], weight: float | None) -> list[ScoredDoc]:
    """The reranked head (fused with its first-stage scores if `weight` is set), then the docs of the rerank
    window that could not be reranked (not in the corpus) and the tail, in first-stage order below the head."""
    if len(scores) != len(head):  # zip would silently drop documents from the ranking
        raise ValueError(f"query {query_id!r}: the reranker must score exactly the {len(head)} candidates it was "
                         f"given, got {len(scores)} scores")
    reranked = sorted((ScoredDoc(query_id, d.doc_id, float(s)) for d, s in zip(head, scores)),
                      key=lambda d: -d.score)
    if weight is not None:
        reranked = fuse(reranked, head, weight)
    done = {d.doc_id for d in head}
    floor = reranked[-1].score
    rest = [d for d in window if d.doc_id not in done] + tail
    return reranked + [ScoredDoc(query_id, d.doc_id, floor - 1.0 - i) for i, d in enumerate(rest)]


def _check_search(k: int, depth: int, fusion_weight: float | None) -> None:
    if k < 1:
        raise KvrankError(f"k must be >= 1, got {k}", param="k")
    if depth < 1:
        raise KvrankError(f"rerank_depth must be >= 1, got {depth}", param="rerank_depth")
    if fusion_weight is not None and not 0.0 <= fusion_weight <= 1.0:
        raise KvrankError(f"fusion_weight must be in [0, 1], got {fusion_weight}", param="fusion_weight")
