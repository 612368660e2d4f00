"""The bytes every store tier keeps: entry files and the store manifest, one codec for the disk and remote tiers.

An entry is a standard safetensors file (any safetensors reader opens it): tensors `k.<layer>` and `v.<layer>`,
each `[kv_heads, T, head_dim]` in the storage dtype (or a compressed format's codes and latents with T at dim -2,
plus its scales), and in the metadata the key, the token and layer counts and `kvrank.checksum = xxh3_64:<hex>`
over the canonical JSON header (without the checksum) and every data byte. `decode_entry` checks all of it over
any buffer (a mapped file, bytes fetched from an object store) and raises `CorruptEntry` on any mismatch, so a
torn, truncated or flipped entry is a miss for every tier, never wrong bytes.

The manifest records what every entry of a store was computed with (`StoreIdentity`) and the store's kind, so a
store is opened only by a reranker whose bytes would be the same.
"""

from __future__ import annotations

import json
import mmap
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import xxhash

from kvrank.store.kv import KVKey, PassageKV, StoreIdentity

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
ENTRY_SUFFIX = ".safetensors"

# safetensors dtype names <-> torch dtypes (the subset a stored KV can use)
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I8": torch.int8, "U8": torch.uint8}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
CHECKSUM_FIELD = "kvrank.checksum"
ENTRY_FORMAT = ("safetensors; tensors k.<layer>, v.<layer> [kv_heads, T, head_dim] (or the storage tag's format: "
                "codes/latents with T at dim -2, scales ks.<layer>, vs.<layer>); metadata kvrank.key, kvrank.tokens, "
                "kvrank.layers, kvrank.checksum (xxh3-64 of header + data)")


class CorruptEntry(Exception):
    """An entry whose bytes do not match its checksum, key or declared layout."""


def is_key(key: str) -> bool:
    """A KV key is a lowercase hex digest: never a path outside a store's objects/."""
    return bool(key) and all(c in "0123456789abcdef" for c in key)


def entry_name(key: KVKey) -> str:
    """Where an entry lives under a store's root: `objects/<k[:2]>/<key>.safetensors` (256 fan-out folders)."""
    if not is_key(key):
        raise ValueError(f"KV key must be a lowercase hex digest, got {key!r}")
    return f"objects/{key[:2]}/{key}{ENTRY_SUFFIX}"


def _tensors(kv: PassageKV) -> list[tuple[str, torch.Tensor]]:
    """Entry tensors in file order: a format's fp16 scales first (even sizes keep every tensor aligned to its
    element size), then `k.<layer>`, `v.<layer>`."""
    named = sorted(kv.aux.items())
    for layer, (k, v) in enumerate(zip(kv.keys, kv.values, strict=True)):
        named += [(f"k.{layer}", k), (f"v.{layer}", v)]
    return named


def _header(kv: PassageKV) -> tuple[dict, list[torch.Tensor]]:
    header: dict = {}
    raw, offset = [], 0
    for name, t in _tensors(kv):
        if t.dtype not in DTYPE_NAMES:
            kept = sorted(map(str, DTYPES.values()))
            raise ValueError(f"KV tensor {name} has dtype {t.dtype}; the store keeps {kept}")
        flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + flat.numel()]}
        offset += flat.numel()
        raw.append(flat)
    header["__metadata__"] = {"kvrank.key": kv.key, "kvrank.tokens": str(kv.num_tokens),
                              "kvrank.layers": str(len(kv.keys))}
    return header, raw


def _canonical(header: dict) -> bytes:
    """The header as checksummed: everything but the checksum itself, in a canonical JSON form."""
    meta = {k: v for k, v in header["__metadata__"].items() if k != CHECKSUM_FIELD}
    return json.dumps({**header, "__metadata__": meta}, sort_keys=True, separators=(",", ":")).encode()


def _header_bytes(header: dict) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-(len(text) + 8) % 8)  # data starts 8-byte aligned


def encode_entry(kv: PassageKV) -> list[bytes | memoryview]:
    """The entry file's bytes as chunks: u64 header length, JSON header, then the tensors' raw bytes.

    Written by hand, not by `safetensors.torch.save`, for two things the library does not do: the checksum over
    header and data lives inside the header (the file is still valid safetensors), and `read_entry` maps it
    copy-on-write and verifies that checksum over the mapped bytes without a second copy."""
    header, raw = _header(kv)
    digest = xxhash.xxh3_64(_canonical(header))
    views = [memoryview(t.numpy().data) for t in raw]
    for view in views:
        digest.update(view)
    header["__metadata__"][CHECKSUM_FIELD] = f"xxh3_64:{digest.hexdigest()}"
    head = _header_bytes(header)
    return [len(head).to_bytes(8, "little"), head, *views]


def entry_nbytes(kv: PassageKV) -> int:
    header, raw = _header(kv)
    header["__metadata__"][CHECKSUM_FIELD] = "xxh3_64:" + "0" * 16
    return 8 + len(_header_bytes(header)) + sum(t.numel() for t in raw)


def parse_header(mm: mmap.mmap | bytes | bytearray, size: int) -> tuple[dict, int]:
    if size < 8:
        raise CorruptEntry(f"{size} bytes is shorter than a safetensors header")
    n = int.from_bytes(mm[:8], "little")
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise CorruptEntry(f"header length {n} does not fit a {size}-byte file")
    try:
        header = json.loads(bytes(mm[8:8 + n]))
        if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
            raise ValueError("no __metadata__")
    except ValueError as err:
        raise CorruptEntry(f"unreadable header ({err})") from None
    return header, 8 + n


