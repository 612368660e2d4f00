"""BM25 with bm25s: Lucene-style scoring over title + text, English stop words and Snowball stemming.

Defaults are bm25s's own (`method="lucene"`, k1=1.5, b=0.75, its token pattern `\\w\\w+` that drops one-character
tokens); on SciFact they give nDCG@10 .686, a point above Anserini's published .679. Anserini's settings (k1=0.9,
b=0.4, `stemmer="porter"`, `token_pattern=KEEP_SINGLE_CHARS` as Lucene's tokenizer keeps "6" of "IL-6") reproduce
its SciFact numbers within .002 (`benchmarks/bm25_reproduction.py`, docs/results/retrieval.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvrank.defaults import DEFAULT_BM25_B, DEFAULT_BM25_K1
from kvrank.errors import KvrankError
from kvrank.retriever.base import corpus_fingerprint, read_manifest, write_manifest
from kvrank.types import Passage, Query, Run, ScoredDoc

logger = logging.getLogger(__name__)

KIND = "bm25"
DEFAULT_TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # bm25s's (and scikit-learn's): tokens of two or more word characters
KEEP_SINGLE_CHARS = r"(?u)\b\w+\b"  # one-character tokens too, as Lucene's StandardTokenizer


@dataclass(frozen=True)
class BM25Config:
    k1: float = DEFAULT_BM25_K1
    b: float = DEFAULT_BM25_B
    method: str = "lucene"
    stopwords: str = "en"
    stemmer: str | None = "english"  # a PyStemmer (Snowball) language, or None for no stemming
    token_pattern: str = DEFAULT_TOKEN_PATTERN

    def identity(self) -> dict[str, Any]:
        identity = {"library": "bm25s", **asdict(self)}
        if self.token_pattern == DEFAULT_TOKEN_PATTERN:
            del identity["token_pattern"]  # indexes built before the option existed stay valid
        return identity


class BM25Retriever:
    """Sparse first stage. Build with `BM25Retriever.build(corpus)`; persist with `save` / `load`."""

    kind = "bm25"

    def __init__(self, model: Any, doc_ids: list[str], config: BM25Config, corpus_fp: str) -> None:
        self.model = model
        self.doc_ids = doc_ids
        self.config = config
        self.corpus_fp = corpus_fp
        self.name = "bm25"
        self._stemmer = _make_stemmer(config.stemmer)

    @classmethod
    def build(
        cls, corpus: Mapping[str, Passage], config: BM25Config | None = None, show_progress: bool = True
    ) -> BM25Retriever:
        import bm25s

        config = config or BM25Config()
        if not corpus:
            raise KvrankError("cannot build a BM25 index over an empty corpus; pass a corpus with documents")
        doc_ids = list(corpus)
        tokens = bm25s.tokenize(
            [corpus[d].contents for d in doc_ids],
            stopwords=config.stopwords,
            stemmer=_make_stemmer(config.stemmer),
            token_pattern=config.token_pattern,
            show_progress=show_progress,
        )
        model = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
        model.index(tokens, show_progress=show_progress)
        return cls(model, doc_ids, config, corpus_fingerprint(corpus))

    def search(self, queries: list[Query], k: int) -> Run:
        import bm25s

        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not queries:
            return {}
        tokens = bm25s.tokenize(
            [q.text for q in queries],
            stopwords=self.config.stopwords,
            stemmer=self._stemmer,
            token_pattern=self.config.token_pattern,
            return_ids=False,
            show_progress=False,
        )
        # bm25s drops query terms missing from the vocabulary; a query with none left scores every doc 0.
        depth = min(k, len(self.doc_ids))
        indices, scores = self.model.retrieve(tokens, k=depth, show_progress=False, n_threads=0)
        run: Run = {}
        for query, row_idx, row_scores in zip(queries, np.asarray(indices), np.asarray(scores), strict=True):
            # Lucene returns only documents that match a query term: drop zero scores.
            run[query.query_id] = [
                ScoredDoc(query.query_id, self.doc_ids[int(i)], float(s))
                for i, s in zip(row_idx, row_scores, strict=True)
                if s > 0
            ]
        return run

    def save(self, folder: Path) -> None:
        """Write the index into `folder` (normally a staging folder; see `base.publishing`)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save(str(folder / "bm25s"), show_progress=False)
        (folder / "doc_ids.json").write_text(json.dumps(self.doc_ids), encoding="utf-8")
        write_manifest(folder, KIND, self.corpus_fp, self.config.identity(), num_docs=len(self.doc_ids))

    @classmethod
    def load(
        cls, folder: Path, config: BM25Config | None = None, corpus_fp: str | None = None
    ) -> BM25Retriever:
        """Load the index in `folder`, refusing one built with other settings or (if given) another corpus."""
        import bm25s

        config = config or BM25Config()
        manifest = read_manifest(folder, KIND, corpus_fp, config.identity())
        doc_ids = json.loads((folder / "doc_ids.json").read_text(encoding="utf-8"))
        model = bm25s.BM25.load(str(folder / "bm25s"), load_vocab=True, show_progress=False)
        if len(doc_ids) != manifest.get("num_docs"):
            raise KvrankError(
                f"{folder} is inconsistent ({len(doc_ids)} doc ids, manifest says "
                f"{manifest.get('num_docs')}); delete it and rebuild the index"
            )
        return cls(model, doc_ids, config, manifest["corpus_fingerprint"])


def _make_stemmer(language: str | None) -> Any:
    if language is None:
        return None
    import Stemmer

    try:
        return Stemmer.Stemmer(language)
    except KeyError:
        raise KvrankError(
            f"unknown stemmer language {language!r}; use one of {', '.join(Stemmer.algorithms())} or None"
        ) from None
