"""Measure the disk KV store: warm throughput against a plain model forward, read latency cold and warm, bytes/token.

    .venv/bin/python benchmarks/kv_store_bench.py --data ../shared/data/scifact --docs 24 --rounds 2 \
        --json out/kv_bench.json

Three ways over the same passages, batch by batch (length-sorted), back to back in rotating order, `--rounds` times:
  forward  the model's own forward over the passage tokens (plain causal attention, KV cache on, logits of the last
           token only): what any use of these passages costs at least
  prefill  `BlockEngine.prefill`: the reranker's passage encoding after the shared prefix, KV cast to fp16
  warm     `kvrank.store.warm.warm` into a new `DiskKVStore`, with the reranker `kvrank warm` builds
           (`kvrank.pipeline.build_reranker`): prefill + entry files (fsync) + index
Then per-passage read latency from that store: cold (each file dropped from the page cache with
posix_fadvise(DONTNEED) first; `fincore` confirms) and warm (read again), p50/p95 over the passages.
Prints one JSON object; every number is measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from kvrank.eval.data import load_dataset
from kvrank.pipeline import PipelineConfig, build_reranker
from kvrank.reranker.model import load_lm
from kvrank.reranker.reranker import BlockReranker, RerankerConfig
from kvrank.store.disk import DiskKVStore
from kvrank.store.warm import warm


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def batches(ids: list[list[int]], size: int) -> list[list[int]]:
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [order[i:i + size] for i in range(0, len(order), size)]


class Clock:
    """Wall and process-CPU seconds summed over the timed blocks."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


