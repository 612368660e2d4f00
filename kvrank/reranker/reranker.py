"""`BlockReranker`: score candidates against a query from stored, reused passage KV.

Modes (one contract, `rerank(query, candidates) -> list[ScoredDoc]`, best first):
- `ql`    query likelihood (UPR): mean log-probability of the query tokens after the passage. Exact: equals a plain
          forward over prefix + passage + query. One batched pass of only the query tokens over K stored blocks.
- `yesno` log-odds of " yes" vs " no" after an instruction, the passage, the query and a question.
- `attn`  in-context: all K blocks in one row at the same positions (parallel encoding), then the query once; a
          passage's score is the attention mass the query puts on its block, per (layer, head), calibrated by a
          content-free query and combined with weights (uniform, or fitted by distillation from `ql`).
- `cascade` `attn` over all K candidates, then `ql` over the best `cascade_keep`.

`score_many(queries, candidate_lists)` is the one scoring path: `rerank` and `score` call it with one query, the
search pipeline and the API with many. `ql` and `yesno` rows of different queries share forward passes.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.profiler import record_function

from kvrank.attention.capture import MassCapture, capture_mass
from kvrank.attention.kvformat import AUTO, Basis, KVFormat, fit_basis
from kvrank.defaults import DEFAULT_MODE, DEFAULT_MODEL, RERANK_MODES
from kvrank.errors import KvrankError
from kvrank.reranker.adapter import AdapterCard
from kvrank.reranker.blocks import PLACEMENTS, BlockEngine
from kvrank.reranker.model import LoadedLM, load_lm
from kvrank.reranker.templates import ATTN_TEMPLATE, QL_TEMPLATE, YESNO_TEMPLATE, PromptTemplate
from kvrank.store.formats import check_format, recommended_format, storage_tag
from kvrank.store.kv import KVKey, KVStore, MemoryKVStore, PassageKV, kv_key
from kvrank.types import Passage, Query, ScoredDoc

logger = logging.getLogger(__name__)

MODES = RERANK_MODES
WEIGHTS_DIR = Path(__file__).parent / "weights"
STORAGE_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


@dataclass(frozen=True)
class RerankerConfig:
    mode: str = DEFAULT_MODE
    model: str = DEFAULT_MODEL
    device: str = "cpu"
    dtype: str = "float32"
    storage_dtype: str = "float16"
    max_passage_tokens: int = 192
    max_query_tokens: int = 64
    batch_size: int = 16
    template: PromptTemplate | None = None  # None: the mode's default
    # stored layout (attention/kvformat.py), e.g. "rank64:128+int8"; part of every key. "auto": the one recommended
    # for the model (store/formats.py), the CLI's and API's default.
    kv_format: str = "none"
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
        if self.mode not in MODES:
            raise KvrankError(f"--rerank {self.mode!r} is not one of {MODES}")
        if self.placement not in PLACEMENTS:
            raise KvrankError(f"placement {self.placement!r} is not one of {PLACEMENTS}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise KvrankError(f"storage dtype {self.storage_dtype!r} is not one of {sorted(STORAGE_DTYPES)}")
        for name in ("max_passage_tokens", "max_query_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise KvrankError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attn_heads is not None and self.attn_heads < 1:
            raise KvrankError(f"attn_heads must be >= 1 (or None for all), got {self.attn_heads}")
        if self.kv_format != AUTO:
            KVFormat.parse(self.kv_format)  # a bad name fails here, with the grammar

    @property
    def prompt(self) -> PromptTemplate:
        if self.template is not None:
            return self.template
        return {"ql": QL_TEMPLATE, "attn": ATTN_TEMPLATE, "yesno": YESNO_TEMPLATE, "cascade": QL_TEMPLATE}[self.mode]

    @property
    def format(self) -> KVFormat:
        return KVFormat.parse(self.kv_format)


@dataclass
class StageTimings:
    """Milliseconds spent per reranker stage in one scoring call."""

    kv_lookup: float = 0.0
    prefill: float = 0.0
    scoring: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"kv_lookup": self.kv_lookup, "prefill": self.prefill, "scoring": self.scoring}


@dataclass(frozen=True)
class ScoredLists:
    """What `score_many` returns: per candidate list, scores in candidate order and how its passage KV was found;
    `timings` covers the whole call (lists scored together share their forward passes)."""

    scores: list[list[float]]
    kv_hits: list[int]  # candidates whose KV came from the store
    kv_misses: list[int]  # passages prefilled (and stored) for that list
    timings: StageTimings = field(default_factory=StageTimings)


class BlockReranker:
    """Reranks with a causal LM over stored passage KV. `lm` defaults to loading `config.model`; `basis` holds the
    fitted projections a compressed `config.kv_format` needs (`store/formats.py`)."""

    def __init__(self, config: RerankerConfig | None = None, store: KVStore | None = None,
                 lm: LoadedLM | None = None, basis: Basis | None = None):
        self.config = config or RerankerConfig()
        self.store: KVStore = store if store is not None else MemoryKVStore()
        self.lm: LoadedLM = lm or load_lm(self.config.model, device=self.config.device, dtype=self.config.dtype)
        self.config = resolve_auto(self.config, self.lm)
        if basis is None and self.config.format.fitted:
            raise KvrankError(f"--kv-format {self.config.kv_format!r} needs a basis fitted on corpus passages; build "
                              "the reranker with kvrank.pipeline.build (it loads or fits one) or pass basis=")
        fmt = self.config.format
        self.engine = BlockEngine(self.lm, STORAGE_DTYPES[self.config.storage_dtype], self.config.batch_size,
                                  fmt, basis)
        self.storage_tag = storage_tag(self.config.storage_dtype, self.config.dtype, fmt, basis)
        check_format(fmt, self.config.mode, self.lm)
        self.template = self.config.prompt
        tok = self.lm.tokenizer
        bos = [tok.bos_token_id] if self.lm.spec.needs_bos and tok.bos_token_id is not None else []
        self.prefix_ids: list[int] = bos + self._encode(self.template.prefix)
        self.prefills = 0  # passages prefilled (store misses) since construction
        self.prefill_tokens = 0  # their block tokens (what the API's cost model is calibrated on)

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
            raise KvrankError("query text is empty; pass a non-empty query")
        if not candidates:
            return []
        scores = self.score(query.text, candidates)
        docs = [ScoredDoc(query.query_id, p.doc_id, float(s)) for p, s in zip(candidates, scores)]
        return sorted(docs, key=lambda d: -d.score)

    def score(self, query: str, candidates: Sequence[Passage]) -> list[float]:
        """Scores in candidate order."""
        return self.score_many([query], [candidates]).scores[0]

    def score_many(self, queries: Sequence[str], candidates: Sequence[Sequence[Passage]]) -> ScoredLists:
        """Score each query against its own candidate list. Passage KV comes from the store (misses are prefilled
        and stored once, even when lists share a passage); `ql` and `yesno` rows of all lists are batched
        together, `attn` and `cascade` run one row per query."""
        if len(queries) != len(candidates):
            raise ValueError(f"{len(queries)} queries but {len(candidates)} candidate lists")
        for query in queries:
            if not query.strip():
                raise KvrankError("query text is empty; pass a non-empty query")
        timings = StageTimings()
        blocks: list[list[PassageKV]] = []
        misses: list[int] = []
        for cands in candidates:
            kvs, fresh = self.passage_kv(cands, timings)
            blocks.append(kvs)
            misses.append(fresh)
        scores = self.score_blocks(queries, blocks, timings)
        return ScoredLists(scores, [len(c) - m for c, m in zip(candidates, misses)], misses, timings)

    def score_blocks(self, queries: Sequence[str], blocks: Sequence[Sequence[PassageKV]],
                     timings: StageTimings | None = None) -> list[list[float]]:
        """The scoring half of `score_many`, over passage KV already at hand (`passage_kv`); the time adds to
        `timings.scoring`."""
        t0 = time.perf_counter()
        mode = self.config.mode
        lists = [list(b) for b in blocks]
        with record_function("kvrank.scoring"):
            if mode in ("ql", "yesno"):
                scores = self._score_rows(list(queries), lists)
            elif mode == "attn":
                scores = [self.attention_scores(q, b) if b else [] for q, b in zip(queries, lists)]
            else:
                scores = [self._score_cascade(q, b) if b else [] for q, b in zip(queries, lists)]
        if timings is not None:
            timings.scoring += (time.perf_counter() - t0) * 1e3
        return scores

    # ------------------------------------------------------------------ passage KV: store lookup, prefill on miss
    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    def block_ids(self, passage: Passage) -> list[int]:
        return self.blocks_ids([passage])[0]

    def blocks_ids(self, passages: Sequence[Passage]) -> list[list[int]]:
        """Block token ids of several passages, tokenized in one call."""
        texts = [self.template.passage_text(p.title, p.text) for p in passages]
        return [ids[: self.config.max_passage_tokens] or [self.lm.tokenizer.eos_token_id or 0]
                for ids in self._encode_many(texts)]

    def passage_keys(self, passages: Sequence[Passage]) -> tuple[list[list[int]], list[KVKey]]:
        """Each passage's block token ids and the content-addressed key its KV is stored under."""
        ids = self.blocks_ids(passages)
        return ids, [kv_key(self.engine.fingerprint, self.prefix_ids, x, self.storage_tag) for x in ids]

    def prefill(self, ids: Sequence[Sequence[int]], keys: Sequence[KVKey]) -> list[PassageKV]:
        """Blocks encoded after this reranker's prefix, in its KV format (nothing is stored)."""
        return self.engine.prefill(self.prefix_ids, ids, keys)

    def passage_kv(self, candidates: Sequence[Passage],
                   timings: StageTimings | None = None) -> tuple[list[PassageKV], int]:
        """The KV of each candidate and how many were prefilled; lookup and prefill time add to `timings`."""
        timings = timings if timings is not None else StageTimings()
        t0 = time.perf_counter()
        with record_function("kvrank.kv_lookup"):
            ids, keys = self.passage_keys(candidates)
            found = self.store.get_many(keys)
        timings.kv_lookup += (time.perf_counter() - t0) * 1e3
        missing = [i for i, kv in enumerate(found) if kv is None]
        fresh: list[PassageKV] = []
        if missing:
            t1 = time.perf_counter()
            # Duplicated candidates share one prefill.
            unique = list(dict.fromkeys(keys[i] for i in missing))
            first = {keys[i]: i for i in reversed(missing)}
            with record_function("kvrank.prefill"):
                fresh = self.prefill([ids[first[k]] for k in unique], unique)
            by_key = {kv.key: kv for kv in fresh}
            self.store.put_many(fresh)
            for i in missing:
                found[i] = by_key[keys[i]]
            self.prefills += len(fresh)
            self.prefill_tokens += sum(len(ids[first[k]]) for k in unique)
            timings.prefill += (time.perf_counter() - t1) * 1e3
        return [kv for kv in found if kv is not None], len(fresh)

    # ------------------------------------------------------------------ scoring modes
    def query_ids(self, query: str) -> tuple[list[int], int, int]:
        """Ids of the query part, and the [start, end) span of the query's own tokens in them."""
        lead = self._encode(self.template.query_lead)
        own = self._encode(" " + query.strip())[: self.config.max_query_tokens]
        tail = self._encode(self.template.query_tail)
        return lead + own + tail, len(lead), len(lead) + len(own)

    def _score_rows(self, queries: list[str], blocks: list[list[PassageKV]]) -> list[list[float]]:
        return [t.tolist() for t in self.row_scores(queries, blocks)]

    def row_scores(self, queries: Sequence[str], blocks: Sequence[Sequence[PassageKV]],
                   grad: bool = False) -> list[torch.Tensor]:
        """`ql` or `yesno` scores of each query over its own blocks, a (K,) tensor per query: one row per (query,
        block) pair, `batch_size` rows per forward, filled across queries (new tokens right-padded; a token never
        attends to the padding after it, so a row's scores do not depend on the rows beside it). `grad=True` keeps
        the graph through the query-side pass (training a query-side adapter)."""
        ql = self.config.mode in ("ql", "cascade")
        spans = [self.query_ids(q) for q in queries]  # (ids, start, end) of each query's own tokens
        if ql and any(start == 0 for _, start, _ in spans):
            raise KvrankError(f"template {self.template.name!r}: ql needs text before {{query}} in the query part")
        yes, no = (0, 0) if ql else (self._single_token(self.config.yes_token),
                                     self._single_token(self.config.no_token))
        device = self.lm.device
        rows = [(qi, bi) for qi, row in enumerate(blocks) for bi in range(len(row))]
        out: list[list[torch.Tensor]] = [[] for _ in blocks]
        for chunk in _chunks(rows, self.config.batch_size):
            if ql:  # positions start-1 .. end-2 predict the query's own tokens
                lo = min(spans[qi][1] for qi, _ in chunk) - 1
                hi = max(spans[qi][2] for qi, _ in chunk) - 1
            else:  # the last token of each row
                lo = min(len(spans[qi][0]) for qi, _ in chunk) - 1
                hi = max(len(spans[qi][0]) for qi, _ in chunk)
            logits, _ = self.engine.run(self.prefix_ids, [[blocks[qi][bi]] for qi, bi in chunk],
                                        [spans[qi][0] for qi, _ in chunk],
                                        logits_to_keep=torch.arange(lo, hi, device=device), grad=grad)
            assert logits is not None  # ql and yesno read every layer (check_format)
            with torch.set_grad_enabled(grad):
                if ql:  # log p(token) = logit - logsumexp: no (B, hi - lo, V) log-softmax written
                    logits = logits.float()
                    norm = torch.logsumexp(logits, dim=-1)  # (B, hi - lo)
                for r, (qi, _) in enumerate(chunk):
                    ids, start, end = spans[qi]
                    if ql:
                        targets = torch.tensor(ids[start:end], device=device)  # (Lq,)
                        at = slice(start - 1 - lo, end - 1 - lo)  # position start-1+t predicts start+t
                        own = logits[r, at].gather(-1, targets[:, None])[:, 0] - norm[r, at]  # (Lq,)
                        out[qi].append(own.mean())
                    else:
                        last = logits[r, len(ids) - 1 - lo].float()  # (V,)
                        out[qi].append(last[yes] - last[no])
        return [torch.stack(row) if row else torch.zeros(0, device=device) for row in out]

    def attention_features(self, query: str, blocks: list[PassageKV]) -> torch.Tensor:
        """Attention mass per (layer, head, block): [L, H, K], each (layer, head) a distribution over blocks.

        With `calibrate`, the distribution a content-free query puts on the blocks is subtracted (same pass, a
        second row), which removes what a block draws regardless of the query (length, sink tokens).
        """
        query_mass, free_mass = self.attention_mass(query, blocks)
        return query_mass - free_mass if free_mass is not None else query_mass

    def attention_mass(self, query: str, blocks: Sequence[PassageKV],
                       grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[L, H, K] block distributions for the query and (with `calibrate`) for the content-free query.

        Both queries run in one row over one copy of the blocks, as two query segments that do not see each other
        but share one copy of the template text before `{query}` (identical for both, so run once). Template text
        after the query is left out: the query's own tokens never attend to it. No logits are computed.
        `grad=True` keeps the graph through the query-side pass (training a query-side adapter).
        """
        texts = [query] + ([self.config.calibration_query] if self.config.calibrate else [])
        lead: list[int] = []
        new_ids: list[int] = []
        subs: list[int] = []
        spans = []
        for i, text in enumerate(texts):
            ids, start, end = self.query_ids(text)
            assert not lead or lead == ids[:start], "every query part starts with the same template text"
            lead = ids[:start]
            spans.append((start + len(new_ids), end + len(new_ids)))
            new_ids += ids[start:end]
            subs += [i] * (end - start)
        new_ids, subs = lead + new_ids, [-1] * len(lead) + subs
        layout, _ = self.engine.layout(len(self.prefix_ids), [blocks], [len(new_ids)], self.config.placement,
                                       [subs])
        n_seg = layout.n_blocks + 2 + len(texts)
        key_segments = torch.where(layout.valid, layout.segments, torch.zeros_like(layout.segments))
        read = self.read_layers()
        capture = MassCapture(key_segments=key_segments, n_segments=n_seg, layers=frozenset(read))
        if self.prefix_ids:
            self.engine.prefix_kv(self.prefix_ids)  # computed (once) outside the capture
        with capture_mass(capture):
            self.engine.run(self.prefix_ids, [blocks], [new_ids], self.config.placement, logits_to_keep=None,
                            new_segments=[subs], num_layers=max(read) + 1, grad=grad)
        heads, k = self.lm.config.num_attention_heads, layout.n_blocks
        per_query = []
        for start, end in spans:
            per_query.append(torch.stack([
                self._query_token_mean(capture.mass[layer][0, :, :, 1:k + 1], start, end)  # (H, K)
                if layer in capture.mass else torch.zeros(heads, k)  # a layer no kept head reads
                for layer in range(self.engine.stored_layers)]))  # (L, H, K)
        return per_query[0], (per_query[1] if len(per_query) > 1 else None)

    def read_layers(self) -> list[int]:
        """Layers whose attention the `attn` score reads: every stored one, or those of the `attn_heads` kept."""
        if self.config.attn_heads is None:
            return list(range(self.engine.stored_layers))
        weights = self.attn_weight_matrix((self.engine.stored_layers, self.lm.config.num_attention_heads))
        return sorted({int(i) for i in weights.nonzero()[:, 0]}) or [0]

    @staticmethod
    def _query_token_mean(mass: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """mass (H, Tq, K) -> (H, K): mean over the query's own tokens of the mass normalised over blocks."""
        own = mass[:, start:end]  # (H, Lq, K)
        own = own / own.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return own.mean(dim=1)

    def attention_scores(self, query: str, blocks: list[PassageKV]) -> list[float]:
        feats = self.attention_features(query, blocks)  # (L, H, K)
        return torch.einsum("lh,lhk->k", self.attn_weight_matrix(feats.shape[:2]), feats).tolist()

    def attn_weight_matrix(self, shape: tuple[int, ...]) -> torch.Tensor:
        """[L, H] weights: explicit, shipped for this model + template ("auto"), or uniform."""
        weights = self.config.attn_weights
        if weights == "auto":
            weights = self._shipped_weights()
        if weights is None:
            matrix = torch.full(shape, 1.0 / (shape[0] * shape[1]))
        else:
            matrix = torch.tensor(weights, dtype=torch.float32)
            if matrix.shape[0] == self.lm.num_layers:
                matrix = matrix[: shape[0]]  # a format that stores fewer layers reads only theirs
            if tuple(matrix.shape) != tuple(shape):
                raise KvrankError(f"attn_weights has shape {tuple(matrix.shape)}, the model needs {tuple(shape)} "
                                  "(layers, heads)")
        if self.config.attn_heads is not None and self.config.attn_heads < matrix.numel():
            keep = matrix.abs().flatten().topk(self.config.attn_heads).indices
            mask = torch.zeros(matrix.numel(), dtype=torch.bool)
            mask[keep] = True
            matrix = matrix * mask.view(matrix.shape)
        return matrix

    def _shipped_weights(self) -> tuple[tuple[float, ...], ...] | None:
        return _load_shipped(WEIGHTS_DIR / f"{self.engine.fingerprint}-{self.template.name}.json",
                             self.config.calibrate)

    def _score_cascade(self, query: str, blocks: list[PassageKV]) -> list[float]:
        """attn over all K; ql reorders the best `cascade_keep`, which stay above the rest."""
        attn = self.attention_scores(query, blocks)
        order = sorted(range(len(blocks)), key=lambda i: -attn[i])
        keep = order[: self.config.cascade_keep]
        ql = self._score_rows([query], [[blocks[i] for i in keep]])[0]
        scores = [0.0] * len(blocks)
        floor = min(ql)
        for i, s in zip(keep, ql):
            scores[i] = s
        for rank, i in enumerate(order[len(keep):]):  # below every kept doc, in attn order
            scores[i] = floor - 1.0 - rank
        return scores

    # ------------------------------------------------------------------ helpers
    def _encode(self, text: str) -> list[int]:
        return self._encode_many([text])[0]

    def _encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (empty text: none), in one tokenizer call."""
        todo = [i for i, text in enumerate(texts) if text]
        out: list[list[int]] = [[] for _ in texts]
        if not todo:
            return out
        try:
            encoded = self.lm.tokenizer([texts[i] for i in todo], add_special_tokens=False).input_ids
        except TypeError:  # how a fast tokenizer refuses a lone surrogate (from JSON's "\\ud800" or a file)
            for i in todo:
                try:
                    texts[i].encode("utf-8")
                except UnicodeEncodeError as err:
                    raise KvrankError(f"text {texts[i][:40]!r} holds U+{ord(texts[i][err.start]):04X} at character "
                                      f"{err.start}, a lone surrogate that is not valid unicode; pass UTF-8 text"
                                      ) from None
            raise
        for i, ids in zip(todo, encoded):
            out[i] = list(ids)
        return out

    def _single_token(self, text: str) -> int:
        ids = self._encode(text)
        if len(ids) != 1:
            logger.warning("%r is %d tokens for this tokenizer; using its first token", text, len(ids))
        if not ids:
            raise KvrankError(f"yes/no token {text!r} encodes to nothing")
        return ids[0]


@functools.lru_cache(maxsize=16)
def _load_shipped(path: Path, calibrate: bool) -> tuple[tuple[float, ...], ...] | None:
    """Shipped attn weights (read once per file, not once per query), or None if absent or fitted on the other
    kind of features."""
    if not path.is_file():
        return None
    shipped = json.loads(path.read_text())
    if (shipped["features"] == "calibrated") != calibrate:
        return None
    return tuple(tuple(row) for row in shipped["weights"])


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


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
