"""Reliability diagrams (Guo et al. 2017): per-bin accuracy against confidence, gap shaded."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on workers
import matplotlib.pyplot as plt  # noqa: E402


def reliability_diagram(bins: dict, title: str, path: Path, ece: float | None = None) -> Path:
    """Bars of accuracy per confidence bin over the diagonal; ``bins`` is a ReliabilityBins as dict."""
    edges = bins["edges"]
    width = edges[1] - edges[0]
    centres = [e + width / 2 for e in edges[:-1]]
    acc = [a if c else 0.0 for a, c in zip(bins["accuracy"], bins["count"])]
    conf = [f if c else m for f, c, m in zip(bins["confidence"], bins["count"], centres)]
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.2, 5.2), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.bar(centres, acc, width=width, edgecolor="black", color="tab:blue", label="accuracy")
    ax.bar(centres, [c - a for c, a in zip(conf, acc)], bottom=acc, width=width, color="tab:red",
           alpha=0.3, edgecolor="tab:red", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=title + (f"  (ECE {ece:.4f})" if ece is not None else ""))
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(centres, bins["count"], width=width, color="grey", edgecolor="black")
    hist.set(xlabel="confidence (max probability)", ylabel="examples")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
