"""Print medians and spreads of the benchmark JSON files in a folder: python bench/summarize.py bench/results"""

from __future__ import annotations

import glob
import json
import os
import statistics
import sys
from collections import defaultdict


def main(folder: str) -> int:
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        name = os.path.basename(path).rsplit("-", 1)[0]
        with open(path, encoding="utf-8") as fh:
            groups[name].append(json.load(fh))
    print(f"{'benchmark':<24} {'runs':>4} {'N':>6} {'ours img/s':>11} {'base img/s':>11} {'ratio (median, min-max)':>26} {'peak MB':>8}")
    for name, runs in groups.items():
        ratios = [r["ratio"] for r in runs if r["ratio"] == r["ratio"]]
        ours = statistics.median(r["ours_images_per_s"] for r in runs)
        base = [r["baseline_images_per_s"] for r in runs if r["baseline_images_per_s"] == r["baseline_images_per_s"]]
        ratio = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-"
        peak = max(r["ours_memory"]["total_mb"] for r in runs)
        print(
            f"{name:<24} {len(runs):>4} {runs[0]['images']:>6} {ours:>11.2f} "
            f"{(statistics.median(base) if base else float('nan')):>11.2f} {ratio:>26} {peak:>8.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench/results"))
