"""The table a layer-wise report leads with, and the verdict that follows from its intervals.

Rows: the MAP, temperature scaling, last-layer Laplace and every layer subset, on the same fine-tuned
models (the reference configuration's seeds). Columns: the improvement over the MAP on test in ECE, NLL
and accuracy (positive = better), each with a marginal 95% interval over test examples, Monte-Carlo sample
sets (``nn``) and, with several seeds, training seeds, pooled by the design the seeds had (the same test
set: crossed; each its own: nested; detected from the recorded test-set identity,
:mod:`distlap.seed_intervals`); whether Δ_ECE is distinguishable from 0 in the family of all rows
against the MAP (simultaneous interval and adjusted p that agree, :mod:`distlap.ranking`); ECE under
shift (mean over the corrupted sets) and OOD AUROCs (mean over seeds, t-interval with several); a
block's Shapley value of Δ_ECE; and the seconds the predictive costs beyond the MAP. The best subset is
chosen on validation and compared with temperature scaling on test.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.aggregate import tied
from analysis.page import with_interval
from distlap import names, ranking, seed_intervals
from distlap.seed_intervals import Pooled

LEVEL = 0.95
PREDICTIVE, BLOCKS, N_SEEDS = "predictive", names.BLOCKS, names.N_SEEDS
SCORES = ("ece", "nll", "accuracy")
DELTAS = {s: names.split_delta("test", s) for s in SCORES}
VAL_DELTA = names.delta("subset", "val", "ece")  # what the best subset is chosen by
P, P_ADJ, DISTINCT = "p", "p_adjusted", "distinguishable"
SHIFT_ECE = names.score("map", "shift", "ece").partition("/")[2]  # the lead table's columns: no predictive
NEAR, FAR = (names.ood("map", s, "auroc_maxprob").partition("/")[2] for s in ("near_ood", "far_ood"))
SHAPLEY, COST = names.SHAPLEY + "ece", "cost_s"
LABELS = {p: names.PREDICTIVES[p] for p in ("map", "temp", "lla")}


def pooled(results: list[dict]) -> dict[str, Pooled] | None:
    """Per score, the joint law of every predictive's improvement over the MAP: one trial's replicates,
    or pooled over the seeds by their design (:func:`distlap.ranking.pooled_laws`). None when a trial has
    no saved replicates (older results)."""
    if not results or any("inference" not in r for r in results):
        return None
    return ranking.pooled_laws([r["inference"] for r in results])


def ece_family(laws: dict[str, Pooled]) -> dict:
    """The family of every row against the MAP in Δ_ECE (:func:`distlap.ranking.family`)."""
    law = laws["ece"]
    return ranking.family(law, ranking.versus_map(law.names), LEVEL)


def lead_table(results: list[dict]) -> pd.DataFrame:
    """The lead table (module doc) of one configuration's trials (their ``layer_wise_results.json``)."""
    laws = pooled(results)
    if laws is None:
        return pd.DataFrame()
    first = results[0]
    order = ["map", *(n for n in ("temp", "lla") if n in first.get("baselines", {})), *first["subsets"]]
    rows = {name: {PREDICTIVE: LABELS.get(name, name), N_SEEDS: len(results)} for name in order}
    for name in first["subsets"]:
        rows[name][BLOCKS] = first["subsets"][name][BLOCKS]
    _improvements(rows, laws)
    _seed_means(rows, results)
    _shapley(rows, results)
    return pd.DataFrame(list(rows.values()), index=order).rename_axis("name").reset_index()


def _improvements(rows: dict, laws: dict[str, Pooled]) -> None:
    rows["map"].update({DELTAS[s]: 0.0 for s in SCORES})
    for score, law in laws.items():
        low, high = law.interval(LEVEL)
        for k, name in enumerate(law.names):
            col = DELTAS[score]
            rows[name].update(
                {col: float(law.estimate[k]), f"{col}_low": float(low[k]), f"{col}_high": float(high[k])}
            )
    for row in ece_family(laws)["rows"]:
        rows[row["name"]].update({P: row["p"], P_ADJ: row.get("p_adjusted"), DISTINCT: row[DISTINCT]})


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
    if len(values) > 1:  # one number per seed: the seed interval's t over seeds
        ci = seed_intervals.seed_t_interval(np.asarray(values, dtype=float), LEVEL)
        out |= {f"{col}_low": float(ci.low[0]), f"{col}_high": float(ci.high[0])}
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
    for col in (P, P_ADJ):
        shown[col] = [f"{p:.3g}" if pd.notna(p) else "" for p in table.get(col, np.nan)]
    if DISTINCT in shown:
        shown[DISTINCT] = ["" if d is None or pd.isna(d) else ("yes" if d else "no") for d in table[DISTINCT]]
    if SHAPLEY in shown:
        shown[SHAPLEY] = [f"{v:+.4f}" if pd.notna(v) else "" for v in table[SHAPLEY]]
    if COST in shown:
        shown[COST] = [f"{v:.2f}" if pd.notna(v) else "" for v in table[COST]]
    return shown.drop(columns=["name"])


