"""Prompt templates. A template splits the prompt into the parts block attention needs:

    [prefix]  shared by every passage; its KV is computed once per template
    [passage] one block per candidate, formatted from `{title}` and `{text}`; its KV is stored and reused
    [query]   run at query time over the stored blocks; `{query}` marks the query's own tokens

Each part is tokenised on its own and the ids are concatenated, so a stored block's ids never depend on the query.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrank.errors import KvrankError


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    prefix: str
    passage: str
    query: str

    def __post_init__(self) -> None:
        if self.query.count("{query}") != 1:
            raise KvrankError(f"template {self.name!r}: the query part must contain '{{query}}' exactly once, "
                              f"got {self.query!r}", param="template")
        if "{query}" in self.prefix or "{query}" in self.passage:
            raise KvrankError(f"template {self.name!r}: '{{query}}' may only appear in the query part, since "
                              "prefix and passage KV are stored and reused across queries", param="template")

    @property
    def query_lead(self) -> str:
        return self.query.split("{query}")[0]

    @property
    def query_tail(self) -> str:
        return self.query.split("{query}")[1]

    def passage_text(self, title: str, text: str) -> str:
        return self.passage.format(title=title, text=text).replace("  ", " ")


# Query likelihood (UPR). Two prompts were measured on the dev sets (docs/results/reranking.md); `ql-claim` has the
# best mean nDCG@10 over TREC DL 2019 and SciFact and is the frozen default. The text before {query} must be
# non-empty so the first query token is predicted inside the query-time pass.
QL_PASSAGE_QUERY_TEMPLATE = PromptTemplate(
    name="ql-passage-query",
    prefix="Passage:",
    passage=" {title} {text}",
    query="\nQuery:{query}",
)
QL_CLAIM_TEMPLATE = PromptTemplate(
    name="ql-claim",
    prefix="",
    passage="{title} {text}",
    query="\n\nA question or claim about this text:{query}",
)
QL_TEMPLATE = QL_CLAIM_TEMPLATE

# Attention mode: the same blocks as QL (so one stored KV serves both modes); the query comes after all blocks.
ATTN_TEMPLATE = QL_TEMPLATE

# Yes/no relevance: instruction prefix, passage block, then the query and the question the logits answer.
YESNO_TEMPLATE = PromptTemplate(
    name="yesno-basic",
    prefix="Judge whether the passage answers the query. Answer only yes or no.\nPassage:",
    passage=" {title} {text}",
    query="\nQuery:{query}\nDoes the passage answer the query? Answer:",
)

TEMPLATES = {t.name: t for t in (QL_PASSAGE_QUERY_TEMPLATE, QL_CLAIM_TEMPLATE, YESNO_TEMPLATE)}
