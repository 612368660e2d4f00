"""The disk KV store: exact hits and LRU eviction order, checksums, identity refusal, warm, and the CLI."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest_models import tiny_lm
from safetensors import safe_open
from typer.testing import CliRunner

from kvrank.cli import app
from kvrank.errors import KvrankError
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.store.disk import (
    DiskKVStore,
    StoreConfig,
    StoreIdentity,
    entry_nbytes,
    read_entry,
)
from kvrank.store.kv import KVStore, MemoryKVStore, PassageKV, kv_key
from kvrank.store.warm import warm
from kvrank.types import Passage

IDENTITY = StoreIdentity(fingerprint="model-a", storage_tag="dtype=float16", model="synthetic")
PASSAGES = [Passage(f"d{i}", f"Title {i}", f"Passage {i} is about topic {i % 3} and number {i * 7}.")
            for i in range(10)]


def entry(name: str, tokens: int = 4, layers: int = 2) -> PassageKV:
    """A synthetic passage KV whose values depend on the name: (Hkv=2, T, D=8) per layer."""
    key = kv_key("model-a", [1, 2], [ord(c) for c in name], "dtype=float16")
    seed = sum(map(ord, name))
    ks = [(torch.arange(2 * tokens * 8).reshape(2, tokens, 8) % 97 + seed + layer).half() for layer in range(layers)]
    vs = [-(k + 0.5) for k in ks]
    return PassageKV(key=key, keys=ks, values=vs)


def same(a: PassageKV | None, b: PassageKV) -> bool:
    return a is not None and a.key == b.key and all(
        torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True))


def open_store(path: Path, max_bytes: int | None = None) -> DiskKVStore:
    return DiskKVStore(path, IDENTITY, StoreConfig(max_bytes=max_bytes))


# ---------------------------------------------------------------------- format and basic behaviour
def test_entries_round_trip_as_standard_safetensors_views_of_the_file(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    assert isinstance(store, KVStore)
    a = entry("a", tokens=5)
    store.put(a)
    got = store.get_many([a.key])[0]
    assert same(got, a) and a.key in store and entry("b").key not in store
    assert "../escape" not in store and 7 not in store  # not keys: never a path outside objects/
    path = tmp_path / "s" / "objects" / a.key[:2] / f"{a.key}.safetensors"
    assert path.stat().st_size == entry_nbytes(a)
    with safe_open(str(path), "pt") as handle:  # any safetensors reader can open an entry
        assert handle.metadata()["kvrank.key"] == a.key
        assert torch.equal(handle.get_tensor("v.1"), a.values[1])
    got.keys[0].zero_()  # a private mapping: writing a served tensor never reaches the file
    assert same(store.get_many([a.key])[0], a)


def test_hits_misses_and_lru_eviction_order_persist_across_handles(tmp_path: Path) -> None:
    a, b, c, d = (entry(x) for x in "abcd")
    size = entry_nbytes(a)
    store = open_store(tmp_path / "s", max_bytes=3 * size)
    for e in (a, b, c):
        store.put(e)
    got = store.get_many([a.key, d.key])  # a becomes most recent
    assert same(got[0], a) and got[1] is None
    assert store.put_many([d]) == [b.key]  # over budget: b (least recently used) goes, not a
    assert store.keys() == [c.key, a.key, d.key]
    other = open_store(tmp_path / "s")  # a second handle (another process) sees the same order and budget
    assert other.max_bytes == 3 * size and other.keys() == [c.key, a.key, d.key]
    other.get_many([c.key])  # recency is shared: c is now the most recent
    assert store.evict(size) == [a.key, d.key]
    assert [k for k in (a.key, b.key, c.key, d.key) if k in store] == [c.key]
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.entries, stats.bytes) == (1, 1, 3, 1, size)
    totals = store.totals()
    assert (totals["hits"], totals["misses"], totals["evictions"], totals["entries"]) == (2, 1, 3, 1)
    assert totals["tokens"] == 4 and totals["bytes_per_token"] == round(size / 4, 1)


def test_putting_an_existing_key_only_refreshes_it_and_oversized_entries_are_skipped(tmp_path: Path) -> None:
    a, b = entry("a"), entry("b")
    store = open_store(tmp_path / "s", max_bytes=2 * entry_nbytes(a))
    store.put_many([a, b])
    store.put(a)  # a refreshed: b is now the oldest
    assert store.keys() == [b.key, a.key]
    big = entry("big", tokens=64)
    store.put(big)
    assert big.key not in store and store.keys() == [b.key, a.key]


def test_eviction_never_takes_bytes_from_a_reader(tmp_path: Path) -> None:
    a = entry("a", tokens=32)
    writer, reader = open_store(tmp_path / "s"), open_store(tmp_path / "s")
    writer.put(a)
    held = reader.get_many([a.key])[0]
    assert writer.evict(0) == [a.key]
    assert a.key not in reader and reader.get_many([a.key]) == [None]
    assert same(held, a)  # the reader's mapping outlives the unlinked file



def test_local_contains_many_is_membership_that_counts_nothing_and_keeps_the_lru_order(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    a, b = entry("a"), entry("b")
    store.put_many([a, b])
    assert store.local_contains_many([a.key, entry("c").key, b.key]) == [True, False, True]
    stats = store.stats()
    assert (stats.hits, stats.misses) == (0, 0)
    assert store.keys() == [a.key, b.key]  # a stays the least recently used

# ---------------------------------------------------------------------- corruption
def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["first data byte", "middle data byte", "last data byte"])
def test_a_flipped_data_byte_is_a_miss_a_warning_and_a_quarantined_file(tmp_path: Path, where: str,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    store = open_store(tmp_path / "s")
    a = entry("a", tokens=16)
    store.put(a)
    path = store._entry_path(a.key)
    size = path.stat().st_size
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    flip(path, {"first data byte": header, "middle data byte": (header + size) // 2, "last data byte": size - 1}[where])
    with caplog.at_level(logging.WARNING):
        assert store.get_many([a.key]) == [None]
    assert "corrupt" in caplog.text and a.key in caplog.text
    assert not path.exists() and len(list((tmp_path / "s" / "quarantine").iterdir())) == 1
    assert store.totals()["corrupt"] == 1 and store.stats().misses == 1
    store.put(a)  # the next writer stores a good copy again
    assert same(store.get_many([a.key])[0], a)


def test_any_flipped_byte_is_never_served_as_other_data(tmp_path: Path) -> None:
    """Flip each byte of a small entry's header and a sample of its data: a read is a miss or the exact KV."""
    a = entry("a", tokens=2, layers=1)
    store = open_store(tmp_path / "s")
    store.put(a)
    path = store._entry_path(a.key)
    good = path.read_bytes()
    offsets = list(range(0, len(good) - 64)) + list(range(len(good) - 64, len(good), 7))
    misses = 0
    for offset in offsets:
        data = bytearray(good)
        data[offset] ^= 0x20
        path.write_bytes(bytes(data))
        try:
            got, _ = read_entry(path, a.key)
            assert same(got, a), f"byte {offset} flipped: wrong KV served"
        except Exception as err:  # noqa: BLE001 - any refusal is a miss for the store
            assert type(err).__name__ == "CorruptEntry", (offset, err)
            misses += 1
    assert misses >= 0.9 * len(offsets)  # only a few header bytes are harmless to flip


