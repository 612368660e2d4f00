"""Fault and load suite: SIGKILLed writers, the overload scenario, and a bounded soak.

1. **Kill trials.** A writer (`kvrank warm`, or `kvrank serve` in the middle of a `/v1/rerank` of new documents) is
   SIGKILLed at a random moment of its writing phase, `--trials` times. After each: `verify` finds no corrupt entry,
   every entry committed before the trial is still there byte for byte, and the scores computed from the store equal
   a fresh in-memory run's (the store served every committed entry, nothing prefilled; equal within 1e-4, an fp16
   ulp of batch-composition noise). Reports passed/trials.
2. **Overload.** `kvrank serve` with KVRANK_QUEUE_SIZE=2, KVRANK_REQUEST_TIMEOUT_S=5 (`--timeout`): first one client
   alone (its throughput of answered requests), then 8 clients each sending `--requests` `/v1/rerank` requests of 20
   new documents (a 503 is retried after its Retry-After; a 504 or other error is a failed request), then a burst of
   8 single requests. Goodput = answers within the deadline per second of the scenario. Wasted completions: jobs the
   worker completed after their client had been answered 503/504 (`kvrank_wasted_completions_total`; a server
   without that counter: batch jobs completed minus answers).
3. **Soak.** Several clients send a mix of valid and invalid requests for `--soak-seconds` against a server with
   the default queue and timeout: every status is counted (no 5xx allowed), the server's RSS after warm-up and at
   the end (and how much of its growth is the in-memory KV store keeping the new documents' KV), and its queue
   (`kvrank_requests_in_flight`) once the clients stop.

`--model` picks the reranker: `default` (kvrank's default model, SmolLM2-135M), `synthetic` (a random Llama,
hidden 256 x 4 layers, byte tokenizer: scheduling behaviour at a cost the 2-core machine can overload in seconds),
`tiny` (the tests' 2-layer Llama), or a checkpoint folder. `--server-src DIR` runs the server from another checkout
(e.g. another version of kvrank, to compare the overload scenario between two versions).

  OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/reliability.py [--model synthetic] [--trials 50] [--requests 5]
      [--soak-seconds 180] [--only kill overload soak] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from kvrank.testing import ServerNotReady, wait_ready

HOST = "127.0.0.1"
TESTS = Path(__file__).resolve().parents[1] / "tests"
QUERY = "which passage talks about topic two"
WORDS = ("river", "stone", "signal", "garden", "orbit", "ledger", "copper", "harbor", "meadow", "engine", "violet",
         "canyon", "pepper", "thunder", "lantern", "glacier")


# ---------------------------------------------------------------------------------------------- models and data
def make_model(kind: str, folder: Path) -> str:
    """The `--model` the writers and servers load: a checkpoint folder (random Llamas are saved there) or an id."""
    if kind == "default":
        from kvrank.defaults import DEFAULT_MODEL

        return DEFAULT_MODEL
    if kind not in ("tiny", "synthetic"):
        return kind
    sys.path.insert(0, str(TESTS))
    import torch
    from conftest_models import COMMON, byte_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    size = {} if kind == "tiny" else {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4}
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**COMMON, **size}), dtype=torch.float32)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def documents(rng: random.Random, n: int, words: int = 12) -> list[str]:
    """`n` new documents (a random tag makes every one unique, so its KV is not in any store yet)."""
    return [f"doc {rng.getrandbits(48):x} about topic {i % 5}: " + " ".join(rng.choice(WORDS) for _ in range(words))
            for i in range(n)]


def write_beir(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                                 for i, t in enumerate(docs)), encoding="utf-8")
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": QUERY}) + "\n", encoding="utf-8")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\td0\t1\n", encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def env(server_src: str | None = None, **settings: object) -> dict[str, str]:
    out = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           **{f"KVRANK_{k.upper()}": str(v) for k, v in settings.items()}}
    if server_src:
        out["PYTHONPATH"] = server_src
    return out


class Server:
    """`kvrank serve` in a subprocess on a free loopback port (bm25 over the embedded demo corpus)."""

    def __init__(self, model: str, server_src: str | None = None, **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "kvrank.cli", "serve", "--retriever", "bm25", "--host", HOST, "--port",
               str(self.port), "--model", model]
        # `python -m` puts its working directory first on sys.path: the checkout it runs from is the server's code
        self.proc = subprocess.Popen(cmd, env=env(server_src, kv_format="none", **settings), cwd=server_src,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 600) -> Server:
        try:
            wait_ready(self.url, self.proc, timeout)
        except ServerNotReady as error:
            stderr = self.proc.stderr.read()[-3000:] if self.proc.poll() is not None and self.proc.stderr else ""
            raise RuntimeError(f"{error}: {stderr}") from None
        return self

    def metric(self, name: str) -> float | None:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        found = re.search(rf"^{re.escape(name)} ([\d.e+-]+)$", text, re.M)
        return float(found[1]) if found else None

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) / 1024  # type: ignore[index]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Server:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------- 1. kill trials
@dataclass
class Trials:
    passed: int = 0
    killed: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _snapshot(store_dir: Path) -> dict[str, str]:
    """Every committed entry's key and a digest of its file."""
    from kvrank.store.disk import DiskKVStore

    with DiskKVStore(store_dir) as store:
        keys = store.keys()
        return {k: hashlib.sha256(store._entry_path(k).read_bytes()).hexdigest() for k in keys}


