"""The remote tier: passage KV that several nodes share, kept in any fsspec file system (s3://, gs://, file://...).

Layout under the URL (design, guarantees and measurements: docs/concepts/store.md, "Remote tier"):

    manifest.json                         identity of every entry (kind `kvrank-remote-kv-store`), written once
    basis.safetensors                     a fitted KV format's projections, first writer wins (store/formats.py)
    objects/<k[:2]>/<key>.safetensors     one immutable entry per passage: the disk store's bytes (store/codec.py)
    quarantine/<key>.<rand>.safetensors   entries that failed their checksum
    tmp/<name>.<host>.<pid>.<rand>.tmp    entries being written (local/POSIX file systems only)

Invariants that make it safe to share:
- An object is written once and never modified: a local file system publishes a complete, fsynced temporary file
  with `link` (fails if the name exists); an object store gets one PUT, conditional (`If-None-Match: *`) where the
  file system supports it, else skipped when the object exists. Two nodes writing one key: the first one's complete
  bytes stay, the other's upload is a no-op (counted as `present`).
- Every read checks the entry whole (`decode_entry`). A torn, truncated or flipped object is moved to quarantine/,
  counted, and reported as a miss, so the caller recomputes it and stores a good copy; it is never served.
- The manifest is created by the first opener (first writer wins) and compared by every later one: a tier of
  another model, format or basis is refused before any work. Keys hash the same identity, so a mixed-up object
  could only ever miss.
- No shared mutable state: recency, budgets and counters stay with each node's local tier (its SQLite index is
  never shared). The remote grows until `kvrank store gc` or the bucket's own lifecycle rules remove objects.
- The tier is a cache: a remote that cannot be reached mid-run makes misses and skipped uploads (logged and counted
  as `errors`), never a failed query. At open, an unreachable or wrong URL is a `KvrankError`.

fsspec (and s3fs for s3://) are imported only when a remote tier is opened: they come with the `ray` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kvrank.errors import KvrankError
from kvrank.io import pid_alive
from kvrank.store.codec import (
    ENTRY_SUFFIX,
    MANIFEST,
    CorruptEntry,
    decode_entry,
    encode_entry_bytes,
    entry_name,
    identity_conflict,
    manifest_text,
    parse_manifest,
)
from kvrank.store.kv import KVKey, PassageKV, RemoteCounters, StoreIdentity

logger = logging.getLogger(__name__)

REMOTE_KIND = "kvrank-remote-kv-store"
STALE_TMP_SECONDS = 3600.0
INSTALL_HINT = "pip install 'kvrank[ray]' (fsspec, s3fs)"
# Options a protocol gets unless the caller sets them. s3fs asks for an object's size (a HEAD) before each GET to
# decide on a parallel ranged download; entries are far smaller than its chunk, so that is a wasted round trip.
PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {"s3": {"max_concurrency": 1}, "s3a": {"max_concurrency": 1}}
OPEN_FIX = ("check that the bucket or folder exists and is writable by this node, and the credentials and endpoint "
            "(AWS_ENDPOINT_URL for an S3-compatible server)")


def open_filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec file system and root path for `url`; every way a URL can be wrong is a one-line KvrankError."""
    protocol, sep, rest = url.partition("://")
    if not sep or not protocol or not rest.strip("/"):
        raise KvrankError(f"remote_store {url!r} is not a URL; write it with its protocol, e.g. "
                          "s3://bucket/prefix or file:///mnt/shared/kvrank", param="remote_store")
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise KvrankError(f"remote_store {url} needs fsspec, which is not installed: {INSTALL_HINT}",
                          param="remote_store") from None
    options = {**PROTOCOL_DEFAULTS.get(protocol, {}), **(storage_options or {})}
    try:
        return url_to_fs(url, **options)
    except ImportError as err:  # fsspec knows the protocol, its package (s3fs, gcsfs, ...) is missing
        raise KvrankError(f"remote_store {url}: protocol {protocol!r} needs a package that is not installed "
                          f"({err}); {INSTALL_HINT}, or the protocol's own fsspec package",
                          param="remote_store") from None
    except ValueError as err:  # "Protocol not known"
        raise KvrankError(f"remote_store {url}: {err}; use s3://, gs://, file:// or another fsspec "
                          "protocol", param="remote_store") from None