def read_tokens(path: Path) -> int:
    """An entry's token count from its header alone (no checksum)."""
    with open(path, "rb") as handle:
        head = handle.read(8 + MAX_HEADER_BYTES)
    header, _ = parse_header(head, os.path.getsize(path))
    try:
        return int(header["__metadata__"]["kvrank.tokens"])
    except (KeyError, ValueError):
        raise CorruptEntry("no kvrank.tokens in the metadata") from None


def encode_entry_bytes(kv: PassageKV) -> bytes:
    """The entry as one bytes object (what a single object-store PUT sends)."""
    return b"".join(encode_entry(kv))


def read_entry(path: Path, key: KVKey) -> tuple[PassageKV, int]:
    """Map an entry file and check it whole; returns the KV (views of the mapping) and the file size.

    Raises FileNotFoundError for a missing entry and CorruptEntry for any mismatch.
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise CorruptEntry("empty file")
        # A private mapping: no copy until written, and a writer of the tensors never reaches the file.
        mm = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    return decode_entry(mm, key), size


def decode_entry(buffer: mmap.mmap | bytearray, key: KVKey) -> PassageKV:
    """Check an entry's bytes whole (header, recorded key, checksum, tensor table) and return its KV as views of
    `buffer`, which must be writable (a copy-on-write mapping, a bytearray) so that the tensors are too.

    Raises CorruptEntry for any mismatch: a short read, a flipped byte, a header that is not ours.
    """
    size = len(buffer)
    header, start = parse_header(buffer, size)
    meta = header["__metadata__"]
    if meta.get("kvrank.key") != key:
        raise CorruptEntry(f"entry records key {meta.get('kvrank.key')!r}")
    want = meta.get(CHECKSUM_FIELD, "")
    digest = xxhash.xxh3_64(_canonical(header))
    with memoryview(buffer) as view:
        digest.update(view[start:])
    if want != f"xxh3_64:{digest.hexdigest()}":
        raise CorruptEntry(f"checksum {want!r} != xxh3_64:{digest.hexdigest()}")
    layers, table, end = _tensor_table(header, start, size)
    tensors = {}
    dtypes = {dtype for _, dtype, _, _, _ in table}
    if len(dtypes) == 1:  # the usual case: one view of the whole data region, sliced per tensor
        (dtype,) = dtypes
        flat = torch.frombuffer(buffer, dtype=dtype, count=end // dtype.itemsize, offset=start)
        for name, _, shape, begin, stop in table:
            tensors[name] = flat[begin // dtype.itemsize: stop // dtype.itemsize].view(shape)
    else:
        for name, dtype, shape, begin, stop in table:
            tensors[name] = torch.frombuffer(buffer, dtype=dtype, count=(stop - begin) // dtype.itemsize,
                                             offset=start + begin).view(shape)
    return PassageKV(key=key, keys=[tensors.pop(f"k.{i}") for i in range(layers)],
                     values=[tensors.pop(f"v.{i}") for i in range(layers)], aux=tensors)


def _tensor_table(header: dict, start: int, size: int) -> tuple[int, list[tuple], int]:
    """The layer count, `(name, dtype, shape, begin, stop)` in file order, and the data's end; the tensors must
    hold every layer's keys and values and tile the data region exactly."""
    meta = header["__metadata__"]
    try:
        layers = int(meta["kvrank.layers"])
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: int(header[k]["data_offsets"][0]))
        if not {f"{kind}.{layer}" for layer in range(layers) for kind in "kv"} <= set(names):
            raise CorruptEntry(f"tensors {names[:4]}... do not hold {layers} layers of keys and values")
        table = []
        end = 0
        for name in names:
            spec = header[name]
            dtype = DTYPES[spec["dtype"]]
            shape = [int(d) for d in spec["shape"]]
            begin, stop = (int(x) for x in spec["data_offsets"])
            if begin != end or stop - begin != torch.Size(shape).numel() * dtype.itemsize or start + stop > size:
                raise CorruptEntry(f"tensor {name}: offsets {spec['data_offsets']} do not match its shape")
            end = stop
            table.append((name, dtype, shape, begin, stop))
        if start + end != size:
            raise CorruptEntry(f"{size - start - end} bytes after the last tensor")
    except (KeyError, ValueError, TypeError) as err:
        raise CorruptEntry(f"malformed tensor table ({err!r})") from None
    return layers, table, end


# ---------------------------------------------------------------------- the manifest
def manifest_text(kind: str, identity: StoreIdentity) -> str:
    """A new store's manifest: its kind and version, the identity of every entry, and how entries are encoded."""
    body = {"format": kind, "format_version": MANIFEST_VERSION, "identity": asdict(identity),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "entry_format": ENTRY_FORMAT}
    return json.dumps(body, indent=2)


def parse_manifest(text: str, kind: str) -> StoreIdentity:
    """The identity a manifest records. Raises ValueError (the caller names the store) if it is not a manifest of
    this kind and version."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != kind:
        found = data.get("format") if isinstance(data, dict) else None
        raise ValueError(f"a manifest of kind {found!r}, not {kind!r}")
    if data.get("format_version") != MANIFEST_VERSION:
        raise ValueError(f"store format version {data.get('format_version')} is not {MANIFEST_VERSION}, the one this "
                         "kvrank reads")
    try:
        return StoreIdentity(**data["identity"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"no identity ({err!r})") from None


def identity_conflict(where: str, recorded: StoreIdentity, identity: StoreIdentity, fix: str) -> str | None:
    """The refusal for opening a store of one identity with another (None: they agree)."""
    diff = recorded.mismatch(identity)
    if not diff:
        return None
    return (f"{where} holds KV of another model or storage setting ({'; '.join(diff)}; store model "
            f"{recorded.model!r}, this reranker {identity.model!r}). Its bytes would be wrong here: {fix}")