@torch.no_grad()
def plain_forward(rr: BlockReranker, ids: list[list[int]]) -> None:
    """The model's own forward over right-padded passage tokens (causal attention, KV cache on)."""
    t_max = max(map(len, ids))
    x = torch.zeros((len(ids), t_max), dtype=torch.long, device=rr.lm.device)
    mask = torch.zeros_like(x)
    for row, seq in enumerate(ids):
        x[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    rr.lm.model(input_ids=x, attention_mask=mask, use_cache=True, logits_to_keep=1)


def resident_bytes(paths: list[Path]) -> int | None:
    """Page-cache bytes of the files, from util-linux `fincore` (None where it is missing)."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(line) for line in out.split())


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_latencies(store: DiskKVStore, keys: list, cold: bool) -> list[float]:
    """Milliseconds per passage for get_many([key]), which maps the file and checksums every byte."""
    out = []
    for key in keys:
        if cold:
            drop_from_page_cache(store._entry_path(key))
        start = time.perf_counter()
        kv = store.get_many([key])[0]
        assert kv is not None
        out.append((time.perf_counter() - start) * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/scifact")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--docs", type=int, default=48, help="first N passages of the corpus")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--kv-format", default="none", help="stored layout, as `kvrank warm --kv-format` (default: "
                        "none, the uncompressed fp16 layout the published numbers are for)")
    parser.add_argument("--calibration-passages", type=int, default=64,
                        help="corpus passages a fitted --kv-format is fitted on")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--store-root", default=None, help="where the temporary stores go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dataset = load_dataset(args.data)
    passages = list(dataset.corpus.values())[: args.docs]
    config = RerankerConfig(kv_format="none", mode="ql", model=args.model, batch_size=args.batch_size)
    lm = load_lm(config.model, device=config.device, dtype=config.dtype)
    corpus = list(dataset.corpus.values())

    def settings(store: Path | None) -> PipelineConfig:
        """What `kvrank warm --store STORE --kv-format F` builds (a fitted format: fitted on a corpus sample)."""
        return PipelineConfig(head="none", reranker=config, kv_format=args.kv_format, store_dir=store,
                              calibration_passages=args.calibration_passages)

    base = build_reranker(settings(None), corpus, lm=lm)  # in memory: the reference forward and prefill
    ids, keys = base.passage_keys(passages)
    tokens = sum(map(len, ids))
    root = Path(args.store_root or tempfile.mkdtemp(prefix="kvbench-"))

    plain_forward(base, ids[: args.batch_size])  # warm-up
    base.engine.prefill(base.prefix_ids, ids[: args.batch_size], keys[: args.batch_size])
    # Batch by batch, the three ways back to back in rotating order, so that the load other jobs put on the
    # machine (which drifts over seconds) falls on all three alike.
    clocks = {name: Clock() for name in ("forward", "prefill", "warm")}
    store_s = 0.0
    store: DiskKVStore | None = None
    for r in range(args.rounds):
        folder = root / f"store-{r}"
        shutil.rmtree(folder, ignore_errors=True)
        if store is not None:
            store.close()
        warmer = build_reranker(settings(folder), corpus, lm=lm)
        assert isinstance(warmer.store, DiskKVStore) and warmer.storage_tag == base.storage_tag
        store = warmer.store
        for b, batch in enumerate(batches(ids, args.batch_size)):
            steps = {
                "forward": lambda batch=batch: plain_forward(base, [ids[i] for i in batch]),
                "prefill": lambda batch=batch: base.engine.prefill(base.prefix_ids, [ids[i] for i in batch],
                                                                   [keys[i] for i in batch]),
                "warm": lambda batch=batch: warm(warmer, [passages[i] for i in batch]),
            }
            names = list(steps)
            for name in names[b % 3:] + names[:b % 3]:
                with clocks[name]:
                    out = steps[name]()
                if name == "warm":
                    assert out.prefilled == len(batch), "the warm job must prefill every passage of the batch"
                    store_s += out.store_s
    assert store is not None
    totals = store.totals()
    sample = store.get_many([keys[0]])[0]
    assert sample is not None
    tensor_bytes_per_token = sample.nbytes / sample.num_tokens
    del sample  # a mapped entry's pages cannot be dropped from the page cache
    paths = [store._entry_path(k) for k in keys]
    read_latencies(store, keys[:4], cold=False)  # warm-up (imports, first mmap)
    cold = read_latencies(store, keys, cold=True)
    for p in paths:
        drop_from_page_cache(p)
    resident_after_drop = resident_bytes(paths)
    read_latencies(store, keys, cold=False)
    warm_ms = read_latencies(store, keys, cold=False)
    batch_start = time.perf_counter()
    for lo in range(0, len(keys), 20):
        store.get_many(keys[lo:lo + 20])
    batched_ms = (time.perf_counter() - batch_start) * 1e3 / len(keys)

    wall = {name: c.wall for name, c in clocks.items()}
    cpu = {name: c.cpu for name, c in clocks.items()}
    total_tokens = tokens * args.rounds
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_avg_at_end": os.getloadavg()},
        "model": config.model, "kv_format": base.config.format.name, "passages": len(passages),
        "passage_tokens": tokens, "batch_size": args.batch_size,
        "rounds": args.rounds,
        "wall_s": {k: round(v, 2) for k, v in wall.items()},
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "tokens_per_s_wall": {k: round(total_tokens / v, 1) for k, v in wall.items()},
        "warm_over_forward": {"wall": round(wall["warm"] / wall["forward"], 3),
                              "cpu": round(cpu["warm"] / cpu["forward"], 3)},
        "warm_over_prefill": {"wall": round(wall["warm"] / wall["prefill"], 3),
                              "cpu": round(cpu["warm"] / cpu["prefill"], 3)},
        "store_s_in_warm": round(store_s, 3),
        "store_share_of_warm_wall": round(store_s / wall["warm"], 4),
        "read_ms_per_passage": {
            "cold_p50": round(statistics.median(cold), 3), "cold_p95": round(percentile(cold, 0.95), 3),
            "warm_p50": round(statistics.median(warm_ms), 3), "warm_p95": round(percentile(warm_ms, 0.95), 3),
            "warm_batched_20_mean": round(batched_ms, 3)},
        "page_cache_bytes_after_drop": resident_after_drop,
        "mean_entry_bytes": round(totals["bytes"] / totals["entries"]),
        "bytes_per_token": totals["bytes_per_token"],
        "tensor_bytes_per_token": round(tensor_bytes_per_token, 1),
    }
    # Extrapolation (not measured): the whole corpus's block tokens (truncated as the reranker does) times the
    # bytes per token measured above.
    corpus_tokens = sum(len(base.block_ids(p)) for p in dataset.corpus.values())
    report["extrapolated_whole_corpus"] = {
        "docs": len(dataset.corpus), "block_tokens": corpus_tokens,
        "store_bytes": round(corpus_tokens * totals["bytes_per_token"]),
        "store_gib": round(corpus_tokens * totals["bytes_per_token"] / 1024**3, 2),
        "warm_hours_at_measured_tokens_per_s": round(corpus_tokens * wall["warm"] / total_tokens / 3600, 2)}
    text = json.dumps(report, indent=2)
    print(text)  # noqa: T201 - a benchmark script's output
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    if args.store_root is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
