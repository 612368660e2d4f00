"""Load test of the search API on loopback: N concurrent clients against a real `kvrank serve`, with and without
micro-batching, bounded in requests and in seconds, the configurations interleaved.

The script starts one server per configuration (subprocesses on 127.0.0.1, OMP_NUM_THREADS=1 unless set), waits
for /readyz, warms each up with one sequential pass over the demo queries (their passage KV is then stored, the
regime kvrank is built for), then runs `--rounds` rounds; in each round every configuration in turn gets N client
coroutines until `--requests / rounds` are sent or `--seconds / rounds` pass (the idle servers wait meanwhile), so
load drift on a shared machine hits every configuration alike. It reports, per configuration, throughput, latency
p50/p95/p99 (client side, ms), errors and the mean number of requests per micro-batch (from /metrics), and the
throughput ratio of each configuration over the first as the median (min-max) of per-round ratios, with the load
average before and after. Then it stops the servers with SIGTERM.

  OMP_NUM_THREADS=1 python benchmarks/api_load.py [--route search|rerank] [--clients 8] [--seconds 60]
      [--requests 200] [--batch 1 8] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx

from kvrank.demo import DEMO_QUERIES, demo_dataset
from kvrank.testing import ServerNotReady, wait_ready

HOST = "127.0.0.1"  # loopback only, by construction


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_server(port: int, max_batch: int, args: argparse.Namespace) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "KVRANK_MAX_BATCH_QUERIES": str(max_batch), "KVRANK_BATCH_WAIT_MS": str(args.wait_ms),
           "KVRANK_QUEUE_SIZE": str(max(64, args.clients * 2)), "KVRANK_REQUEST_TIMEOUT_S": "120"}
    cmd = [sys.executable, "-m", "kvrank.cli", "serve", "--retriever", "bm25", "--host", HOST, "--port", str(port)]
    if args.model:
        cmd += ["--model", args.model]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def server_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    try:
        wait_ready(url, proc, timeout, poll_s=0.5)
    except ServerNotReady as error:
        stderr = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
        raise SystemExit(f"{error}: {stderr}") from None


def bodies(route: str, depth: int) -> list[dict]:
    if route == "search":
        return [{"query": text, "top_k": 10, "rerank": {"depth": depth}} for _, text, _ in DEMO_QUERIES]
    corpus = list(demo_dataset().corpus.values())
    out = []
    for i, (_, text, _) in enumerate(DEMO_QUERIES):
        docs = [p.contents for p in corpus[i * depth:(i + 1) * depth]]
        out.append({"query": text, "documents": docs, "top_n": 5})
    return out


def batch_totals(metrics: str) -> tuple[float, float]:
    """(requests served, micro-batches run) from the server's /metrics."""
    found = [re.search(rf"^kvrank_batch_queries_{name} ([\d.e+]+)$", metrics, re.M) for name in ("sum", "count")]
    return (float(found[0][1]) if found[0] else 0.0, float(found[1][1]) if found[1] else 0.0)


