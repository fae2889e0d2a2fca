"""The table a layer-wise report leads with, and the verdict that follows from its intervals.

Rows: the MAP, temperature scaling, last-layer Laplace and every layer subset, on the same fine-tuned
models (the reference configuration's seeds). Columns: the improvement over the MAP on test in ECE, NLL
and accuracy (positive = better), each with a 95% interval over test examples, Monte-Carlo sample sets
(``nn``) and, with several seeds, training seeds (a hierarchical bootstrap of the trials' saved
replicates, :func:`distlap.seed_intervals.across_seeds`); whether Δ_ECE is distinguishable from 0 after
Holm's correction over all rows; ECE under shift (mean over the corrupted sets) and OOD AUROCs (mean
over seeds, t-interval with several); a block's Shapley value of Δ_ECE; and the seconds the predictive
costs beyond the MAP.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from analysis.aggregate import tied
from analysis.page import with_interval
from distlap import intervals, names, ranking, seed_intervals

LEVEL = 0.95
PREDICTIVE, BLOCKS, N_SEEDS = "predictive", names.BLOCKS, names.N_SEEDS
SCORES = ("ece", "nll", "accuracy")
DELTAS = {s: f"test/delta_{s}" for s in SCORES}
P_HOLM, DISTINCT = "p_holm", "distinguishable"
SHIFT_ECE, NEAR, FAR = "shift/ece", "near_ood/auroc_maxprob", "far_ood/auroc_maxprob"
SHAPLEY, COST = names.SHAPLEY + "ece", "cost_s"
LABELS = {p: names.PREDICTIVES[p] for p in ("map", "temp", "lla")}


def pooled(results: list[dict]) -> dict[str, intervals.Replicates] | None:
    """Per score, the replicates of every predictive's improvement over the MAP: one trial's own, or
    pooled over the seeds by the hierarchical bootstrap (each seed its own test draw: nested). None when
    a trial has no saved replicates (older results)."""
    if not results or any("inference" not in r for r in results):
        return None
    out = {}
    for score in SCORES:
        per_seed = [intervals.replicates_from_json(r["inference"]["replicates"][score]) for r in results]
        out[score] = (
            per_seed[0]
            if len(per_seed) == 1
            else seed_intervals.across_seeds(per_seed, shared_examples=False, n_resamples=2000, seed=0)
        )
    return out


def lead_table(results: list[dict]) -> pd.DataFrame:
    """The lead table (module doc) of one configuration's trials (their ``layer_wise_results.json``)."""
    reps = pooled(results)
    if reps is None:
        return pd.DataFrame()
    first = results[0]
    order = ["map", *(n for n in ("temp", "lla") if n in first.get("baselines", {})), *first["subsets"]]
    rows = {name: {PREDICTIVE: LABELS.get(name, name), N_SEEDS: len(results)} for name in order}
    for name in first["subsets"]:
        rows[name][BLOCKS] = first["subsets"][name][BLOCKS]
    _improvements(rows, reps)
    _seed_means(rows, results)
    _shapley(rows, results)
    return pd.DataFrame(list(rows.values()), index=order).rename_axis("name").reset_index()


def _improvements(rows: dict, reps: dict[str, intervals.Replicates]) -> None:
    rows["map"].update({DELTAS[s]: 0.0 for s in SCORES})
    for score, rep in reps.items():
        low, high = intervals.percentile_interval(rep.replicates, LEVEL)
        for k, name in enumerate(rep.names):
            col = DELTAS[score]
            rows[name].update(
                {col: float(rep.estimate[k]), f"{col}_low": float(low[k]), f"{col}_high": float(high[k])}
            )
    for row in ranking.ranking_table(reps["ece"], LEVEL):
        rows[row["name"]].update({P_HOLM: row["p_holm"], DISTINCT: row["distinguishable"]})


def _metrics(result: dict, name: str) -> tuple[str, dict]:
    """The vocabulary's predictive of a row (``subset`` for a layer subset) and the row's metrics."""
    if name in result["subsets"]:
        return names.SUBSET, result["subsets"][name]["metrics"]
    if name == "map":
        return "map", result["map"]["metrics"]
    return name, result["baselines"][name]["metrics"]


