"""The disk KV store under crashes and concurrency: a writer SIGKILLed at random points, again and again; several
reader processes with two writers of the same keys."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import store_workers
import torch
from conftest_models import tiny_lm

from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.store.disk import DiskKVStore, StoreConfig, StoreIdentity, entry_nbytes, read_entry
from kvrank.store.kv import KVKey, MemoryKVStore, PassageKV
from kvrank.types import Passage

KILLS = 30  # writers SIGKILLed mid-run
ATTEMPTS = 90  # writers started at most
QUERY = "which passage talks about topic two"


def entry_files(store_dir: Path) -> dict[KVKey, Path]:
    return {KVKey(p.stem): p for p in (store_dir / "objects").glob("*/*.safetensors")}


def write_all(store_dir: Path, identity: StoreIdentity, kvs: list[PassageKV]) -> None:
    """The child: store every entry, four per transaction (the budget makes it evict as it goes)."""
    with DiskKVStore(store_dir, identity) as store:
        for lo in range(0, len(kvs), 4):
            store.put_many(kvs[lo:lo + 4])


def run_child(store_dir: Path, identity: StoreIdentity, kvs: list[PassageKV],
              kill_after: float | None) -> tuple[bool, float]:
    """Fork a writer; SIGKILL it after `kill_after` seconds. Returns (killed before it finished, seconds)."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: no torch kernels run here, only byte copies, file and SQLite calls
        code = 1
        try:
            write_all(store_dir, identity, kvs)
            code = 0
        finally:
            os._exit(code)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - start
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0, "the writer failed on its own"
        return False, elapsed
    assert os.WTERMSIG(status) == signal.SIGKILL
    return True, elapsed


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_writer_killed_at_random_points_leaves_a_store_that_serves_exact_kv(tmp_path: Path) -> None:
    lm = tiny_lm("llama")
    passages = [Passage(f"d{i}", f"Title {i}", f"Passage {i} about topic {i % 4}. " * (3 + i % 5)) for i in range(40)]
    fresh = BlockReranker(RerankerConfig(kv_format="none", mode="ql", batch_size=8), store=MemoryKVStore(), lm=lm)
    kvs, _ = fresh.passage_kv(passages)
    expected = fresh.score(QUERY, passages)
    identity = StoreIdentity(fresh.engine.fingerprint, fresh.storage_tag, model=lm.name)
    store_dir = tmp_path / "store"
    budget = sum(sorted(entry_nbytes(kv) for kv in kvs)[:20])  # fits 20 of 40: every writer evicts and rewrites
    DiskKVStore(store_dir, identity, StoreConfig(max_bytes=budget)).close()

    start = time.perf_counter()
    rng = random.Random(4)
    window = run_child(store_dir, identity, kvs, None)[1]  # a whole run times the window the kills fall in
    killed = 0
    # Writers run until KILLS of them died mid-run: on a loaded machine a writer's time varies, and a kill timed
    # from one run's length can land after another run has finished (those runs count, but not as crashes).
    for _ in range(ATTEMPTS):
        if killed == KILLS:
            break
        was_killed, seconds = run_child(store_dir, identity, rng.sample(kvs, len(kvs)), rng.uniform(0, window))
        killed += was_killed
        if not was_killed:  # the machine got faster: shrink the window to a whole run's time
            window = min(window, seconds)
        # After every crash the store opens, and each file under objects/ is a complete, checksummed entry.
        DiskKVStore(store_dir, identity).close()  # (closed again before the next fork)
        for key, path in entry_files(store_dir).items():
            read_entry(path, key)
    assert killed == KILLS, f"only {killed} of {ATTEMPTS} writers were killed mid-run"
    assert time.perf_counter() - start < 120

    with DiskKVStore(store_dir, identity) as store:
        report = store.verify()
        assert report.corrupt == [] and report.ok == len(entry_files(store_dir)) > 0
        assert not list((store_dir / "tmp").iterdir())  # temporary files of killed writers are gone
        assert store.totals()["entries"] == report.ok  # files whose writer died before indexing them: adopted
        store.gc()  # ... and evicted first, as least recent, down to the budget
        stored = store.totals()["entries"]
        assert 0 < stored == len(entry_files(store_dir)) and store.totals()["bytes"] <= budget
        by_key = {kv.key: kv for kv in kvs}
        on_disk = set(entry_files(store_dir))
        hits = [p for p, kv in zip(passages, kvs, strict=True) if kv.key in on_disk]
        served = BlockReranker(RerankerConfig(kv_format="none", mode="ql", batch_size=8), store=store, lm=lm)
        served_kvs, prefilled = served.passage_kv(hits)
        assert prefilled == 0
        for kv in served_kvs:  # every served entry holds exactly the bytes of a fresh prefill
            assert all(torch.equal(a, b) for a, b in zip(kv.keys + kv.values,
                                                         by_key[kv.key].keys + by_key[kv.key].values, strict=True))
        assert served.score(QUERY, hits) == fresh.score(QUERY, hits)  # scores from the store: identical
        assert served.prefills == 0 and served.store.stats().hits == 2 * stored
        # Over all passages the misses are prefilled in other batches, where float32 batch composition may move
        # an fp16 value by one ulp: equal within that.
        assert torch.allclose(torch.tensor(served.score(QUERY, passages)), torch.tensor(expected), atol=1e-5)
        assert served.prefills == len(passages) - stored


def test_reader_processes_with_two_writers_see_no_errors_and_no_wrong_data(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    size = entry_nbytes(store_workers.synthetic(0))
    DiskKVStore(store_dir, store_workers.IDENTITY, StoreConfig(max_bytes=24 * size)).close()  # 24 of 64 keys fit
    roles = [("writer", 1), ("writer", 2), ("reader", 3), ("reader", 4), ("reader", 5)]
    script = Path(store_workers.__file__)
    procs = [subprocess.Popen([sys.executable, str(script), role, str(store_dir), "3", str(seed)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for role, seed in roles]
    try:
        deadline = time.monotonic() + 90
        while not all(Path(f"{store_dir}.{r}.{s}.ready").exists() for r, s in roles):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker did not start"
            time.sleep(0.05)
        Path(f"{store_dir}.go").touch()
        outputs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0 and "Traceback" not in err, err
    counts = {role + str(seed): json.loads(out.strip().splitlines()[-1])
              for (role, seed), (out, _) in zip(roles, outputs, strict=True)}
    readers = [c for name, c in counts.items() if name.startswith("reader")]
    writers = [c for name, c in counts.items() if name.startswith("writer")]
    assert sum(c["wrong"] for c in readers) == 0
    assert all(c["hits"] > 0 and c["misses"] > 0 for c in readers), counts  # the readers really raced the writers
    assert sum(c["evicted"] for c in writers) > 0 and all(c["ops"] > 0 for c in writers), counts
    with DiskKVStore(store_dir, store_workers.IDENTITY) as store:
        report = store.verify()
        assert report.corrupt == [] and report.ok == store.totals()["entries"] <= 24
        assert report.adopted == 0 and report.dropped_rows == 0  # index and files agree
