"""The lead table and its verdict, on results whose truth is known: a predictive built to calibrate
better than the MAP, one identical to the MAP, a worse one; their replicates computed for real. And the
analysis side of selection on validation (aggregate, findings, attribution)."""

import functools

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from analysis import aggregate, attribution, findings, lead
from distlap import intervals, metrics, names, ranking, seed_intervals

SCORES = {
    "ece": (functools.partial(metrics.expected_calibration_error, n_bins=15), False),
    "nll": (metrics.negative_log_likelihood, False),
    "accuracy": (metrics.accuracy, True),
}
VAL = names.delta("subset", "val", "ece")


def _result(
    seed: int, test_seed: int | None = None, n: int = 600, c: int = 4, n_resamples: int = 300
) -> dict:
    """One trial on test set ``test_seed`` (default: its own, ``seed``): labels drawn from p (calibrated);
    the MAP is p sharpened (overconfident) with the trial's own noise; 'layer_0' is p itself (better),
    'layer_1' the MAP again (no different), 'all' sharper still (worse); temperature scaling is p (better),
    last-layer Laplace the MAP (no different)."""
    g = torch.Generator().manual_seed(seed if test_seed is None else test_seed)
    logits = 1.5 * torch.randn(n, c, generator=g)
    y = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    own = 0.3 * torch.randn(n, c, generator=torch.Generator().manual_seed(1000 + seed))
    p_map = (3 * logits + own).softmax(1)
    probs = {"layer_0": logits.softmax(1), "layer_1": p_map, "all": (6 * logits + own).softmax(1)}
    probs |= {"temp": logits.softmax(1), "lla": p_map}
    record = ranking.trial_replicates(
        p_map, probs, y, SCORES, test_set=intervals.test_set_identity(logits, y), n_resamples=n_resamples
    )

    def m(key, name):
        ece = metrics.expected_calibration_error(probs.get(name, p_map), y)
        return {
            names.score(key, "shift", "ece"): ece + 0.05,
            names.ood(key, "far_ood", "auroc_maxprob"): 0.7,
            names.ood(key, "near_ood", "auroc_maxprob"): 0.6,
        }

    subsets = {"layer_0": [0], "layer_1": [1], "all": [0, 1]}
    return {
        names.FIT_TIME: 2.0,
        names.EVAL_TIME: 3.0,
        names.BLOCK_UPDATE: [1.0, 0.0],
        "map": {"metrics": m("map", "map")},
        "subsets": {s: {names.BLOCKS: b, "metrics": m("subset", s)} for s, b in subsets.items()},
        "baselines": {
            "temp": {"metrics": {**m("temp", "temp"), names.TEMP_TIME: 0.1}},
            "lla": {"metrics": {**m("lla", "lla"), names.LLA_TIME: 1.0}},
        },
        "attribution": {"values": {"ece": {"shapley": [0.03, -0.01]}}},
        "inference": record,
    }


def test_one_seed_uses_the_trials_replicates():
    result = _result(0)
    table = lead.lead_table([result]).set_index("name")
    assert list(table.index) == ["map", "temp", "lla", "layer_0", "layer_1", "all"]
    ece = intervals.replicates_from_json(result["inference"]["replicates"]["ece"])
    k = ece.names.index("layer_0")
    se = ece.replicates[k].std().item()  # est ± t_{R−1} se: the bootstrap's own Monte-Carlo df
    half = stats.t.ppf(0.975, 299) * se
    col = lead.DELTAS["ece"]
    assert col == "test/delta_ece"
    assert table.loc["layer_0", col] == pytest.approx(float(ece.estimate[k]))
    assert table.loc["layer_0", f"{col}_low"] == pytest.approx(float(ece.estimate[k]) - half, abs=1e-9)
    assert table.loc["layer_0", f"{col}_high"] == pytest.approx(float(ece.estimate[k]) + half, abs=1e-9)
    assert table.loc["layer_0", lead.DISTINCT] and table.loc["all", lead.DISTINCT]
    assert not table.loc["layer_1", lead.DISTINCT] and table.loc["layer_1", col] == 0
    assert table.loc["layer_1", lead.P] == 1.0 and table.loc["layer_0", lead.P_ADJ] < 0.05 / 5
    assert table.loc["layer_0", lead.SHAPLEY] == 0.03 and np.isnan(table.loc["all", lead.SHAPLEY])
    assert table.loc["layer_0", lead.COST] == 5.0 and table.loc["lla", lead.COST] == 1.0