class RemoteFolder:
    """A URL's file system and root, with the few verbs the remote tier needs on objects named relative to it.

    `create` is the only way anything is written: first writer wins, and a reader never sees a partial object."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.fs, self.root = open_filesystem(url, storage_options)
        from fsspec.implementations.local import LocalFileSystem

        self.local = isinstance(self.fs, LocalFileSystem)  # POSIX: publish by link; otherwise one (conditional) PUT

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def read(self, name: str) -> bytes | None:
        """The object's bytes, or None if there is none."""
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            return None

    def read_many(self, names: Sequence[str]) -> list[bytes | BaseException]:
        """Each object's bytes or the error reading it (FileNotFoundError: none), fetched concurrently where the
        file system is asynchronous (s3fs, gcsfs)."""
        paths = [self.path(name) for name in names]
        if not getattr(self.fs, "async_impl", False):
            return [self._read_or_error(path) for path in paths]
        from fsspec.asyn import sync

        async def fetch_all() -> list[bytes | BaseException]:
            # `_cat_file` is the coroutine of fsspec's async API, the one `cat_file` wraps
            return await asyncio.gather(*(self.fs._cat_file(p) for p in paths), return_exceptions=True)

        return sync(self.fs.loop, fetch_all)

    def _read_or_error(self, path: str) -> bytes | BaseException:
        try:
            return self.fs.cat_file(path)
        except Exception as err:  # noqa: BLE001 - handed to the caller, who decides what a failed read means
            return err

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(self.path(name)))

    def create(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist; True if this call wrote it, False if another writer did first."""
        return self._link_into_place(name, data) if self.local else self._put_if_absent(name, data)

    def _put_if_absent(self, name: str, data: bytes) -> bool:
        """One PUT is atomic on an object store: readers see nothing or the whole object. `mode="create"` makes it
        conditional (s3fs sends If-None-Match: *; file systems without conditional writes check existence first)."""
        try:
            self.fs.pipe_file(self.path(name), data, mode="create")
        except FileExistsError:
            return False
        return True

    def _link_into_place(self, name: str, data: bytes) -> bool:
        """Write a temporary file, flush it to disk, and hard-link it under its name: `link` fails if the name
        exists, so the first complete file stays and no reader ever sees a partial one. (A name that exists already
        is not written at all: checking is free here, unlike a round trip to an object store.)"""
        target = self.path(name)
        if os.path.exists(target):
            return False
        tmp = self.path(f"tmp/{os.path.basename(name)}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return True

    def move(self, name: str, to: str) -> None:
        """Move an object (a rename on a local file system, copy then delete on an object store). Raises
        FileNotFoundError only if the object is gone."""
        if self.local:  # object stores have no folders; a local one must exist, or the rename fails as "not found"
            os.makedirs(os.path.dirname(self.path(to)), exist_ok=True)
        self.fs.mv(self.path(name), self.path(to))

    def remove(self, name: str) -> bool:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            return False
        return True

    def listing(self, folder: str) -> dict[str, dict[str, Any]]:
        """Objects under `folder`, by name relative to the root, with the file system's details (size, mtime)."""
        base = self.path(folder)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            found = {}
        finally:
            self.fs.invalidate_cache(self.root)  # listings are cached by some file systems: never read stale ones
        prefix = self.root.rstrip("/") + "/"
        return {path[len(prefix):] if path.startswith(prefix) else path: info for path, info in found.items()}

    def recorded_identity(self) -> StoreIdentity | None:
        """The identity in the remote's manifest, or None where there is no (readable) manifest yet."""
        text = self.read(MANIFEST)
        if text is None:
            return None
        try:
            return parse_manifest(text.decode("utf-8"), REMOTE_KIND)
        except (UnicodeDecodeError, ValueError):
            return None  # RemoteTier's open reports an unreadable manifest

    def recorded_tag(self) -> str | None:
        identity = self.recorded_identity()
        return identity.storage_tag if identity is not None else None


@dataclass
class RemoteVerifyReport:
    checked: int = 0
    ok: int = 0
    corrupt: list[str] = field(default_factory=list)
    quarantined: int = 0
    unquarantined: list[str] = field(default_factory=list)  # corrupt keys that could not be moved away

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RemoteUsage:
    """What `scan` counts: entries and their bytes, quarantined objects, temporary files."""

    entries: int = 0
    bytes: int = 0
    quarantined: int = 0
    quarantined_bytes: int = 0
    tmp: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class RemoteTier:
    """Passage KV shared by several nodes under `url`; see the module docstring for the layout and invariants.

    Opening checks (or, for a new URL, records) the manifest's identity; `identity=None` opens the tier as it is
    (the `kvrank store` tools). Thread-safe; `counters` are this handle's."""

    def __init__(self, url: str, identity: StoreIdentity | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.folder = RemoteFolder(url, storage_options)
        self.url = url
        self.identity = self._open_manifest(identity)
        self._counters = RemoteCounters()
        self._lock = threading.Lock()
        self._warned = False

    # ------------------------------------------------------------------ opening
    def _open_manifest(self, identity: StoreIdentity | None) -> StoreIdentity:
        try:
            text = self.folder.read(MANIFEST)
            if text is None:
                if identity is None:
                    raise KvrankError(f"remote_store {self.url}: no remote KV store there (no {MANIFEST}); create "
                                      f"one by warming a store (`kvrank warm`) with remote_store={self.url!r}",
                                      param="remote_store")
                self.folder.create(MANIFEST, manifest_text(REMOTE_KIND, identity).encode())  # first opener wins
                text = self.folder.read(MANIFEST)
        except KvrankError:
            raise
        except Exception as err:  # noqa: BLE001 - any way of failing to reach the URL becomes one clear line
            raise KvrankError(f"remote_store {self.url}: cannot open it ({type(err).__name__}: {err}); "
                              f"{OPEN_FIX}", param="remote_store") from None
        try:
            recorded = parse_manifest((text or b"").decode("utf-8"), REMOTE_KIND)
        except (UnicodeDecodeError, ValueError) as err:
            raise KvrankError(f"remote_store {self.url}: unreadable {MANIFEST} ({err}); pass the URL of a remote "
                              "KV store, or a new prefix for a new one", param="remote_store") from None
        if identity is not None and (refusal := identity_conflict(
                f"remote_store {self.url}", recorded, identity,
                "pass another remote_store URL (e.g. a new prefix) for this model and format")):
            raise KvrankError(refusal, param="remote_store")
        return recorded

    # ------------------------------------------------------------------ entries
    def get_many(self, keys: Sequence[KVKey]) -> list[PassageKV | None]:
        """Each key's KV or None (a miss: absent, unreadable or corrupt). Every object is fetched once per call,
        checked whole, and a corrupt one is quarantined."""
        unique = list(dict.fromkeys(keys))
        fetched = dict(zip(unique, self.folder.read_many([entry_name(k) for k in unique])))
        loaded = {key: self._decode(key, data) for key, data in fetched.items()}
        out = [loaded[key] for key in keys]
        hits = sum(kv is not None for kv in out)
        with self._lock:
            self._counters.hits += hits
            self._counters.misses += len(out) - hits
        return out

    def _decode(self, key: KVKey, data: bytes | BaseException) -> PassageKV | None:
        if isinstance(data, FileNotFoundError):
            return None
        if isinstance(data, BaseException):
            self._transport_error("read", key, data)
            return None
        try:
            kv = decode_entry(bytearray(data), key)  # writable: tensors handed out are views of this copy
        except CorruptEntry as err:
            logger.warning("remote KV store %s: entry %s is corrupt (%s); treating it as a miss and moving it to "
                           "quarantine/", self.url, key, err)
            self._quarantine(key)
            with self._lock:
                self._counters.corrupt += 1
            return None
        with self._lock:
            self._counters.bytes_read += len(data)
        return kv

    def put_many(self, kvs: Sequence[PassageKV]) -> int:
        """Upload each entry unless the remote has its key already; returns how many this call wrote."""
        written = 0
        for kv in {kv.key: kv for kv in kvs}.values():
            data = encode_entry_bytes(kv)
            try:
                created = self.folder.create(entry_name(kv.key), data)
            except Exception as err:  # noqa: BLE001 - a cache upload that fails loses nothing: logged, counted
                self._transport_error("write", kv.key, err)
                continue
            with self._lock:
                if created:
                    self._counters.uploaded += 1
                    self._counters.bytes_written += len(data)
                else:
                    self._counters.present += 1
            written += created
        return written

    def __contains__(self, key: object) -> bool:
        try:
            return isinstance(key, str) and self.folder.exists(entry_name(KVKey(key)))
        except ValueError:  # not a key
            return False
        except Exception as err:  # noqa: BLE001 - unreachable: not known to be there
            self._transport_error("check", str(key), err)
            return False

    @property
    def counters(self) -> RemoteCounters:
        with self._lock:
            return replace(self._counters)

    def describe(self) -> dict[str, Any]:
        """The URL and this handle's counters (what a tiered store's `totals()` reports under `remote`)."""
        return {"url": self.url, **asdict(self.counters)}

    def close(self) -> None:
        """Nothing to release: fsspec keeps (and shares) its file system instances."""

    def _transport_error(self, action: str, key: str, err: BaseException) -> None:
        with self._lock:
            self._counters.errors += 1
            first, self._warned = not self._warned, True
        log = logger.warning if first else logger.debug  # one warning per handle, not one per passage
        log("remote KV store %s: could not %s %s (%s: %s); the remote tier is skipped for it", self.url, action, key,
            type(err).__name__, err)

    def _quarantine(self, key: KVKey) -> bool:
        """Move a corrupt object out of objects/ so the next put stores a good copy; False if it could not be.

        Another node may quarantine the same object at the same time (one of the moves finds nothing), or may
        already have stored a good copy that this move then takes away: that costs one recompute, never wrong
        bytes, because objects are only ever served after their checksum."""
        try:
            self.folder.move(entry_name(key), f"quarantine/{key}.{uuid.uuid4().hex[:8]}{ENTRY_SUFFIX}")
        except FileNotFoundError:
            return True  # another reader moved it first
        except Exception as err:  # noqa: BLE001 - reported by the caller (verify: exit 1)
            logger.warning("remote KV store %s: could not quarantine %s (%s: %s)", self.url, key,
                           type(err).__name__, err)
            return False
        return True

    # ------------------------------------------------------------------ maintenance (kvrank store)
    def scan(self) -> RemoteUsage:
        """Count entries, bytes, quarantined objects and temporary files (one listing of the tier)."""
        usage = RemoteUsage()
        for name, info in self.folder.listing("objects").items():
            if name.endswith(ENTRY_SUFFIX):
                usage.entries += 1
                usage.bytes += int(info.get("size") or 0)
        quarantined = self.folder.listing("quarantine")
        usage.quarantined = len(quarantined)
        usage.quarantined_bytes = sum(int(info.get("size") or 0) for info in quarantined.values())
        usage.tmp = len(self.folder.listing("tmp"))
        return usage

    def verify(self) -> RemoteVerifyReport:
        """Fetch every entry and check it whole; corrupt ones are moved to quarantine/."""
        report = RemoteVerifyReport()
        names = sorted(n for n in self.folder.listing("objects") if n.endswith(ENTRY_SUFFIX))
        for name in names:
            key = KVKey(os.path.basename(name)[: -len(ENTRY_SUFFIX)])
            data = self.folder.read(name)
            if data is None:  # removed meanwhile
                continue
            report.checked += 1
            try:
                decode_entry(bytearray(data), key)
                report.ok += 1
            except CorruptEntry as err:
                logger.warning("remote KV store %s: entry %s is corrupt (%s)", self.url, key, err)
                report.corrupt.append(key)
                if self._quarantine(key):
                    report.quarantined += 1
                else:
                    report.unquarantined.append(key)
        with self._lock:
            self._counters.corrupt += len(report.corrupt)
        return report

    def gc(self) -> tuple[int, int]:
        """Delete quarantined objects and temporary files of writers that are gone; returns both counts.

        Entries are never deleted here: the remote has no shared recency to evict by (each node's LRU is local),
        so it grows until removed by the bucket's lifecycle rules or by starting a new prefix."""
        quarantined = sum(self.folder.remove(name) for name in self.folder.listing("quarantine"))
        stale = [name for name, info in self.folder.listing("tmp").items() if _stale_tmp(name, info)]
        return quarantined, sum(self.folder.remove(name) for name in stale)


def _host() -> str:
    """This node's name, safe inside a dotted file name."""
    return socket.gethostname().replace(".", "-") or "host"


def _stale_tmp(name: str, info: dict[str, Any]) -> bool:
    """A temporary file of a writer that is gone: on this host with a dead pid, or older than an hour (temporary
    files exist on local file systems only, whose listings give `mtime`)."""
    parts = os.path.basename(name).rsplit(".", 4)  # <name>.<host>.<pid>.<rand>.tmp
    old = time.time() - float(info.get("mtime", 0.0)) > STALE_TMP_SECONDS
    try:
        return old or (parts[1] == _host() and not pid_alive(int(parts[2])))
    except (IndexError, ValueError):
        return old
