"""The remote tier and the tiered store, over file:// and a real S3-protocol server (moto's, on 127.0.0.1).

Each core test runs against both: read-through with zero prefills and identical scores, writes to both tiers with
identical bytes, concurrent writers and openers of one key, corrupt objects never served, identity refusal, the
shared basis of a fitted format, and the `kvrank store` commands.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_disk_store import PASSAGES, entry, invoke, same

from kvrank.errors import KvrankError
from kvrank.pipeline import PipelineConfig, build_reranker
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.store.codec import encode_entry_bytes, entry_name
from kvrank.store.disk import DiskKVStore, StoreConfig
from kvrank.store.formats import BASIS_FILE, basis_bytes, parse_basis, resolve_basis
from kvrank.store.kv import KVStore, MemoryKVStore, PassageKV, StoreIdentity
from kvrank.store.remote import RemoteFolder, RemoteTier
from kvrank.store.tiered import TieredKVStore
from kvrank.store.warm import warm

IDENTITY = StoreIdentity(fingerprint="model-a", storage_tag="dtype=float16", model="synthetic")
BUCKET = "kvrank-test"
QUERY = "topic one"
NO_FSYNC = StoreConfig(fsync=False)


# ---------------------------------------------------------------------- the two backends
@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free port of 127.0.0.1 with one bucket; s3fs finds it through AWS_ENDPOINT_URL."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield env["AWS_ENDPOINT_URL"]
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(params=["file", "s3"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty remote location for each test, on each backend."""
    if request.param == "file":
        return f"file://{tmp_path}/remote"
    request.getfixturevalue("s3_server")
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def object_bytes(url: str, name: str) -> bytes:
    data = RemoteFolder(url).read(name)
    assert data is not None, f"{name} is not in {url}"
    return data


def overwrite(url: str, name: str, data: bytes) -> None:
    """Replace an object's bytes behind the tier's back (what bit rot or a torn upload would leave)."""
    folder = RemoteFolder(url)
    folder.fs.pipe_file(folder.path(name), data)


# ---------------------------------------------------------------------- the tier alone
def test_entries_round_trip_with_the_disk_stores_bytes_and_are_written_once(url: str, tmp_path: Path) -> None:
    tier = RemoteTier(url, IDENTITY)
    a, b = entry("a", tokens=6), entry("b")
    assert tier.put_many([a, b, a]) == 2 and tier.put_many([a]) == 0  # immutable: a second put writes nothing
    got = tier.get_many([a.key, entry("c").key, a.key])
    assert same(got[0], a) and got[1] is None and same(got[2], a)
    assert a.key in tier and entry("c").key not in tier and "../escape" not in tier
    disk = DiskKVStore(tmp_path / "disk", IDENTITY, NO_FSYNC)
    disk.put(a)
    assert object_bytes(url, entry_name(a.key)) == (tmp_path / "disk" / entry_name(a.key)).read_bytes()
    counters = tier.counters
    assert (counters.hits, counters.misses, counters.uploaded, counters.present, counters.corrupt) == (2, 1, 2, 1, 0)
    assert counters.bytes_written == len(encode_entry_bytes(a)) + len(encode_entry_bytes(b))
    assert counters.bytes_read == len(encode_entry_bytes(a))  # fetched once per call, even when asked twice
    got[0].keys[0].zero_()  # served tensors are the caller's copy
    assert same(tier.get_many([a.key])[0], a)


