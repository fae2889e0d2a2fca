"""The key findings of a sweep (``analysis_summary.json``) and a short narrative of them.

All computed from the tables of :mod:`analysis.aggregate`: the reference configuration (best mean
validation objective: selection never looks at test), its best single layer and best group by mean
VALIDATION Δ_ECE, reported with their test values (older results without validation Δ are chosen on test,
and the findings say so), ``all`` against the best single layer (the paired difference of their test
Δ_ECE from the saved replicates, pooled over seeds by their design; the non-overlap of their CIs for
results without replicates), Optuna's best trial (λ and LoRA rank), the cost of each evaluation, and
which trials are missing and why.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pandas as pd

from analysis import attribution, lead
from analysis.aggregate import (
    DELTA,
    DELTA_ACCURACY,
    DELTA_HIGH,
    DELTA_LOW,
    TEST,
    VAL_DELTA,
    config_label,
    ranking,
    tied,
)
from analysis.collect import SweepData
from distlap import names, seed_intervals
from distlap import ranking as family_ranking
from distlap.names import (
    BLOCKS,
    CI_METHOD,
    CONFIG,
    N_SEEDS,
    OBJECTIVE,
    OPTUNA_TRIAL,
    STATUS,
    SUBSET,
    SUBSET_KIND,
    TRIAL_ID,
    TRIAL_IDS,
)

_SUBSET_FIELDS = (
    SUBSET,
    BLOCKS,
    N_SEEDS,
    DELTA,
    DELTA_LOW,
    DELTA_HIGH,
    CI_METHOD,
    TEST["ece"],
    TEST["accuracy"],
    TEST["nll"],
    DELTA_ACCURACY,
    VAL_DELTA,
    names.RANKED_ON,
)
_COST_FIELDS = (names.TIME_PER_EPOCH, names.FIT_TIME, names.EVAL_TIME, names.WALL_TIME)
_LAPLACE_FIELDS = (
    names.HESSIAN,
    names.BACKEND,
    names.ESTIMATOR,
    names.PREDICTIVE,
    names.N_SAMPLES,
    names.N_PARAMS,
    names.N_BLOCKS,
    names.FIT_EXAMPLES,
    names.PRIOR_METHOD,
)
ESTIMATORS = {"ggn": "GGN", "mc": "Monte-Carlo GGN", "ef": "empirical Fisher"}  # None: before the choice
ACCURACY_DROP_NOTE = 0.02  # a subset this much less accurate than the MAP may be calibrated by being unsure


def findings(data: SweepData, summary: pd.DataFrame, reference: str) -> dict:
    """The JSON-able findings; ``reference`` is the configuration the subsets are ranked in."""
    ranked = ranking(summary, reference)
    ref = _reference(ranked, data)
    best_layer = _best(ranked, "layer")
    every = _best(ranked, "all")
    ref_results = [data.results[t] for t in ref[TRIAL_IDS] if t in data.results]
    return {
        "sweep": {
            "name": data.name,
            "source": data.source,
            "metric": data.search.metric,
            "direction": data.search.direction,
            "searched": list(data.search.space),
            "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "trials": _trial_counts(data),
        "reference_config": ref,
        "laplace": {k: data.results[ref[TRIAL_IDS][0]].get(k) for k in _LAPLACE_FIELDS},
        "best_single_layer": best_layer,
        "best_group": _best(ranked, "group"),
        "all": every,
        "all_vs_best_single_layer": _compare(every, best_layer, ref_results),
        "optuna_best": _optuna_best(data),
        "cost": _cost(data, summary),
        "attribution": _attribution(ref_results),
        "own_lambda": attribution.ranking_survives(ranked),
    }


def _attribution(results: list[dict]) -> dict | None:
    """The blocks by Shapley value of Δ_ECE and Δ_NLL (mean over seeds, interval), the best-k curve."""
    table = attribution.shapley_table(results)
    if table.empty:
        return None
    out = {}
    for score, rows in table.groupby(attribution.SCORE, sort=False):
        rows = rows.loc[tied(rows[attribution.VALUE]).sort_values(ascending=False, kind="stable").index]
        out[score] = [{k: _clean(v) for k, v in row.items()} for row in rows.to_dict("records")]
    best = attribution.best_k_table(results)
    out["best_k"] = [
        {k: (v if k == BLOCKS else _clean(v)) for k, v in row.items()} for row in best.to_dict("records")
    ]
    return out


def _clean(value):
    """JSON-safe scalars: numpy -> Python, NaN -> None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _row(row: pd.Series) -> dict:
    return {
        key: list(row[key]) if key == BLOCKS else _clean(row[key]) for key in _SUBSET_FIELDS if key in row
    }


def _best(ranked: pd.DataFrame, kind: str) -> dict | None:
    rows = ranked[ranked[SUBSET_KIND] == kind]
    return _row(rows.iloc[0]) if len(rows) else None


