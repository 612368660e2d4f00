"""Measure the remote KV tier's per-entry cost, read and write, over file:// and a local S3-protocol server.

    .venv/bin/python benchmarks/remote_store_bench.py [--entries 40] [--tokens 150] [--batch 20] [--rounds 5] \
        [--json out.json]

Entries are shaped like SmolLM2-135M's in the default `int8` format (`--layers 30 --kv-heads 3 --head-dim 64`),
encoded by the real codec (`KVCodec`, integer codes plus fp16 scales) from random KV, so their sizes are what a
`kvrank warm` would store for a `--tokens`-token passage. No model runs: this measures the store alone.

Per backend (file:// on a temporary folder of the local disk; s3:// on moto's S3 server started here on 127.0.0.1,
an in-process Python emulation of S3, so its numbers are an upper bound of the protocol's client-side cost, not of
AWS's latency), after one warm-up round:
  write         RemoteTier.put_many([entry]) of a new key: encode + checksum + publish (link / conditional PUT)
  write again   the same keys once more: a no-op that learns the object exists (another node wrote it)
  read          RemoteTier.get_many([key]): fetch + full checksum + tensor views
  read batch    get_many of `--batch` keys at once (fetched concurrently on s3), per entry, `--rounds` times
                (moto serves from threads of this very process, so concurrent fetches share its GIL with it)
  read-through  TieredKVStore over a new DiskKVStore: remote hit + copy into the local tier, per entry
and for scale the local DiskKVStore's own put and get of the same entries. p50/p95 in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kvrank.attention.kvformat import KVCodec, KVFormat
from kvrank.store.codec import entry_nbytes
from kvrank.store.disk import DiskKVStore, StoreConfig
from kvrank.store.kv import PassageKV, StoreIdentity, kv_key
from kvrank.store.remote import RemoteTier
from kvrank.store.tiered import TieredKVStore

FORMAT = "int8"
IDENTITY = StoreIdentity(fingerprint="bench", storage_tag=f"dtype=float16;compute=float32;format={FORMAT}",
                         model="synthetic")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(ms, 0.5), 2), "p95_ms": round(percentile(ms, 0.95), 2),
            "mean_ms": round(statistics.fmean(ms), 2), "n": len(ms)}


def make_entries(n: int, tokens: int, layers: int, kv_heads: int, head_dim: int, seed: int) -> list[PassageKV]:
    """`n` entries of `tokens` tokens in FORMAT, encoded from random post-RoPE-like KV by the store's codec."""
    gen = torch.Generator().manual_seed(seed)
    codec = KVCodec(KVFormat.parse(FORMAT), torch.float16, kv_heads=kv_heads, head_dim=head_dim)
    out = []
    for i in range(n):
        keys = [torch.randn(kv_heads, tokens, head_dim, generator=gen) for _ in range(layers)]
        values = [torch.randn(kv_heads, tokens, head_dim, generator=gen) for _ in range(layers)]
        ck, cv, aux = codec.encode(keys, values, start=0)
        out.append(PassageKV(kv_key("bench", [seed], [i, tokens], IDENTITY.storage_tag), ck, cv, aux))
    return out


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(url: str, entries: list[PassageKV], warmup: list[PassageKV], batch: int, rounds: int,
            folder: Path) -> dict:
    tier = RemoteTier(url, IDENTITY)
    for kv in warmup:  # connections, imports, the bucket's first objects
        tier.put_many([kv])
        tier.get_many([kv.key])
    result = {
        "write": summary([timed(lambda: tier.put_many([kv])) for kv in entries]),
        "write_again": summary([timed(lambda: tier.put_many([kv])) for kv in entries]),
        "read": summary([timed(lambda: tier.get_many([kv.key])) for kv in entries]),
    }
    keys = [kv.key for kv in entries]
    groups = [keys[i:i + batch] for i in range(0, len(keys) - batch + 1, batch)] or [keys]
    result["read_batch_per_entry"] = summary([timed(lambda: tier.get_many(g)) / len(g)
                                              for _ in range(rounds) for g in groups])
    local = DiskKVStore(folder / f"local-{uuid.uuid4().hex[:6]}", IDENTITY, StoreConfig(fsync=True))
    tiered = TieredKVStore(local, tier)
    result["read_through"] = summary([timed(lambda: tiered.get_many([k])) for k in keys])
    counters = tier.counters
    assert counters.misses == 0 and counters.corrupt == 0 and counters.errors == 0, counters
    tiered.close()
    return result


def measure_disk(entries: list[PassageKV], folder: Path) -> dict:
    store = DiskKVStore(folder / "disk", IDENTITY, StoreConfig(fsync=True))
    out = {"put": summary([timed(lambda: store.put(kv)) for kv in entries]),
           "get": summary([timed(lambda: store.get_many([kv.key])) for kv in entries])}
    store.close()
    return out


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on a free port of 127.0.0.1 with bucket `bench`; yields its endpoint."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("bench")
    try:
        yield endpoint
    finally:
        server.stop()


def machine() -> dict:
    import fsspec
    import moto
    import s3fs

    cpu = platform.processor() or "unknown"
    with open("/proc/cpuinfo") as handle:
        names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    return {"cpu": names[0] if names else cpu, "cores": os.cpu_count(), "load_avg": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__, "fsspec": fsspec.__version__,
            "s3fs": s3fs.__version__, "moto": moto.__version__, "when_utc": time.strftime("%Y-%m-%d %H:%M",
                                                                                      time.gmtime())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=40, help="entries timed per backend and operation")
    parser.add_argument("--tokens", type=int, default=150, help="tokens per passage")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=20, help="keys per get_many in the batched read")
    parser.add_argument("--rounds", type=int, default=5, help="times the batched reads are repeated")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    entries = make_entries(args.entries, args.tokens, args.layers, args.kv_heads, args.head_dim, seed=1)
    warmup = make_entries(3, args.tokens, args.layers, args.kv_heads, args.head_dim, seed=2)
    settings = {**vars(args), "json": str(args.json) if args.json else None, "format": FORMAT,
                "entry_bytes": entry_nbytes(entries[0]), "fsync": True}
    report: dict = {"machine": machine(), "settings": settings}
    print(json.dumps({k: report[k] for k in ("machine", "settings")}, indent=1))
    with tempfile.TemporaryDirectory(prefix="kvrank-remote-bench-") as tmp:
        folder = Path(tmp)
        report["disk"] = measure_disk(entries, folder)
        report["file"] = measure(f"file://{folder}/remote", entries, warmup, args.batch, args.rounds, folder)
        with moto_s3() as endpoint:
            report["s3_moto"] = measure(f"s3://bench/{uuid.uuid4().hex[:8]}", entries, warmup, args.batch,
                                        args.rounds, folder)
            report["s3_moto"]["endpoint"] = endpoint
    for backend in ("disk", "file", "s3_moto"):
        for op, stats in report[backend].items():
            if isinstance(stats, dict):
                print(f"{backend:8s} {op:22s} p50 {stats['p50_ms']:8.2f} ms  p95 {stats['p95_ms']:8.2f} ms  "
                      f"(n={stats['n']})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