_LMS: dict = {}  # model -> LoadedLM, loaded once for every trial's checks


def check_store(store_dir: Path, model: str, before: dict[str, str], passages: list) -> str | None:
    """None if the store is sound after a kill; else what is wrong."""
    from kvrank.pipeline import PipelineConfig, build_reranker
    from kvrank.reranker.reranker import RerankerConfig
    from kvrank.store.disk import DiskKVStore

    with DiskKVStore(store_dir) as store:
        report = store.verify()
    if report.corrupt or report.unquarantined:
        return f"verify found corrupt entries {report.corrupt}"
    after = _snapshot(store_dir)
    changed = [k for k, digest in before.items() if after.get(k) != digest]
    if changed:
        return f"{len(changed)} committed entries changed or vanished: {changed[:3]}"
    config = RerankerConfig(kv_format="none", mode="ql", model=model)
    if model not in _LMS:
        from kvrank.reranker.model import load_lm

        _LMS[model] = load_lm(model)
    fresh = build_reranker(PipelineConfig(reranker=config, kv_format="none"), passages, lm=_LMS[model])
    served = build_reranker(PipelineConfig(reranker=config, kv_format="none", store_dir=store_dir), passages,
                            lm=_LMS[model])
    try:
        _, keys = served.passage_keys(passages)
        committed = [p for p, k in zip(passages, keys) if k in served.store]
        if not committed:
            return None
        got = served.score(QUERY, committed)
        if served.prefills:
            return f"{served.prefills} committed entries were not served from the store"
        want = fresh.score(QUERY, committed)
        if any(abs(a - b) > 1e-4 for a, b in zip(got, want)):
            return f"scores from the store differ from a fresh run: {got[:3]} vs {want[:3]}"
    finally:
        served.store.close()
    return None


def _wait_for_writes(store_dir: Path, proc: subprocess.Popen, before: int, timeout: float) -> float:
    """Seconds until the writer has published its first entry (or ended)."""
    t0 = time.perf_counter()
    objects = store_dir / "objects"
    while time.perf_counter() - t0 < timeout and proc.poll() is None:
        if sum(1 for _ in objects.glob("*/*.safetensors")) > before:
            break
        time.sleep(0.02)
    return time.perf_counter() - t0


