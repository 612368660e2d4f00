"""A store's KV format in practice: fit a format's projections on calibration passages, keep them with the store.

A fitted format (`rank...`, `heads...`) is only meaningful with its basis, so the basis lives in the store folder
(`basis.safetensors`, written atomically before the store's manifest) and its digest is part of the storage tag,
hence of the store's identity and of every key. Opening a store with another format is refused before any work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from kvrank.attention.kvformat import Basis, KVFormat
from kvrank.errors import KvrankError
from kvrank.io import atomic_write_bytes
from kvrank.store.codec import MANIFEST
from kvrank.types import Passage

logger = logging.getLogger(__name__)

BASIS_FILE = "basis.safetensors"
DEFAULT_CALIBRATION_PASSAGES = 64
# `--kv-format auto` (the CLI and API default): per model fingerprint, the format chosen by the Pareto report in
# docs/KV_FORMATS.md; models nobody measured get int8, which changed no ranking metric beyond noise on SmolLM2.
RECOMMENDED = {"48a75d720672966c5ec1116ec9caafbc": "int8"}  # SmolLM2-135M-Instruct (offline GGUF)
FALLBACK_FORMAT = "int8"


def recommended_format(fingerprint: str) -> str:
    return RECOMMENDED.get(fingerprint, FALLBACK_FORMAT)


def basis_digest(basis: Basis) -> str:
    """Content hash of a fitted basis (names, shapes and fp32 bytes), 16 hex digits."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(basis):
        t = basis[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{list(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def storage_tag(storage_dtype: str, compute_dtype: str, fmt: KVFormat, basis: Basis | None) -> str:
    """Everything about the stored bytes besides model, prefix and tokens (part of every KVKey and store identity).
    The uncompressed format keeps the tag it always had."""
    tag = f"dtype={storage_dtype};compute={compute_dtype};format={fmt.name}"
    if fmt.fitted:
        if not basis:
            raise KvrankError(f"--kv-format {fmt.name!r} needs a fitted basis")
        tag += f";basis={basis_digest(basis)}"
    return tag


def tag_format(tag: str) -> str:
    """The format name recorded in a storage tag."""
    fields = dict(part.split("=", 1) for part in tag.split(";") if "=" in part)
    return fields.get("format", "none")


Calibration = Sequence[Passage] | Callable[[], Sequence[Passage]]


def calibration_sample(passages: Sequence[Passage], n: int = DEFAULT_CALIBRATION_PASSAGES,
                       seed: int = 0) -> list[Passage]:
    """A fixed random sample of the corpus being indexed (the same for the same corpus and seed)."""
    if n < 1:
        raise KvrankError(f"--calibration-passages must be >= 1, got {n}")
    ordered = sorted(passages, key=lambda p: p.doc_id)
    return random.Random(seed).sample(ordered, min(n, len(ordered)))


def save_basis(folder: str | Path, fmt: KVFormat, basis: Basis) -> Path:
    path = Path(folder) / BASIS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in basis.items()},
                                  metadata={"kvrank.format": fmt.name, "kvrank.basis": basis_digest(basis)}))
    return path


def load_basis(folder: str | Path) -> tuple[Basis, str] | None:
    """The basis saved in a store folder and the format it was fitted for, or None."""
    path = Path(folder) / BASIS_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        fitted_for = (handle.metadata() or {}).get("kvrank.format", "")
    return load_file(str(path)), fitted_for


def check_format(fmt: KVFormat, mode: str, lm) -> None:
    """Refuse a format this model or scoring mode cannot use (before any calibration work)."""
    fmt.check(lm.num_layers, lm.kv_heads, lm.head_dim)
    stored = fmt.stored_layers(lm.num_layers)
    if stored < lm.num_layers and mode != "attn":
        raise KvrankError(f"--rerank {mode} reads the model's output after all {lm.num_layers} layers, but "
                          f"--kv-format {fmt.name!r} stores {stored}; use --rerank attn or a format without layers<L>")


def store_format(folder: str | Path | None) -> str | None:
    """The KV format of an existing store folder (None: no store there yet)."""
    tag = recorded_tag(folder) if folder is not None else None
    return tag_format(tag) if tag is not None else None


def recorded_tag(folder: str | Path) -> str | None:
    """The storage tag in a store folder's manifest, or None for a new folder."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text(encoding="utf-8"))["identity"]["storage_tag"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the store's own open reports an unreadable manifest


def resolve_basis(fmt: KVFormat, store: str | Path | None, calibration: Calibration | None,
                  fit: Callable[[Sequence[Passage]], Basis]) -> Basis | None:
    """The basis format `fmt` needs: the store's own (same format), else `fit(passages)` on `calibration` (and saved
    into a new store). A store of another format is refused here, before any model work. `calibration` may be a
    function returning the passages: it is called only when a basis has to be fitted. `fit` prefills the passages
    with the model that will read them (the reranker provides it, so this module never imports the reranker)."""
    tag = recorded_tag(store) if store is not None else None
    if tag is not None and tag_format(tag) != fmt.name:
        raise KvrankError(f"--store {store} holds KV in format {tag_format(tag)!r}, not --kv-format {fmt.name!r}; "
                          f"pass --kv-format {tag_format(tag)} or another --store folder")
    if not fmt.fitted:
        return None
    saved = load_basis(store) if store is not None else None
    if saved is not None and saved[1] == fmt.name:
        return saved[0]
    if tag is not None:  # the store's entries were encoded with a basis that is gone
        raise KvrankError(f"--store {store}: format {fmt.name!r} but no {BASIS_FILE} fitted for it; its entries "
                          "cannot be decoded, warm a new store")
    # A new store (no manifest): a basis file left by an interrupted or refused start is fitted again.
    if callable(calibration):
        calibration = calibration()
    if not calibration:
        raise KvrankError(f"--kv-format {fmt.name!r} is fitted on calibration passages of the corpus: give the data "
                          "(--data) or a store warmed with this format (--store)")
    basis = fit(calibration)
    if store is not None:
        save_basis(store, fmt, basis)
    return basis

