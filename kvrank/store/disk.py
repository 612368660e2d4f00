"""`DiskKVStore`: passage KV kept on disk, shared by processes, bounded in bytes, safe under crashes.

A store is a folder (design notes and measurements: docs/concepts/store.md):

    manifest.json                 identity, written once: format, layout version, model fingerprint, storage tag
    index.sqlite                  LRU index and counters (SQLite, WAL): entries(key, bytes, tokens, last_access)
    objects/<k[:2]>/<key>.safetensors   one immutable safetensors file per passage: `k.<layer>`, `v.<layer>`,
                                        each `[kv_heads, T, head_dim]`, plus the key and a checksum in the metadata
    tmp/                          entries being written; renamed into objects/ only when complete
    quarantine/                   entries that failed their checksum

Invariants that make it safe:
- An entry file appears under objects/ by `os.replace` of a complete, fsynced file, and is never modified after.
  A writer killed at any point leaves at worst a file in tmp/ (removed later) or a file without an index row
  (adopted by `gc`/`verify`); never a torn entry under its key. Two writers of one key each write their own tmp
  file and rename it into place: identical, complete bytes either way.
- Reads go to the file named by the key, not to the index. Each read memory-maps the file (a private mapping:
  no copy; tensors are views of the page cache) and checks an xxh3-64 checksum over the header and every data
  byte, and the key recorded inside. Any mismatch is a miss, a logged warning and a quarantined file.
- Eviction deletes the index row and unlinks the file under the index's write lock. A reader that has the file
  open or mapped keeps a valid view of the bytes until it drops them (POSIX unlink semantics), so eviction never
  takes bytes from under a reader; a reader that comes later gets a miss.
- The manifest fixes the model fingerprint, storage tag and layout version. Opening with another identity is
  refused with an error that names both; keys also hash all three, so a mixed-up file could only ever miss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvrank.errors import KvrankError
from kvrank.io import pid_alive
from kvrank.store.codec import (
    MANIFEST,
    CorruptEntry,
    encode_entry,
    entry_name,
    entry_nbytes,
    identity_conflict,
    is_key,
    manifest_text,
    parse_manifest,
    read_entry,
    read_tokens,
)
from kvrank.store.kv import CacheStats, KVKey, PassageKV, StoreIdentity, store_totals

logger = logging.getLogger(__name__)

STORE_KIND = "kvrank-kv-store"  # manifest fields "format" / "format_version": the folder layout, not a KV format
DEFAULT_MAX_BYTES = 64 * 1024**3
STALE_TMP_SECONDS = 3600.0


@dataclass(frozen=True)
class StoreConfig:
    """max_bytes: the byte budget (None keeps the store's recorded budget, `DEFAULT_MAX_BYTES` for a new store);
    fsync: flush each entry to disk before publishing it (durability across power loss; crash safety against a
    killed process does not need it, and the checksum turns a torn file after power loss into a miss)."""

    max_bytes: int | None = None
    fsync: bool = True

    def __post_init__(self) -> None:
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {self.max_bytes}")


@dataclass
class VerifyReport:
    checked: int = 0
    ok: int = 0
    corrupt: list[str] = field(default_factory=list)  # keys found corrupt
    quarantined: int = 0
    unquarantined: list[str] = field(default_factory=list)  # corrupt keys that could not be moved away
    adopted: int = 0  # complete files without an index row (a writer killed between rename and commit)
    dropped_rows: int = 0  # index rows without a file (an evictor killed between commit and unlink, or power loss)
    tmp_removed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class DiskKVStore:
    """A `KVStore` in a folder; see the module docstring for the layout and the invariants.

    Thread-safe within a process; any number of processes may read and write one store at the same time.
    `stats()` counts this handle's hits, misses and evictions (what one eval run did) with the whole store's
    entries and bytes; `totals()` gives the store's lifetime counters.
    """

    def __init__(self, path: str | Path, identity: StoreIdentity | None = None,
                 config: StoreConfig | None = None) -> None:
        self.path = Path(path).expanduser()
        self.config = config or StoreConfig()
        self.identity = self._open_manifest(identity)
        for sub in ("objects", "tmp"):
            (self.path / sub).mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path / "index.sqlite", timeout=60.0, isolation_level=None,
                                   check_same_thread=False)
        self._init_db()
        self._session = CacheStats()
        self._tmp_removed_on_open = self.remove_stale_tmp()  # reported by the next verify/gc

    # ------------------------------------------------------------------ opening
    def _open_manifest(self, identity: StoreIdentity | None) -> StoreIdentity:
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            if identity is None:
                raise KvrankError(f"store_dir {self.path}: no KV store there (no {MANIFEST}); create one by warming "
                                  f"it (`kvrank warm --data DIR --store {self.path}`)", param="store_dir")
            known = ("objects", "tmp", "quarantine", "index.sqlite", "basis.safetensors")
            if self.path.is_dir() and any(p.name not in known for p in self.path.iterdir()
                                          if not p.name.startswith(".")):
                raise KvrankError(f"store_dir {self.path}: the folder holds other files and no {MANIFEST}; pass an "
                                  "empty or new folder for a new KV store", param="store_dir")
            self._create_manifest(manifest, identity)
        try:
            recorded = parse_manifest(manifest.read_text(encoding="utf-8"), STORE_KIND)
        except (OSError, ValueError) as err:
            raise KvrankError(f"store_dir {self.path}: unreadable {MANIFEST} ({err}); pass a folder made by "
                              "warming a store (`kvrank warm`)", param="store_dir") from None
        if identity is not None and (refusal := identity_conflict(
                f"store_dir {self.path}", recorded, identity,
                "pass another store_dir folder, or warm a new one (`kvrank warm --store NEW_DIR`)")):
            raise KvrankError(refusal, param="store_dir")
        return recorded

    def _create_manifest(self, manifest: Path, identity: StoreIdentity) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=self.path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(manifest_text(STORE_KIND, identity))
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):  # another process created it first: theirs is checked
                os.link(tmp, manifest)
        finally:
            os.unlink(tmp)

    def _init_db(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._write_txn() as db:
                db.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, bytes INTEGER NOT NULL, "
                           "tokens INTEGER NOT NULL, last_access INTEGER NOT NULL) WITHOUT ROWID")
                db.execute("CREATE INDEX IF NOT EXISTS entries_lru ON entries(last_access)")
                db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) "
                           "WITHOUT ROWID")
                db.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)",
                               [("clock", 0), ("hits", 0), ("misses", 0), ("evictions", 0), ("corrupt", 0),
                                ("max_bytes", DEFAULT_MAX_BYTES)])
                if self.config.max_bytes is not None:
                    db.execute("UPDATE meta SET value = ? WHERE name = 'max_bytes'", (self.config.max_bytes,))

    @contextlib.contextmanager
    def _write_txn(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the index (caller holds `self._lock`); other processes wait for it."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> DiskKVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ KVStore
    def get_many(self, keys: Sequence[KVKey]) -> list[PassageKV | None]:
        """Each key's KV (tensors are zero-copy views of the mapped file) or None; every read is checksummed."""
        out: list[PassageKV | None] = []
        hits: dict[KVKey, tuple[int, int]] = {}
        loaded: dict[KVKey, PassageKV | None] = {}
        corrupt = 0
        for key in keys:
            if key not in loaded:
                try:
                    kv, size = read_entry(self._entry_path(key), key)
                    hits[key] = (size, kv.num_tokens)
                except FileNotFoundError:
                    kv = None
                except CorruptEntry as err:
                    logger.warning("KV store %s: entry %s is corrupt (%s); treating it as a miss and moving it "
                                   "to quarantine/", self.path, key, err)
                    self._quarantine(key)
                    corrupt += 1
                    kv = None
                loaded[key] = kv
            out.append(loaded[key])
        n_hits = sum(kv is not None for kv in out)
        with self._lock:
            with self._write_txn() as db:
                # Files are only unlinked under this lock: one gone now was evicted after we mapped it (our
                # mapping stays valid), and must not get its row back.
                hits = {k: v for k, v in hits.items() if self._entry_path(k).exists()}
                tick = self._tick(db, len(hits))
                # Upsert: a complete file whose row was lost (writer killed after rename) joins the index here.
                db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                               "last_access = excluded.last_access",
                               [(k, s, t, tick + i) for i, (k, (s, t)) in enumerate(hits.items())])
                self._count(db, hits=n_hits, misses=len(out) - n_hits, corrupt=corrupt)
            self._session.hits += n_hits
            self._session.misses += len(out) - n_hits
        return out

    def put(self, kv: PassageKV) -> None:
        self.put_many([kv])

    def put_many(self, kvs: Sequence[PassageKV]) -> list[KVKey]:
        """Store each KV not yet stored (an existing key only becomes most recent); then evict down to the budget.

        An entry larger than the whole budget is not stored. Returns the keys evicted, oldest first.
        """
        max_bytes = self.max_bytes
        fresh: list[tuple[KVKey, int, int]] = []
        touched: list[KVKey] = []
        for kv in kvs:
            path = self._entry_path(kv.key)
            if path.exists():
                touched.append(kv.key)
                continue
            size = entry_nbytes(kv)
            if size > max_bytes:
                logger.info("KV store %s: entry of %d bytes exceeds the budget of %d bytes; not stored",
                            self.path, size, max_bytes)
                continue
            self._write_entry(kv, path)
            fresh.append((kv.key, size, kv.num_tokens))
        with self._lock:
            with self._write_txn() as db:
                # Files are only unlinked under this lock. One that is gone now was evicted (by another writer)
                # after we checked or wrote it: it gets no row, as if stored and evicted at once.
                touched = [k for k in touched if self._entry_path(k).exists()]
                fresh = [f for f in fresh if self._entry_path(f[0]).exists()]
                tick = self._tick(db, len(fresh) + len(touched))
                db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                               "last_access = excluded.last_access, bytes = excluded.bytes, "
                               "tokens = excluded.tokens", [(k, s, t, tick + i) for i, (k, s, t) in enumerate(fresh)])
                db.executemany("UPDATE entries SET last_access = ? WHERE key = ?",
                               [(tick + len(fresh) + i, k) for i, k in enumerate(touched)])
                evicted = self._evict_to(db, max_bytes)
        return evicted

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and is_key(key) and self._entry_path(KVKey(key)).exists()

    def local_contains_many(self, keys: Sequence[KVKey]) -> list[bool]:
        return [key in self for key in keys]

    def stats(self) -> CacheStats:
        with self._lock:
            entries, nbytes, _ = self._sizes()
            return CacheStats(hits=self._session.hits, misses=self._session.misses,
                              evictions=self._session.evictions, entries=entries, bytes=nbytes)

    # ------------------------------------------------------------------ budget and maintenance
    @property
    def max_bytes(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE name = 'max_bytes'").fetchone()[0])

    def evict(self, max_bytes: int) -> list[KVKey]:
        """Shrink to `max_bytes`, least recently used first; returns the evicted keys in eviction order."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        with self._lock:
            with self._write_txn() as db:
                return self._evict_to(db, max_bytes)

    def set_max_bytes(self, max_bytes: int) -> list[KVKey]:
        """Record a new budget and shrink to it; returns the evicted keys."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        with self._lock:
            with self._write_txn() as db:
                db.execute("UPDATE meta SET value = ? WHERE name = 'max_bytes'", (max_bytes,))
                return self._evict_to(db, max_bytes)

    def keys(self) -> list[KVKey]:
        """Indexed keys, least recently used first (the eviction order)."""
        with self._lock:
            return [KVKey(k) for (k,) in self._db.execute("SELECT key FROM entries ORDER BY last_access, key")]

    @property
    def location(self) -> Path:
        return self.path

    def totals(self) -> dict[str, int | float]:
        """The whole store: entries, tokens, bytes, bytes_per_token, budget and lifetime counters."""
        with self._lock:
            entries, nbytes, tokens = self._sizes()
            meta = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
        lifetime = CacheStats(hits=meta["hits"], misses=meta["misses"], evictions=meta["evictions"], entries=entries,
                              bytes=nbytes)
        return store_totals(lifetime, tokens, meta["max_bytes"], meta["corrupt"])

    def verify(self) -> VerifyReport:
        """Read every entry file and check its checksum; quarantine corrupt ones; reconcile index and files."""
        report = VerifyReport(tmp_removed=self._take_tmp_removed())
        report.adopted, report.dropped_rows = self.reconcile()
        for path in self._entry_files():
            key = KVKey(path.stem)
            report.checked += 1
            try:
                read_entry(path, key)
                report.ok += 1
            except FileNotFoundError:  # evicted meanwhile
                report.checked -= 1
            except CorruptEntry as err:
                logger.warning("KV store %s: entry %s is corrupt (%s)", self.path, key, err)
                report.corrupt.append(key)
                if self._quarantine(key):
                    report.quarantined += 1
                else:
                    report.unquarantined.append(key)
        with self._lock, self._write_txn() as db:
            self._count(db, corrupt=len(report.corrupt))
        return report

    def gc(self, max_bytes: int | None = None) -> tuple[list[KVKey], VerifyReport]:
        """Remove stale temporary files, reconcile the index with the files, and evict down to the budget
        (`max_bytes` records a new budget first). Returns the evicted keys and what was reconciled."""
        report = VerifyReport(tmp_removed=self._take_tmp_removed())
        report.adopted, report.dropped_rows = self.reconcile()
        evicted = self.set_max_bytes(max_bytes) if max_bytes is not None else self.evict(self.max_bytes)
        return evicted, report

    def reconcile(self) -> tuple[int, int]:
        """Index complete files that have no row (as least recent) and drop rows whose file is gone."""
        on_disk = {KVKey(p.stem): p for p in self._entry_files()}
        with self._lock, self._write_txn() as db:
            rows = {k for (k,) in db.execute("SELECT key FROM entries")}
            # Re-checked under the lock: a writer may have published a file since the scan.
            gone = [k for k in rows if k not in on_disk and not self._entry_path(k).exists()]
            db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in gone])
            adopt = []
            for key in on_disk.keys() - rows:
                try:
                    adopt.append((key, on_disk[key].stat().st_size, read_tokens(on_disk[key])))
                except (OSError, CorruptEntry):
                    continue  # left for verify to judge
            db.executemany("INSERT OR IGNORE INTO entries VALUES (?, ?, ?, 0)", adopt)
        return len(adopt), len(gone)

    def _take_tmp_removed(self) -> int:
        """Temporary files removed now and, not yet reported, when this handle opened the store."""
        removed, self._tmp_removed_on_open = self._tmp_removed_on_open, 0
        return removed + self.remove_stale_tmp()

    def remove_stale_tmp(self) -> int:
        """Delete temporary files of writers that are no longer running (or older than an hour)."""
        removed = 0
        for tmp in (self.path / "tmp").glob("*.tmp"):
            try:
                pid = int(tmp.name.split(".")[1])
                stale = not pid_alive(pid) or time.time() - tmp.stat().st_mtime > STALE_TMP_SECONDS
            except (ValueError, IndexError, OSError):
                stale = True
            if stale:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                    removed += 1
        return removed

    # ------------------------------------------------------------------ internals
    def _entry_path(self, key: KVKey) -> Path:
        return self.path / entry_name(key)

    def _entry_files(self) -> list[Path]:
        return sorted((self.path / "objects").glob("??/*.safetensors"))

    def _write_entry(self, kv: PassageKV, path: Path) -> None:
        path.parent.mkdir(exist_ok=True)
        tmp = self.path / "tmp" / f"{kv.key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as handle:
                for chunk in encode_entry(kv):
                    handle.write(chunk)
                handle.flush()
                if self.config.fsync:
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def _quarantine(self, key: KVKey) -> bool:
        """Move a corrupt entry out of objects/ so the next put rewrites it; False if it could not be moved."""
        path = self._entry_path(key)
        with self._lock, self._write_txn() as db:  # files leave objects/ only under the index's write lock
            try:
                (self.path / "quarantine").mkdir(exist_ok=True)
                os.replace(path, self.path / "quarantine" / f"{key}.{uuid.uuid4().hex[:8]}.safetensors")
            except FileNotFoundError:
                pass  # another reader moved it first
            except OSError as err:
                logger.warning("KV store %s: could not quarantine %s (%s)", self.path, path, err)
                return False
            db.execute("DELETE FROM entries WHERE key = ?", (key,))
        return True

    def _tick(self, db: sqlite3.Connection, n: int) -> int:
        """Reserve `n` consecutive access times on the store-wide clock; returns the first."""
        (end,) = db.execute("UPDATE meta SET value = value + ? WHERE name = 'clock' RETURNING value", (n,)).fetchone()
        return int(end) - n + 1

    def _count(self, db: sqlite3.Connection, **deltas: int) -> None:
        db.executemany("UPDATE meta SET value = value + ? WHERE name = ?",
                       [(v, k) for k, v in deltas.items() if v])

    def _sizes(self) -> tuple[int, int, int]:
        entries, nbytes, tokens = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0), COALESCE(SUM(tokens), 0) FROM entries").fetchone()
        return int(entries), int(nbytes), int(tokens)

    def _evict_to(self, db: sqlite3.Connection, max_bytes: int) -> list[KVKey]:
        """Drop least-recently-used entries until the store fits; files are unlinked inside the transaction."""
        (total,) = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM entries").fetchone()
        evicted: list[KVKey] = []
        if total <= max_bytes:
            return evicted
        for key, size in db.execute("SELECT key, bytes FROM entries ORDER BY last_access, key").fetchall():
            if total <= max_bytes:
                break
            db.execute("DELETE FROM entries WHERE key = ?", (key,))
            with contextlib.suppress(FileNotFoundError):
                self._entry_path(key).unlink()  # a reader that mapped it keeps its view
            total -= size
            evicted.append(KVKey(key))
        self._count(db, evictions=len(evicted))
        self._session.evictions += len(evicted)
        return evicted