def test_nested_seeds_pool_as_the_t_interval_and_the_verdict_follows_the_intervals():
    results = [_result(s) for s in range(3)]  # each seed its own test set
    table = lead.lead_table(results).set_index("name")
    col = lead.DELTAS["ece"]
    per_seed = [lead.lead_table([r]).set_index("name").loc["layer_0", col] for r in results]
    t = stats.t.interval(0.95, 2, loc=np.mean(per_seed), scale=stats.sem(per_seed))
    assert table.loc["layer_0", col] == pytest.approx(np.mean(per_seed))
    assert (table.loc["layer_0", f"{col}_low"], table.loc["layer_0", f"{col}_high"]) == pytest.approx(
        t, abs=1e-6
    )
    assert table.loc["layer_0", lead.N_SEEDS] == 3 and f"{lead.SHIFT_ECE}_low" in table
    lines = lead.verdict(lead.lead_table(results), results)
    assert lines[0].startswith("The 3 seeds each drew their own test set: pooled as nested")
    assert lines[1].startswith("Over 3 training seeds: 1 of 3 layer subsets calibrate better than the MAP")
    assert "Bonferroni over 3 contrasts, t with 2 df" in lines[1]  # lla, layer_1 are the MAP: se = 0
    assert "layer_0" in lines[1] and "1 calibrate worse (all)" in lines[1]
    assert any(
        line.startswith("Temperature scaling: Δ_ECE") and "better than the MAP" in line for line in lines
    )
    assert any("Last-layer Laplace" in line and "no different from the MAP" in line for line in lines)
    assert any("layer_0 and temperature scaling cannot be told apart" in line for line in lines)  # both are p
    assert any("chosen on TEST Δ_ECE" in line for line in lines)  # no validation Δ in these results
    assert any("switched off block 1" in line for line in lines)


def test_seeds_sharing_a_test_set_pool_as_crossed():
    """Same test set: the same identity and example resamples; Var = s²/n + the mean cross-seed bootstrap
    covariance (brute force over the seed pairs), t with n − 1 df; the t over seeds alone is too narrow."""
    results = [_result(s, test_seed=7) for s in range(3)]
    assert len({r["inference"][names.TEST_SET] for r in results}) == 1
    reps = [np.array(r["inference"]["replicates"]["ece"]["replicates"]) for r in results]
    est = np.array([r["inference"]["replicates"]["ece"]["estimate"] for r in results])
    k = results[0]["inference"]["replicates"]["ece"]["names"].index("layer_0")
    gamma = np.mean([np.cov(reps[i][k], reps[j][k])[0, 1] for i in range(3) for j in range(3) if i != j])
    half = stats.t.ppf(0.975, 2) * np.sqrt(est[:, k].var(ddof=1) / 3 + gamma)
    table = lead.lead_table(results).set_index("name")
    col = lead.DELTAS["ece"]
    assert table.loc["layer_0", f"{col}_high"] == pytest.approx(est[:, k].mean() + half, rel=1e-6)
    naive = seed_intervals.seed_t_interval(est[:, k], test_sets=["a", "b", "c"])
    assert (naive.high - naive.low).item() < 2 * half
    assert lead.verdict(lead.lead_table(results), results)[0].startswith("The 3 seeds share one test set")


def test_an_unresolvable_family_makes_no_call_and_says_why():
    result = _result(0, n_resamples=40)  # 5 rows need 50 replicates for their correlation
    table = lead.lead_table([result])
    assert table[lead.DISTINCT].isna().all() and table[lead.P].iloc[1:].notna().all()  # all but the MAP
    lines = lead.verdict(table, [result])
    assert "no predictive is called better or worse than the MAP" in lines[0] and "40 bootstrap" in lines[0]
    assert any(
        "Temperature scaling" in line and "not compared (unresolvable family)" in line for line in lines
    )
    assert set(lead.display(table)[lead.DISTINCT]) == {""}


def test_the_best_subset_is_chosen_on_validation():
    """Validation prefers 'all' (worse on test): the comparison with temperature scaling is about 'all'."""
    results = [_result(s) for s in range(2)]
    for r in results:
        for name, value in (("layer_0", 0.01), ("layer_1", 0.0), ("all", 0.02)):
            r["subsets"][name]["metrics"][VAL] = value
    lines = lead.verdict(lead.lead_table(results), results)
    line = next(line for line in lines if line.startswith("Best subset"))
    assert line.startswith("Best subset all (chosen on validation Δ_ECE)")
    assert "temperature scaling calibrates better than all" in line


def test_the_selection_for_export_is_the_validation_best_subset_of_the_first_trial():
    """What ``python -m distlap.export`` exports by default: the subset validation prefers ('all', worse
    on test), in the reference configuration's first trial, with its lead-table row."""
    results = [_result(s) for s in range(2)]
    for r in results:
        for name, value in (("layer_0", 0.01), ("layer_1", 0.0), ("all", 0.02)):
            r["subsets"][name]["metrics"][VAL] = value
    table = lead.lead_table(results)
    chosen = lead.selection(table, results, ["first", "second"])
    assert chosen[names.TRIAL_ID] == "first" and chosen[names.SUBSET] == "all"
    assert chosen["chosen_on"] == "validation" and chosen["lead_row"][names.BLOCKS] == [0, 1]
    col = names.split_delta("test", "ece")
    row = table.set_index("name").loc["all"]
    assert chosen["lead_row"][col] == row[col] and chosen["lead_row"][col + "_low"] == row[col + "_low"]
    assert lead.selection(table.iloc[:0], results, ["first"]) is None