@pytest.mark.parametrize("damage", ["flipped data byte", "truncated", "bad header"])
def test_a_corrupt_object_is_quarantined_counted_and_never_served(url: str, damage: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    tier = RemoteTier(url, IDENTITY)
    a, b = entry("a", tokens=16), entry("b")
    tier.put_many([a, b])
    good = object_bytes(url, entry_name(a.key))
    bad = {"flipped data byte": good[:-3] + bytes([good[-3] ^ 0x10]) + good[-2:],
           "truncated": good[: len(good) // 2],
           "bad header": (len(good)).to_bytes(8, "little") + good[8:]}[damage]
    overwrite(url, entry_name(a.key), bad)
    with caplog.at_level(logging.WARNING):
        assert tier.get_many([a.key, b.key])[0] is None
    assert "corrupt" in caplog.text and a.key in caplog.text
    assert a.key not in tier and tier.counters.corrupt == 1 and tier.counters.misses == 1
    assert tier.scan().quarantined == 1
    assert tier.put_many([a]) == 1 and same(tier.get_many([a.key])[0], a)  # the next writer stores a good copy
    assert tier.verify().ok == 2


def test_two_writers_of_one_key_leave_one_complete_copy(url: str) -> None:
    """Four nodes store the same 12 keys at once, each with its own bytes (prefill on another machine may round
    differently): every object is one writer's complete entry, and every reader sees that one."""
    writers, keys = 4, [f"k{i}" for i in range(12)]

    def node_entry(name: str, node: int) -> PassageKV:
        kv = entry(name)
        return PassageKV(kv.key, [k + node for k in kv.keys], [v - node for v in kv.values])

    tiers = [RemoteTier(url, IDENTITY, storage_options={"skip_instance_cache": True}) for _ in range(writers)]
    start = threading.Barrier(writers)
    written = [0] * writers

    def write(node: int) -> None:
        start.wait()
        for name in keys:
            written[node] += tiers[node].put_many([node_entry(name, node)])

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counters = [t.counters for t in tiers]
    assert sum(c.uploaded + c.present for c in counters) == writers * len(keys) and sum(c.errors for c in counters) == 0
    if url.startswith("file://"):  # link() is atomic; moto's server does not serialise its If-None-Match check
        assert sum(written) == len(keys)
    for name in keys:
        stored = object_bytes(url, entry_name(entry(name).key))
        assert stored in {encode_entry_bytes(node_entry(name, n)) for n in range(writers)}, name
        views = [t.get_many([entry(name).key])[0] for t in tiers]
        assert all(v is not None and views[0] is not None and same(v, views[0]) for v in views)


def test_the_manifest_is_created_once_and_another_identity_is_refused(url: str, tmp_path: Path) -> None:
    other = StoreIdentity(fingerprint="model-b", storage_tag="dtype=float16", model="other")
    opened: list[StoreIdentity] = []
    refused: list[str] = []
    start = threading.Barrier(6)

    def open_as(identity: StoreIdentity) -> None:
        start.wait()
        try:
            opened.append(RemoteTier(url, identity, storage_options={"skip_instance_cache": True}).identity)
        except KvrankError as err:
            refused.append(str(err))

    threads = [threading.Thread(target=open_as, args=(IDENTITY if i % 2 else other,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorded = RemoteTier(url).identity  # the tools open a tier as it is
    assert len(opened) == 3 and set(opened) == {recorded} and len(refused) == 3
    loser = other if recorded == IDENTITY else IDENTITY
    assert all(f"remote_store {url} holds KV of another model" in e and "another remote_store URL" in e
               and f"{recorded.fingerprint!r} != {loser.fingerprint!r}" in e for e in refused), refused[0]
    local = MemoryKVStore(identity=loser)
    with pytest.raises(KvrankError, match="different models or storage settings"):
        TieredKVStore(local, RemoteTier(url))


def test_gc_deletes_quarantined_objects_and_temporary_files_of_dead_writers_only(tmp_path: Path) -> None:
    from kvrank.store.remote import _host

    url = f"file://{tmp_path}/remote"
    tier = RemoteTier(url, IDENTITY)
    a = entry("a")
    tier.put_many([a])
    tmp = tmp_path / "remote" / "tmp"
    dead = tmp / f"{a.key}.safetensors.{_host()}.999999999.abcd1234.tmp"  # a writer killed mid-way
    alive = tmp / f"{a.key}.safetensors.{_host()}.{os.getpid()}.abcd1234.tmp"  # one writing now
    elsewhere = tmp / f"{a.key}.safetensors.other-node.999999999.abcd1234.tmp"  # its pid means nothing here
    for path in (dead, alive, elsewhere):
        path.write_bytes(b"partial")
    overwrite(url, entry_name(a.key), b"torn")
    assert tier.get_many([a.key]) == [None] and tier.scan().quarantined == 1
    assert tier.gc() == (1, 1)
    assert not dead.exists() and alive.exists() and elsewhere.exists() and tier.scan().quarantined == 0
    old = time.time() - 2 * 3600
    os.utime(elsewhere, (old, old))  # an hour-old file is stale on any host
    assert tier.gc() == (0, 1) and not elsewhere.exists() and alive.exists()


def test_a_disk_store_folder_or_an_empty_url_is_not_a_remote_tier(tmp_path: Path) -> None:
    DiskKVStore(tmp_path / "disk", IDENTITY, NO_FSYNC)
    with pytest.raises(KvrankError, match="unreadable manifest.json .*kind 'kvrank-kv-store'"):
        RemoteTier(f"file://{tmp_path}/disk", IDENTITY)
    with pytest.raises(KvrankError, match="no remote KV store there.*kvrank warm"):
        RemoteTier(f"file://{tmp_path}/nothing")


@pytest.mark.parametrize("bad, message", [
    ("stores/shared", "'stores/shared' is not a URL; write it with its protocol"),
    ("s3://", "is not a URL"),
    ("nosuch://bucket/kv", "nosuch://bucket/kv: Protocol not known: nosuch; use s3://"),
    ("gs://bucket/kv", "protocol 'gs' needs a package that is not installed"),  # gcsfs is not installed here
])
def test_bad_urls_are_one_line_errors_naming_the_value(bad: str, message: str) -> None:
    pytest.importorskip("fsspec")
    if bad.startswith("gs://") and "gcsfs" in sys.modules:
        pytest.skip("gcsfs is installed")
    with pytest.raises(KvrankError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RemoteTier(bad, IDENTITY)


def test_an_unreachable_bucket_is_an_error_at_open_and_fsspec_is_only_needed_for_a_remote(
        s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KvrankError, match="s3://no-such-bucket/kv: cannot open it .*bucket or folder exists"):
        RemoteTier("s3://no-such-bucket/kv", IDENTITY)
    for module in ("fsspec", "fsspec.core"):  # a single-machine install without the ray extra
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(KvrankError, match=r"needs fsspec, which is not installed: pip install 'kvrank\[ray\]'"):
        RemoteTier(f"s3://{BUCKET}/kv", IDENTITY)


def test_importing_kvrank_does_not_import_fsspec() -> None:
    """The command line and the store modules (the remote tier's included) import fsspec only to open a remote.
    (`kvrank.pipeline` adds transformers' seconds of import time and imports the store modules checked here.)"""
    code = ("import sys, kvrank.cli, kvrank.store.tiered, kvrank.store.formats; "
            "assert 'fsspec' not in sys.modules, 'fsspec imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------------- the tiered store
def test_tiered_reads_local_then_remote_then_miss_and_writes_both(url: str, tmp_path: Path) -> None:
    a, b, c = entry("a"), entry("b"), entry("c")
    node1 = TieredKVStore(DiskKVStore(tmp_path / "n1", IDENTITY, NO_FSYNC), RemoteTier(url, IDENTITY))
    assert isinstance(node1, KVStore)
    node1.put_many([a, b])
    for key in (a.key, b.key):  # written to both tiers, byte for byte the same entry file
        assert (tmp_path / "n1" / entry_name(key)).read_bytes() == object_bytes(url, entry_name(key))
    node2 = TieredKVStore(DiskKVStore(tmp_path / "n2", IDENTITY, NO_FSYNC), RemoteTier(url, IDENTITY))
    got = node2.get_many([a.key, c.key, a.key])
    assert same(got[0], a) and got[1] is None and same(got[2], a)
    assert a.key in node2.local and b.key not in node2.local  # copied into the local tier on the way
    assert (tmp_path / "n2" / entry_name(a.key)).read_bytes() == object_bytes(url, entry_name(a.key))
    assert same(node2.get_many([a.key])[0], a)  # now a local hit
    stats = node2.stats().as_dict()
    assert (stats["hits"], stats["misses"], stats["local_hits"]) == (3, 1, 1)
    assert (stats["remote"]["hits"], stats["remote"]["misses"]) == (2, 1)
    assert stats["remote"]["bytes_read"] == len(encode_entry_bytes(a))
    assert b.key in node2 and c.key not in node2
    totals = node2.totals()
    assert totals["entries"] == 1 and totals["remote"]["url"] == url


@pytest.fixture(scope="module")
def lm():
    from conftest_models import tiny_lm

    return tiny_lm("llama")


def node(lm, url: str | None, store: Path | None, kv_format: str = "int8", calibration=PASSAGES) -> BlockReranker:
    """What one node builds (`build_reranker`): its own store folder (or memory), the shared remote tier."""
    config = PipelineConfig(reranker=RerankerConfig(mode="ql", batch_size=4), kv_format=kv_format, store_dir=store,
                            store_config=NO_FSYNC, remote_store=url, calibration_passages=len(calibration) or 1)
    return build_reranker(config, list(calibration), lm=lm)


def test_a_fresh_node_reads_through_the_warm_remote_with_zero_prefills_and_identical_scores(
        url: str, tmp_path: Path, lm) -> None:
    alone = node(lm, None, None)  # no remote at all: the reference
    expected = alone.score(QUERY, PASSAGES)
    first = node(lm, url, tmp_path / "node1")
    assert warm(first, PASSAGES).prefilled == len(PASSAGES)
    fresh = node(lm, url, None)  # another machine: nothing local, memory only
    assert fresh.score(QUERY, PASSAGES) == expected
    assert fresh.prefills == 0
    stats = fresh.store.stats()
    assert stats.remote is not None and stats.remote.hits == len(PASSAGES) and stats.misses == 0
    assert fresh.score(QUERY, PASSAGES) == expected and fresh.store.stats().remote.hits == len(PASSAGES)  # local now


def test_a_corrupt_remote_entry_is_recomputed_and_replaced_not_served(url: str, tmp_path: Path, lm) -> None:
    expected = node(lm, None, None).score(QUERY, PASSAGES)
    warm(node(lm, url, tmp_path / "node1"), PASSAGES)
    victim = node(lm, None, None).passage_keys(PASSAGES[3:4])[1][0]
    good = object_bytes(url, entry_name(victim))
    overwrite(url, entry_name(victim), good[:-1] + bytes([good[-1] ^ 0x01]))
    fresh = node(lm, url, tmp_path / "node2")
    assert fresh.score(QUERY, PASSAGES) == expected
    assert fresh.prefills == 1 and fresh.store.stats().remote.corrupt == 1
    assert object_bytes(url, entry_name(victim)) == good  # recomputed, stored again, the same bytes
    assert RemoteTier(url).verify().ok == len(PASSAGES)


def test_a_remote_of_another_model_is_refused_before_any_work(url: str, tmp_path: Path, lm) -> None:
    from conftest_models import tiny_lm

    warm(node(lm, url, None), PASSAGES[:2])
    with pytest.raises(KvrankError, match=f"remote_store {url} holds KV of another model.*fingerprint"):
        node(tiny_lm("llama", seed=1), url, tmp_path / "other")
    assert not (tmp_path / "other" / "manifest.json").exists()  # refused before its own store was created
    with pytest.raises(KvrankError, match=f"remote_store {url} holds KV in format 'int8', not kv_format 'none'"):
        node(lm, url, None, kv_format="none")


def test_a_fitted_formats_basis_is_shared_first_writer_wins(url: str, tmp_path: Path, lm) -> None:
    first = node(lm, url, tmp_path / "node1", kv_format="rank8+int8")
    shared = object_bytes(url, BASIS_FILE)
    assert (tmp_path / "node1" / BASIS_FILE).read_bytes() == shared
    warm(first, PASSAGES)
    second = node(lm, url, tmp_path / "node2", kv_format="rank8+int8", calibration=())  # could not fit: none given
    assert (tmp_path / "node2" / BASIS_FILE).read_bytes() == shared  # the same bytes on every node
    assert second.storage_tag == first.storage_tag
    assert second.score(QUERY, PASSAGES) == first.score(QUERY, PASSAGES) and second.prefills == 0
    implicit = node(lm, url, None, kv_format=None, calibration=())  # no --kv-format: the remote's own
    assert implicit.config.format.name == "rank8+int8" and implicit.storage_tag == first.storage_tag


def test_a_node_that_fitted_while_another_uploaded_takes_the_uploaded_basis(url: str, tmp_path: Path, lm) -> None:
    from kvrank.attention.kvformat import KVFormat
    from kvrank.reranker.reranker import fit_format_basis

    fmt = KVFormat.parse("rank8")
    config = RerankerConfig(kv_format="rank8")
    theirs = basis_bytes(fmt, fit_format_basis(config, lm, PASSAGES[5:]))
    folder = RemoteFolder(url)

    def fit_while_another_node_uploads(passages):
        assert folder.create(BASIS_FILE, theirs)  # the other node finishes first
        return fit_format_basis(config, lm, passages)

    basis = resolve_basis(fmt, tmp_path / "node", PASSAGES[:5], fit_while_another_node_uploads, remote=folder)
    want = parse_basis(theirs)[0]
    assert basis is not None and basis.keys() == want.keys()
    assert all(torch.equal(basis[name], want[name]) for name in want)
    assert (tmp_path / "node" / BASIS_FILE).read_bytes() == theirs == object_bytes(url, BASIS_FILE)


# ---------------------------------------------------------------------- the command line and the API's settings
def test_cli_warm_eval_stats_verify_gc_with_a_remote_store(url: str, tmp_path: Path, tiny_beir: Path,
                                                           tiny_checkpoint: Path) -> None:
    warmed = invoke("warm", "--data", tiny_beir, "--remote-store", url, "--model", tiny_checkpoint)
    assert warmed.exit_code == 0, warmed.output
    assert "store in memory" in warmed.output and "uploaded 8 entries" in warmed.output

    out = tmp_path / "eval.json"
    result = invoke("eval", "--data", tiny_beir, "--rerank", "ql", "--model", tiny_checkpoint, "--store",
                    tmp_path / "n2", "--remote-store", url, "--retriever", "bm25", "--k", 8, "--rerank-depth", 8,
                    "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["prefills"] == 0 and report["kv_cache"]["misses"] == 0 and report["settings"]["remote_store"] == url
    # each passage came from the remote once, into the new local store; repeats across queries were local hits
    assert report["kv_cache"]["remote"]["hits"] == report["kv_store"]["entries"] > 0

    stats = invoke("store", "stats", "--store", tmp_path / "n2", "--remote-store", url, "--json")
    assert stats.exit_code == 0, stats.output
    remote = json.loads(stats.output)["remote"]
    assert (remote["url"], remote["entries"], remote["quarantined"]) == (url, 8, 0) and remote["bytes"] > 0

    name = sorted(RemoteFolder(url).listing("objects"))[0]
    overwrite(url, name, object_bytes(url, name)[:-5])
    check = invoke("store", "verify", "--remote-store", url)
    assert check.exit_code == 3 and "checked 8 entries: 7 ok, 1 corrupt (1 quarantined)" in check.output, check.output
    gc = invoke("store", "gc", "--remote-store", url)
    assert gc.exit_code == 0 and "deleted 1 quarantined objects" in gc.output, gc.output
    assert json.loads(invoke("store", "stats", "--remote-store", url, "--json").output)["remote"]["entries"] == 7


def test_cli_refuses_bad_remote_urls_and_missing_stores_in_one_line(tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    bad = invoke("store", "stats", "--remote-store", "nosuch://x/y")
    assert bad.exit_code == 2 and "error: --remote-store nosuch://x/y: Protocol not known" in bad.output
    assert "Traceback" not in bad.output
    none = invoke("store", "verify")
    assert none.exit_code == 2 and "pass --store DIR, --remote-store URL, or both" in none.output
    from typer.testing import CliRunner

    from kvrank.cli import app

    from_env = CliRunner().invoke(app, ["store", "stats"], env={"KVRANK_REMOTE_STORE": f"file://{tmp_path}/nothing"})
    assert from_env.exit_code == 2 and "no remote KV store there" in from_env.output


def test_the_api_settings_pass_the_remote_store_to_the_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvrank.api.server import pipeline_config
    from kvrank.api.settings import Settings

    monkeypatch.setenv("KVRANK_REMOTE_STORE", "s3://bucket/kv")
    assert pipeline_config(Settings()).remote_store == "s3://bucket/kv"
    assert pipeline_config(Settings(remote_store="file:///mnt/kv")).remote_store == "file:///mnt/kv"
