"""Figures for serve_bench.py: TTFT / TPOT / ITL (p50 and p99) and throughput against request rate.

    python bench/plot.py RESULT.json [RESULT2.json ...] --out sweep.png   # one line per file

A request rate of ``inf`` (all at once) is drawn at the right end, one step past the largest
finite rate, and labelled "inf".
"""

from __future__ import annotations

import argparse
import json
import math

METRICS = (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"))


def _x_positions(rates: list[float]) -> tuple[list[float], list[float], list[str]]:
    finite = sorted({r for r in rates if math.isfinite(r)})
    top = finite[-1] * 2 if finite else 1.0
    xs = [r if math.isfinite(r) else top for r in rates]
    ticks = [*finite, *([top] if any(not math.isfinite(r) for r in rates) else [])]
    labels = [f"{r:g}" for r in finite] + (["inf"] if len(ticks) > len(finite) else [])
    return xs, ticks, labels


def plot_sweep(
    points: list[tuple[float, dict]] | dict[str, list[tuple[float, dict]]], path: str, title: str = ""
) -> None:
    """``points``: [(rate, summary)] for one system, or {label: [(rate, summary)]} for several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = points if isinstance(points, dict) else {"": points}
    all_rates = [float(r) if r != "inf" else math.inf for pts in series.values() for r, _ in pts]
    _, ticks, labels = _x_positions(all_rates)
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for si, (label, pts) in enumerate(series.items()):
        pts = sorted(((float(r) if r != "inf" else math.inf), s) for r, s in pts)
        xs, _, _ = _x_positions([r for r, _ in pts] + all_rates)
        xs = xs[: len(pts)]
        color = colors[si % len(colors)]
        prefix = f"{label} " if label else ""
        for ax, (key, name) in zip(axes, METRICS):
            p50 = [s[key]["p50"] for _, s in pts]
            p99 = [s[key]["p99"] for _, s in pts]
            ax.plot(xs, p50, "o-", color=color, label=f"{prefix}p50")
            ax.plot(xs, p99, "s--", color=color, alpha=0.7, label=f"{prefix}p99")
            ax.set_ylabel(name)
        axes[3].plot(xs, [s["output_throughput"] for _, s in pts], "o-", color=color, label=label or "output")
        axes[3].set_ylabel("output tokens/s")
    for ax, name in zip(axes, [m[1] for m in METRICS] + ["output throughput"]):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, labels)
        ax.minorticks_off()
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="serve_bench.py --json files (with --sweep-rates)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    series = {}
    for path in args.results:
        with open(path) as f:
            data = json.load(f)
        series[path if len(args.results) > 1 else ""] = [
            (p["request_rate"], p["summary"]) for p in data["points"]
        ]
    plot_sweep(series if len(series) > 1 else series[""], args.out, args.title)


if __name__ == "__main__":
    main()
