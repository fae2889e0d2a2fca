"""The report's PNGs: ranked Δ_ECE, Δ_ECE against block depth, ECE per subset, reliability diagrams.

Every figure is ``FIGSIZE`` inches at ``DPI`` (800 x 450 px; reliability diagrams are
:func:`distlap.plots.reliability_diagram`'s own 420 x 520 px), so a page of them reads alike.
ECE and Δ_ECE are absolute calibration errors on the test split (fractions in [0, 1]).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from analysis.aggregate import DELTA, DELTA_HIGH, DELTA_LOW, KINDS, MAP_TEST, TEST
from distlap import names
from distlap.names import CONFIG, FIRST_BLOCK, N_SEEDS, SUBSET, SUBSET_KIND
from distlap.plots import reliability_diagram

FIGSIZE = (8.0, 4.5)
DPI = 100
TITLE_CHARS = 80  # a 12 pt title this long fills the 800 px width beside the axis labels
COLORS = {"map": "tab:gray", "layer": "tab:blue", "group": "tab:orange", "all": "tab:green"}
KIND_NAMES = {"map": "MAP", "layer": "single block", "group": "group of blocks", "all": "all blocks"}
DELTA_LABEL = "Δ_ECE = ECE_MAP − ECE_S\n(test, absolute ECE)"


def save(fig, path: Path) -> Path:
    """Fixed size and resolution (no tight bbox, which would change the pixel size); a title too long
    for the width is wrapped onto more lines instead of running off the image."""
    fig.set_size_inches(*FIGSIZE)
    for ax in fig.axes:
        if len(ax.get_title()) > TITLE_CHARS:
            ax.set_title(textwrap.fill(ax.get_title(), TITLE_CHARS))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _kind_legend(ax, kinds: pd.Series, *, with_map: bool = False) -> None:
    """One colour patch per kind of subset drawn (MAP first if drawn), in ``KINDS`` order."""
    shown = (["map"] if with_map else []) + [k for k in KINDS if k in set(kinds)]
    ax.legend(handles=[Patch(color=COLORS[k], label=KIND_NAMES[k]) for k in shown], fontsize=8, loc="best")


def delta_ece_ranked(ranked: pd.DataFrame, title: str, path: Path) -> Path:
    """Bars of mean Δ_ECE per subset, largest first, with 95% CI whiskers; above 0 = better than MAP."""
    fig, ax = plt.subplots()
    x = range(len(ranked))
    err = [ranked[DELTA] - ranked[DELTA_LOW], ranked[DELTA_HIGH] - ranked[DELTA]]
    ax.bar(x, ranked[DELTA], color=[COLORS[k] for k in ranked[SUBSET_KIND]], edgecolor="black", linewidth=0.5)
    ax.errorbar(x, ranked[DELTA], yerr=err, fmt="none", ecolor="black", capsize=3, linewidth=1)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(list(x), ranked[SUBSET], rotation=45, ha="right")
    ax.set(xlabel="layer subset S treated as Bayesian (ranked)", ylabel=DELTA_LABEL, title=title)
    _kind_legend(ax, ranked[SUBSET_KIND])
    return save(fig, path)


def delta_ece_sequential(summary: pd.DataFrame, configs: list[str], path: Path) -> Path:
    """Δ_ECE of each single block against its depth, one line (and 95% CI band) per configuration."""
    fig, ax = plt.subplots()
    for config in configs:
        rows = summary[(summary[CONFIG] == config) & (summary[SUBSET_KIND] == "layer")]
        rows = rows.sort_values(FIRST_BLOCK)
        n = int(rows[N_SEEDS].max()) if len(rows) else 0
        (line,) = ax.plot(
            rows[FIRST_BLOCK], rows[DELTA], marker="o", label=f"{config} ({n} seed{'s' * (n > 1)})"
        )
        ax.fill_between(
            rows[FIRST_BLOCK], rows[DELTA_LOW], rows[DELTA_HIGH], color=line.get_color(), alpha=0.15
        )
    ax.axhline(0, color="black", linewidth=0.8)
    blocks = sorted(summary.loc[summary[SUBSET_KIND] == "layer", FIRST_BLOCK].unique())
    ax.set_xticks(blocks)
    ax.set(
        xlabel="transformer block (0 = nearest the input)",
        ylabel=DELTA_LABEL,
        title="Δ_ECE of each single block by depth (band: 95% CI)",
    )
    ax.legend(fontsize=8, loc="best", title=names.describe(CONFIG).label, title_fontsize=8)
    return save(fig, path)


def answer_by_setting(summary: pd.DataFrame, path: Path) -> Path:
    """How the answer moves with λ and the LoRA rank: each configuration's single-block Δ_ECE (mean
    over its seeds) against depth; colour = λ (log scale), line style = rank."""
    rows = summary[summary[SUBSET_KIND] == "layer"]
    lams = rows[names.LAMBDA] if names.LAMBDA in rows else pd.Series(dtype=float)
    norm = matplotlib.colors.LogNorm(lams.min(), lams.max()) if len(lams.dropna()) > 1 else None
    ranks = sorted(rows[names.LORA_RANK].dropna().unique()) if names.LORA_RANK in rows else []
    styles = dict(zip(ranks, ["-", "--", ":", "-."] * 4))
    fig, ax = plt.subplots()
    for config, part in rows.groupby(CONFIG, sort=False):
        part = part.sort_values(FIRST_BLOCK)
        first = part.iloc[0]
        color = plt.cm.viridis(norm(first[names.LAMBDA])) if norm is not None else None
        ax.plot(
            part[FIRST_BLOCK],
            part[DELTA],
            marker="o",
            color=color,
            linestyle=styles.get(first.get(names.LORA_RANK), "-"),
            label=f"{config} ({int(part[N_SEEDS].max())} seeds)",
        )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(sorted(rows[FIRST_BLOCK].unique()))
    if norm is not None:
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="prior precision λ")
    ax.set(
        xlabel="transformer block (0 = nearest the input)",
        ylabel=DELTA_LABEL,
        title="How the answer moves with λ and rank: single-block Δ_ECE per configuration",
    )
    ax.legend(fontsize=7, loc="best")
    return save(fig, path)


def ece_comparison(ranked: pd.DataFrame, title: str, path: Path) -> Path:
    """Test ECE of the MAP, of each subset (blocks in depth order, then groups) and of all blocks;
    whiskers: std over seeds."""
    rows = ranked.assign(_o=ranked[SUBSET_KIND].map(KINDS.index)).sort_values(
        ["_o", FIRST_BLOCK], kind="stable"
    )
    labels = ["MAP", *rows[SUBSET]]
    map_ece, ece = MAP_TEST["ece"], TEST["ece"]
    values = [rows[map_ece].iloc[0], *rows[ece]]
    std = [rows[f"{map_ece}_std"].iloc[0], *rows[f"{ece}_std"]]  # NaN (no whisker) for one seed
    fig, ax = plt.subplots()
    ax.bar(
        range(len(labels)),
        values,
        yerr=np.nan_to_num(std),
        capsize=3,
        color=[COLORS["map"], *(COLORS[k] for k in rows[SUBSET_KIND])],
        edgecolor="black",
        linewidth=0.5,
    )
    ax.axhline(values[0], color=COLORS["map"], linestyle="--", linewidth=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set(xlabel="predictive (MAP, or Laplace on subset S)", ylabel="test ECE (absolute)", title=title)
    _kind_legend(ax, rows[SUBSET_KIND], with_map=True)
    return save(fig, path)


def reliability_set(result: dict, best_layer: str | None, trial: str, out: Path) -> dict[str, Path]:
    """Reliability diagrams of one trial's MAP, ``all`` and best single layer (test split)."""
    map_row = result["map"]
    paths = {
        "reliability_map": reliability_diagram(
            map_row["reliability"],
            f"MAP, trial {trial}",
            out / "reliability_map.png",
            map_row["metrics"][MAP_TEST["ece"]],
        )
    }
    for key, name in (("reliability_all", "all"), ("reliability_best_layer", best_layer)):
        row = result["subsets"].get(name) if name else None
        if row is not None:
            paths[key] = reliability_diagram(
                row["reliability"],
                f"Laplace on {name}, trial {trial}",
                out / f"{key}.png",
                row["metrics"][TEST["ece"]],
            )
    return paths