def test_results_without_replicates_say_so():
    old = _result(0)
    del old["inference"]
    table = lead.lead_table([old])
    assert table.empty and "No saved replicates" in lead.verdict(table, [old])[0]


def test_blocks_all_but_off_are_named_switched_off():
    """Every block's update tiny (the strong-prior LoRA MAP): all are off, not only those under 1% of the
    largest; a block moved in one seed is not off."""
    results = [_result(s) for s in range(2)]
    results[0][names.BLOCK_UPDATE], results[1][names.BLOCK_UPDATE] = [0.009, 0.002], [0.6, 0.001]
    lines = lead.verdict(lead.lead_table(results), results)
    assert any("switched off block 1 (" in line for line in lines)
    results[1][names.BLOCK_UPDATE] = [0.004, 0.001]
    assert any("switched off blocks 0, 1" in line for line in lead.verdict(lead.lead_table(results), results))


def test_switched_off_only_under_the_zero_anchor_with_the_origin_test_numbers():
    """Under the init anchor a block at θ₀ keeps its Jacobian (∂f/∂B ∝ A₀): not 'off'. Under the zero
    anchor the origin test of the first seed explains the silenced blocks in numbers."""
    results = [_result(s) for s in range(2)]
    for r in results:
        r[names.BLOCK_UPDATE] = [0.6, 0.001]
        r[names.PRIOR_ANCHOR] = "init"
    assert not any("switched off" in line for line in lead.verdict(lead.lead_table(results), results))
    for r in results:
        r[names.PRIOR_ANCHOR] = "zero"
    results[0][names.SWITCH_OFF] = [
        {"block": 0, "sigma": 0.157, "threshold": 0.05, "silenced": False},
        {"block": 1, "sigma": 0.0353, "threshold": 0.25, "silenced": True},
    ]
    (line,) = [x for x in lead.verdict(lead.lead_table(results), results) if "switched off" in x]
    assert "switched off block 1 (" in line and "block 1: 0.0353 vs 0.25" in line and "block 0:" not in line


def test_float_noise_on_equal_deltas_is_a_tie_and_the_first_row_wins():
    """Switched-off blocks have Δ = 0 up to fp32 noise (~1e-8): the noise must not choose the 'best'."""
    rows = pd.DataFrame({"name": ["layer_0", "layer_1", "layer_2"], "d": [-7e-4, -3e-8, 2e-8]})
    assert lead._first_best(rows, "d", ascending=False) == "layer_1"
    rows.loc[0, "d"] = 1e-3
    assert lead._first_best(rows, "d", ascending=False) == "layer_0"
    assert lead._first_best(rows, "d", ascending=True) == "layer_1"


# ------------------------------------------------------------ selection on validation, reported on test


def _subset_rows(val: dict | None, test_sets=("t", "t")) -> pd.DataFrame:
    """Two seeds of one configuration, three subsets: test Δ prefers layer_0, validation prefers layer_1."""
    test = {"layer_0": [0.05, 0.04], "layer_1": [0.01, 0.02], "all": [0.03, 0.03]}
    rows = []
    for name, deltas in test.items():
        for i, d in enumerate(deltas):
            row = {
                names.CONFIG: "c",
                names.SUBSET: name,
                names.SUBSET_KIND: "group" if name == "all" else "layer",
                names.BLOCKS: [0, 1] if name == "all" else [int(name[-1])],
                names.FIRST_BLOCK: 0,
                names.SEED: i,
                names.TRIAL_ID: f"t{i}",
                names.OBJECTIVE: 1.0,
                names.PRIOR_PRECISION: 1.0,
                names.TEST_SET: test_sets[i],
                aggregate.DELTA: d,
                aggregate.DELTA_LOW: d - 0.0196,  # a within-seed se of 0.01
                aggregate.DELTA_HIGH: d + 0.0196,
            }
            if val is not None:
                row[VAL] = val[name]
            rows.append(row)
    return pd.DataFrame(rows)


