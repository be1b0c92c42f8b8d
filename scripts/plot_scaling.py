#!/usr/bin/env python3
"""Draws the scaling benchmarks' CSVs as PNG plots (needs matplotlib).

    python3 scripts/plot_scaling.py [CSV ...]   # default: target/bench/scaling-*.csv

One image per backend, `scaling-<backend>.png` beside BENCHMARKS.md: consume
throughput (msg/s) against the number of consumers, one panel per payload
size, switchyard next to the raw client.
"""
import csv
import glob
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
paths = sys.argv[1:] or sorted(glob.glob(os.path.join(root, "target/bench/scaling-*.csv")))
if not paths:
    sys.exit("no scaling CSV found (run a backend's `--bench scaling` first)")

for path in paths:
    rows = list(csv.DictReader(open(path)))
    backend = rows[0]["backend"]
    sizes = sorted({int(r["payload_bytes"]) for r in rows})
    series = defaultdict(list)  # (size, client) -> [(consumers, rate)]
    for r in rows:
        series[(int(r["payload_bytes"]), r["client"])].append(
            (int(r["consumers"]), float(r["msg_per_s"]))
        )
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for (s, client), points in sorted(series.items()):
            if s != size:
                continue
            points.sort()
            xs = [p[0] for p in points]
            ax.plot(xs, [p[1] for p in points], marker="o", label=client)
            ax.set_xticks(xs)
        ax.set_title(f"{backend}: {size // 1024} KiB payloads")
        ax.set_xlabel("consumers on one subscription")
        ax.set_ylabel("consume+ack (msg/s)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    name = os.path.basename(path).replace(".csv", ".png")
    out = os.path.join(root, name)
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
