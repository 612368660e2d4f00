"""A store's KV format in practice: fit a format's projections on calibration passages, keep them with the store.

A fitted format (`rank...`, `heads...`) is only meaningful with its basis, so the basis lives in the store folder
(`basis.safetensors`, written atomically before the store's manifest) and its digest is part of the storage tag,
hence of the store's identity and of every key. Opening a store with another format is refused before any work.
With a remote tier the basis is shared too: the first one uploaded is every node's (`resolve_basis`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load, save

from kvrank.attention.kvformat import Basis, KVFormat
from kvrank.defaults import DEFAULT_CALIBRATION_PASSAGES
from kvrank.errors import KvrankError
from kvrank.io import atomic_write_bytes
from kvrank.store.codec import MANIFEST, parse_header
from kvrank.types import Passage

if TYPE_CHECKING:
    from kvrank.store.remote import RemoteFolder

logger = logging.getLogger(__name__)

BASIS_FILE = "basis.safetensors"
# `kv_format="auto"` (the CLI and API default): per model fingerprint, the format chosen by the Pareto report in
# docs/concepts/kv-formats.md; models nobody measured get int8, which changed no ranking metric beyond noise on SmolLM2.
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
            raise KvrankError(f"kv_format {fmt.name!r} needs a fitted basis", param="kv_format")
        tag += f";basis={basis_digest(basis)}"
    return tag


def tag_format(tag: str) -> str:
    """The format name recorded in a storage tag."""
    fields = dict(part.split("=", 1) for part in tag.split(";") if "=" in part)
    return fields.get("format", "none")


Calibration = Sequence[Passage] | Callable[[], Sequence[Passage]]


def calibration_sample(passages: Sequence[Passage], n: int = DEFAULT_CALIBRATION_PASSAGES,
                       seed: int = 0) -> list[Passage]:
    """A fixed random sample of the corpus being indexed (the same for the same corpus and seed), in doc id
    order: a sample of a sample is itself, so a Ray worker handed the driver's sample fits the same basis."""
    if n < 1:
        raise KvrankError(f"calibration_passages must be >= 1, got {n}", param="calibration_passages")
    ordered = sorted(passages, key=lambda p: p.doc_id)
    if len(ordered) <= n:
        return ordered
    return sorted(random.Random(seed).sample(ordered, n), key=lambda p: p.doc_id)


def basis_bytes(fmt: KVFormat, basis: Basis) -> bytes:
    """A basis as the bytes of `basis.safetensors` (what the store folder and the remote tier keep)."""
    return save({k: v.contiguous() for k, v in basis.items()},
                metadata={"kvrank.format": fmt.name, "kvrank.basis": basis_digest(basis)})


def parse_basis(data: bytes) -> tuple[Basis, str, str]:
    """The basis in `basis.safetensors` bytes, the format it was fitted for and its digest."""
    header, _ = parse_header(data, len(data))
    meta = header.get("__metadata__", {})
    return load(data), meta.get("kvrank.format", ""), meta.get("kvrank.basis", "")


def save_basis(folder: str | Path, fmt: KVFormat, basis: Basis) -> Path:
    return _write_basis(folder, basis_bytes(fmt, basis))


def _write_basis(folder: str | Path, data: bytes) -> Path:
    path = Path(folder) / BASIS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def load_basis(folder: str | Path) -> tuple[Basis, str] | None:
    """The basis saved in a store folder and the format it was fitted for, or None."""
    path = Path(folder) / BASIS_FILE
    if not path.is_file():
        return None
    basis, fitted_for, _ = parse_basis(path.read_bytes())
    return basis, fitted_for


def check_format(fmt: KVFormat, mode: str, lm) -> None:
    """Refuse a format this model or scoring mode cannot use (before any calibration work)."""
    fmt.check(lm.num_layers, lm.kv_heads, lm.head_dim)
    stored = fmt.stored_layers(lm.num_layers)
    if stored < lm.num_layers and mode != "attn":
        raise KvrankError(f"mode {mode!r} reads the model's output after all {lm.num_layers} layers, but "
                          f"kv_format {fmt.name!r} stores {stored}; use mode='attn' or a format without layers<L>",
                          param="mode")