def test_subsets_are_ranked_on_validation_and_reported_on_test():
    val = {"layer_0": 0.0, "layer_1": 0.03, "all": 0.01}
    ranked = aggregate.ranking(aggregate.summary_table(_subset_rows(val), [], "min"), "c")
    assert list(ranked[names.SUBSET]) == ["layer_1", "all", "layer_0"]
    assert ranked[aggregate.DELTA].tolist() == pytest.approx([0.015, 0.03, 0.045])  # test values
    assert set(ranked[names.RANKED_ON]) == {"validation"}
    old = aggregate.ranking(aggregate.summary_table(_subset_rows(None), [], "min"), "c")
    assert list(old[names.SUBSET]) == ["layer_0", "all", "layer_1"]
    assert old[names.RANKED_ON].iloc[0].startswith("test")


def test_seed_interval_of_the_summary_follows_the_design():
    shared = aggregate.summary_table(_subset_rows(None), [], "min").set_index(names.SUBSET)
    nested = aggregate.summary_table(_subset_rows(None, ("a", "b")), [], "min").set_index(names.SUBSET)
    x = np.array([0.05, 0.04])
    crossed_half = stats.t.ppf(0.975, 1) * np.sqrt(x.var(ddof=1) / 2 + (0.0196 / stats.norm.ppf(0.975)) ** 2)
    nested_half = stats.t.ppf(0.975, 1) * x.std(ddof=1) / np.sqrt(2)
    assert shared.loc["layer_0", aggregate.DELTA_HIGH] == pytest.approx(x.mean() + crossed_half, rel=1e-6)
    assert nested.loc["layer_0", aggregate.DELTA_HIGH] == pytest.approx(x.mean() + nested_half, rel=1e-6)
    assert (
        "crossed" in shared.loc["layer_0", names.CI_METHOD]
        and "nested" in nested.loc["layer_0", names.CI_METHOD]
    )


def test_findings_compare_all_with_the_validation_best_layer_by_a_paired_interval():
    results = [_result(s) for s in range(3)]
    every = {names.SUBSET: "all", aggregate.DELTA: -0.05, aggregate.DELTA_LOW: -0.1, aggregate.DELTA_HIGH: 0}
    layer = {
        names.SUBSET: "layer_0",
        aggregate.DELTA: 0.1,
        aggregate.DELTA_LOW: 0.05,
        aggregate.DELTA_HIGH: 0.15,
    }
    cmp = findings._compare(every, layer, results)
    law = lead.pooled(results)["ece"]
    est, se, _ = law.contrast(ranking.pairs(law.names, ["all", "layer_0"]).weights)
    assert cmp["difference"] == pytest.approx(est.item())
    assert cmp["high"] == pytest.approx(est.item() + stats.t.ppf(0.975, 2) * se.item())
    assert cmp["cis_separate"] and "paired" in cmp["method"] and cmp["larger_delta_ece"] == "layer_0"
    for r in results:
        del r["inference"]
    assert "non-overlap" in findings._compare(every, layer, results)["method"]


def test_best_k_is_read_as_chosen_on_validation_where_the_results_say_so():
    steps = [{"size": 1, "blocks": [1], "value": 0.02, "val_value": 0.03}]
    new = [{"attribution": {"values": {"ece": {"greedy": steps, "shapley": [0.0, 0.02]}}}}]
    old = [
        {
            "attribution": {
                "values": {"ece": {"greedy": [{k: v for k, v in steps[0].items() if k != "val_value"}]}}
            }
        }
    ]
    table = attribution.best_k_table(new)
    assert table[attribution.VALUE].tolist() == [0.02] and table[names.RANKED_ON].tolist() == ["validation"]
    assert attribution.best_k_table(old)[names.RANKED_ON].iloc[0].startswith("test")


def test_shapley_interval_over_seeds_follows_the_design():
    per_seed = [[0.02, 0.01], [0.04, 0.0], [0.03, 0.02]]
    results = [
        {
            "attribution": {
                "values": {
                    "ece": {
                        "shapley": phi,
                        "shapley_low": [v - 0.0196 for v in phi],
                        "shapley_high": [v + 0.0196 for v in phi],
                    }
                }
            },
            "inference": {names.TEST_SET: test_set},
        }
        for phi, test_set in zip(per_seed, ["t", "t", "t"])
    ]
    row = attribution.shapley_table(results).iloc[0]
    x = np.array([0.02, 0.04, 0.03])
    half = stats.t.ppf(0.975, 2) * np.sqrt(x.var(ddof=1) / 3 + (0.0196 / stats.norm.ppf(0.975)) ** 2)
    assert (row[attribution.LOW], row[attribution.HIGH]) == pytest.approx(
        (0.03 - half, 0.03 + half), rel=1e-6
    )
    for r, test_set in zip(results, "abc"):
        r["inference"][names.TEST_SET] = test_set
    row = attribution.shapley_table(results).iloc[0]
    assert row[attribution.HIGH] == pytest.approx(0.03 + stats.t.ppf(0.975, 2) * x.std(ddof=1) / np.sqrt(3))