def _called(rows: pd.DataFrame) -> pd.Series:
    """Rows called distinguishable (None, no call in an unresolvable family, is not a call)."""
    return rows[DISTINCT].map(lambda d: d is True or d is np.True_)


def verdict(table: pd.DataFrame, results: list[dict]) -> list[str]:
    """Plain sentences that follow from the intervals of ``table`` (see :func:`lead_table`)."""
    if table.empty:
        return ["No saved replicates in these results: rerun the trials with this version for the table."]
    laws = pooled(results)
    n = int(table[N_SEEDS].iloc[0])
    lines = [*_design_line(laws["ece"]), _calls_line(table, ece_family(laws), n)]
    lines += [_baseline_line(table, name) for name in ("temp", "lla") if name in set(table["name"])]
    lines += _best_vs_temperature(table, results)
    lines += _shift_ood_line(table) + _switched_off(results)
    if n == 1:
        lines.append(
            "One training seed: the intervals cover test examples (and Monte-Carlo sample sets) but not "
            "training randomness; repeat the configuration with search.seeds for that."
        )
    return lines


def _design_line(law: Pooled) -> list[str]:
    """How the seeds were pooled, from their recorded test sets (:mod:`distlap.seed_intervals`)."""
    n = law.n_seeds
    how = {
        seed_intervals.CROSSED: f"The {n} seeds share one test set (the same test-set identity and example "
        "resamples): pooled as crossed, the seed means' variance s²/n plus the shared test-set covariance "
        f"of their bootstrap replicates, t with {n - 1} df.",
        seed_intervals.NESTED: f"The {n} seeds each drew their own test set: pooled as nested, the "
        f"t-interval over the seed means ({n - 1} df), whose spread holds the test noise.",
        seed_intervals.UNKNOWN: f"The {n} seeds' test sets cannot be matched (no test-set identity in "
        "older results, unaligned resamples, or some shared and some not): pooled conservatively, the "
        f"shared test-set variance bounded by the mean within-seed one, t with {n - 1} df.",
    }
    return [how[law.design]] if law.design in how else []


def _calls_line(table: pd.DataFrame, family: dict, n: int) -> str:
    subsets = table[table[BLOCKS].notna()]
    seeds = f"Over {n} training seed{'s' * (n > 1)}"
    if not family["resolvable"]:
        return (
            f"{seeds}: no predictive is called better or worse than the MAP: the family of "
            f"{len(family['rows'])} rows cannot be resolved ({family['reason']})."
        )
    better = subsets[_called(subsets) & (subsets[DELTAS["ece"]] > 0)]
    worse = subsets[_called(subsets) & (subsets[DELTAS["ece"]] < 0)]
    crit = min((r["critical"] for r in family["rows"] if r["critical"] > 0), default=float("nan"))
    return (
        f"{seeds}: {len(better)} of {len(subsets)} layer subsets calibrate better than the MAP (Δ_ECE > 0, "
        f"its simultaneous 95% interval over all {len(family['rows'])} rows against the MAP excludes 0: "
        f"{family['method']}; a call needs |t| > {crit:.2f})"
        + (f": {', '.join(better['name'])}" if len(better) else "")
        + f"; {len(worse)} calibrate worse"
        + (f" ({', '.join(worse['name'])})" if len(worse) else "")
        + "; the others cannot be told apart from the MAP."
    )


def _baseline_line(table: pd.DataFrame, name: str) -> str:
    row = table.set_index("name").loc[name]
    col = DELTAS["ece"]
    called = row[DISTINCT] is True or row[DISTINCT] is np.True_
    verdict_ = "better than" if called and row[col] > 0 else "worse than" if called else "no different from"
    if row[DISTINCT] is None or pd.isna(row[DISTINCT]):  # no call: the family is unresolvable
        verdict_ = "not compared (unresolvable family) with"
    return (
        f"{LABELS[name][0].upper() + LABELS[name][1:]}: Δ_ECE {row[col]:+.4f} [{row[col + '_low']:+.4f}, "
        f"{row[col + '_high']:+.4f}], {verdict_} the MAP."
    )


