"""The scoring modes: one record each, in `SCORING_MODES` (in the order of `kvrank.defaults.RERANK_MODES`).

- `ql`      query likelihood (UPR): mean log-probability of the query tokens after the passage. Exact: equals a
            plain forward over prefix + passage + query. One batched pass of only the query tokens over K blocks.
- `attn`    in-context: all K blocks in one row at the same positions (parallel encoding), then the query once; a
            passage's score is the attention mass the query puts on its block, per (layer, head), calibrated by a
            content-free query and combined with weights (uniform, or fitted by distillation from `ql`).
- `yesno`   log-odds of " yes" vs " no" after an instruction, the passage, the query and a question.
- `cascade` `attn` over all K candidates, then `ql` over the best `cascade_keep`.

A mode is its default prompt, a score function and the objective a query-side adapter trains on, if any. The score
function lays out its own rows: `ql` and `yesno` one row per (query, passage), rows of all queries batched
(`rows.py`); `attn` and `cascade` one row per query holding all its blocks (`attn.py`). A new mode is a new record
here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

import torch

from kvrank.errors import KvrankError
from kvrank.reranker.attn import attention_scores
from kvrank.reranker.rows import QuerySpan, row_scores
from kvrank.reranker.templates import ATTN_TEMPLATE, QL_TEMPLATE, YESNO_TEMPLATE, PromptTemplate
from kvrank.store.kv import PassageKV

if TYPE_CHECKING:
    from kvrank.reranker.reranker import BlockReranker

# (reranker, queries, each query's blocks, grad) -> a (K,) score tensor per query, in block order
ScoreFn = Callable[["BlockReranker", Sequence[str], Sequence[Sequence[PassageKV]], bool], list[torch.Tensor]]


@dataclass(frozen=True)
class ScoringMode:
    name: str
    template: PromptTemplate  # the prompt when `RerankerConfig.template` is None
    score: ScoreFn
    # what a query-side adapter trains on (kvrank/train/trainer.py): "listwise" softmax cross-entropy over the
    # scores, "infonce" over them (positives against the other candidates); None: `score` keeps no graph
    loss: Literal["listwise", "infonce"] | None = None

    @property
    def trainable(self) -> bool:
        """Whether `score(..., grad=True)` keeps the graph through the query-side pass."""
        return self.loss is not None


class QLRows:
    """`ql`: positions start-1 .. end-2 predict the query's own tokens; the score is their mean log-probability."""

    def __init__(self, template: str):
        self.template = template

    def window(self, span: QuerySpan) -> tuple[int, int]:
        _, start, end = span
        if start == 0:
            raise KvrankError(f"template {self.template!r}: ql needs text before {{query}} in the query part",
                              param="template")
        return start - 1, end - 1

    def read(self, logits: torch.Tensor, spans: Sequence[QuerySpan], lo: int) -> list[torch.Tensor]:
        # log p(token) = logit - logsumexp: no (B, hi - lo, V) log-softmax written
        logits = logits.float()
        norm = torch.logsumexp(logits, dim=-1)  # (B, hi - lo)
        out = []
        for r, (ids, start, end) in enumerate(spans):
            targets = torch.tensor(ids[start:end], device=logits.device)  # (Lq,)
            at = slice(start - 1 - lo, end - 1 - lo)  # position start-1+t predicts start+t
            own = logits[r, at].gather(-1, targets[:, None])[:, 0] - norm[r, at]  # (Lq,)
            out.append(own.mean())
        return out


class YesNoRows:
    """`yesno`: the logit of the yes token minus the no token's, at the last position of the query part."""

    def __init__(self, yes: int, no: int):
        self.yes, self.no = yes, no

    def window(self, span: QuerySpan) -> tuple[int, int]:
        ids = span[0]
        return len(ids) - 1, len(ids)

    def read(self, logits: torch.Tensor, spans: Sequence[QuerySpan], lo: int) -> list[torch.Tensor]:
        out = []
        for r, (ids, _, _) in enumerate(spans):
            last = logits[r, len(ids) - 1 - lo].float()  # (V,)
            out.append(last[self.yes] - last[self.no])
        return out


def score_ql(rr: BlockReranker, queries: Sequence[str], blocks: Sequence[Sequence[PassageKV]],
             grad: bool = False) -> list[torch.Tensor]:
    return row_scores(rr, queries, blocks, QLRows(rr.template.name), grad)


def score_yesno(rr: BlockReranker, queries: Sequence[str], blocks: Sequence[Sequence[PassageKV]],
                grad: bool = False) -> list[torch.Tensor]:
    readout = YesNoRows(rr.tokens.single_token(rr.config.yes_token, "yes_token"),
                        rr.tokens.single_token(rr.config.no_token, "no_token"))
    return row_scores(rr, queries, blocks, readout, grad)


def score_attn(rr: BlockReranker, queries: Sequence[str], blocks: Sequence[Sequence[PassageKV]],
               grad: bool = False) -> list[torch.Tensor]:
    return [attention_scores(rr, q, row, grad) if row else torch.zeros(0) for q, row in zip(queries, blocks)]


def score_cascade(rr: BlockReranker, queries: Sequence[str], blocks: Sequence[Sequence[PassageKV]],
                  grad: bool = False) -> list[torch.Tensor]:
    """attn over all K; ql reorders the best `cascade_keep`, which stay above the rest (those in attn order)."""
    out = []
    for query, row in zip(queries, blocks):
        if not row:
            out.append(torch.zeros(0, dtype=torch.float64))
            continue
        attn = attention_scores(rr, query, row).tolist()
        order = sorted(range(len(row)), key=lambda i: -attn[i])
        keep = order[: rr.config.cascade_keep]
        ql = score_ql(rr, [query], [[row[i] for i in keep]])[0].tolist()
        scores = [0.0] * len(row)
        floor = min(ql)
        for i, s in zip(keep, ql):
            scores[i] = s
        for rank, i in enumerate(order[len(keep):]):  # below every kept doc, in attn order
            scores[i] = floor - 1.0 - rank
        out.append(torch.tensor(scores, dtype=torch.float64))  # float64: the Python floats exactly
    return out


SCORING_MODES: Mapping[str, ScoringMode] = MappingProxyType({mode.name: mode for mode in (
    ScoringMode("ql", QL_TEMPLATE, score_ql, loss="listwise"),
    ScoringMode("attn", ATTN_TEMPLATE, score_attn, loss="infonce"),
    ScoringMode("yesno", YESNO_TEMPLATE, score_yesno, loss="listwise"),
    ScoringMode("cascade", QL_TEMPLATE, score_cascade),
)})


def get_mode(name: str) -> ScoringMode:
    """The registered mode called `name`."""
    try:
        return SCORING_MODES[name]
    except KeyError:
        raise KvrankError(f"mode {name!r} is not one of {tuple(SCORING_MODES)}", param="mode") from None
