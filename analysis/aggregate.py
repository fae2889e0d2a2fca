"""Tables: per (trial, subset) rows -> per (configuration, subset) over seeds -> the ranking of subsets.

Metric names are the project's one vocabulary (``distlap.tracking.subset_metrics``): ``test/ece``,
``val/nll``, ``delta_ece`` with its 95% CI ``delta_ece_low`` / ``delta_ece_high``, the MAP's
``map/test/ece``. A *configuration* is a setting of the searched parameters other than the seed;
trials that repeat one (several seeds) are aggregated: mean, ``<metric>_std`` (sample std) and
``n_seeds``. The CI of one run is its paired bootstrap over test examples; over several seeds it is the
t-interval of the seed means (``ci_method`` says which).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from scipy import stats

from analysis.collect import SEED, SweepData
from distlap.tracking import subset_metrics

KINDS = ("layer", "group", "all")   # a single block, several blocks, every block
AGGREGATED = ("delta_ece", "test/accuracy", "test/nll", "test/brier", "test/ece", "test/mce",
              "val/accuracy", "val/nll", "val/ece", "map/test/accuracy", "map/test/ece", "map/test/nll",
              "accuracy_drop", "objective", "time_s")
_LAYER = re.compile(r"layer_\d+")
_SHORT = {"train.prior_precision": "λ", "peft.rank": "r", "peft.method": "method"}


def subset_kind(name: str, blocks: list[int]) -> str:
    if name == "all":
        return "all"
    return "layer" if _LAYER.fullmatch(name) and len(blocks) == 1 else "group"


def config_label(params: dict) -> str:
    """``{"peft.rank": 4, "train.prior_precision": 43.1}`` -> ``"r=4, λ=43.1"``."""
    def value(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{_SHORT.get(k, k.rsplit('.', 1)[-1])}={value(v)}" for k, v in params.items()) or "base"


def subset_frame(data: SweepData) -> pd.DataFrame:
    """One row per (trial with results, subset), subsets in the results' order (blocks, groups, all)."""
    trials = data.trials.set_index("trial_id")
    rows = []
    for trial_id, result in data.results.items():
        trial = trials.loc[trial_id]
        params = {p: trial.get(p) for p in data.config_params}
        map_test = {f"map/test/{k}": v for k, v in result["map"]["test"].items()}
        for name, row in result["subsets"].items():
            metrics = subset_metrics(row)
            rows.append({
                "config": config_label(params), **params, SEED: trial.get(SEED), "trial_id": trial_id,
                "optuna_trial": trial.get("optuna_trial"), "objective": trial.get("objective"),
                "subset": name, "kind": subset_kind(name, row["blocks"]), "blocks": row["blocks"],
                "first_block": min(row["blocks"]), **metrics, **map_test,
                "accuracy_drop": map_test["map/test/accuracy"] - metrics["test/accuracy"],
                "prior_precision": result["prior_precision"], "prior_method": result["prior_method"]})
    return pd.DataFrame(rows)


def summary_table(subsets: pd.DataFrame, config_params: list[str], direction: str) -> pd.DataFrame:
    """One row per (configuration, subset), aggregated over seeds; configurations best objective first,
    subsets by ``rank`` (1 = largest mean Δ_ECE) within each."""
    keys = ["config", *config_params, "subset"]
    groups = subsets.groupby(keys, sort=False, dropna=False)
    table = groups.agg(kind=("kind", "first"), blocks=("blocks", "first"),
                       first_block=("first_block", "first"), n_seeds=("trial_id", "size"), seeds=(SEED, list),
                       trial_ids=("trial_id", list), prior_precision=("prior_precision", "mean"))
    present = [m for m in AGGREGATED if m in subsets and subsets[m].notna().any()]
    means = groups[present].mean()
    stds = groups[present].std(ddof=1).add_suffix("_std")
    table = table.join(means).join(stds).reset_index()
    table = _with_ci(table, groups[["delta_ece_low", "delta_ece_high"]].first().reset_index(drop=True))
    table["rank"] = table.groupby("config", sort=False)["delta_ece"].rank(ascending=False, method="first")
    table["rank"] = table["rank"].astype(int)
    order = table.groupby("config", sort=False)["objective"].first()
    order = order.sort_values(ascending=direction == "min", kind="stable").index
    table["config"] = pd.Categorical(table["config"], categories=order, ordered=True)
    table = table.sort_values(["config", "rank"], kind="stable")
    table["config"] = table["config"].astype(str)
    return table.reset_index(drop=True)


def _with_ci(table: pd.DataFrame, single_run: pd.DataFrame) -> pd.DataFrame:
    """95% CI of the mean Δ_ECE: one run's bootstrap interval, or a t-interval over several seeds."""
    n = table["n_seeds"].to_numpy()
    half = stats.t.ppf(0.975, np.maximum(n - 1, 1)) * table["delta_ece_std"].to_numpy() / np.sqrt(n)
    one = n == 1
    table["delta_ece_low"] = np.where(one, single_run["delta_ece_low"], table["delta_ece"] - half)
    table["delta_ece_high"] = np.where(one, single_run["delta_ece_high"], table["delta_ece"] + half)
    table["ci_method"] = np.where(one, "paired bootstrap over test examples", "t-interval over seeds")
    return table


def best_config(summary: pd.DataFrame) -> str:
    """The configuration with the best mean validation objective (``summary_table`` puts it first)."""
    return str(summary["config"].iloc[0])


def ranking(summary: pd.DataFrame, config: str) -> pd.DataFrame:
    """The subsets of ``config`` ranked by mean Δ_ECE, largest first."""
    return summary[summary["config"] == config].sort_values("rank").reset_index(drop=True)


def line_configs(summary: pd.DataFrame, config_params: list[str]) -> list[str]:
    """One configuration per setting of the searched parameters other than λ, at its best objective
    (``summary`` is ordered best first): the lines of the depth plot."""
    others = [p for p in config_params if p != "train.prior_precision"]
    configs = summary.drop_duplicates("config")
    if others:
        configs = configs.drop_duplicates(others)
    return configs["config"].tolist()
