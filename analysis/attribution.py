"""The headline of a layer-wise report: which blocks matter, by their Shapley values, and the best k.

Each trial's ``layer_wise_results.json`` carries (glm predictive) the Shapley value of every block for
Δ_ECE and Δ_NLL with a bootstrap interval over test examples, and the greedy best set of k blocks.
Over the seeds of one configuration the mean is shown; the interval is the trial's bootstrap interval
for one seed and, for several, the seed interval of :func:`distlap.seed_intervals.seed_t_interval` by the
seeds' design (as :mod:`analysis.aggregate` does for Δ_ECE): the t-interval over seeds when each drew its
own test set, plus the mean within-seed variance (a bound on the shared test set's noise) when they share
one or the design is unknown. These are marginal intervals: no distinguishability call is made over the
blocks or the 2^L coalitions. The best set of k blocks is chosen on validation (``val_value``) and its
test value shown; older results chose it on test, and ``ranked_on`` says so.
:func:`ranking_survives` says whether the subsets rank alike under the global λ and under their own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.aggregate import tied
from analysis.figures import plt, save
from distlap import names, seed_intervals

SCORE, BLOCK, K, VALUE, LOW, HIGH = "score", "block", "k", "value", "low", "high"
_LEVEL = 0.95


def shapley_table(results: list[dict]) -> pd.DataFrame:
    """One row per (score, block): mean Shapley value over the seeds (``results``: their JSON), interval."""
    rows = []
    with_attribution = [r for r in results if "attribution" in r]
    for score in names.SCORES:
        seeds = [r for r in with_attribution if score in r["attribution"].get("values", {})]
        if not seeds:
            continue
        per_seed = [r["attribution"]["values"][score] for r in seeds]
        phi = np.array([v["shapley"] for v in per_seed])  # (n_seeds, L)
        test_sets = [r.get("inference", {}).get(names.TEST_SET) for r in seeds]
        low, high = _interval(phi, per_seed, test_sets)
        rows += [
            {
                SCORE: score,
                BLOCK: b,
                VALUE: phi[:, b].mean(),
                LOW: low[b],
                HIGH: high[b],
                names.N_SEEDS: len(per_seed),
            }
            for b in range(phi.shape[1])
        ]
    return pd.DataFrame(rows, columns=[SCORE, BLOCK, VALUE, LOW, HIGH, names.N_SEEDS])


def _se(one: dict, n_blocks: int) -> np.ndarray:
    """One seed's standard errors: from its percentile interval, (high − low) / (2 z_0.975), or as saved."""
    if "shapley_low" in one:
        return (np.array(one["shapley_high"]) - np.array(one["shapley_low"])) / (2 * stats.norm.ppf(0.975))
    return np.array(one.get("shapley_se", np.full(n_blocks, np.nan)), dtype=float)


def _interval(phi: np.ndarray, per_seed: list[dict], test_sets: list) -> tuple[np.ndarray, np.ndarray]:
    if len(phi) > 1:
        within = np.stack([_se(one, phi.shape[1]) ** 2 for one in per_seed])
        within = None if np.isnan(within).any() else within
        ci = seed_intervals.seed_t_interval(phi, _LEVEL, within_var=within, test_sets=test_sets)
        return ci.low.numpy(), ci.high.numpy()
    one = per_seed[0]
    if "shapley_low" in one:
        return np.array(one["shapley_low"]), np.array(one["shapley_high"])
    z = stats.norm.ppf((1 + _LEVEL) / 2)
    return phi[0] - z * _se(one, phi.shape[1]), phi[0] + z * _se(one, phi.shape[1])