async def load(url: str, route: str, payloads: list[dict], clients: int, requests: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    cycle = itertools.cycle(payloads)
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            sent += 1
            body = next(cycle)
            t0 = time.perf_counter()
            try:
                r = await http.post(f"/v1/{route}", json=body)
                ok = r.status_code == 200
                key = str(r.status_code)
            except httpx.HTTPError as err:
                ok, key = False, type(err).__name__
            if ok:
                latencies.append((time.perf_counter() - t0) * 1e3)
            else:
                errors[key] = errors.get(key, 0) + 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=180, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [0.0] * 99
    return {"requests": len(latencies) + sum(errors.values()), "ok": len(latencies), "errors": errors,
            "seconds": round(wall, 1), "throughput_rps": round(len(latencies) / wall, 3),
            "p50_ms": round(q[49], 1), "p95_ms": round(q[94], 1), "p99_ms": round(q[98], 1)}


class Server:
    """One `kvrank serve` subprocess with a micro-batching setting, warmed up."""

    def __init__(self, max_batch: int, args: argparse.Namespace):
        self.max_batch = max_batch
        port = free_port()
        self.url = f"http://{HOST}:{port}"
        self.proc = start_server(port, max_batch, args)

    def warm(self, payloads: list[dict], route: str) -> None:
        server_ready(self.url, self.proc)
        with httpx.Client(base_url=self.url, timeout=300) as http:  # warm-up: store every passage's KV, once
            for body in payloads:
                http.post(f"/v1/{route}", json=body).raise_for_status()

    def burst(self, args: argparse.Namespace, payloads: list[dict]) -> dict:
        before = httpx.get(f"{self.url}/metrics", timeout=30).text
        result = asyncio.run(load(self.url, args.route, payloads, args.clients, max(1, args.requests // args.rounds),
                                  args.seconds / args.rounds))
        after = httpx.get(f"{self.url}/metrics", timeout=30).text
        # Mean requests per micro-batch during this burst only.
        (s0, c0), (s1, c1) = batch_totals(before), batch_totals(after)
        result["mean_batch"] = round((s1 - s0) / max(c1 - c0, 1), 2)
        result["max_batch_queries"] = self.max_batch
        return result

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_interleaved(args: argparse.Namespace) -> tuple[list[list[dict]], tuple, tuple]:
    """Per round, per configuration, one burst's result; and the load average before and after the rounds."""
    servers = [Server(b, args) for b in args.batch]
    payloads = bodies(args.route, args.depth)
    try:
        for server in servers:
            server.warm(payloads, args.route)
        before = os.getloadavg()
        rounds = [[server.burst(args, payloads) for server in servers] for _ in range(args.rounds)]
        return rounds, before, os.getloadavg()
    finally:
        for server in servers:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--route", choices=("search", "rerank"), default="search")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0, help="Upper bound per configuration.")
    parser.add_argument("--requests", type=int, default=200, help="Upper bound per configuration.")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8],
                        help="KVRANK_MAX_BATCH_QUERIES values to compare (1: no micro-batching).")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds (each gets requests/rounds).")
    parser.add_argument("--wait-ms", type=float, default=5.0, help="KVRANK_BATCH_WAIT_MS.")
    parser.add_argument("--depth", type=int, default=20, help="Candidates reranked per request.")
    parser.add_argument("--model", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.clients < 1 or args.requests < 1 or args.seconds <= 0 or args.rounds < 1:
        raise SystemExit("--clients, --requests, --seconds and --rounds must be positive")
    rounds, load_before, load_after = run_interleaved(args)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}"
    print(f"route /v1/{args.route}, {args.clients} clients, depth {args.depth}, model {args.model or 'smollm2'}, "
          f"{machine}; {args.rounds} interleaved rounds; load average before "
          f"{'/'.join(f'{x:.1f}' for x in load_before)}, after {'/'.join(f'{x:.1f}' for x in load_after)}")
    print("| round | max_batch_queries | requests | errors | seconds | req/s | p50 ms | p95 ms | p99 ms | mean batch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, results in enumerate(rounds, 1):
        for r in results:
            print(f"| {i} | {r['max_batch_queries']} | {r['ok']} | {sum(r['errors'].values())} {r['errors'] or ''} | "
                  f"{r['seconds']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
                  f"{r['mean_batch']} |")
    for j, batch in enumerate(args.batch[1:], 1):
        pairs = [results[j]["throughput_rps"] / results[0]["throughput_rps"] for results in rounds
                 if results[0]["throughput_rps"] > 0]
        if pairs:
            print(f"throughput max_batch_queries={batch} / {args.batch[0]}: {statistics.median(pairs):.2f}x "
                  f"({min(pairs):.2f}-{max(pairs):.2f}, {len(pairs)} rounds)")
    results = [r for results in rounds for r in results]
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "machine": machine, "load_before": load_before, "load_after": load_after,
                       "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
