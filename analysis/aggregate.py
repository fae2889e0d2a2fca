"""Tables: per (trial, subset) rows -> per (configuration, subset) over seeds -> the ranking of subsets.

Column names are the project's one vocabulary (:mod:`distlap.names`): ``subset/test/ece``,
``subset/val/nll``, ``subset/test/delta_ece`` with its 95% CI ``..._low`` / ``..._high``, the MAP's
``map/test/ece``. A *configuration* is a setting of the searched parameters other than the seed;
trials that repeat one (several seeds) are aggregated: mean, ``<metric>_std`` (sample std) and
``n_seeds``. The CI of one run is its paired bootstrap over test examples; over several seeds it is the
seed interval of :func:`distlap.seed_intervals.seed_t_interval` by the design the seeds had (read from
their recorded test-set identity): nested, the t-interval of the seed means; a shared test set (or an
unknown design), the seed means' variance plus the mean within-seed variance of each trial's own
interval, a bound on the shared test set's noise (``ci_method`` says which). Subsets are ranked within a
configuration by their mean VALIDATION Δ_ECE (``subset/val/delta_ece``) and reported on test; results
without it (older ones) are ranked on test, and ``ranked_on`` says so.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from scipy import stats

from analysis.collect import SweepData
from distlap import names, seed_intervals
from distlap.names import (
    BLOCKS,
    CI_METHOD,
    CONFIG,
    FIRST_BLOCK,
    LAMBDA,
    OBJECTIVE,
    RANK,
    SEED,
    SEEDS,
    SUBSET,
    TRIAL_ID,
    TRIAL_IDS,
)
from distlap.names import SUBSET_KIND as KIND

KINDS = ("layer", "group", "all")  # a single block, several blocks, every block
DELTA = names.delta("subset", "test", "ece")  # what subsets are reported by
VAL_DELTA = names.delta("subset", "val", "ece")  # what subsets are ranked (selected) by
TIE = 1e-6  # metric differences below this are float noise (fp32 probabilities): ties
DELTA_LOW, DELTA_HIGH = names.interval(DELTA)
DELTA_ACCURACY = names.delta("subset", "test", "accuracy")
TEST, VAL, MAP_TEST = (
    names.scores("subset", "test"),
    names.scores("subset", "val"),
    names.scores("map", "test"),
)
AGGREGATED = (
    DELTA,
    VAL_DELTA,
    names.delta("subset", "test", "nll"),
    DELTA_ACCURACY,
    names.delta("subset_tuned", "test", "ece"),
    names.delta("subset_tuned", "test", "nll"),
    names.SUBSET_LAMBDA_VAL,
    names.SUBSET_LAMBDA_MARGLIK,
    *TEST.values(),
    *(VAL[s] for s in ("accuracy", "nll", "ece")),
    *(MAP_TEST[s] for s in ("accuracy", "ece", "nll")),
    OBJECTIVE,
    names.SUBSET_TIME,
)
_LAYER = re.compile(r"layer_\d+")


def tied(values: pd.Series) -> pd.Series:
    """``values`` in units of :data:`TIE`, rounded: equal where they differ only by float noise (e.g. the
    Δ of blocks the MAP switched off), so sorting or ranking them keeps their order."""
    return (values / TIE).round()


def subset_kind(name: str, blocks: list[int]) -> str:
    if name == "all":
        return "all"
    return "layer" if _LAYER.fullmatch(name) and len(blocks) == 1 else "group"


def config_label(params: dict) -> str:
    """``{"peft.rank": 4, "train.prior_precision": 43.1}`` -> ``"r=4, λ=43.1"``."""

    def value(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    def label(key: str) -> str:
        return names.PARAMS[key].label if key in names.PARAMS else key.rsplit(".", 1)[-1]

    return ", ".join(f"{label(k)}={value(v)}" for k, v in params.items()) or "base"


def subset_frame(data: SweepData) -> pd.DataFrame:
    """One row per (trial with results, subset), subsets in the results' order (blocks, groups, all)."""
    trials = data.trials.set_index(TRIAL_ID)
    rows = []
    for trial_id, result in data.results.items():
        trial = trials.loc[trial_id]
        params = {p: trial.get(p) for p in data.config_params}
        map_test = {key: result["map"]["metrics"][key] for key in MAP_TEST.values()}
        for name, row in result["subsets"].items():
            rows.append(
                {
                    CONFIG: config_label(params),
                    **params,
                    SEED: trial.get(SEED),
                    TRIAL_ID: trial_id,
                    names.OPTUNA_TRIAL: trial.get(names.OPTUNA_TRIAL),
                    OBJECTIVE: trial.get(OBJECTIVE),
                    SUBSET: name,
                    KIND: subset_kind(name, row[BLOCKS]),
                    BLOCKS: row[BLOCKS],
                    FIRST_BLOCK: min(row[BLOCKS]),
                    **row["metrics"],
                    **map_test,
                    names.PRIOR_PRECISION: result[names.PRIOR_PRECISION],
                    names.PRIOR_METHOD: result[names.PRIOR_METHOD],
                    names.PRIOR_ANCHOR: result.get(names.PRIOR_ANCHOR, "zero"),  # older results: zero
                    names.REGIME: result.get(names.REGIME, "mode"),  # older results trained to a mode
                    names.TEST_SET: result.get("inference", {}).get(names.TEST_SET),
                }
            )
    return pd.DataFrame(rows)


