"""`build_or_load`: the one way the CLI, the eval pipeline and the demo get a first-stage retriever.

With `index_dir`, each component lives in `<index_dir>/bm25` and `<index_dir>/dense`; an existing one is
loaded (and refused if built with another model, other settings or another corpus), a missing one is built and
published atomically. Without `index_dir`, components are cached under `cache_root()/indexes/<kind>-<hash>`,
the hash taken over the corpus content and the component's identity (model fingerprint, settings), so e.g.
hybrid reuses the dense index an earlier dense run built.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from kvrank.errors import KvrankError
from kvrank.retriever.base import (
    Retriever,
    cache_root,
    corpus_fingerprint,
    hash_parts,
    load_or_build,
    publishing,
)
from kvrank.retriever.bm25 import BM25Config, BM25Retriever
from kvrank.retriever.dense import DenseConfig, DenseRetriever, Encoder, load_encoder
from kvrank.retriever.hybrid import FusionConfig, HybridRetriever
from kvrank.types import Dataset, Passage

logger = logging.getLogger(__name__)

KINDS = ("bm25", "dense", "hybrid")
# Progress bars only where a build is slow enough to need one: BM25 indexes SciFact (5k docs) in ~2 s, MiniLM
# encodes ~12 passages/s on 2 cores.
BM25_PROGRESS_DOCS = 50_000
DENSE_PROGRESS_DOCS = 1_000


@dataclass(frozen=True)
class RetrieverConfig:
    bm25: BM25Config = field(default_factory=BM25Config)
    dense: DenseConfig = field(default_factory=DenseConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    show_progress: bool = True


def build_or_load(
    kind: str,
    data: Dataset | Mapping[str, Passage],
    index_dir: Path | str | None = None,
    config: RetrieverConfig | None = None,
    rebuild: bool = False,
    vectors: Mapping[str, np.ndarray] | None = None,
) -> Retriever:
    """A `bm25`, `dense` or `hybrid` retriever over `data`'s corpus, loaded from its index or built (and
    saved).

    `rebuild=True` always builds and replaces the stored index (what `kvrank index` does). `vectors` (doc id ->
    embedding by the configured dense model, computed elsewhere: `kvrank index --ray`) saves encoding the corpus
    when a dense index is built.
    """
    if kind not in KINDS:
        raise KvrankError(f"retriever {kind!r} is not one of {', '.join(KINDS)}", param="retriever")
    config = config or RetrieverConfig()
    corpus = data.corpus if isinstance(data, Dataset) else data
    if not corpus:
        raise KvrankError("the corpus is empty; a retriever needs at least one document")
    corpus_fp = corpus_fingerprint(corpus)
    root = Path(index_dir).expanduser() if index_dir is not None else None
    if root is not None and root.exists() and not root.is_dir():
        raise KvrankError(f"index_dir {root} is a file; pass a folder (it is created if missing)", param="index_dir")
    if kind == "bm25":
        return _bm25(corpus, corpus_fp, root, config, rebuild)
    if kind == "dense":
        return _dense(corpus, corpus_fp, root, config, rebuild, vectors)
    return HybridRetriever(
        _bm25(corpus, corpus_fp, root, config, rebuild),
        _dense(corpus, corpus_fp, root, config, rebuild, vectors),
        config.fusion,
    )


def _bm25(
    corpus: Mapping[str, Passage], corpus_fp: str, root: Path | None, config: RetrieverConfig, rebuild: bool
) -> BM25Retriever:
    identity = config.bm25.identity()
    folder = root / "bm25" if root else cache_root() / "indexes" / f"bm25-{hash_parts(corpus_fp, identity)}"

    def build(target: Path) -> BM25Retriever:
        retriever = BM25Retriever.build(
            corpus, config.bm25, show_progress=config.show_progress and len(corpus) >= BM25_PROGRESS_DOCS
        )
        with publishing(target) as staging:
            retriever.save(staging)
        return retriever

    return load_or_build(
        folder, lambda f: BM25Retriever.load(f, config.bm25, corpus_fp), build, rebuild, "bm25"
    )


def _dense(
    corpus: Mapping[str, Passage], corpus_fp: str, root: Path | None, config: RetrieverConfig, rebuild: bool,
    vectors: Mapping[str, np.ndarray] | None = None,
) -> DenseRetriever:
    encoder = load_encoder(config.dense.model, config.dense.device)
    identity = encoder.identity() | config.dense.index_identity()
    folder = root / "dense" if root else cache_root() / "indexes" / f"dense-{hash_parts(corpus_fp, identity)}"

    def build(target: Path) -> DenseRetriever:
        progress = config.show_progress and len(corpus) >= DENSE_PROGRESS_DOCS
        stored = vectors or _stored_vectors(corpus_fp, encoder, config.dense,
                                            [target, *_sibling_dense_caches(target)])
        retriever = DenseRetriever.build(
            corpus, encoder, config.dense, show_progress=progress, vectors=stored
        )
        with publishing(target) as staging:
            retriever.save(staging)
        return retriever

    return load_or_build(
        folder, lambda f: DenseRetriever.load(f, encoder, config.dense, corpus_fp), build, rebuild, "dense"
    )


def _sibling_dense_caches(target: Path) -> list[Path]:
    """Other cached dense indexes (any index type) that may hold this corpus's embeddings."""
    folder = cache_root() / "indexes"
    return sorted(p for p in folder.glob("dense-*") if p != target) if folder.is_dir() else []


def _stored_vectors(
    corpus_fp: str, encoder: Encoder, config: DenseConfig, folders: list[Path]
) -> dict[str, np.ndarray] | None:
    """Embeddings of this corpus by this exact encoder from an existing index of any type, if there is one."""
    for folder in folders:
        for index_type in ("flat", "hnsw"):
            other = replace(config, index_type=index_type)
            try:
                return DenseRetriever.load(folder, encoder, other, corpus_fp).vectors()
            except KvrankError:
                continue
    return None
