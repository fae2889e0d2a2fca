"""The PEFT-methods report's composite PNGs, every backbone in one figure: colour = method, marker (or
bar group) = backbone, one panel per dataset. Points and bars are means over seeds, whiskers the std
over seeds (none for one seed). Each ``*_figure`` takes :func:`analysis.peft_tables.method_summary`'s
frame and returns the (unsaved) Figure; :func:`write_figures` saves them at ``analysis.figures``' size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from analysis.figures import plt, save
from analysis.peft_tables import ACC, ECE, METHODS, PCT, SERIES, dataset_label
from distlap.names import ACCURACY_PER_PCT, DATASET, METHOD, TIME_PER_EPOCH

COLORS = {"norm": "tab:blue", "lora": "tab:orange", "hybrid": "tab:green"}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
STD_NOTE = "mean ± std over seeds"


def _panels(summary: pd.DataFrame) -> tuple[Figure, list[tuple[str, plt.Axes]]]:
    datasets = list(pd.unique(summary[DATASET]))
    fig, axes = plt.subplots(1, len(datasets), squeeze=False)
    return fig, list(zip(datasets, axes[0]))


def _legend(ax, summary: pd.DataFrame, *, markers: bool) -> None:
    """One legend: a colour patch per method, then (with ``markers``) a black marker per backbone."""
    handles = [Patch(color=COLORS[m], label=METHODS[m]) for m in METHODS if m in set(summary[METHOD])]
    if markers:
        handles += [
            Line2D([], [], color="black", marker=_marker(summary, s), linestyle="none", label=s)
            for s in pd.unique(summary[SERIES])
        ]
    ax.legend(handles=handles, fontsize=7, loc="best")


def _marker(summary: pd.DataFrame, series: str) -> str:
    return MARKERS[list(pd.unique(summary[SERIES])).index(series) % len(MARKERS)]


def _versus_params(summary: pd.DataFrame, y: str, ylabel: str, title: str, scale: float = 1) -> Figure:
    """One point per (setting, method) at (Tuned Params %, ``scale`` × ``y``), x on a log scale."""
    fig, panels = _panels(summary)
    for dataset, ax in panels:
        for row in summary[summary[DATASET] == dataset].to_dict("records"):
            ax.errorbar(
                row[PCT],
                scale * row[y],
                yerr=scale * np.nan_to_num(row[f"{y}_std"]),
                fmt=_marker(summary, row[SERIES]),
                color=COLORS[row[METHOD]],
                capsize=3,
                markersize=7,
                markeredgecolor="black",
                markeredgewidth=0.5,
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="Tuned Params % (log scale)", ylabel=ylabel, title=dataset_label(dataset))
        ax.grid(alpha=0.3, which="both")
    _legend(panels[-1][1], summary, markers=True)
    fig.suptitle(f"{title} ({STD_NOTE})", fontsize=10)
    return fig


def _grouped_bars(summary: pd.DataFrame, y: str, ylabel: str, title: str) -> Figure:
    """Bars grouped by backbone (x), one bar per method (colour) in each group."""
    fig, panels = _panels(summary)
    methods = [m for m in METHODS if m in set(summary[METHOD])]
    width = 0.8 / len(methods)
    for dataset, ax in panels:
        rows = summary[(summary[DATASET] == dataset) & np.isfinite(summary[y].astype(float))]
        groups = list(pd.unique(rows[SERIES]))
        for row in rows.to_dict("records"):
            x = groups.index(row[SERIES]) + (methods.index(row[METHOD]) - (len(methods) - 1) / 2) * width
            ax.bar(
                x,
                row[y],
                width,
                yerr=np.nan_to_num(row[f"{y}_std"]),
                capsize=3,
                color=COLORS[row[METHOD]],
                edgecolor="black",
                linewidth=0.5,
            )
        ax.set_xticks(range(len(groups)), groups, rotation=15 if len(groups) > 2 else 0)
        ax.set(xlabel="backbone", ylabel=ylabel, title=dataset_label(dataset))
        ax.grid(alpha=0.3, axis="y")
    _legend(panels[-1][1], summary, markers=False)
    fig.suptitle(f"{title} ({STD_NOTE})", fontsize=10)
    return fig


def accuracy_vs_params_figure(summary: pd.DataFrame) -> Figure:
    return _versus_params(summary, ACC, "test Acc@1 (%)", "Accuracy vs Tuned Params %", scale=100)


def ece_vs_params_figure(summary: pd.DataFrame) -> Figure:
    return _versus_params(summary, ECE, "test ECE (absolute)", "ECE vs Tuned Params %")


def time_per_epoch_figure(summary: pd.DataFrame) -> Figure:
    return _grouped_bars(summary, TIME_PER_EPOCH, "time per epoch (s)", "Training time per epoch")


def accuracy_per_param_figure(summary: pd.DataFrame) -> Figure:
    return _grouped_bars(
        summary, ACCURACY_PER_PCT, "Acc@1 (%) / Tuned Params %", "Accuracy per tuned parameter"
    )


FIGURES = {
    "accuracy_vs_tuned_params": (
        accuracy_vs_params_figure,
        "Test Acc@1 against Tuned Params % (log x); colour = method, "
        "marker = backbone; whiskers: std over seeds.",
    ),
    "ece_vs_tuned_params": (
        ece_vs_params_figure,
        "Test ECE against Tuned Params % (log x); lower is better calibrated; whiskers: std over seeds.",
    ),
    "time_per_epoch": (
        time_per_epoch_figure,
        "Training time per epoch, grouped by backbone, one bar per method; whiskers: std over seeds.",
    ),
    "accuracy_per_tuned_param": (
        accuracy_per_param_figure,
        "Acc@1 (%) divided by Tuned Params %: accuracy points per percent "
        "of parameters tuned; whiskers: std over seeds.",
    ),
}


def write_figures(summary: pd.DataFrame, out: Path) -> dict[str, Path]:
    """Every figure of ``FIGURES`` as ``out/<name>.png``."""
    return {name: save(draw(summary), out / f"{name}.png") for name, (draw, _) in FIGURES.items()}
