"""Worker processes for tests/test_store_crash.py: `python store_workers.py reader|writer STORE SECONDS SEED`.

Each worker writes `<STORE>.<role>.<seed>.ready` once imported, waits for `<STORE>.go`, runs for SECONDS and
prints one JSON line of counts. Readers check every served entry against the value it must have.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

from kvrank.store.disk import DiskKVStore, StoreIdentity
from kvrank.store.kv import PassageKV, kv_key

IDENTITY = StoreIdentity(fingerprint="synthetic-model", storage_tag="dtype=float16", model="synthetic")
KEYSPACE = 64


def synthetic(i: int, tokens: int = 48, layers: int = 2) -> PassageKV:
    """Entry i: values that only entry i has, [Hkv=2, T, D=16] per layer (about 12 KiB per layer)."""
    key = kv_key(IDENTITY.fingerprint, [1], [i], IDENTITY.storage_tag)
    base = torch.arange(2 * tokens * 16, dtype=torch.float32).reshape(2, tokens, 16) % 251
    ks = [(base + 1000 * layer + i).half() for layer in range(layers)]
    return PassageKV(key=key, keys=ks, values=[-k for k in ks])


def matches(kv: PassageKV, i: int) -> bool:
    want = synthetic(i)
    return kv.key == want.key and all(torch.equal(a, b) for a, b in zip(kv.keys + kv.values,
                                                                      want.keys + want.values, strict=True))


def main(role: str, store_dir: str, seconds: float, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    store = DiskKVStore(store_dir, IDENTITY)  # the budget is the one the parent recorded
    counts = {"ops": 0, "hits": 0, "misses": 0, "wrong": 0, "evicted": 0}
    Path(f"{store_dir}.{role}.{seed}.ready").touch()
    go = Path(f"{store_dir}.go")
    while not go.exists():
        time.sleep(0.01)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ids = [rng.randrange(KEYSPACE) for _ in range(8)]
        if role == "writer":
            counts["evicted"] += len(store.put_many([synthetic(i) for i in ids]))
        else:
            for i, kv in zip(ids, store.get_many([synthetic(i).key for i in ids]), strict=True):
                if kv is None:
                    counts["misses"] += 1
                elif matches(kv, i):
                    counts["hits"] += 1
                else:
                    counts["wrong"] += 1
        counts["ops"] += 1
    return counts


if __name__ == "__main__":
    role, store_dir, seconds, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(main(role, store_dir, seconds, seed)))  # noqa: T201 - the parent reads this line
