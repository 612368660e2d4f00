"""The first-stage contract and what every persisted index shares: the manifest, fingerprints, the cache.

An index lives in a folder with a `manifest.json` written last. The manifest records the index kind, the
corpus fingerprint and the `identity` (everything that changes the stored bytes: model fingerprint, BM25
parameters, tokenisation...). Loading compares both with what the caller expects and refuses a mismatch with a
`KvrankError`. Indexes are built in a staging folder and published with one rename, so an interrupted build
leaves nothing that loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from kvrank.errors import KvrankError
from kvrank.fingerprints import corpus_fingerprint as corpus_fingerprint  # re-exported
from kvrank.io import atomic_write_text
from kvrank.io import cache_root as cache_root  # re-exported
from kvrank.io import publishing as publishing  # re-exported: indexes are published with it
from kvrank.types import Query, Run

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@runtime_checkable
class Retriever(Protocol):
    """First stage: for each query, its top-`k` passages as ScoredDocs, best first. kvrank's own also say which
    `kind` they are (bm25, dense, hybrid, run), which picks the scoring head trained on that kind."""

    name: str

    def search(self, queries: list[Query], k: int) -> Run: ...


def hash_parts(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (cache keys)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_manifest(folder: Path, kind: str, corpus_fp: str, identity: dict[str, Any], **info: Any) -> None:
    manifest = {
        "format_version": MANIFEST_VERSION,
        "kind": kind,
        "corpus_fingerprint": corpus_fp,
        "identity": identity,
        **info,
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(
    folder: Path, kind: str, corpus_fp: str | None, identity: dict[str, Any], model: str | None = None
) -> dict[str, Any]:
    """The manifest of the index in `folder`, after checking it is a complete `kind` index for this corpus and
    identity; raises KvrankError naming the difference and the fix otherwise. `model` (a display name, not part
    of the identity) is named in the message next to the index's own."""
    path = folder / MANIFEST
    if not path.is_file():
        raise KvrankError(
            f"{folder} holds no complete {kind} index (no {MANIFEST}); build it (rebuild=True, or "
            f"`kvrank index --retriever {kind} --index-dir {folder.parent}`)", param="index_dir"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KvrankError(
            f"{path} is not valid JSON ({err}); delete {folder} and rebuild the index"
        ) from None
    if manifest.get("format_version") != MANIFEST_VERSION or manifest.get("kind") != kind:
        raise KvrankError(
            f"{folder} holds a {manifest.get('kind')!r} index of format "
            f"{manifest.get('format_version')!r}, expected a {kind!r} index of format "
            f"{MANIFEST_VERSION}; delete {folder} and rebuild it"
        )
    if corpus_fp is not None and manifest.get("corpus_fingerprint") != corpus_fp:
        raise KvrankError(
            f"the {kind} index in {folder} was built on a different corpus than the one given; "
            "rebuild it for this data (rebuild=True, or `kvrank index`), or pass another index_dir", param="index_dir"
        )
    stored = manifest.get("identity", {})
    diffs = {
        key: (stored.get(key), identity.get(key))
        for key in sorted(stored.keys() | identity.keys())
        if stored.get(key) != identity.get(key)
    }
    if diffs:
        detail = "; ".join(
            f"{key}: index has {old!r}, asked for {new!r}" for key, (old, new) in diffs.items()
        )
        if model is not None and manifest.get("model") is not None:
            detail = f"model: index has {manifest['model']!r}, asked for {model!r}; {detail}"
        raise KvrankError(
            f"the {kind} index in {folder} was built with other settings ({detail}); rebuild it "
            f"with these settings (rebuild=True, or another index_dir) or ask for the index's own settings",
            param="index_dir"
        )
    return manifest


def load_or_build(
    folder: Path, loader: Callable[[Path], Any], builder: Callable[[Path], Any], rebuild: bool, what: str
) -> Any:
    """Load the index in `folder` if one is there (a mismatch raises), else build and publish it."""
    if not rebuild and (folder / MANIFEST).is_file():
        logger.info("loading %s index from %s", what, folder)
        return loader(folder)
    logger.info("building %s index in %s", what, folder)
    return builder(folder)


