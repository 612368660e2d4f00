"""Report of query-side adapter runs: nDCG@10 of zero-shot vs adapter per test set (from `kvrank eval --json`
reports), training cost (from each adapter's card and history.json), and a PNG of the loss curves.

    python benchmarks/training_report.py --run NAME ADAPTER_DIR ZEROSHOT.json ADAPTER.json [--run ...] \
        --png docs/training.png
    python benchmarks/training_report.py --kfold NAME KFOLD_OUT [--kfold ...] --png docs/training_kfold.png

(`--kfold`: the per-fold loss curves of a `benchmarks/train_kfold.py` run, with its held-out nDCG@10 in the legend.)

Prints a Markdown table; every number is read from the files the commands wrote.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs=4, action="append", default=[],
                        metavar=("NAME", "ADAPTER", "ZEROSHOT_JSON", "ADAPTER_JSON"))
    parser.add_argument("--kfold", nargs=2, action="append", default=[], metavar=("NAME", "KFOLD_OUT"))
    parser.add_argument("--png", type=Path)
    parser.add_argument("--window", type=int, default=20, help="Moving-average window of the loss curve.")
    args = parser.parse_args()

    print("| run | test set | queries | first stage | zero-shot | adapter | Δ vs zero-shot | training queries | "
          "train s | q/s | KV hit rate | adapter MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    curves = []
    for name, adapter, zero_path, tuned_path in args.run:
        card = json.loads((Path(adapter) / "card.json").read_text())
        history = json.loads((Path(adapter) / "history.json").read_text())
        zero, tuned = json.loads(Path(zero_path).read_text()), json.loads(Path(tuned_path).read_text())
        assert tuned["settings"].get("adapter", {}).get("digest") == card["digest"], "eval was not run with it"
        size = (Path(adapter) / "adapter.safetensors").stat().st_size / 2**20
        z, t = zero["metrics"]["nDCG@10"], tuned["metrics"]["nDCG@10"]
        qps = history["queries"] / max(history["seconds"], 1e-9)
        print(f"| {name} | {tuned['dataset']} | {tuned['queries']} | {tuned['first_stage_metrics']['nDCG@10']:.4f} "
              f"| {z:.4f} | {t:.4f} | {t - z:+.4f} | {card['training']['queries']} | {history['seconds']:.0f} | "
              f"{qps:.2f} | {card['training']['kv_hit_rate']:.1%} | {size:.1f} |")
        curves.append((name, history["loss"]))
    for name, folder in args.kfold:
        report = json.loads((Path(folder) / "report.json").read_text())
        held = report["metrics"]["k-fold adapter alone"]["nDCG@10"]
        zero = report["metrics"]["zero-shot alone"]["nDCG@10"]
        for fold in sorted(Path(folder).glob("fold*/history.json")):
            history = json.loads(fold.read_text())
            curves.append((f"{name} {fold.parent.name}", history["loss"]))
        print(f"{name}: held-out nDCG@10 alone {zero:.4f} -> {held:.4f} over {report['queries']} queries")
    if args.png:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for name, loss in curves:
            w = max(1, min(args.window, len(loss)))
            smooth = [sum(loss[max(0, i - w + 1):i + 1]) / len(loss[max(0, i - w + 1):i + 1])
                      for i in range(len(loss))]
            ax.plot(range(1, len(loss) + 1), smooth, label=name)
        ax.set_xlabel("training query (steps)")
        ax.set_ylabel(f"listwise loss ({args.window}-step mean)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