def kill_trials(n: int, model: str, work: Path, seed: int = 14, docs_per_trial: int = 16,
                serve_every: int = 5, log=print) -> Trials:
    """`n` SIGKILL trials on one store: trial i kills `kvrank serve` mid-`/v1/rerank` when i % serve_every == 0,
    else `kvrank warm`, at a random moment of its writing phase."""
    from kvrank.eval.data import load_dataset
    from kvrank.types import Passage

    rng = random.Random(seed)
    store_dir = work / "store"
    result = Trials()
    t_start = time.perf_counter()
    # An unkilled warm creates the store and times the writing phase of a warm of `docs_per_trial` passages.
    data = write_beir(work / "data-0", documents(rng, docs_per_trial))
    cmd = [sys.executable, "-m", "kvrank.cli", "warm", "--data", str(data), "--store", str(store_dir), "--model",
           model, "--kv-format", "none", "--batch-size", "4"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = _wait_for_writes(store_dir, proc, 0, 600)
    if proc.wait() != 0:
        raise RuntimeError(f"kvrank warm failed: {proc.stderr.read()[-3000:] if proc.stderr else ''}")
    writing = max(time.perf_counter() - t0 - first, 0.05)
    for i in range(1, n + 1):
        before = _snapshot(store_dir)
        texts = documents(rng, docs_per_trial)
        if i % serve_every == 0:
            passages = [Passage(str(j), "", t) for j, t in enumerate(texts)]
            killed = _kill_serve(model, store_dir, texts, rng)
        else:
            passages = list(load_dataset(write_beir(work / f"data-{i}", texts)).corpus.values())
            cmd[cmd.index("--data") + 1] = str(work / f"data-{i}")
            proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            _wait_for_writes(store_dir, proc, len(before), 600)
            time.sleep(rng.uniform(0, writing))
            killed = proc.poll() is None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        result.killed += killed
        problem = check_store(store_dir, model, before, passages)
        if problem is None:
            result.passed += 1
        else:
            result.failures.append(f"trial {i}: {problem}")
        log(f"kill trial {i}/{n} ({'serve' if i % serve_every == 0 else 'warm'}, "
            f"{'killed' if killed else 'finished first'}): {'ok' if problem is None else problem}")
    result.seconds = time.perf_counter() - t_start
    return result


def _kill_serve(model: str, store_dir: Path, texts: list[str], rng: random.Random) -> bool:
    """Start `kvrank serve --store`, send a /v1/rerank of new documents, SIGKILL the server while it works."""
    server = Server(model, store=store_dir).wait_ready()
    try:
        http = httpx.Client(base_url=server.url, timeout=600)
        t0 = time.perf_counter()
        http.post("/v1/rerank", json={"query": QUERY, "documents": ["warm-up " + texts[0]]}).raise_for_status()
        one = time.perf_counter() - t0  # a one-document request: the time scale of this machine
        sent = threading.Thread(target=lambda: _quietly(http, texts), daemon=True)
        sent.start()
        time.sleep(rng.uniform(0, one * len(texts) * 0.6))
        killed = server.proc.poll() is None
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        sent.join(30)
        return killed
    finally:
        server.stop()


def _quietly(http: httpx.Client, texts: list[str]) -> None:
    try:
        http.post("/v1/rerank", json={"query": QUERY, "documents": texts})
    except httpx.HTTPError:
        pass  # the server was killed: that is the point


# ---------------------------------------------------------------------------------------------- 2. overload
def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": float("nan"), "p95_ms": float("nan")}
    if len(values) == 1:
        return {"p50_ms": round(values[0], 1), "p95_ms": round(values[0], 1)}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50_ms": round(q[49], 1), "p95_ms": round(q[94], 1)}


async def _clients(url: str, clients: int, requests: int, docs: int, deadline_s: float, rng: random.Random,
                   retry: bool = True) -> dict:
    """`clients` coroutines, each getting `requests` reranks of `docs` new documents answered: a 503 is retried
    after its Retry-After (if `retry`), anything else but 200 fails that request."""
    statuses: dict[str, int] = {}
    answered: list[float] = []  # latency of each answered attempt (ms)
    end_to_end: list[float] = []  # from the first attempt to the answer, retries included (ms)
    late = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal late
        for _ in range(requests):
            body = {"query": QUERY, "documents": documents(rng, docs)}
            first = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/rerank", json=body)
                    key = str(r.status_code)
                except httpx.HTTPError as err:
                    r, key = None, type(err).__name__
                statuses[key] = statuses.get(key, 0) + 1
                if r is not None and r.status_code == 200:
                    took = time.perf_counter() - t0
                    late += took > deadline_s
                    answered.append(took * 1e3)
                    end_to_end.append((time.perf_counter() - first) * 1e3)
                    break
                if retry and r is not None and r.status_code == 503:
                    await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                    continue
                break

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = len(answered) - late
    return {"clients": clients, "requests": clients * requests, "answered": len(answered), "late": late,
            "statuses": dict(sorted(statuses.items())), "seconds": round(wall, 2),
            "goodput_rps": round(ok / wall, 3), **_quantiles(answered),
            "end_to_end_p50_ms": _quantiles(end_to_end)["p50_ms"]}


def _completed(server: Server) -> float:
    """Jobs the worker has run (sum of micro-batch sizes)."""
    return server.metric("kvrank_batch_queries_sum") or 0.0


def overload(model: str, clients: int = 8, requests: int = 5, docs: int = 20, timeout: float = 5.0,
             queue: int = 2, burst: int = 8, seed: int = 14, server_src: str | None = None, log=print) -> dict:
    rng = random.Random(seed)
    out: dict = {"settings": {"clients": clients, "requests_per_client": requests, "docs": docs,
                              "KVRANK_QUEUE_SIZE": queue, "KVRANK_REQUEST_TIMEOUT_S": timeout, "burst": burst,
                              "server_src": server_src or "this checkout"}}
    with Server(model, server_src, queue_size=queue, request_timeout_s=timeout) as server, \
            httpx.Client(base_url=server.url, timeout=600) as http:
        http.post("/v1/rerank", json={"query": QUERY, "documents": documents(rng, docs)})  # warm-up, calibration
        out["single"] = asyncio.run(_clients(server.url, 1, requests, docs, timeout, rng))
        log(f"one client: {out['single']}")
        phases = {"overload": (clients, requests, True), "burst": (burst, 1, False)}
        for name, (n, k, retry) in phases.items():
            done0 = _completed(server)
            wasted0 = server.metric("kvrank_wasted_completions_total")
            busy0 = server.metric("kvrank_batch_duration_seconds_sum") or 0.0
            est0, act0 = (server.metric(f"kvrank_cost_{x}_seconds_total") for x in ("estimated", "actual"))
            phase = asyncio.run(_clients(server.url, n, k, docs, timeout, rng, retry=retry))
            busy = (server.metric("kvrank_batch_duration_seconds_sum") or 0.0) - busy0
            phase["worker_busy"] = round(busy / phase["seconds"], 3)  # share of the phase the model worked
            est1, act1 = (server.metric(f"kvrank_cost_{x}_seconds_total") for x in ("estimated", "actual"))
            if None not in (est0, act0, est1, act1) and act1 > act0:  # type: ignore[operator]
                phase["estimated_over_actual"] = round((est1 - est0) / (act1 - act0), 3)  # type: ignore[operator]
            time.sleep(min(timeout, 5.0))  # let the worker finish (or drop) what it still holds
            wasted1 = server.metric("kvrank_wasted_completions_total")
            if wasted1 is not None and wasted0 is not None:
                phase["wasted"] = int(wasted1 - wasted0)
            else:  # a server without the counter: jobs it completed that answered nobody
                phase["wasted"] = int(_completed(server) - done0 - phase["answered"])
            out[name] = phase
            log(f"{name}: {phase}")
        single = out["single"]["goodput_rps"]
        out["goodput_ratio"] = round(out["overload"]["goodput_rps"] / single, 3) if single else None
    return out


# ---------------------------------------------------------------------------------------------- 3. soak
def soak_bodies(rng: random.Random) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(method, path, body, headers) of valid and invalid requests, one of each kind."""
    j = {"content-type": "application/json"}

    def body(obj: object) -> bytes:
        return json.dumps(obj).encode()

    return [
        ("POST", "/v1/rerank", body({"query": QUERY, "documents": documents(rng, 4)}), j),
        ("POST", "/v2/rerank", body({"model": "rerank-v3.5", "query": "topic 2", "top_n": 2,
                                     "documents": ["a stored document", {"text": "another one"}]}), j),
        ("POST", "/v1/search", body({"query": "what is the capital of france", "top_k": 3}), j),
        ("POST", "/v1/rerank", body({"query": "x", "documents": ["ok\ud800"]}), j),
        ("POST", "/v1/rerank", body({"query": "x", "documents": [{"text": "\udc80"}], "return_documents": True}), j),
        ("POST", "/v1/search", body({"query": "q", "top_k": True}), j),
        ("POST", "/v1/rerank", body({"query": "q", "documents": ["a"], "top_n": "2"}), j),
        ("POST", "/v1/rerank", b'{"query": ', j),
        ("POST", "/v1/search", b"[" * 5000 + b"]" * 5000, j),
        ("POST", "/v1/search", b'{"query": "q", "top_k": ' + b"9" * 5000 + b"}", j),
        ("POST", "/v1/search", b'{"query": "\xff"}', j),
        ("POST", "/v1/search", body({"query": "q"}), {}),
        ("POST", "/v1/search", body({"query": "q", "nope": 1}), j),
        ("POST", "/v1/rerank", body({"query": "q", "documents": []}), j),
        ("GET", "/v1/search", b"", {}),
        ("GET", "/nowhere", b"", {}),
        ("GET", "/healthz", b"", {}),
        ("GET", "/metrics", b"", {}),
    ]


async def _soak_clients(url: str, clients: int, seconds: float, seed: int) -> dict[str, int]:
    statuses: dict[str, int] = {}
    end = time.perf_counter() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed + i)
        while time.perf_counter() < end:
            method, path, content, headers = rng.choice(soak_bodies(rng))
            try:
                r = await http.request(method, path, content=content or None, headers=headers)
                key = str(r.status_code)
            except httpx.HTTPError as err:
                key = type(err).__name__
            statuses[key] = statuses.get(key, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return dict(sorted(statuses.items()))


def soak(model: str, seconds: float = 180, clients: int = 4, seed: int = 14, log=print) -> dict:
    with Server(model) as server:
        rng = random.Random(seed)
        for method, path, content, headers in soak_bodies(rng):  # warm-up: every kind once
            httpx.request(method, f"{server.url}{path}", content=content or None, headers=headers, timeout=600)
        rss0, kv0 = server.rss_mib(), (server.metric("kvrank_kv_bytes") or 0.0) / 2**20
        statuses = asyncio.run(_soak_clients(server.url, clients, seconds, seed))
        rss1, kv1 = server.rss_mib(), (server.metric("kvrank_kv_bytes") or 0.0) / 2**20
        in_flight = server.metric("kvrank_requests_in_flight")
        queue = server.metric("kvrank_queue_depth")
    five = sum(n for code, n in statuses.items() if code.startswith("5"))
    out = {"seconds": seconds, "clients": clients, "requests": sum(statuses.values()), "statuses": statuses,
           "5xx": five, "transport_errors": sum(n for code, n in statuses.items() if not code.isdigit()),
           "rss_start_mib": round(rss0, 1), "rss_end_mib": round(rss1, 1),
           "rss_growth_mib": round(rss1 - rss0, 1), "kv_store_growth_mib": round(kv1 - kv0, 1),
           # the in-memory KV store keeps every new document's KV (up to its budget): the rest is what must not grow
           "rss_growth_beyond_kv_mib": round(rss1 - rss0 - (kv1 - kv0), 1),
           "queue_depth_end": queue, "in_flight_end": in_flight}
    log(f"soak: {out}")
    return out


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="synthetic")
    parser.add_argument("--kill-model", default=None, help="model of the kill trials (default: --model)")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--kill-docs", type=int, default=16, help="new passages each killed writer writes")
    parser.add_argument("--requests", type=int, default=5, help="answered requests each overload client wants")
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--soak-seconds", type=float, default=180)
    parser.add_argument("--only", nargs="*", default=["kill", "overload", "soak"])
    parser.add_argument("--server-src", default=None, help="PYTHONPATH of the overload server (another checkout)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "load_avg_start": os.getloadavg(),
                                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                    "model": args.model}
    with tempfile.TemporaryDirectory(prefix="kvrank-reliability-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("KVRANK_CACHE_DIR", str(work / "cache"))
        model = make_model(args.model, work / "model")
        if "kill" in args.only:
            kill_model = make_model(args.kill_model, work / "kill-model") if args.kill_model else model
            trials = kill_trials(args.trials, kill_model, work / "kill", docs_per_trial=args.kill_docs)
            report["kill"] = {"model": args.kill_model or args.model, "docs_per_trial": args.kill_docs,
                              "passed": trials.passed, "trials": args.trials,
                              "killed_mid_write": trials.killed, "failures": trials.failures,
                              "seconds": round(trials.seconds, 1)}
            print(f"kill trials: {trials.passed}/{args.trials} passed ({trials.killed} killed mid-write)")
        if "overload" in args.only:
            report["overload"] = overload(model, requests=args.requests, docs=args.docs, timeout=args.timeout,
                                          server_src=args.server_src)
        if "soak" in args.only:
            report["soak"] = soak(model, args.soak_seconds)
    report["machine"]["load_avg_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
