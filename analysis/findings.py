"""The key findings of a sweep (``analysis_summary.json``) and a short narrative of them.

All computed from the tables of :mod:`analysis.aggregate`: the reference configuration (best mean
validation objective: selection never looks at test), its best single layer and best group by mean
Δ_ECE, ``all`` against the best single layer and whether their 95% CIs separate them, Optuna's best
trial (λ and LoRA rank), the cost of each evaluation, and which trials are missing and why.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pandas as pd

from analysis.aggregate import config_label, ranking
from analysis.collect import SweepData

_SUBSET_FIELDS = ("subset", "blocks", "n_seeds", "delta_ece", "delta_ece_low", "delta_ece_high", "ci_method",
                  "test/ece", "test/accuracy", "test/nll", "accuracy_drop")
_COST_FIELDS = ("time_per_epoch_s", "laplace_fit_s", "laplace_eval_s", "wall_time_s")
_LAPLACE_FIELDS = ("hessian_structure", "backend", "predictive", "link_approx", "n_samples", "n_params",
                   "n_blocks", "fit_examples", "prior_method")
ACCURACY_DROP_NOTE = 0.02   # a subset this much less accurate than the MAP may be calibrated by being unsure


def findings(data: SweepData, summary: pd.DataFrame, reference: str) -> dict:
    """The JSON-able findings; ``reference`` is the configuration the subsets are ranked in."""
    ranked = ranking(summary, reference)
    ref = _reference(ranked, data)
    best_layer = _best(ranked, "layer")
    every = _best(ranked, "all")
    return {
        "sweep": {"name": data.name, "source": data.source, "objective": data.search.metric,
                  "direction": data.search.direction, "searched": list(data.search.space),
                  "generated": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "trials": _trial_counts(data),
        "reference_config": ref,
        "laplace": {k: data.results[ref["trial_ids"][0]].get(k) for k in _LAPLACE_FIELDS},
        "best_single_layer": best_layer,
        "best_group": _best(ranked, "group"),
        "all": every,
        "all_vs_best_single_layer": _compare(every, best_layer),
        "optuna_best": _optuna_best(data),
        "cost": _cost(data, summary),
    }


def _clean(value):
    """JSON-safe scalars: numpy -> Python, NaN -> None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _row(row: pd.Series) -> dict:
    return {key: list(row[key]) if key == "blocks" else _clean(row[key])
            for key in _SUBSET_FIELDS if key in row}


def _best(ranked: pd.DataFrame, kind: str) -> dict | None:
    rows = ranked[ranked["kind"] == kind]
    return _row(rows.iloc[0]) if len(rows) else None


def _compare(every: dict | None, layer: dict | None) -> dict | None:
    """``all`` minus the best single layer; 'separate' = the two 95% CIs do not overlap (conservative:
    non-overlap implies a difference, overlap does not prove there is none; not a paired test)."""
    if every is None or layer is None:
        return None
    separate = (every["delta_ece_low"] > layer["delta_ece_high"]
                or layer["delta_ece_low"] > every["delta_ece_high"])
    better = "all" if every["delta_ece"] > layer["delta_ece"] else layer["subset"]
    return {"difference": every["delta_ece"] - layer["delta_ece"], "cis_separate": bool(separate),
            "larger_delta_ece": better,
            "method": "non-overlap of the two 95% CIs of Δ_ECE (conservative; not a paired test)"}


def _reference(ranked: pd.DataFrame, data: SweepData) -> dict:
    first = ranked.iloc[0]
    return {"config": first["config"], "params": {p: _clean(first[p]) for p in data.config_params},
            "n_seeds": int(first["n_seeds"]), "trial_ids": list(first["trial_ids"]),
            "objective": _clean(first["objective"]),
            "laplace_prior_precision": _clean(first["prior_precision"]),
            "why": f"best mean validation objective {data.search.metric} ({data.search.direction}) "
                   "over its seeds"}


def _trial_counts(data: SweepData) -> dict:
    missing = data.missing()
    return {"planned": data.search.num_samples, "started": len(data.trials),
            "with_results": len(data.results), "not_started": data.not_started,
            "by_status": {k: int(v) for k, v in data.trials["status"].value_counts().items()},
            "missing": [{k: _clean(v) for k, v in row.items()} for row in missing.to_dict("records")],
            "complete": len(data.results) == data.search.num_samples}


