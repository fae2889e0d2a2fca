"""distlap.ranking: bootstrap p-values, Holm, simultaneous intervals, the ranking table."""

import itertools
import json

import numpy as np
import pytest
import torch

from distlap import intervals as I
from distlap import metrics as M
from distlap import ranking as R

ECE = M.expected_calibration_error


# ------------------------------------------------------------------------------------ multiplicity


def test_bootstrap_p_values_match_their_definition():
    shift = torch.tensor([0, 0.5, 1, 5, -5])[:, None]
    x = torch.randn(5, 199, generator=torch.Generator().manual_seed(0)) + shift
    x[0] = 0.0
    p = R.bootstrap_p_values(x)
    for row, got in zip(x.tolist(), p.tolist()):
        below, above = sum(v <= 0 for v in row), sum(v >= 0 for v in row)
        assert got == pytest.approx(min(1.0, 2 * min(below + 1, above + 1) / 200), abs=1e-15)
    assert p[0] == 1.0 and p[3] == p[4] == pytest.approx(2 / 200)


def test_bootstrap_p_value_agrees_with_the_percentile_interval():
    """p < alpha exactly when 0 is outside the (1 - alpha) percentile interval, up to one replicate."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 999, generator=g) + 3 * torch.rand(400, 1, generator=g)
    p = R.bootstrap_p_values(x)
    low, high = I.percentile_interval(x, 0.95)
    agree = (p < 0.05) == ((low > 0) | (high < 0))
    near = ((x <= 0).sum(1) - 0.025 * 1000).abs() <= 2
    assert (agree | near).all() and near.sum() < 40


def test_holm_hand_computed():
    # sorted: .005 * 4 = .02; .01 * 3 = .03; .03 * 2 = .06; .04 * 1 = .04 -> max(.06, .04) = .06
    adjusted = R.holm(torch.tensor([0.01, 0.04, 0.03, 0.005], dtype=torch.float64))
    assert adjusted.tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    # sorted: .2 * 2 = .4; .9 * 1 = .9 -> max(.4, .9) = .9
    assert R.holm(torch.tensor([0.9, 0.2], dtype=torch.float64)).tolist() == pytest.approx([0.9, 0.4])


def _closed_bonferroni(p):
    """Brute force: the closure of Bonferroni tests; H_i's adjusted p = max over I containing i of
    min(1, |I| min_{j in I} p_j)."""
    m = len(p)
    families = [s for r in range(1, m + 1) for s in itertools.combinations(range(m), r)]
    return [max(min(1.0, len(s) * min(p[j] for j in s)) for s in families if i in s) for i in range(m)]


def _holm_rejects(p, alpha):
    """Holm's step-down procedure itself: reject the sorted hypotheses while p_(j) <= alpha / (m - j + 1)."""
    m, rejected = len(p), set()
    for j, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        if p[i] > alpha / (m - j):
            break
        rejected.add(i)
    return rejected


@pytest.mark.parametrize("seed", range(6))
def test_holm_equals_brute_force_definitions(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 8))
    # small p-values on odd seeds; rounded ones (with ties) on even seeds
    p = (rng.uniform(0, 0.2, m) ** 2).tolist() if seed % 2 else rng.uniform(0, 1, m).round(2).tolist()
    adjusted = R.holm(torch.tensor(p, dtype=torch.float64)).tolist()
    assert adjusted == pytest.approx(_closed_bonferroni(p), abs=1e-12)
    for alpha in (0.001, 0.01, 0.05, 0.1, 0.3):
        assert {i for i in range(m) if adjusted[i] <= alpha} == _holm_rejects(p, alpha)


def test_simultaneous_intervals_cover_jointly():
    """Ten independent means, truth 0: marginal 95% intervals all cover far less often than 95%
    (~0.95^10 = 0.60); max-|t| and Bonferroni intervals cover all ten about 95% of the time."""
    g = torch.Generator().manual_seed(0)
    hits = {"marginal": 0, "max_t": 0, "bonferroni": 0}
    sims, n, s, r = 150, 100, 10, 1000  # R large enough for the 1 - 0.05/20 Bonferroni tail
    for _ in range(sims):
        x = torch.randn(n, s, generator=g, dtype=torch.float64)
        est = x.mean(0)
        reps = x[torch.randint(0, n, (r, n), generator=g)].mean(1).T  # (S, R)
        low, high = I.percentile_interval(reps)
        hits["marginal"] += bool(((low <= 0) & (high >= 0)).all())
        for method in ("max_t", "bonferroni"):
            low, high = R.simultaneous_intervals(est, reps, 0.95, method)
            hits[method] += bool(((low <= 0) & (high >= 0)).all())
    assert hits["marginal"] / sims < 0.8
    assert hits["max_t"] / sims > 0.88 and hits["bonferroni"] / sims > 0.88


def test_simultaneous_max_t_zero_spread_rows_and_bad_method():
    reps = torch.stack([torch.zeros(50, dtype=torch.float64), torch.linspace(-1, 1, 50, dtype=torch.float64)])
    low, high = R.simultaneous_intervals(torch.tensor([0.0, 0.0]), reps)
    assert (low[0].item(), high[0].item()) == (0.0, 0.0) and low[1] < 0 < high[1]
    with pytest.raises(ValueError, match="method"):
        R.simultaneous_intervals(torch.zeros(2), reps, method="sidak")


def test_ranking_table_orders_and_flags_distinguishable():
    logits = 3 * torch.randn(1500, 5, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    probs_map = torch.softmax(3 * logits, 1)  # overconfident
    bayes = {
        "same": probs_map.clone(),
        "calibrated": torch.softmax(logits, 1),
        "half": torch.softmax(2 * logits, 1),
    }
    rep = I.delta_replicates(ECE, probs_map, bayes, labels, n_resamples=300)
    table = R.ranking_table(rep)
    json.dumps(table)
    assert [row["name"] for row in table] == ["calibrated", "half", "same"]
    flags = {row["name"]: row["distinguishable"] for row in table}
    assert flags == {"calibrated": True, "half": True, "same": False}
    assert all(row["low"] <= row["estimate"] <= row["high"] and row["p"] <= row["p_holm"] for row in table)
    pairs = {row["name"]: row for row in R.ranking_table(R.pairwise(rep))}
    assert set(pairs) == {"same - calibrated", "same - half", "calibrated - half"}
    assert pairs["same - calibrated"]["distinguishable"] and pairs["same - calibrated"]["estimate"] < 0


def test_holm_refuses_p_values_outside_0_1():
    with pytest.raises(ValueError, match="p_values"):
        R.holm(torch.tensor([0.5, 1.5]))
