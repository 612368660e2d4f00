"""Content fingerprints that tie stored artefacts to what made them: a corpus (indexes) and model weights
(indexes, the passage-KV store, shipped per-model files). One definition each, used by every stage."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from kvrank.types import Passage


def corpus_fingerprint(corpus: Mapping[str, Passage]) -> str:
    """A hash of every doc id, title and text (id order): an index is tied to the corpus it was built on."""
    digest = hashlib.sha256()
    for doc_id in sorted(corpus):
        passage = corpus[doc_id]
        digest.update(f"{doc_id}\x00{passage.title}\x00{passage.text}\x01".encode())
    return digest.hexdigest()


def model_fingerprint(state_dict: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> str:
    """A hash of a model's config (if given) and of every weight tensor's name, shape, first and last 256 values:
    another architecture, or other weights, differ; where the checkpoint lives does not matter. 32 hex digits."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    if config is not None:
        h.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in state_dict.items():
            h.update(name.encode())
            h.update(str(tuple(param.shape)).encode())
            flat = param.detach().reshape(-1)
            h.update(flat[:256].float().cpu().numpy().tobytes())
            h.update(flat[-256:].float().cpu().numpy().tobytes())
    return h.hexdigest()
