"""`--ray`: the same index, store and rankings from Ray workers as from one process.

The cluster tests (marker `ray`; `scripts/test` runs them after the default suite) share one local cluster of two
nodes with one CPU each (`ray.cluster_utils.Cluster`): a head and a worker node, so a pool of two workers puts
one on each node and `--store DIR/store-{node}` gives each node its own store folder. Models are the tiny random
Llama checkpoint of conftest.py and the bundled MiniLM. The tests without the marker need no Ray.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import write_beir
from typer.testing import CliRunner

from kvrank.cli import app
from kvrank.cluster import RayConfig, node_store
from kvrank.cluster.connect import worker_error, worker_errors
from kvrank.errors import KvrankError

ROOT = Path(__file__).resolve().parents[1]
MB = 1024**2


# ------------------------------------------------------------------------------------------ without Ray
@pytest.mark.parametrize("address", ["auto", "ray://head:10001", "10.0.0.5:6379", "local:2"])
def test_ray_addresses_are_accepted(address: str) -> None:
    assert RayConfig(address).address == address


@pytest.mark.parametrize(("address", "fix"), [("cluster", "local:N"), ("local:0", "N >= 1"), ("local:x", "auto")])
def test_bad_ray_address_names_the_value_and_the_forms(address: str, fix: str) -> None:
    with pytest.raises(KvrankError, match=fix) as err:
        RayConfig(address)
    assert repr(address) in str(err.value) or address in str(err.value)


def test_bad_worker_settings_are_clear_cli_errors(tiny_beir: Path, tmp_path: Path) -> None:
    base = ["warm", "--data", str(tiny_beir), "--store", str(tmp_path / "s"), "--ray", "local:1"]
    result = CliRunner().invoke(app, [*base, "--ray-workers", "0"])
    assert result.exit_code == 2 and "--ray-workers must be >= 1, got 0" in result.output
    result = CliRunner().invoke(app, ["warm", "--data", str(tiny_beir), "--store", str(tmp_path / "s-{node}")])
    assert result.exit_code == 2 and "{node}" in result.output and "--ray" in result.output
    result = CliRunner().invoke(app, ["serve", "--replicas", "2"])
    assert result.exit_code == 2 and "--replicas 2 needs --ray" in result.output


def test_missing_ray_is_one_line_with_the_install_hint(tiny_beir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = CliRunner().invoke(app, ["eval", "--data", str(tiny_beir), "--ray", "local:1"])
    assert result.exit_code == 2 and "pip install 'kvrank[ray]'" in result.output
    assert "Traceback" not in result.output


def test_node_field_gives_each_node_its_own_folder() -> None:
    a, b = "0f6c40c142b8eae73f6962d1a523b49a508a86656a55aa04821f804a", "91aa20c142b8eae73f6962d1a523b49a5"
    assert node_store(Path("/kv/store-{node}"), a) == Path("/kv/store-0f6c40c142b8")
    assert node_store(Path("/kv/{node}/s"), a) != node_store(Path("/kv/{node}/s"), b)
    assert node_store(Path("/kv/shared"), a) == Path("/kv/shared")  # same path on every node
    assert node_store(None, a) is None


def test_worker_error_finds_the_kvrank_error_behind_rays_wrappers() -> None:
    class Wrapped(Exception):  # what a failed Ray task carries: the worker's exception as `cause`
        def __init__(self, cause: BaseException):
            super().__init__("ray task failed")
            self.cause = cause

    assert worker_error(Wrapped(KvrankError("model x: not found", param="model"))) == "model x: not found"
    died = RuntimeError("The actor died ... creation task\nTraceback ...\nkvrank.errors.KvrankError: store_dir s: no")
    assert worker_error(died) == "store_dir s: no"  # an actor whose constructor failed: only text
    assert worker_error(Wrapped(ValueError("bug"))) is None  # anything else keeps its traceback
    with pytest.raises(KvrankError, match="^model x: not found$") as err, worker_errors():
        raise Wrapped(KvrankError("model x: not found", param="model"))
    assert err.value.param == "model"  # the CLI shows it as its option


# ------------------------------------------------------------------------------------------ the cluster
@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """Two nodes of one CPU and a small object store each; this process is connected. Workers import this
    worktree's kvrank: the nodes inherit PYTHONPATH, and so do CLI subprocesses started by the tests."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), old]))
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 120 * MB,
                                                          "include_dashboard": False})
    nodes.add_node(num_cpus=1, object_store_memory=120 * MB)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, include_dashboard=False, log_to_driver=False)
    # Ray Data's usage poller (a daemon thread) asks a Prometheus server, of which there is none, every 10 s and logs
    # each failure at debug level into the session's log file; once the cluster is gone that record ended as a
    # "--- Logging error ---" traceback on stderr at exit. Debug records of that module are not made at all.
    logging.getLogger("ray.data._internal.usage").setLevel(logging.INFO)
    try:
        yield nodes.address
    finally:
        ray.shutdown()
        nodes.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def kvrank(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def entries(store: Path) -> dict[str, bytes]:
    """key -> the entry file's bytes."""
    return {f.stem: f.read_bytes() for f in (store / "objects").glob("*/*.safetensors")}


@pytest.mark.ray
def test_index_embeddings_from_workers_match_single_process(cluster: str, tiny_beir: Path, tmp_path: Path) -> None:
    from kvrank.retriever.dense import DenseRetriever, load_encoder

    kvrank("index", "--data", str(tiny_beir), "--index-dir", str(tmp_path / "here"), "--retriever", "hybrid")
    kvrank("index", "--data", str(tiny_beir), "--index-dir", str(tmp_path / "ray"), "--retriever", "hybrid",
           "--ray", cluster, "--ray-workers", "2", "--ray-batch-size", "3")
    encoder = load_encoder(None, "cpu")
    here = DenseRetriever.load(tmp_path / "here" / "dense", encoder).vectors()
    there = DenseRetriever.load(tmp_path / "ray" / "dense", encoder).vectors()
    assert list(here) == list(there)  # same doc order in the index
    assert max(float(np.abs(here[d] - there[d]).max()) for d in here) < 1e-6
    assert (tmp_path / "ray" / "bm25").is_dir()  # the hybrid's BM25 half, built on the driver


@pytest.mark.ray
def test_warm_and_eval_on_two_nodes_equal_single_process(cluster: str, tiny_beir: Path, tiny_checkpoint: Path,
                                                         tmp_path: Path) -> None:
    model = ["--model", str(tiny_checkpoint)]
    ray = ["--ray", cluster, "--ray-workers", "2", "--ray-batch-size", "2"]
    kvrank("warm", "--data", str(tiny_beir), "--store", str(tmp_path / "single"), *model)
    out = kvrank("warm", "--data", str(tiny_beir), "--store", str(tmp_path / "store-{node}"), *model, *ray)
    assert "warmed 8 passages" in out

    # One store per node, together holding exactly the single-process entries, byte for byte.
    stores = sorted(tmp_path.glob("store-*"))
    assert len(stores) == 2 and all(entries(s) for s in stores)
    single = entries(tmp_path / "single")
    assert {k: v for s in stores for k, v in entries(s).items()} == single

    # Evaluating over the node stores: a worker reads what its node warmed and prefills what the other node did
    # (a shared remote tier would hold both); either way the same run file, byte for byte, and metrics.
    def evaluate(name: str, *extra: str) -> dict:
        kvrank("eval", "--data", str(tiny_beir), "--retriever", "bm25", "--rerank", "ql", "--rerank-depth", "4",
               *model, "--run", str(tmp_path / f"{name}.trec"), "--json", str(tmp_path / f"{name}.json"), *extra)
        return json.loads((tmp_path / f"{name}.json").read_text())

    here = evaluate("single", "--store", str(tmp_path / "single"))
    there = evaluate("ray", "--store", str(tmp_path / "store-{node}"), *ray)
    assert (tmp_path / "ray.trec").read_bytes() == (tmp_path / "single.trec").read_bytes()
    assert there["metrics"] == here["metrics"] and there["first_stage_metrics"] == here["first_stage_metrics"]
    lookups = here["kv_cache"]["hits"] + here["kv_cache"]["misses"]
    assert here["prefills"] == 0 and there["kv_cache"]["hits"] + there["kv_cache"]["misses"] == lookups
    assert 0 < there["kv_cache"]["hits"] < lookups and there["prefills"] == there["kv_cache"]["misses"]
    assert there["settings"]["ray"]["workers"] == 2

    # Cold, in memory: each worker prefills its own queries' misses, in other batches than the single process
    # did; block prefill does not depend on its batch, so the scores are still identical.
    evaluate("single-cold")
    cold = evaluate("ray-cold", *ray)
    assert (tmp_path / "ray-cold.trec").read_bytes() == (tmp_path / "single-cold.trec").read_bytes()
    assert cold["prefills"] > 0


def warmer_pids() -> set[int]:
    """Processes of Ray Data's warm workers (Ray titles them `ray::MapWorker(MapBatches(_Warmer))`)."""
    import psutil

    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        if "_Warmer" in " ".join(proc.info["cmdline"] or []):
            found.add(proc.pid)
    return found


@pytest.mark.ray
def test_worker_killed_mid_warm_is_retried_and_leaves_no_corrupt_entry(cluster: str, tiny_checkpoint: Path,
                                                                       tmp_path: Path) -> None:
    from kvrank.cluster.jobs import warm_passages
    from kvrank.eval.data import load_dataset
    from kvrank.pipeline import PipelineConfig, build_reranker
    from kvrank.reranker.reranker import RerankerConfig
    from kvrank.store.disk import DiskKVStore

    corpus = [{"_id": f"p{i}", "title": f"Passage {i}", "text": f"Item {i} is about topic {i % 13} " * (3 + i % 9)}
              for i in range(1200)]
    passages = list(load_dataset(str(write_beir(tmp_path / "big", corpus=corpus))).corpus.values())
    config = PipelineConfig(reranker=RerankerConfig(mode="ql", model=str(tiny_checkpoint), batch_size=4),
                            store_dir=tmp_path / "store-{node}")
    job: dict = {}
    worker = threading.Thread(target=lambda: job.update(done=warm_passages(
        RayConfig(cluster, workers=2, batch_size=8), config, passages)))
    worker.start()
    deadline = time.time() + 300  # workers start slowly on a loaded machine
    while sum(len(entries(s)) for s in tmp_path.glob("store-*")) < 40:  # well into the job
        assert worker.is_alive() and time.time() < deadline, "the warm job ended before a worker could be killed"
        time.sleep(0.05)
    victim = min(warmer_pids())
    os.kill(victim, signal.SIGKILL)
    stored_at_kill = sum(len(entries(s)) for s in tmp_path.glob("store-*"))
    worker.join(180)
    assert not worker.is_alive() and "done" in job, "the job did not finish after its worker was killed"
    assert stored_at_kill < len(passages) and victim not in warmer_pids()

    # Every passage stored on some node; no entry torn; nothing left in tmp/ by the killed writer is indexed.
    reranker = build_reranker(PipelineConfig(reranker=config.reranker), passages)  # in memory: the keys only
    _, keys = reranker.passage_keys(passages)
    stored: set[str] = set()
    for folder in tmp_path.glob("store-*"):
        with DiskKVStore(folder) as store:
            report = store.verify()
            assert report.corrupt == [] and report.ok == report.checked
            stored |= set(store.keys())
    assert stored == set(keys)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.ray
def test_serve_two_replicas_answer_rerank_and_stop_on_sigterm(cluster: str, tiny_beir: Path, tiny_checkpoint: Path,
                                                              tmp_path: Path) -> None:
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "kvrank.cli", "serve", "--ray", cluster, "--replicas", "2", "--port", str(port),
               "--data", str(tiny_beir), "--model", str(tiny_checkpoint), "--retriever", "bm25",
               "--store", str(tmp_path / "store-{node}")]
    server = subprocess.Popen(command, cwd=ROOT, env=os.environ.copy(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    body = {"query": "largest planet", "documents": ["Jupiter is the largest planet.", "Cats purr."]}
    try:
        deadline = time.time() + 150
        while True:  # ready once the proxy routes /v1/rerank (it learns a replica's routes after its /readyz)
            assert server.poll() is None, server.communicate()[0][-3000:]
            assert time.time() < deadline, "Serve did not become ready"
            try:
                if httpx.post(f"{url}/v1/rerank", json=body, timeout=30).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)

        replicas = set()
        for _ in range(60):
            answer = httpx.post(f"{url}/v1/rerank", json=body, timeout=30)
            assert answer.status_code == 200, answer.text
            assert [r["index"] for r in answer.json()["results"]] in ([0, 1], [1, 0])
            replicas.add(answer.headers["X-Kvrank-Replica"])
            if len(replicas) == 2:
                break
        assert len(replicas) == 2, f"one replica answered every request: {replicas}"
        assert len(list(tmp_path.glob("store-*"))) == 2  # one replica per node, each with its node's store
        ready = httpx.get(f"{url}/readyz", timeout=5)
        assert ready.json()["ready"] and ready.json()["replica"] == ready.headers["X-Kvrank-Replica"] in replicas

        server.send_signal(signal.SIGTERM)
        assert server.wait(90) == 0, server.communicate()[0][-4000:]
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.ray
def test_warm_into_a_shared_remote_tier_then_eval_on_fresh_nodes_prefills_nothing(
        cluster: str, tiny_beir: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The remote tier (`--remote-store`) travels in `PipelineConfig` to every worker: warm on the cluster writes
    each node's store and the shared tier; an eval on new, empty node stores reads everything from the tier."""
    model = ["--model", str(tiny_checkpoint)]
    ray = ["--ray", cluster, "--ray-workers", "2", "--ray-batch-size", "2"]
    remote = ["--remote-store", (tmp_path / "shared").as_uri()]
    kvrank("warm", "--data", str(tiny_beir), "--store", str(tmp_path / "warm-{node}"), *model, *ray, *remote)

    def evaluate(name: str, *extra: str) -> dict:
        kvrank("eval", "--data", str(tiny_beir), "--retriever", "bm25", "--rerank", "ql", "--rerank-depth", "4",
               *model, "--run", str(tmp_path / f"{name}.trec"), "--json", str(tmp_path / f"{name}.json"), *extra)
        return json.loads((tmp_path / f"{name}.json").read_text())

    here = evaluate("single")  # in memory, prefilling everything
    fresh = evaluate("fresh", "--store", str(tmp_path / "fresh-{node}"), *ray, *remote)
    lookups = here["kv_cache"]["hits"] + here["kv_cache"]["misses"]
    assert here["prefills"] > 0 and fresh["prefills"] == 0 and fresh["kv_cache"]["hits"] == lookups
    assert (tmp_path / "fresh.trec").read_bytes() == (tmp_path / "single.trec").read_bytes()