def _compare(every: dict | None, layer: dict | None, results: list[dict]) -> dict | None:
    """``all`` minus the best single layer (chosen on validation) in test Δ_ECE. With saved replicates:
    the marginal 95% interval of their paired difference, pooled over the seeds by their design
    (:class:`distlap.seed_intervals.Pooled`); 'separate' = it excludes 0. Without (older results): the
    non-overlap of the two 95% CIs (conservative; not a paired test)."""
    if every is None or layer is None:
        return None
    better = "all" if every[DELTA] > layer[DELTA] else layer[SUBSET]
    laws = lead.pooled(results)
    if laws is None or not {"all", layer[SUBSET]} <= set(laws["ece"].names):
        separate = every[DELTA_LOW] > layer[DELTA_HIGH] or layer[DELTA_LOW] > every[DELTA_HIGH]
        return {
            "difference": every[DELTA] - layer[DELTA],
            "cis_separate": bool(separate),
            "larger_delta_ece": better,
            "method": "non-overlap of the two 95% CIs of Δ_ECE (conservative; not a paired test)",
        }
    law = laws["ece"]
    est, se, df = law.contrast(family_ranking.pairs(law.names, ["all", layer[SUBSET]]).weights)
    low, high = seed_intervals.t_bounds(est, se, df, 0.95)
    return {
        "difference": float(est[0]),
        "low": float(low[0]),
        "high": float(high[0]),
        "cis_separate": bool(low[0] > 0 or high[0] < 0),
        "larger_delta_ece": better,
        "method": f"paired difference of test Δ_ECE, marginal 95% interval ({law.design} design, "
        f"{law.n_seeds} seed{'s' * (law.n_seeds > 1)})",
    }


def _reference(ranked: pd.DataFrame, data: SweepData) -> dict:
    first = ranked.iloc[0]
    return {
        CONFIG: first[CONFIG],
        "params": {p: _clean(first[p]) for p in data.config_params},
        N_SEEDS: int(first[N_SEEDS]),
        TRIAL_IDS: list(first[TRIAL_IDS]),
        OBJECTIVE: _clean(first[OBJECTIVE]),
        names.PRIOR_PRECISION: _clean(first[names.PRIOR_PRECISION]),
        "why": f"best mean validation objective {data.search.metric} ({data.search.direction}) "
        "over its seeds",
    }


def _trial_counts(data: SweepData) -> dict:
    missing = data.missing()
    return {
        "planned": data.search.num_samples,
        "started": len(data.trials),
        "with_results": len(data.results),
        "not_started": data.not_started,
        "by_status": {k: int(v) for k, v in data.trials[STATUS].value_counts().items()},
        "missing": [{k: _clean(v) for k, v in row.items()} for row in missing.to_dict("records")],
        "complete": len(data.results) == data.search.num_samples,
    }


def _optuna_best(data: SweepData) -> dict | None:
    """Optuna's best trial; None while no trial completed."""
    done = data.trials[data.trials[STATUS] == "ok"].dropna(subset=[OBJECTIVE])
    if done.empty:
        return None
    objective = done[OBJECTIVE]
    best = done.loc[objective.idxmin() if data.search.direction == "min" else objective.idxmax()]
    params = {p: _clean(best.get(p)) for p in data.search.space}
    return {
        OPTUNA_TRIAL: _clean(best[OPTUNA_TRIAL]),
        TRIAL_ID: best[TRIAL_ID],
        "metric": data.search.metric,
        OBJECTIVE: _clean(best[OBJECTIVE]),
        "params": params,
    }


def _cost(data: SweepData, summary: pd.DataFrame) -> dict:
    """Seconds per stage and trial, and per subset evaluation (``nn``; ``glm`` serves all in one pass)."""
    cols = [c for c in _COST_FIELDS if c in data.trials]
    ok = data.trials[data.trials[TRIAL_ID].isin(data.results)]
    per_trial = [{TRIAL_ID: r[TRIAL_ID], **{c: _clean(r[c]) for c in cols}} for _, r in ok.iterrows()]
    per_subset = {}
    if names.SUBSET_TIME in summary:
        per_subset = {
            k: _clean(v) for k, v in summary.groupby(SUBSET, sort=False)[names.SUBSET_TIME].mean().items()
        }
    return {
        "per_trial": per_trial,
        "mean_per_trial": {c: _clean(ok[c].mean()) for c in cols},
        "per_subset_eval_s": per_subset,
        "note": "per-subset times are absent for the glm predictive: one Jacobian pass serves every "
        f"subset (see {names.EVAL_TIME})",
    }


def _fmt_subset(s: dict) -> str:
    return (
        f"{s[SUBSET]} (Δ_ECE {s[DELTA]:+.4f}, 95% CI [{s[DELTA_LOW]:+.4f}, "
        f"{s[DELTA_HIGH]:+.4f}], test accuracy {s[TEST['accuracy']]:.3f})"
    )


def narrative(f: dict) -> list[str]:
    """A few plain sentences that state the findings, for the HTML page and the terminal."""
    return [*_setup_lines(f), *_attribution_lines(f), *_subset_lines(f), *_cost_lines(f)]