def _optuna_best(data: SweepData) -> dict | None:
    """Optuna's best trial; None while no trial completed."""
    done = data.trials[data.trials["status"] == "ok"].dropna(subset=["objective"])
    if done.empty:
        return None
    objective = done["objective"]
    best = done.loc[objective.idxmin() if data.search.direction == "min" else objective.idxmax()]
    params = {p: _clean(best.get(p)) for p in data.search.space}
    return {"optuna_trial": _clean(best["optuna_trial"]), "trial_id": best["trial_id"],
            "metric": data.search.metric, "objective": _clean(best["objective"]),
            "prior_precision": params.get("train.prior_precision"), "lora_rank": params.get("peft.rank"),
            "params": params}


def _cost(data: SweepData, summary: pd.DataFrame) -> dict:
    """Seconds per stage and trial, and per subset evaluation (``nn``; ``glm`` serves all in one pass)."""
    cols = [c for c in _COST_FIELDS if c in data.trials]
    ok = data.trials[data.trials["trial_id"].isin(data.results)]
    per_trial = [{"trial_id": r["trial_id"], **{c: _clean(r[c]) for c in cols}} for _, r in ok.iterrows()]
    per_subset = {}
    if "time_s" in summary:
        per_subset = {k: _clean(v) for k, v in summary.groupby("subset", sort=False)["time_s"].mean().items()}
    return {"per_trial": per_trial, "mean_per_trial": {c: _clean(ok[c].mean()) for c in cols},
            "per_subset_eval_s": per_subset,
            "note": "per-subset times are absent for the glm predictive: one Jacobian pass serves every "
                    "subset (see laplace_eval_s)"}


def _fmt_subset(s: dict) -> str:
    return (f"{s['subset']} (Δ_ECE {s['delta_ece']:+.4f}, 95% CI [{s['delta_ece_low']:+.4f}, "
            f"{s['delta_ece_high']:+.4f}], test accuracy {s['test/accuracy']:.3f})")


def narrative(f: dict) -> list[str]:
    """A few plain sentences that state the findings, for the HTML page and the terminal."""
    t, ref = f["trials"], f["reference_config"]
    lines = [f"{t['with_results']} of {t['planned']} planned trials have layer-wise results"
             + ("." if t["complete"] else f"; {len(t['missing'])} started without results and "
                f"{t['not_started']} not started: this report is partial.")]
    la = f["laplace"]
    lines.append(f"Laplace: {la['hessian_structure']} GGN ({la['backend']}) over {la['n_params']:,} "
                 f"parameters of {la['n_blocks']} blocks, {la['predictive']} predictive"
                 + (f" with {la['n_samples']} samples" if la["predictive"] == "nn" else "")
                 + f", prior precision {la['prior_method']}.")
    opt = f["optuna_best"]
    if opt:
        lines.append(f"Optuna's best trial is #{opt['optuna_trial']} ({config_label(opt['params'])}): "
                     f"{opt['metric']} = {opt['objective']:.4f}.")
    seeds = f"{ref['n_seeds']} seeds" if ref["n_seeds"] > 1 else "one seed"
    lines.append(f"Subsets are ranked in the configuration {ref['config']} ({ref['why']}; {seeds}).")
    if f["best_single_layer"]:
        lines.append(f"The best single layer is {_fmt_subset(f['best_single_layer'])}.")
    if f["best_group"]:
        lines.append(f"The best group is {_fmt_subset(f['best_group'])}.")
    cmp = f["all_vs_best_single_layer"]
    if cmp:
        layer = f["best_single_layer"]["subset"]
        verdict = ("do not overlap: the test set separates them" if cmp["cis_separate"] else
                   "overlap: the test set does not separate them")
        lines.append(f"With every block Bayesian: {_fmt_subset(f['all'])}; its CI and {layer}'s {verdict}.")
    for s in (f["best_single_layer"], f["all"]):
        if s and s["accuracy_drop"] is not None and s["accuracy_drop"] > ACCURACY_DROP_NOTE:
            lines.append(f"Caution: {s['subset']} is {100 * s['accuracy_drop']:.1f} accuracy points below "
                         "the MAP, so part of its ECE change may come from a posterior too wide to be confident.")
    mean = f["cost"]["mean_per_trial"]
    if mean.get("wall_time_s") is not None:
        lines.append(f"A trial took {mean['wall_time_s']:.1f} s on average (Laplace fit "
                     f"{mean.get('laplace_fit_s') or 0:.1f} s, all subsets "
                     f"{mean.get('laplace_eval_s') or 0:.1f} s).")
    return lines
