"""Bytes an entry file holds beyond its tensors (header, recorded key, checksum, alignment), over a store's entries.

    python benchmarks/entry_overhead.py --store stores/dl19-ql [--entries 200]

Prints min / median / max overhead per entry and its share of the entry: what docs/results/scale.md adds to a corpus's
stored size per entry.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from kvrank.store.codec import entry_name, read_entry
from kvrank.store.disk import DiskKVStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--entries", type=int, default=200, help="How many entries to read (least recently used).")
    args = parser.parse_args()

    with DiskKVStore(args.store) as store:
        keys = store.keys()[:args.entries]
    overhead, share, tokens = [], [], []
    for key in keys:
        kv, size = read_entry(args.store / entry_name(key), key)
        overhead.append(size - kv.nbytes)
        share.append((size - kv.nbytes) / size)
        tokens.append(kv.num_tokens)
    print(f"{args.store}: {len(keys)} entries, {statistics.median(tokens):.0f} tokens (median)")
    print(f"bytes beyond the tensors per entry: min {min(overhead):,}, median {statistics.median(overhead):,.0f}, "
          f"max {max(overhead):,}; share of the entry: median {statistics.median(share):.2%}, max {max(share):.2%}")


if __name__ == "__main__":
    main()