def test_verify_quarantines_corrupt_entries_and_fails_when_it_cannot(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    a, b, c = entry("a"), entry("b"), entry("c")
    store.put_many([a, b, c])
    flip(store._entry_path(b.key), -1)
    report = store.verify()
    assert (report.checked, report.ok, report.corrupt, report.quarantined) == (3, 2, [b.key], 1)
    assert store.keys() == [a.key, c.key] and not report.unquarantined
    flip(store._entry_path(c.key), -1)
    shutil.rmtree(tmp_path / "s" / "quarantine")
    (tmp_path / "s" / "quarantine").write_text("not a folder")  # the move now fails
    report = store.verify()
    assert report.corrupt == [c.key] and report.unquarantined == [c.key]


def test_torn_and_orphaned_files_are_cleaned_up(tmp_path: Path) -> None:
    """What a writer killed mid-way, or a power loss, can leave behind: none of it is ever served."""
    store = open_store(tmp_path / "s")
    a, b, c = entry("a", tokens=8), entry("b", tokens=8), entry("c", tokens=8)
    store.put_many([a, b])
    dead_tmp = tmp_path / "s" / "tmp" / f"{c.key}.999999999.abcd.tmp"  # a writer that no longer runs
    dead_tmp.write_bytes(store._entry_path(a.key).read_bytes()[:100])
    torn = store._entry_path(b.key)
    torn.write_bytes(torn.read_bytes()[:-10])  # a truncated entry under its final name
    store._entry_path(c.key).parent.mkdir(exist_ok=True)
    store.put(c)
    store._db.execute("DELETE FROM entries WHERE key = ?", (c.key,))  # file renamed, row never committed
    assert store.get_many([b.key]) == [None]
    reopened = open_store(tmp_path / "s")
    assert not dead_tmp.exists()  # removed on opening, and counted by the first verify
    report = reopened.verify()
    assert report.adopted == 1 and report.ok == 2 and report.corrupt == []  # b was quarantined by the read
    assert report.tmp_removed == 1 and reopened.verify().tmp_removed == 0
    assert set(reopened.keys()) == {a.key, c.key} and same(reopened.get_many([c.key])[0], c)


# ---------------------------------------------------------------------- identity
def test_a_store_of_another_model_or_storage_setting_is_refused(tmp_path: Path) -> None:
    open_store(tmp_path / "s").put(entry("a"))
    with pytest.raises(KvrankError, match="another model or storage setting.*fingerprint 'model-a' != 'model-b'"):
        DiskKVStore(tmp_path / "s", StoreIdentity("model-b", "dtype=float16"))
    with pytest.raises(KvrankError, match="storage_tag"):
        DiskKVStore(tmp_path / "s", StoreIdentity("model-a", "dtype=float32"))
    with pytest.raises(KvrankError, match="no KV store there"):
        DiskKVStore(tmp_path / "nothing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(KvrankError, match="holds other files"):
        open_store(tmp_path / "other")
    assert DiskKVStore(tmp_path / "s").identity == IDENTITY  # tools open a store as it is


# ---------------------------------------------------------------------- with a model
@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


def reranker(lm, store) -> BlockReranker:
    return BlockReranker(RerankerConfig(kv_format="none", mode="ql", batch_size=4), store=store, lm=lm)


def identity_of(rr: BlockReranker) -> StoreIdentity:
    return StoreIdentity(rr.engine.fingerprint, rr.storage_tag, model=rr.lm.name)


def test_warm_stores_exactly_what_the_reranker_looks_up(tmp_path: Path, lm) -> None:
    fresh = reranker(lm, MemoryKVStore())
    expected = fresh.score("topic one", PASSAGES)
    store = DiskKVStore(tmp_path / "s", identity_of(fresh))
    result = warm(reranker(lm, store), PASSAGES)
    assert (result.prefilled, result.skipped) == (10, 0) and result.tokens == store.totals()["tokens"]
    again = warm(reranker(lm, store), PASSAGES + PASSAGES[:2])  # resumable: nothing left to do
    assert (again.prefilled, again.skipped) == (0, 12)
    served = reranker(lm, DiskKVStore(tmp_path / "s", identity_of(fresh)))  # a later process
    assert served.score("topic one", PASSAGES) == expected  # the same fp16 bytes: identical scores
    assert served.prefills == 0 and served.store.stats().hits == 10
    other_template = BlockReranker(RerankerConfig(kv_format="none",
                                                  mode="yesno", batch_size=4), store=served.store, lm=lm)
    other_template.score("topic one", PASSAGES)  # another prompt prefix: other keys, so misses, never ql's KV
    assert other_template.prefills == 10 and served.store.stats().hits == 10


def test_kv_of_another_model_is_never_used(tmp_path: Path, lm) -> None:
    other_lm = tiny_lm("llama", seed=1)  # same architecture, other weights
    rr_a = reranker(lm, DiskKVStore(tmp_path / "a", identity_of(reranker(lm, MemoryKVStore()))))
    warm(rr_a, PASSAGES)
    fresh_b = reranker(other_lm, MemoryKVStore())
    with pytest.raises(KvrankError, match="fingerprint"):
        DiskKVStore(tmp_path / "a", identity_of(fresh_b))
    store_b = DiskKVStore(tmp_path / "b", identity_of(fresh_b))
    shutil.copytree(tmp_path / "a" / "objects", tmp_path / "b" / "objects", dirs_exist_ok=True)  # files mixed up
    rr_b = reranker(other_lm, store_b)
    assert rr_b.score("topic one", PASSAGES) == fresh_b.score("topic one", PASSAGES)
    assert rr_b.prefills == 10 and store_b.stats().hits == 0  # keys hash the model: A's files never match


# ---------------------------------------------------------------------- CLI
def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_warm_stats_verify_gc_and_eval(tmp_path: Path, tiny_beir: Path, tiny_checkpoint: Path) -> None:
    store = tmp_path / "store"
    first = invoke("warm", "--data", tiny_beir, "--store", store, "--model", tiny_checkpoint, "--max-docs", 6)
    assert first.exit_code == 0, first.output
    assert "warmed 6 passages (0 already stored)" in first.output and "tokens/s" in first.output
    assert "bytes/token" in first.output
    second = invoke("warm", "--data", tiny_beir, "--store", store, "--model", tiny_checkpoint)
    assert second.exit_code == 0 and "warmed 2 passages (6 already stored)" in second.output, second.output

    stats = invoke("store", "stats", "--store", store, "--json")
    assert stats.exit_code == 0, stats.output
    totals = json.loads(stats.output)
    assert totals["entries"] == 8 and totals["tokens"] > 0 and totals["bytes"] > 0
    assert totals["bytes_per_token"] == round(totals["bytes"] / totals["tokens"], 1)
    assert {"hits", "misses", "evictions"} <= totals.keys()

    out = tmp_path / "eval.json"
    args = ("eval", "--data", tiny_beir, "--rerank", "ql", "--model", tiny_checkpoint, "--store", store,
            "--retriever", "bm25", "--k", 8, "--rerank-depth", 8)
    result = invoke(*args, "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["prefills"] == 0 and report["kv_cache"]["hit_rate"] == 1.0
    assert report["kv_store"]["entries"] == 8

    entry_file = next((store / "objects").glob("*/*.safetensors"))
    flip(entry_file, -1)
    check = invoke("store", "verify", "--store", store)
    assert check.exit_code == 3 and "1 corrupt (1 quarantined)" in check.output, check.output  # found, repaired
    clean = invoke("store", "verify", "--store", store)
    assert clean.exit_code == 0 and " 0 corrupt" in clean.output, clean.output
    flip(next((store / "objects").glob("*/*.safetensors")), -1)
    shutil.rmtree(store / "quarantine")
    (store / "quarantine").write_text("")
    check = invoke("store", "verify", "--store", store)
    assert check.exit_code == 1 and "could not be moved" in check.output, check.output

    gc = invoke("store", "gc", "--store", store, "--max-bytes", "0")
    assert gc.exit_code == 0 and "now 0 entries" in gc.output, gc.output
    missing = invoke("store", "stats", "--store", tmp_path / "none")
    assert missing.exit_code == 2 and "no KV store there" in missing.output


def test_cli_verify_counts_removed_temporary_files_and_names_a_bad_manifest_once(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    store.put(entry("a"))
    store.close()
    for i in range(3):  # temporary files of writers that no longer run
        (tmp_path / "s" / "tmp" / f"{entry('a').key}.999999999.{i:04d}.tmp").write_bytes(b"partial")
    check = invoke("store", "verify", "--store", tmp_path / "s")
    assert check.exit_code == 0 and "removed 3 temporary files" in check.output, check.output
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    for command in ("verify", "stats", "gc"):
        bad = invoke("store", command, "--store", tmp_path / "s")
        assert bad.exit_code == 2 and bad.output.count("unreadable manifest.json") == 1, bad.output


def test_cli_warm_within_a_small_budget_evicts_and_says_so(tmp_path: Path, tiny_beir: Path,
                                                           tiny_checkpoint: Path) -> None:
    result = invoke("warm", "--data", tiny_beir, "--store", tmp_path / "s", "--model", tiny_checkpoint,
                    "--max-bytes", "40K")
    assert result.exit_code == 0, result.output
    assert "were evicted to stay within the budget of 40.0 KiB" in result.output
    totals = json.loads(invoke("store", "stats", "--store", tmp_path / "s", "--json").output)
    assert 0 < totals["entries"] < 8 and totals["bytes"] <= 40 * 1024 and totals["max_bytes"] == 40 * 1024
    assert totals["evictions"] == 8 - totals["entries"]
    bad = invoke("warm", "--data", tiny_beir, "--store", tmp_path / "s", "--max-bytes", "lots")
    assert bad.exit_code == 2 and "'lots' is not a size" in bad.output