def _first_best(rows: pd.DataFrame, column: str, *, ascending: bool) -> str:
    """The best row by ``column``; of rows equal up to float noise (:func:`analysis.aggregate.tied`) the
    first wins (single blocks in depth order, then groups): float noise picks no name."""
    return rows.loc[tied(rows[column]).sort_values(ascending=ascending, kind="stable").index, "name"].iloc[0]


def best_subset(subsets: pd.DataFrame, results: list[dict]) -> tuple[str, str]:
    """The subset with the largest mean validation Δ_ECE over the seeds, and ``"validation"``; where a
    result lacks ``subset/val/delta_ece`` (older results), the largest test Δ_ECE and ``"test"``."""
    val = [[r["subsets"][n]["metrics"].get(VAL_DELTA) for r in results] for n in subsets["name"]]
    if any(v is None for row in val for v in row):
        return _first_best(subsets, DELTAS["ece"], ascending=False), "test"
    chosen = pd.DataFrame({"name": list(subsets["name"]), VAL_DELTA: [float(np.mean(v)) for v in val]})
    return _first_best(chosen, VAL_DELTA, ascending=False), "validation"


def selection(table: pd.DataFrame, results: list[dict], trial_ids: list[str]) -> dict | None:
    """What the report selects for deployment (``python -m distlap.export``): the reference
    configuration's first trial with results and the best subset chosen on validation, with the lead
    table's row of that subset; None without subsets or results."""
    subsets = table[table[BLOCKS].notna()] if BLOCKS in table else table.iloc[:0]
    if subsets.empty or not results:
        return None
    best, on = best_subset(subsets, results)
    row = subsets[subsets["name"] == best].iloc[0].drop("name")
    return {
        names.TRIAL_ID: trial_ids[0],
        names.SUBSET: best,
        "chosen_on": on,
        "lead_row": {k: (list(v) if k == BLOCKS else _plain(v)) for k, v in row.items()},
    }


def _plain(value):
    """A JSON-safe scalar: numpy -> Python, NaN -> None."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and np.isnan(value) else value


def _best_vs_temperature(table: pd.DataFrame, results: list[dict]) -> list[str]:
    """The best subset (chosen on validation) against temperature scaling on test: the marginal interval of
    their paired difference (:meth:`distlap.seed_intervals.Pooled.contrast`)."""
    laws = pooled(results)
    subsets = table[table[BLOCKS].notna()]
    if laws is None or subsets.empty or "temp" not in laws["ece"].names:
        return []
    best, on = best_subset(subsets, results)
    law = laws["ece"]
    est, se, df = law.contrast(ranking.pairs(law.names, [best, "temp"]).weights)
    low, high = seed_intervals.t_bounds(est, se, df, LEVEL)
    d, lo, hi = float(est[0]), float(low[0]), float(high[0])
    if lo > 0:
        says = f"{best} calibrates better than temperature scaling"
    elif hi < 0:
        says = f"temperature scaling calibrates better than {best}"
    else:
        says = f"{best} and temperature scaling cannot be told apart"
    chosen = (
        "chosen on validation Δ_ECE"
        if on == "validation"
        else "chosen on TEST Δ_ECE: these results carry no validation Δ, so this comparison is optimistic"
    )
    return [
        f"Best subset {best} ({chosen}) minus temperature scaling in test Δ_ECE: {d:+.4f} "
        f"[{lo:+.4f}, {hi:+.4f}]: {says}."
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
    """Under the zero anchor (older results: the only one), blocks whose MAP update is (nearly) zero in
    every seed, under ``tol`` of the largest block's or under ``floor`` in norm (when every block is off):
    their linearised posterior changes nothing, so 'this block does not matter' there is a property of the
    MAP, not of the block; with the origin test's numbers where the trials recorded them. Under the init
    anchor a block at θ₀ keeps a Jacobian (∂f/∂B ∝ A₀) and is not off."""
    updates = [r.get(names.BLOCK_UPDATE) for r in results]
    anchors = {r.get(names.PRIOR_ANCHOR, "zero") for r in results}
    if not updates or any(u is None for u in updates) or anchors != {"zero"}:
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
        + _origin_test(results[0], off)
    ]


def _origin_test(result: dict, off: list[int]) -> str:
    """The first seed's origin test of the switched-off blocks (σ_max of ∇_W NLL against λ/(N·s))."""
    tests = {t["block"]: t for t in result.get(names.SWITCH_OFF) or []}
    shown = [tests[b] for b in off if b in tests]
    if not shown:
        return ""
    parts = ", ".join(f"block {t['block']}: {t['sigma']:.3g} vs {t['threshold']:.3g}" for t in shown)
    return (
        f" The origin test of the first seed (σ_max of ∇_W NLL at A = B = 0 against λ/(N·s); the origin "
        f"is a local minimum when the second is larger): {parts}."
    )
