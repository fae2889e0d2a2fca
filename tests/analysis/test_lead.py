"""The lead table and its verdict, on results whose truth is known: a predictive built to calibrate
better than the MAP, one identical to the MAP, a worse one; their replicates computed for real."""

import numpy as np
import pytest
import torch

from analysis import lead
from distlap import intervals, metrics, names

SCORES = {
    "ece": (metrics.expected_calibration_error, False),
    "nll": (metrics.negative_log_likelihood, False),
    "accuracy": (metrics.accuracy, True),
}


def _result(seed: int, n: int = 600, c: int = 4) -> dict:
    """One trial: labels drawn from p (calibrated); the MAP is p sharpened (overconfident); 'layer_0' is
    p itself (calibrated: better), 'layer_1' the MAP again (no different), 'all' sharper still (worse);
    temperature scaling is p (better), last-layer Laplace the MAP (no different)."""
    g = torch.Generator().manual_seed(seed)
    logits = 1.5 * torch.randn(n, c, generator=g)
    y = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    p_map = (3 * logits).softmax(1)
    probs = {"layer_0": logits.softmax(1), "layer_1": p_map, "all": (6 * logits).softmax(1)}
    probs |= {"temp": logits.softmax(1), "lla": p_map}
    reps = intervals.improvement_replicates(p_map, probs, y, SCORES, n_resamples=300, seed=seed)

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
        "inference": {"replicates": {s: intervals.replicates_to_json(r) for s, r in reps.items()}},
    }


def test_one_seed_uses_the_trials_replicates():
    result = _result(0)
    table = lead.lead_table([result]).set_index("name")
    assert list(table.index) == ["map", "temp", "lla", "layer_0", "layer_1", "all"]
    ece = intervals.replicates_from_json(result["inference"]["replicates"]["ece"])
    low, high = intervals.percentile_interval(ece.replicates, 0.95)
    k = ece.names.index("layer_0")
    col = lead.DELTAS["ece"]
    assert table.loc["layer_0", col] == pytest.approx(float(ece.estimate[k]))
    assert table.loc["layer_0", f"{col}_low"] == pytest.approx(float(low[k]), abs=1e-6)
    assert table.loc["layer_0", f"{col}_high"] == pytest.approx(float(high[k]), abs=1e-6)
    assert table.loc["layer_0", lead.DISTINCT] and table.loc["all", lead.DISTINCT]
    assert not table.loc["layer_1", lead.DISTINCT] and table.loc["layer_1", col] == 0
    assert table.loc["layer_0", lead.SHAPLEY] == 0.03 and np.isnan(table.loc["all", lead.SHAPLEY])
    assert table.loc["layer_0", lead.COST] == 5.0 and table.loc["lla", lead.COST] == 1.0


def test_seeds_pool_and_the_verdict_follows_the_intervals():
    results = [_result(s) for s in range(3)]
    table = lead.lead_table(results).set_index("name")
    col = lead.DELTAS["ece"]
    per_seed = [lead.lead_table([r]).set_index("name").loc["layer_0", col] for r in results]
    assert table.loc["layer_0", col] == pytest.approx(np.mean(per_seed))
    assert table.loc["layer_0", lead.N_SEEDS] == 3 and f"{lead.SHIFT_ECE}_low" in table
    lines = lead.verdict(lead.lead_table(results), results)
    assert lines[0].startswith("Over 3 training seeds: 1 of 3 layer subsets calibrate better than the MAP")
    assert "layer_0" in lines[0] and "1 calibrate worse (all)" in lines[0]
    assert any(
        line.startswith("Temperature scaling: Δ_ECE") and "better than the MAP" in line for line in lines
    )
    assert any("Last-layer Laplace" in line and "no different from the MAP" in line for line in lines)
    assert any("layer_0 and temperature scaling cannot be told apart" in line for line in lines)  # both are p
    assert any("switched off block 1" in line for line in lines)


def test_results_without_replicates_say_so():
    old = _result(0)
    del old["inference"]
    table = lead.lead_table([old])
    assert table.empty and "No saved replicates" in lead.verdict(table, [old])[0]
