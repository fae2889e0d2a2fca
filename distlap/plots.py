"""Reliability diagrams (Guo et al. 2017): per-bin accuracy against confidence, the gap shaded.

Only bins that hold examples are drawn (an empty bin has no accuracy to show); a histogram of the
examples per bin sits underneath, so a bar backed by three examples reads as such.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on workers
from matplotlib.figure import Figure

SIZE_IN, DPI = (4.2, 5.2), 100  # 420 x 520 px


def reliability_figure(bins: dict, title: str, ece: float | None = None) -> Figure:
    """The figure of :func:`reliability_diagram` (not saved). ``bins``: a ReliabilityBins as a dict."""
    edges = bins["edges"]
    width = edges[1] - edges[0]
    drawn = [
        (e + width / 2, a, c, n)
        for e, a, c, n in zip(edges[:-1], bins["accuracy"], bins["confidence"], bins["count"])
        if n
    ]
    centres, acc, conf, counts = (list(v) for v in zip(*drawn)) if drawn else ([], [], [], [])
    # a bare Figure (no pyplot state) with fixed margins: tight_layout cost more than the drawing
    fig = Figure(figsize=SIZE_IN)
    ax, hist = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    fig.subplots_adjust(left=0.16, right=0.96, top=0.9, bottom=0.1, hspace=0.12)
    ax.bar(centres, acc, width=width, edgecolor="black", color="tab:blue", label="accuracy")
    ax.bar(
        centres,
        [c - a for c, a in zip(conf, acc)],
        bottom=acc,
        width=width,
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    subtitle = f"\nECE {ece:.4f}" if ece is not None else ""
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(title + subtitle, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(centres, counts, width=width, color="grey", edgecolor="black")
    hist.set(xlabel="confidence (max probability)", ylabel="examples")
    return fig


def reliability_diagram(bins: dict, title: str, path: Path, ece: float | None = None) -> Path:
    """Bars of accuracy per non-empty confidence bin over the diagonal, saved as a 420 x 520 px PNG."""
    fig = reliability_figure(bins, title, ece)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
