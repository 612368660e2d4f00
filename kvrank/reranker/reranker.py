"""`BlockReranker`: score candidates against a query from stored, reused passage KV.

One contract for every scoring mode (`modes.py`): `rerank(query, candidates) -> list[ScoredDoc]`, best first.
`score_many(queries, candidate_lists)` is the one scoring path: `rerank` and `score` call it with one query, the
search pipeline and the API with many; training calls the same per-mode score function with `grad=True`.

`BlockReranker` is the facade over its parts: `PromptTokens` (tokens.py), `PassageKVSource` (passages.py: keys,
store lookup, prefill on a miss), `BlockEngine` (blocks.py) and the mode's `ScoringMode` record (modes.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch.profiler import record_function

from kvrank.attention.kvformat import AUTO, Basis, KVFormat, fit_basis
from kvrank.defaults import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_KV_FORMAT,
    DEFAULT_MAX_PASSAGE_TOKENS,
    DEFAULT_MAX_QUERY_TOKENS,
    DEFAULT_MODE,
    DEFAULT_MODEL,
    DEFAULT_RERANK_BATCH_SIZE,
    DEFAULT_STORAGE_DTYPE,
)
from kvrank.errors import KvrankError
from kvrank.reranker import attn
from kvrank.reranker.adapter import AdapterCard
from kvrank.reranker.blocks import PLACEMENTS, BlockEngine
from kvrank.reranker.model import LoadedLM, load_lm
from kvrank.reranker.modes import SCORING_MODES, ScoringMode, get_mode
from kvrank.reranker.passages import PassageKVSource, StageTimings
from kvrank.reranker.templates import PromptTemplate
from kvrank.reranker.tokens import PromptTokens
from kvrank.store.formats import check_format, recommended_format, storage_tag
from kvrank.store.kv import KVKey, KVStore, MemoryKVStore, PassageKV, kv_key
from kvrank.types import Passage, Query, ScoredDoc

__all__ = ["MODES", "BlockReranker", "RerankerConfig", "ScoredLists", "StageTimings", "fit_format_basis",
           "resolve_auto"]

logger = logging.getLogger(__name__)

MODES = tuple(SCORING_MODES)  # the mode names, in registry order (== RERANK_MODES)
STORAGE_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


@dataclass(frozen=True)
class RerankerConfig:
    mode: str = DEFAULT_MODE
    model: str = DEFAULT_MODEL
    device: str = DEFAULT_DEVICE
    dtype: str = DEFAULT_DTYPE
    storage_dtype: str = DEFAULT_STORAGE_DTYPE
    max_passage_tokens: int = DEFAULT_MAX_PASSAGE_TOKENS
    max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS
    batch_size: int = DEFAULT_RERANK_BATCH_SIZE
    template: PromptTemplate | None = None  # None: the mode's default
    # stored layout (attention/kvformat.py), e.g. "rank64:128+int8" or "none"; part of every key. "auto": the one
    # recommended for the model (store/formats.py). A pipeline replaces it with its own `kv_format`.
    kv_format: str = DEFAULT_KV_FORMAT
    # attn mode
    placement: str = "parallel"
    calibrate: bool = True  # subtract the attention a content-free query puts on each block (ICR)
    calibration_query: str = "N/A"
    # [layers][heads] weights of the attention-mass features; "auto": the weights fitted by distillation from ql
    # that ship for this model and template (kvrank/reranker/weights/), else uniform; None: uniform.
    attn_weights: tuple[tuple[float, ...], ...] | str | None = "auto"
    # attn mode, SQA-style: read only the `attn_heads` (layer, head) features with the largest weights; the pass
    # computes attention probabilities only in their layers and stops after the deepest (None: every head)
    attn_heads: int | None = None
    # cascade mode: attn ranks all K candidates, ql reorders the best `cascade_keep`
    cascade_keep: int = 20
    # yesno mode
    yes_token: str = " yes"
    no_token: str = " no"

    def __post_init__(self) -> None:
        get_mode(self.mode)  # an unknown name fails here, with the registered ones
        if self.placement not in PLACEMENTS:
            raise KvrankError(f"placement {self.placement!r} is not one of {PLACEMENTS}", param="placement")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise KvrankError(f"storage_dtype {self.storage_dtype!r} is not one of {sorted(STORAGE_DTYPES)}",
                              param="storage_dtype")
        for name in ("max_passage_tokens", "max_query_tokens", "batch_size", "cascade_keep"):
            if getattr(self, name) < 1:
                raise KvrankError(f"{name} must be >= 1, got {getattr(self, name)}", param=name)
        if self.attn_heads is not None and self.attn_heads < 1:
            raise KvrankError(f"attn_heads must be >= 1 (or None for all), got {self.attn_heads}",
                              param="attn_heads")
        if self.kv_format != AUTO:
            KVFormat.parse(self.kv_format)  # a bad name fails here, with the grammar

    @property
    def prompt(self) -> PromptTemplate:
        """`template`, else the mode's default prompt."""
        return self.template if self.template is not None else get_mode(self.mode).template

    @property
    def format(self) -> KVFormat:
        return KVFormat.parse(self.kv_format)