def best_k_table(results: list[dict]) -> pd.DataFrame:
    """One row per (score, k): the mean over seeds of the TEST value of the greedy best k blocks, chosen
    on validation where the results say so (``val_value`` beside ``value``; ``ranked_on``), and its blocks
    in the first seed."""
    rows = []
    for score in names.SCORES:
        curves = [
            r["attribution"]["values"][score]["greedy"]
            for r in results
            if score in r.get("attribution", {}).get("values", {})
        ]
        for k, steps in enumerate(zip(*curves), start=1):
            on_val = all("val_value" in s for s in steps)
            rows.append(
                {
                    SCORE: score,
                    K: k,
                    VALUE: float(np.mean([s["value"] for s in steps])),
                    names.BLOCKS: list(steps[0][names.BLOCKS]),
                    names.N_SEEDS: len(steps),
                    names.RANKED_ON: "validation"
                    if on_val
                    else "test (no validation value in these results)",
                }
            )
    return pd.DataFrame(rows, columns=[SCORE, K, VALUE, names.BLOCKS, names.N_SEEDS, names.RANKED_ON])


def shapley_figure(table: pd.DataFrame, title: str, path: Path) -> Path | str:
    """Bars: each block's Shapley value for Δ_ECE and for Δ_NLL, whiskers the 95% interval."""
    if table.empty:
        return "no attribution (the nn predictive, or no trial with results)"
    scores = list(pd.unique(table[SCORE]))
    fig, axes = plt.subplots(1, len(scores), squeeze=False)
    for ax, score in zip(axes[0], scores):
        rows = table[table[SCORE] == score]
        err = np.nan_to_num([rows[VALUE] - rows[LOW], rows[HIGH] - rows[VALUE]])
        ax.bar(
            rows[BLOCK], rows[VALUE], yerr=err, capsize=3, color="tab:blue", edgecolor="black", linewidth=0.5
        )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(list(rows[BLOCK]))
        ax.set(xlabel="transformer block (0 = nearest the input)", title=f"Δ{_label(score)} by block")
        ax.set_ylabel(f"Shapley value of Δ{_label(score)}")
    fig.suptitle(title, fontsize=10)
    return save(fig, path)


def best_k_figure(table: pd.DataFrame, title: str, path: Path) -> Path | str:
    """The improvement over the MAP of the greedy best k blocks, against k, per score."""
    if table.empty:
        return "no attribution (the nn predictive, or no trial with results)"
    fig, ax = plt.subplots()
    for score in pd.unique(table[SCORE]):
        rows = table[table[SCORE] == score]
        ax.plot(rows[K], rows[VALUE], marker="o", label=f"Δ{_label(score)}")
        for k, v, blocks in zip(rows[K], rows[VALUE], rows[names.BLOCKS]):
            ax.annotate(
                ",".join(map(str, blocks)), (k, v), fontsize=7, textcoords="offset points", xytext=(0, 5)
            )
    ax.axhline(0, color="black", linewidth=0.8)
    on = "validation" if (table[names.RANKED_ON] == "validation").all() else "TEST (older results)"
    ax.set(
        xlabel=f"k, blocks treated as Bayesian (greedy best set, chosen on {on}; labels: its blocks)",
        ylabel="improvement over the MAP (test)",
        title=title,
    )
    ax.legend(fontsize=8)
    return save(fig, path)


def _label(score: str) -> str:
    return names.SCORES[score].label


def ranking_survives(ranked: pd.DataFrame) -> dict:
    """Do the subsets rank alike by Δ_ECE at the global λ and at each one's own λ_S? Kendall's τ of the
    two orders and the top subset of each (``ranked``: the reference configuration's rows)."""
    tuned = names.delta("subset_tuned", "test", "ece")
    if tuned not in ranked or ranked[tuned].isna().all():
        return {"available": False}
    glob, own = tied(ranked[names.delta("subset", "test", "ece")]), tied(ranked[tuned])
    tau = stats.kendalltau(glob, own).statistic
    top = ranked[names.SUBSET].iloc[int(np.argmax(glob))]  # the first of tied rows, in rank order
    top_tuned = ranked[names.SUBSET].iloc[int(np.argmax(own))]
    return {
        "available": True,
        "kendall_tau": float(tau),
        "top_global": top,
        "top_own_lambda": top_tuned,
        "survives": bool(top == top_tuned),
    }