def store_format(folder: str | Path | None, remote: RemoteFolder | None = None) -> str | None:
    """The KV format of an existing store folder, else of the remote tier (None: neither exists yet)."""
    tag = recorded_tag(folder) if folder is not None else None
    if tag is None and remote is not None:
        tag = remote.recorded_tag()
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
                  fit: Callable[[Sequence[Passage]], Basis], remote: RemoteFolder | None = None) -> Basis | None:
    """The basis format `fmt` needs: the store's own (same format), else the remote tier's, else `fit(passages)` on
    `calibration`, saved into a new store and uploaded to the remote. A store or remote of another format is refused
    here, before any model work. `calibration` may be a function returning the passages: it is called only when a
    basis has to be fitted. `fit` prefills the passages with the model that will read them (the reranker provides
    it, so this module never imports the reranker).

    With a remote tier every node ends up with the same bytes: the first basis uploaded wins, and a node that fitted
    one meanwhile, or has none, takes the remote's (and keeps a copy in its store folder)."""
    tag = recorded_tag(store) if store is not None else None
    remote_tag = remote.recorded_tag() if remote is not None else None
    shared_at = f"remote_store {remote.url}" if remote is not None else ""
    _refuse_other_format(fmt, f"store_dir {store}", tag)
    _refuse_other_format(fmt, shared_at, remote_tag)
    if not fmt.fitted:
        return None
    local = _local_basis(store, fmt)
    shared = _remote_basis(remote, fmt) if remote is not None else None
    data = shared if shared is not None else local
    if data is None:
        if tag is not None or remote_tag is not None:  # entries were encoded with a basis that is gone
            where = f"store_dir {store}" if tag is not None else shared_at
            raise KvrankError(f"{where}: format {fmt.name!r} but no {BASIS_FILE} fitted for it; its entries cannot "
                              "be decoded, warm a new store", param=where.split()[0])
        data = basis_bytes(fmt, fit(_passages(fmt, calibration)))
    if remote is not None and shared is None:
        data = _share(remote, data)
    if store is not None and data != local:
        if local is not None and tag is not None and _digest(local) != _digest(data):
            raise KvrankError(f"store_dir {store} was encoded with basis {_digest(local)}, {shared_at} with basis "
                              f"{_digest(data)}: their entries cannot be shared; pass a new store_dir folder (it "
                              "takes the remote's basis) or another remote_store", param="store_dir")
        _write_basis(store, data)  # a new store: the basis is written before its manifest
    return parse_basis(data)[0]


def _digest(data: bytes) -> str:
    return parse_basis(data)[2]


def _refuse_other_format(fmt: KVFormat, where: str, tag: str | None) -> None:
    if tag is not None and tag_format(tag) != fmt.name:
        option = where.split()[0]
        raise KvrankError(f"{where} holds KV in format {tag_format(tag)!r}, not kv_format {fmt.name!r}; pass "
                          f"kv_format={tag_format(tag)!r} or another {option}", param="kv_format")


def _local_basis(store: str | Path | None, fmt: KVFormat) -> bytes | None:
    """The store folder's basis file if it was fitted for `fmt`. A new store's basis left by an interrupted or
    refused start of another format is ignored (and replaced)."""
    path = Path(store) / BASIS_FILE if store is not None else None
    if path is None or not path.is_file():
        return None
    data = path.read_bytes()
    return data if parse_basis(data)[1] == fmt.name else None


def _remote_basis(remote: RemoteFolder, fmt: KVFormat) -> bytes | None:
    data = remote.read(BASIS_FILE)
    if data is not None and (fitted_for := parse_basis(data)[1]) != fmt.name:
        raise KvrankError(f"remote_store {remote.url} holds a basis fitted for format {fitted_for!r}, not "
                          f"kv_format {fmt.name!r}; pass kv_format={fitted_for!r} or another remote_store",
                          param="kv_format")
    return data


def _share(remote: RemoteFolder, data: bytes) -> bytes:
    """Upload a basis unless another node did first; returns the one every node uses (the first uploaded)."""
    if remote.create(BASIS_FILE, data):
        return data
    logger.info("remote_store %s: another node uploaded a basis first; using it", remote.url)
    theirs = remote.read(BASIS_FILE)
    assert theirs is not None, "a remote object is never removed once written"
    return theirs


def _passages(fmt: KVFormat, calibration: Calibration | None) -> Sequence[Passage]:
    if callable(calibration):
        calibration = calibration()
    if not calibration:
        raise KvrankError(f"kv_format {fmt.name!r} is fitted on calibration passages of the corpus: give the corpus, "
                          "or a store_dir warmed with this format", param="kv_format")
    return calibration
