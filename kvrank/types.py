"""Records shared by every stage. Run-level records are ir_measures' own (`ScoredDoc`, `Qrel`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ir_measures import Qrel, ScoredDoc

__all__ = ["Dataset", "Passage", "Qrel", "Query", "Run", "ScoredDoc"]

# query_id -> ranked ScoredDocs (best first)
Run = dict[str, list[ScoredDoc]]


@dataclass(frozen=True)
class Passage:
    doc_id: str
    title: str
    text: str

    @property
    def contents(self) -> str:
        """Title and text as one string, the form retrievers and the reranker read."""
        return f"{self.title} {self.text}".strip() if self.title else self.text


@dataclass(frozen=True)
class Query:
    query_id: str
    text: str


@dataclass
class Dataset:
    """A test collection: corpus, the test queries (only those with judgements) and their qrels."""

    name: str
    corpus: dict[str, Passage]
    queries: dict[str, Query]
    qrels: list[Qrel] = field(default_factory=list)
    # Queries without judgements (e.g. SciFact's train claims): usable for unsupervised calibration, never scored.
    extra_queries: dict[str, Query] = field(default_factory=dict)
    source: str = ""

    def sorted_queries(self, max_queries: int | None = None) -> list[Query]:
        """Test queries in sorted id order (numeric ids numerically), so subsets are reproducible."""
        ids = sorted(self.queries, key=_natural_key)
        if max_queries is not None:
            ids = ids[:max_queries]
        return [self.queries[qid] for qid in ids]

    def grades(self) -> dict[str, dict[str, int]]:
        """The qrels as query id -> doc id -> judged relevance."""
        out: dict[str, dict[str, int]] = {}
        for qrel in self.qrels:
            out.setdefault(qrel.query_id, {})[qrel.doc_id] = int(qrel.relevance)
        return out


def _natural_key(value: str) -> tuple[int, int | str]:
    return (0, int(value)) if value.isdigit() else (1, value)