def _seed_means(rows: dict, results: list[dict]) -> None:
    """Shift ECE, OOD AUROCs and cost: mean over seeds, with a t-interval over them (two or more)."""
    for name, row in rows.items():
        key = _metrics(results[0], name)[0]
        columns = {
            SHIFT_ECE: names.score(key, "shift", "ece"),
            NEAR: names.ood(key, "near_ood", "auroc_maxprob"),
            FAR: names.ood(key, "far_ood", "auroc_maxprob"),
        }
        for col, metric in columns.items():
            values = [_metrics(r, name)[1].get(metric) for r in results]
            row.update(_mean_interval(col, [v for v in values if v is not None]))
        row[COST] = float(np.mean([_cost(r, name) for r in results]))


def _mean_interval(col: str, values: list[float]) -> dict:
    if not values:
        return {}
    out = {col: float(np.mean(values))}
    if len(values) > 1:
        half = stats.t.ppf((1 + LEVEL) / 2, len(values) - 1) * np.std(values, ddof=1) / len(values) ** 0.5
        out |= {f"{col}_low": out[col] - half, f"{col}_high": out[col] + half}
    return out


def _cost(result: dict, name: str) -> float:
    """Seconds beyond the MAP: a baseline's fit; a subset's share of the Laplace fit plus its evaluation
    (glm: one pass serves every subset, so each is charged the whole evaluation)."""
    if name == "map":
        return 0.0
    if name in ("temp", "lla"):
        return result["baselines"][name]["metrics"][names.TEMP_TIME if name == "temp" else names.LLA_TIME]
    own = result["subsets"][name]["metrics"].get(names.SUBSET_TIME)
    return result[names.FIT_TIME] + (own if own is not None else result[names.EVAL_TIME])


def _shapley(rows: dict, results: list[dict]) -> None:
    """A single block's row gets its Shapley value of Δ_ECE (mean over seeds), where computed."""
    values = [r["attribution"]["values"]["ece"]["shapley"] for r in results if "attribution" in r]
    if not values:
        return
    phi = np.mean(values, axis=0)
    for name, row in rows.items():
        blocks = row.get(BLOCKS)
        if blocks is not None and len(blocks) == 1 and name.startswith("layer_"):
            row[SHAPLEY] = float(phi[blocks[0]])


def display(table: pd.DataFrame) -> pd.DataFrame:
    """The lead table for the page: "estimate [low, high]" cells, rounded p-values, Shapley and cost."""
    if table.empty:
        return table
    shown = with_interval(table, [*DELTAS.values(), SHIFT_ECE, NEAR, FAR])
    shown[P_HOLM] = [f"{p:.3g}" if pd.notna(p) else "" for p in table.get(P_HOLM, np.nan)]
    if DISTINCT in shown:
        shown[DISTINCT] = ["" if pd.isna(d) else ("yes" if d else "no") for d in table[DISTINCT]]
    if SHAPLEY in shown:
        shown[SHAPLEY] = [f"{v:+.4f}" if pd.notna(v) else "" for v in table[SHAPLEY]]
    if COST in shown:
        shown[COST] = [f"{v:.2f}" if pd.notna(v) else "" for v in table[COST]]
    return shown.drop(columns=["name"])


def verdict(table: pd.DataFrame, results: list[dict]) -> list[str]:
    """Plain sentences that follow from the intervals of ``table`` (see :func:`lead_table`)."""
    if table.empty:
        return ["No saved replicates in these results: rerun the trials with this version for the table."]
    subsets = table[table[BLOCKS].notna()]
    better = subsets[subsets[DISTINCT] & (subsets[DELTAS["ece"]] > 0)]
    worse = subsets[subsets[DISTINCT] & (subsets[DELTAS["ece"]] < 0)]
    n = int(table[N_SEEDS].iloc[0])
    lines = [
        f"Over {n} training seed{'s' * (n > 1)}: {len(better)} of {len(subsets)} layer subsets calibrate "
        f"better than the MAP (Δ_ECE > 0, distinguishable from 0 after Holm's correction at 95%)"
        + (f": {', '.join(better['name'])}" if len(better) else "")
        + f"; {len(worse)} calibrate worse"
        + (f" ({', '.join(worse['name'])})" if len(worse) else "")
        + "; the others cannot be told apart from the MAP."
    ]
    lines += [_baseline_line(table, name) for name in ("temp", "lla") if name in set(table["name"])]
    lines += _best_vs_temperature(table, results)
    lines += _shift_ood_line(table) + _switched_off(results)
    if n == 1:
        lines.append(
            "One training seed: the intervals cover test examples (and Monte-Carlo sample sets) but not "
            "training randomness; repeat the configuration with search.seeds for that."
        )
    return lines


