#!/usr/bin/env python3
"""Bar chart (PNG) of benchmark JSON files: each implementation's speed relative to the
in-tree model of the same run (higher is better; startup and ms/token inverted).

    python scripts/gpu/plot_benchmark.py docs/results/bench2_h100.intree.json \
        docs/results/bench2_h100.plugin.json --out docs/performance_h100.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import SCENARIOS, headline  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="per-implementation JSON files of one run")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="ERNIE-4.5-21B-A3B, bf16, dummy weights")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {json.loads(Path(p).read_text())["impl"]: json.loads(Path(p).read_text()) for p in args.results}
    base = runs["intree"]
    scen = [s for s in SCENARIOS if headline(base, s)]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(runs)
    for i, (impl, res) in enumerate(runs.items()):
        ratios = []
        for s in scen:
            b, v = headline(base, s), headline(res, s)
            ratios.append((b / v if s in ("startup", "bs1") else v / b) if v else 0)
        bars = ax.bar([j + i * width for j in range(len(scen))], ratios, width, label=impl)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(scen))], scen)
    ax.set_ylabel("speed vs in-tree (same run)")
    ax.set_title(args.title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