@dataclass(frozen=True)
class ScoredLists:
    """What `score_many` returns: per candidate list, scores in candidate order (`[]` for a list nobody was
    `waiting` for) and how its passage KV was found; `timings` covers the whole call (lists scored together share
    their forward passes)."""

    scores: list[list[float]]
    kv_hits: list[int]  # candidates whose KV came from the store
    kv_misses: list[int]  # passages prefilled (and stored) for that list
    timings: StageTimings = field(default_factory=StageTimings)
    block_tokens: list[int] = field(default_factory=list)  # the block tokens of each list's passages


class BlockReranker:
    """Reranks with a causal LM over stored passage KV. `lm` defaults to loading `config.model`; `basis` holds the
    fitted projections a compressed `config.kv_format` needs (`store/formats.py`).

    The parts: `tokens` (the template's token ids, `tokens.py`), `kv` (keys, store lookup, prefill on a miss,
    `passages.py`), `engine` (the block-attention passes, `blocks.py`) and `scoring_mode` (the mode's record,
    `modes.py`)."""

    def __init__(self, config: RerankerConfig | None = None, store: KVStore | None = None,
                 lm: LoadedLM | None = None, basis: Basis | None = None):
        self.config = config or RerankerConfig()
        self.lm: LoadedLM = lm or load_lm(self.config.model, device=self.config.device, dtype=self.config.dtype)
        self.config = resolve_auto(self.config, self.lm)
        if basis is None and self.config.format.fitted:
            raise KvrankError(f"kv_format {self.config.kv_format!r} needs a basis fitted on corpus passages; build "
                              "the reranker with kvrank.pipeline.build (it loads or fits one) or pass basis=",
                              param="kv_format")
        fmt = self.config.format
        self.engine = BlockEngine(self.lm, STORAGE_DTYPES[self.config.storage_dtype], self.config.batch_size,
                                  fmt, basis)
        self.storage_tag = storage_tag(self.config.storage_dtype, self.config.dtype, fmt, basis)
        check_format(fmt, self.config.mode, self.lm)
        self.scoring_mode: ScoringMode = get_mode(self.config.mode)
        self.template = self.config.prompt
        self.tokens = PromptTokens(self.lm, self.template, self.config.max_passage_tokens,
                                   self.config.max_query_tokens)
        self.kv = PassageKVSource(self.tokens, self.engine, store if store is not None else MemoryKVStore(),
                                  self.storage_tag)

    @property
    def store(self) -> KVStore:
        """Where passage KV is looked up and stored (shared by `variant`s made after it was set)."""
        return self.kv.store

    @store.setter
    def store(self, store: KVStore) -> None:
        self.kv.store = store

    @property
    def prefix_ids(self) -> list[int]:
        """The template prefix's ids, which every block attended to (part of every key)."""
        return self.tokens.prefix_ids

    @prefix_ids.setter
    def prefix_ids(self, ids: list[int]) -> None:
        self.tokens.prefix_ids = ids

    @property
    def prefills(self) -> int:
        """Passages prefilled (store misses) since construction."""
        return self.kv.prefills

    @property
    def prefill_tokens(self) -> int:
        """Their block tokens (what the API's cost model is calibrated on)."""
        return self.kv.prefill_tokens

    @property
    def adapter(self) -> AdapterCard | None:
        """The query-side adapter attached to the model (`reranker/adapter.py`), if any."""
        return self.lm.adapter

    def variant(self, **changes: object) -> BlockReranker:
        """A reranker with some settings changed (e.g. another mode) sharing this one's model, basis and store."""
        return BlockReranker(replace(self.config, **changes), store=self.store, lm=self.lm,  # type: ignore[arg-type]
                             basis=self.engine.codec.basis)

    # ------------------------------------------------------------------ public contract
    def rerank(self, query: Query | str, candidates: Sequence[Passage]) -> list[ScoredDoc]:
        """Score every candidate for the query; returns ScoredDocs sorted best first."""
        query = query if isinstance(query, Query) else Query("q", query)
        if not query.text.strip():
            raise KvrankError("query text is empty; pass a non-empty query", param="query")
        if not candidates:
            return []
        scores = self.score(query.text, candidates)
        docs = [ScoredDoc(query.query_id, p.doc_id, float(s)) for p, s in zip(candidates, scores)]
        return sorted(docs, key=lambda d: -d.score)

    def score(self, query: str, candidates: Sequence[Passage]) -> list[float]:
        """Scores in candidate order."""
        return self.score_many([query], [candidates]).scores[0]

    def score_many(self, queries: Sequence[str], candidates: Sequence[Sequence[Passage]],
                   waiting: Callable[[int], bool] | None = None) -> ScoredLists:
        """Score each query against its own candidate list. Passage KV comes from the store (misses are prefilled
        and stored once, even when lists share a passage), list by list; then the lists `i` with `waiting(i)`
        (None: all) are scored, the others get no scores (`[]`) though their KV was stored. `ql` and `yesno`
        batch the rows of all scored lists together, `attn` and `cascade` run one row per query."""
        if len(queries) != len(candidates):
            raise ValueError(f"{len(queries)} queries but {len(candidates)} candidate lists")
        for query in queries:
            if not query.strip():
                raise KvrankError("query text is empty; pass a non-empty query", param="query")
        timings = StageTimings()
        blocks: list[list[PassageKV]] = []
        misses: list[int] = []
        for cands in candidates:
            kvs, fresh = self.passage_kv(cands, timings)
            blocks.append(kvs)
            misses.append(fresh)
        todo = [i for i in range(len(queries)) if waiting is None or waiting(i)]
        scores: list[list[float]] = [[] for _ in queries]
        for i, row in zip(todo, self.score_blocks([queries[i] for i in todo], [blocks[i] for i in todo], timings)):
            scores[i] = row
        return ScoredLists(scores, [len(c) - m for c, m in zip(candidates, misses)], misses, timings,
                           [sum(kv.num_tokens for kv in row) for row in blocks])

    def score_blocks(self, queries: Sequence[str], blocks: Sequence[Sequence[PassageKV]],
                     timings: StageTimings | None = None) -> list[list[float]]:
        """The scoring half of `score_many`, over passage KV already at hand (`passage_kv`); the time adds to
        `timings.scoring`."""
        t0 = time.perf_counter()
        with record_function("kvrank.scoring"):
            scores = [s.tolist() for s in self.scoring_mode.score(self, queries, [list(b) for b in blocks], False)]
        if timings is not None:
            timings.scoring += (time.perf_counter() - t0) * 1e3
        return scores

    def uncached_tokens(self, passages: Sequence[Passage]) -> int:
        """Block tokens of the distinct passages whose KV the store's node-local tier lacks: what scoring them
        would prefill at most (admission control). Asks no remote tier; counts nothing in the store's stats."""
        return self.kv.uncached_tokens(passages)

    # ------------------------------------------------------------------ passage KV: keys, store lookup, prefill
    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    def block_ids(self, passage: Passage) -> list[int]:
        return self.tokens.blocks_ids([passage])[0]

    def blocks_ids(self, passages: Sequence[Passage]) -> list[list[int]]:
        """Block token ids of several passages, tokenized in one call."""
        return self.tokens.blocks_ids(passages)

    def passage_keys(self, passages: Sequence[Passage]) -> tuple[list[list[int]], list[KVKey]]:
        """Each passage's block token ids and the content-addressed key its KV is stored under."""
        return self.kv.keys(passages)

    def prefill(self, ids: Sequence[Sequence[int]], keys: Sequence[KVKey]) -> list[PassageKV]:
        """Blocks encoded after this reranker's prefix, in its KV format (nothing is stored)."""
        return self.kv.prefill(ids, keys)

    def passage_kv(self, candidates: Sequence[Passage],
                   timings: StageTimings | None = None) -> tuple[list[PassageKV], int]:
        """The KV of each candidate and how many were prefilled; lookup and prefill time add to `timings`."""
        return self.kv.lookup(candidates, timings if timings is not None else StageTimings())

    # ------------------------------------------------------------------ what the scoring modes read
    def query_ids(self, query: str) -> tuple[list[int], int, int]:
        """Ids of the query part, and the [start, end) span of the query's own tokens in them."""
        return self.tokens.query_ids(query)

    def attention_mass(self, query: str, blocks: Sequence[PassageKV],
                       grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[L, H, K] block distributions for the query and (with `calibrate`) the content-free query (`attn.py`)."""
        return attn.attention_mass(self, query, blocks, grad)

    def attention_features(self, query: str, blocks: Sequence[PassageKV], grad: bool = False) -> torch.Tensor:
        """Attention mass per (layer, head, block): [L, H, K], calibrated with `calibrate` (`attn.py`)."""
        return attn.attention_features(self, query, blocks, grad)

    def attention_scores(self, query: str, blocks: Sequence[PassageKV]) -> list[float]:
        """The `attn` score of each block."""
        return attn.attention_scores(self, query, blocks).tolist()

    def attn_weight_matrix(self, shape: tuple[int, ...]) -> torch.Tensor:
        """[L, H] weights: explicit, shipped for this model + template ("auto"), or uniform."""
        return attn.weight_matrix(self, shape)

    def read_layers(self) -> list[int]:
        """Layers whose attention the `attn` score reads: every stored one, or those of the `attn_heads` kept."""
        return attn.read_layers(self)


def resolve_auto(config: RerankerConfig, lm: LoadedLM) -> RerankerConfig:
    """`config` with `kv_format="auto"` replaced by the model's recommended format (other configs unchanged)."""
    if config.kv_format != AUTO:
        return config
    return replace(config, kv_format=recommended_format(lm.fingerprint))


def fit_format_basis(config: RerankerConfig, lm: LoadedLM, passages: Sequence[Passage]) -> Basis:
    """Fit the projections of `config`'s KV format on `passages`, prefilled by the same model and template,
    uncompressed and in fp32, exactly as they will be stored."""
    probe = BlockReranker(replace(config, kv_format="none", storage_dtype="float32"), lm=lm)
    fmt = KVFormat.parse(config.kv_format)
    ids = probe.blocks_ids(passages)
    keys = [kv_key(probe.engine.fingerprint, probe.prefix_ids, x, "calibration") for x in ids]
    blocks = probe.prefill(ids, keys)
    logger.info("fitting %s on %d calibration passages (%d tokens)", fmt.name, len(blocks),
                sum(kv.num_tokens for kv in blocks))
    return fit_basis(fmt, [kv.keys for kv in blocks], [kv.values for kv in blocks], start=len(probe.prefix_ids),
                     rope=probe.engine.rope)