def _baseline_line(table: pd.DataFrame, name: str) -> str:
    row = table.set_index("name").loc[name]
    col = DELTAS["ece"]
    verdict_ = (
        "better than"
        if row[DISTINCT] and row[col] > 0
        else "worse than"
        if row[DISTINCT]
        else "no different from"
    )
    return (
        f"{LABELS[name][0].upper() + LABELS[name][1:]}: Δ_ECE {row[col]:+.4f} [{row[col + '_low']:+.4f}, "
        f"{row[col + '_high']:+.4f}], {verdict_} the MAP."
    )


def _first_best(rows: pd.DataFrame, column: str, *, ascending: bool) -> str:
    """The best row by ``column``; of rows equal up to float noise (:func:`analysis.aggregate.tied`) the
    first wins (single blocks in depth order, then groups): float noise picks no name."""
    return rows.loc[tied(rows[column]).sort_values(ascending=ascending, kind="stable").index, "name"].iloc[0]


def _best_vs_temperature(table: pd.DataFrame, results: list[dict]) -> list[str]:
    """The best subset against temperature scaling, from the paired replicates of their difference."""
    reps = pooled(results)
    subsets = table[table[BLOCKS].notna()]
    if reps is None or subsets.empty or "temp" not in reps["ece"].names:
        return []
    best = _first_best(subsets, DELTAS["ece"], ascending=False)
    pair = intervals.select(reps["ece"], [best, "temp"])
    diff = ranking.pairwise(pair)
    low, high = intervals.percentile_interval(diff.replicates, LEVEL)
    d, lo, hi = float(diff.estimate[0]), float(low[0]), float(high[0])
    if lo > 0:
        says = f"{best} calibrates better than temperature scaling"
    elif hi < 0:
        says = f"temperature scaling calibrates better than {best}"
    else:
        says = f"{best} and temperature scaling cannot be told apart"
    return [
        f"Best subset {best} minus temperature scaling in Δ_ECE: {d:+.4f} [{lo:+.4f}, {hi:+.4f}]: {says}."
    ]


def _shift_ood_line(table: pd.DataFrame) -> list[str]:
    """ECE under shift and far-OOD AUROC of the MAP, the baselines and the subset best under shift."""
    if SHIFT_ECE not in table:
        return []
    rows = table.set_index("name")
    subsets = table[table[BLOCKS].notna()].dropna(subset=[SHIFT_ECE])
    shown = [n for n in ("map", "temp", "lla") if n in rows.index]
    if not subsets.empty:
        shown.append(_first_best(subsets, SHIFT_ECE, ascending=True))
    parts = [f"{rows.loc[n, PREDICTIVE]} {rows.loc[n, SHIFT_ECE]:.4f}" for n in shown]
    line = "ECE under shift (mean over the corrupted sets): " + ", ".join(parts) + "."
    if FAR in rows:
        line += (
            " Far-OOD AUROC (max-probability): "
            + ", ".join(
                f"{rows.loc[n, PREDICTIVE]} {rows.loc[n, FAR]:.3f}"
                for n in shown
                if pd.notna(rows.loc[n, FAR])
            )
            + "."
        )
    return [line]


def _switched_off(results: list[dict], tol: float = 1e-2, floor: float = 1e-2) -> list[str]:
    """Blocks whose MAP update is (nearly) zero in every seed, under ``tol`` of the largest block's or
    under ``floor`` in norm (when every block is off): their linearised posterior changes nothing, so
    'this block does not matter' there is a property of the MAP, not of the block."""
    updates = [r.get(names.BLOCK_UPDATE) for r in results]
    if not updates or any(u is None for u in updates):
        return []
    u = np.array(updates)
    off = [b for b in range(u.shape[1]) if (u[:, b] < np.maximum(tol * u.max(1), floor)).all()]
    if not off:
        return []
    return [
        f"The MAP switched off block{'s' * (len(off) > 1)} {', '.join(map(str, off))} (‖θ* − θ₀‖ under "
        f"{tol:.0%} of the largest block's or under {floor:g}, every seed): a Gaussian prior on LoRA "
        "factors is a nuclear-norm penalty on their product, and at A = B = 0 the linearised posterior "
        "of a block changes nothing; read those blocks' rows as 'off at the MAP', not 'irrelevant'."
    ]