def _attribution_lines(f: dict) -> list[str]:
    """Which blocks the Shapley values single out (an interval above 0), and whether λ_S changes the order."""
    lines = []
    for score, rows in (f.get("attribution") or {}).items():
        if score == "best_k":
            continue
        label = names.SCORES[score].label
        top = rows[0]
        low, high = top[attribution.LOW], top[attribution.HIGH]
        clear = [str(r[attribution.BLOCK]) for r in rows if (r[attribution.LOW] or 0) > 0]
        lines.append(
            f"By Shapley value, block {top[attribution.BLOCK]} contributes most to Δ{label} "
            f"({top[attribution.VALUE]:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}]); "
            + (
                f"blocks whose interval lies above 0 (marginal intervals, no call over the blocks): "
                f"{', '.join(clear)}."
                if clear
                else "no block's interval lies above 0."
            )
        )
    own = f.get("own_lambda") or {}
    if own.get("available"):
        verdict = "the same" if own["survives"] else f"{own['top_own_lambda']} instead"
        lines.append(
            f"With each subset at its own validation-chosen λ_S the best subset is {verdict} "
            f"(global λ: {own['top_global']}; Kendall τ of the two rankings {own['kendall_tau']:+.2f})."
        )
    return lines


def _setup_lines(f: dict) -> list[str]:
    """How complete the sweep is, how the posterior was made, Optuna's best, the reference configuration."""
    t, ref, la = f["trials"], f["reference_config"], f["laplace"]
    partial = f"; {len(t['missing'])} started without results and {t['not_started']} not started"
    complete = "." if t["complete"] else f"{partial}: this report is partial."
    lines = [f"{t['with_results']} of {t['planned']} planned trials have layer-wise results{complete}"]
    lines.append(
        f"Laplace: {la[names.HESSIAN]} {ESTIMATORS.get(la[names.ESTIMATOR], 'GGN')} ({la[names.BACKEND]}) "
        f"over {la[names.N_PARAMS]:,} "
        f"parameters of {la[names.N_BLOCKS]} blocks, {la[names.PREDICTIVE]} predictive"
        + (f" with {la[names.N_SAMPLES]} samples" if la[names.PREDICTIVE] == "nn" else "")
        + f", prior precision {la[names.PRIOR_METHOD]}."
    )
    opt = f["optuna_best"]
    if opt:
        lines.append(
            f"Optuna's best trial is #{opt[OPTUNA_TRIAL]} ({config_label(opt['params'])}): "
            f"{opt['metric']} = {opt[OBJECTIVE]:.4f}."
        )
    seeds = f"{ref[N_SEEDS]} seeds" if ref[N_SEEDS] > 1 else "one seed"
    lines.append(f"Subsets are ranked in the configuration {ref[CONFIG]} ({ref['why']}; {seeds}).")
    return lines


def _subset_lines(f: dict) -> list[str]:
    """The best single layer, the best group, ``all`` against the best layer, accuracy cautions."""
    lines = []
    on = (f["best_single_layer"] or f["best_group"] or {}).get(names.RANKED_ON)
    if on == "validation":
        lines.append("The best subsets are chosen on validation Δ_ECE; their test values are reported.")
    elif on is not None:
        lines.append(
            "Caution: these results carry no validation Δ_ECE, so the best subsets below were chosen on "
            "the test set they are reported on: their values are optimistic."
        )
    if f["best_single_layer"]:
        lines.append(f"The best single layer is {_fmt_subset(f['best_single_layer'])}.")
    if f["best_group"]:
        lines.append(f"The best group is {_fmt_subset(f['best_group'])}.")
    cmp = f["all_vs_best_single_layer"]
    if cmp:
        layer = f["best_single_layer"][SUBSET]
        paired = "low" in cmp
        verdict = (
            "the test set separates them" if cmp["cis_separate"] else "the test set does not separate them"
        )
        how = (
            f"all − {layer} = {cmp['difference']:+.4f} [{cmp['low']:+.4f}, {cmp['high']:+.4f}] (paired)"
            if paired
            else f"its CI and {layer}'s {'do not overlap' if cmp['cis_separate'] else 'overlap'}"
        )
        lines.append(f"With every block Bayesian: {_fmt_subset(f['all'])}; {how}: {verdict}.")
    for s in (f["best_single_layer"], f["all"]):
        if s and s[DELTA_ACCURACY] is not None and -s[DELTA_ACCURACY] > ACCURACY_DROP_NOTE:
            lines.append(
                f"Caution: {s[SUBSET]} is {-100 * s[DELTA_ACCURACY]:.1f} accuracy points below "
                "the MAP, so part of its ECE change may come from a posterior too wide to be confident."
            )
    return lines


def _cost_lines(f: dict) -> list[str]:
    mean = f["cost"]["mean_per_trial"]
    if mean.get(names.WALL_TIME) is None:
        return []
    return [
        f"A trial took {mean[names.WALL_TIME]:.1f} s on average (Laplace fit "
        f"{mean.get(names.FIT_TIME) or 0:.1f} s, all subsets {mean.get(names.EVAL_TIME) or 0:.1f} s)."
    ]