def summary_table(subsets: pd.DataFrame, config_params: list[str], direction: str) -> pd.DataFrame:
    """One row per (configuration, subset), aggregated over seeds; configurations best objective first,
    subsets by ``rank`` (1 = largest mean validation Δ_ECE; test where results lack it) within each."""
    groups = subsets.groupby([CONFIG, *config_params, SUBSET], sort=False, dropna=False)
    table = groups.agg(
        **{
            KIND: (KIND, "first"),
            BLOCKS: (BLOCKS, "first"),
            FIRST_BLOCK: (FIRST_BLOCK, "first"),
            names.N_SEEDS: (TRIAL_ID, "size"),
            SEEDS: (SEED, list),
            TRIAL_IDS: (TRIAL_ID, list),
            names.PRIOR_PRECISION: (names.PRIOR_PRECISION, "mean"),
        }
    )
    present = [m for m in AGGREGATED if m in subsets and subsets[m].notna().any()]
    means = groups[present].mean()
    stds = groups[present].std(ddof=1).add_suffix("_std")
    table = table.join(means).join(stds).reset_index()
    table = _with_ci(table, [group for _, group in groups])
    table = _rank(table)
    order = table.groupby(CONFIG, sort=False)[OBJECTIVE].first()
    order = order.sort_values(ascending=direction == "min", kind="stable").index
    table[CONFIG] = pd.Categorical(table[CONFIG], categories=order, ordered=True)
    table = table.sort_values([CONFIG, RANK], kind="stable")
    table[CONFIG] = table[CONFIG].astype(str)
    return table.reset_index(drop=True)


def _rank(table: pd.DataFrame) -> pd.DataFrame:
    """``rank`` within each configuration by mean validation Δ_ECE (selection never looks at test), or by
    test Δ_ECE where any of its rows lacks the validation value; ``ranked_on`` names the split."""
    val = table[VAL_DELTA] if VAL_DELTA in table else pd.Series(np.nan, index=table.index)
    on_val = val.notna().groupby(table[CONFIG], sort=False).transform("all")
    key = tied(val.where(on_val, table[DELTA]))
    table[RANK] = key.groupby(table[CONFIG], sort=False).rank(ascending=False, method="first").astype(int)
    table[names.RANKED_ON] = np.where(on_val, "validation", "test (no validation Δ in these results)")
    return table


def _with_ci(table: pd.DataFrame, groups: list[pd.DataFrame]) -> pd.DataFrame:
    """95% CI of the mean Δ_ECE: one run's bootstrap interval, or the seed interval of its seeds (module
    doc); each trial's own interval gives its within-seed variance, ((high − low) / (2 z_0.975))²."""
    low, high, method = [], [], []
    z = stats.norm.ppf(0.975)
    for group in groups:
        if len(group) == 1:
            low.append(group[DELTA_LOW].iloc[0])
            high.append(group[DELTA_HIGH].iloc[0])
            method.append("paired bootstrap over test examples")
            continue
        within = ((group[DELTA_HIGH] - group[DELTA_LOW]) / (2 * z)) ** 2
        ids = group[names.TEST_SET] if names.TEST_SET in group else [None] * len(group)
        test_sets = [t if isinstance(t, str) else None for t in ids]
        ci = seed_intervals.seed_t_interval(
            group[DELTA].to_numpy(float), within_var=within.to_numpy(float), test_sets=test_sets
        )
        low.append(float(ci.low[0]))
        high.append(float(ci.high[0]))
        method.append(ci.method)
    return table.assign(**{DELTA_LOW: low, DELTA_HIGH: high, CI_METHOD: method})


def best_config(summary: pd.DataFrame) -> str:
    """The configuration with the best mean validation objective (``summary_table`` puts it first)."""
    return str(summary[CONFIG].iloc[0])


def ranking(summary: pd.DataFrame, config: str) -> pd.DataFrame:
    """The subsets of ``config`` ranked by mean validation Δ_ECE, largest first (``ranked_on`` says where
    older results made that test)."""
    return summary[summary[CONFIG] == config].sort_values(RANK).reset_index(drop=True)


def line_configs(summary: pd.DataFrame, config_params: list[str]) -> list[str]:
    """One configuration per setting of the searched parameters other than λ, at its best objective
    (``summary`` is ordered best first): the lines of the depth plot."""
    others = [p for p in config_params if p != LAMBDA]
    configs = summary.drop_duplicates(CONFIG)
    if others:
        configs = configs.drop_duplicates(others)
    return configs[CONFIG].tolist()
