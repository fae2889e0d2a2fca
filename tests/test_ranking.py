"""distlap.ranking: families of contrasts with p-values and simultaneous intervals that agree, against
SciPy's t law (Bonferroni's closed form), a simulated global null, and families of 10 and 18 predictives
where a real effect is called."""

import functools
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from distlap import intervals as I
from distlap import metrics as M
from distlap import ranking as R
from distlap import seed_intervals as S

ECE = functools.partial(M.expected_calibration_error, n_bins=15)
LEVEL = 0.95


def _law(estimate, cov, n_resamples=10**9, names=None):
    """A one-seed law with a known covariance (huge R: the multivariate normal)."""
    s = len(estimate)
    names = names or tuple(f"r{k}" for k in range(s))
    est, cov = torch.as_tensor(estimate).double(), torch.as_tensor(cov).double()
    return S.Pooled(names, est, torch.zeros(s, s, dtype=torch.float64), cov, 1, "single", n_resamples)


# ---------------------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize(("n_resamples", "m"), [(200, 10), (1000, 18), (10**9, 153)])
def test_one_seed_is_bonferroni_over_t_with_r_minus_1_df(n_resamples, m):
    """p̃ = min(1, m · 2 P(T_{R−1} > |t|)) and c = t_{R−1}^{-1}(1 − α/(2m)), from SciPy's t law."""
    g = np.random.default_rng(m)
    law = _law(g.normal(0, 3, m), np.diag(g.uniform(0.5, 2, m)), n_resamples=n_resamples)
    fam = R.family(law, R.versus_map(law.names))
    df = n_resamples - 1
    assert fam["method"].startswith(f"Bonferroni over {m} contrasts") and fam["n_tested"] == m
    for row in fam["rows"]:
        p = 2 * stats.t.sf(abs(row["t"]), df)
        assert row["p"] == pytest.approx(p, rel=1e-9, abs=1e-300)
        assert row["p_adjusted"] == pytest.approx(min(1.0, m * p), rel=1e-9, abs=1e-300)
        assert row["critical"] == pytest.approx(stats.t.isf(0.05 / (2 * m), df), rel=1e-9)


def test_a_call_needs_p_below_alpha_over_m_and_can_get_far_below_it():
    """No floor: a contrast 20 standard errors out has an adjusted p < 1e-50, far below α/m."""
    law = _law(torch.tensor([20.0, 0.5]), torch.eye(2), n_resamples=1000)
    rows = {r["name"]: r for r in R.family(law, R.versus_map(law.names))["rows"]}
    assert rows["r0"]["distinguishable"] and rows["r0"]["p_adjusted"] < 1e-50
    assert not rows["r1"]["distinguishable"] and rows["r1"]["p_adjusted"] == 1.0  # min(1, 2 · 0.62)


# -------------------------------------------------------------------- definitions and their agreement


@pytest.mark.parametrize("seed", range(4))
def test_p_values_and_simultaneous_intervals_agree(seed):
    g = np.random.default_rng(seed)
    s = 12
    a = g.normal(size=(s, s))
    law = _law(g.normal(0, 3, s), a @ a.T / s + np.eye(s) * 0.1, n_resamples=1000)
    for contrasts in (R.versus_map(law.names), R.pairs(law.names)):
        fam = R.family(law, contrasts)
        for row in fam["rows"]:
            excludes = row["low"] > 0 or row["high"] < 0
            assert row["distinguishable"] == excludes == (row["p_adjusted"] < 0.05)
            assert row["p"] <= row["p_adjusted"] and row["low"] <= row["estimate"] <= row["high"]
            assert row["p"] == pytest.approx(2 * stats.t.sf(abs(row["t"]), 999))


def test_several_seeds_use_bonferroni_over_t_with_n_minus_1_df():
    x = torch.tensor([[0.05, 0.01, 0.0], [0.07, -0.02, 0.0], [0.06, 0.02, 0.0]], dtype=torch.float64)
    per_seed = [I.Replicates(("a", "b", "c"), row, torch.zeros(3, 50, dtype=torch.float64)) for row in x]
    law = S.pool(per_seed, ["s0", "s1", "s2"], [0, 0, 0])  # nested
    rows = {r["name"]: r for r in R.family(law, R.versus_map(law.names))["rows"]}
    se = x.std(0)[:2] / math.sqrt(3)
    t = x.mean(0)[:2] / se
    m = 2  # c has se = 0 in every seed: never tested, not counted
    for k, name in enumerate("ab"):
        p = 2 * stats.t.sf(abs(t[k].item()), 2)
        assert rows[name]["p"] == pytest.approx(p) and rows[name]["p_adjusted"] == pytest.approx(
            min(1, m * p)
        )
        assert rows[name]["critical"] == pytest.approx(stats.t.isf(0.05 / (2 * m), 2))
    assert rows["a"]["distinguishable"] and not rows["b"]["distinguishable"]  # t 17.3 > 14.1 > t_b
    assert rows["c"]["p"] == rows["c"]["p_adjusted"] == 1.0 and not rows["c"]["distinguishable"]


def test_too_few_replicates_for_a_call_is_unresolvable():
    law = _law(torch.tensor([5.0] * 10), torch.eye(10), n_resamples=R.MIN_RESAMPLES - 1)
    fam = R.family(law, R.versus_map(law.names))
    assert fam["resolvable"] is False and f"{R.MIN_RESAMPLES - 1} bootstrap replicates" in fam["reason"]
    assert all(row["distinguishable"] is None and "p_adjusted" not in row for row in fam["rows"])
    assert fam["rows"][0]["p"] < 1e-5  # the unadjusted p is still there
    enough = _law(torch.tensor([5.0] * 10), torch.eye(10), n_resamples=R.MIN_RESAMPLES)
    assert R.family(enough, R.versus_map(enough.names))["resolvable"]


# ----------------------------------------------------------------- real predictives, families of 10, 18


def _predictives(n_null: int, n: int = 1000, seed: int = 0):
    """Labels from p; the MAP sharpens p (overconfident); 'calibrated' is p itself; the nulls are the MAP
    with their own small perturbation, and 'same' is the MAP itself (se = 0)."""
    g = torch.Generator().manual_seed(seed)
    logits = 1.5 * torch.randn(n, 5, generator=g)
    y = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    probs_map = (3 * logits).softmax(1)
    probs = {"calibrated": logits.softmax(1), "same": probs_map.clone()}
    for k in range(n_null - 2):
        probs[f"null_{k}"] = (3 * logits + 0.3 * torch.randn(n, 5, generator=g)).softmax(1)
    return probs_map, probs, y


@pytest.mark.parametrize("n_rows", [10, 18])
def test_a_real_effect_is_called_among_10_and_18_predictives(n_rows):
    """The old floor (bootstrap p >= 2/(R+1), then Holm over 45 or 153 pairs) could never call a pair;
    now the adjusted p of a clear effect falls far below α / m, vs the MAP and in pairs."""
    probs_map, probs, y = _predictives(n_rows)
    inf = R.trial_inference(
        probs_map, probs, y, {"ece": (ECE, False)}, test_set=I.test_set_identity(y), n_resamples=1000
    )
    json.dumps(inf)
    vs = {r["name"]: r for r in inf["vs_map"]["ece"]["rows"]}
    assert vs["calibrated"]["distinguishable"] and vs["calibrated"]["p_adjusted"] < 0.05 / n_rows
    assert vs["same"]["se"] == 0 and not vs["same"]["distinguishable"] and vs["same"]["p"] == 1.0
    pairs = {r["name"]: r for r in inf["pairwise"]["rows"]}
    m = n_rows * (n_rows - 1) // 2
    assert len(pairs) == m and inf["pairwise"]["n_tested"] == m
    assert (
        pairs["calibrated - same"]["distinguishable"] and pairs["calibrated - same"]["p_adjusted"] < 0.05 / m
    )
    assert pairs["calibrated - same"]["estimate"] == pytest.approx(vs["calibrated"]["estimate"], abs=1e-5)
    for fam in (inf["vs_map"]["ece"], inf["pairwise"]):
        for row in fam["rows"]:
            assert row["distinguishable"] == (row["low"] > 0 or row["high"] < 0) == (row["p_adjusted"] < 0.05)


def test_family_wise_error_under_the_global_null_holds_its_level():
    """Simulation with known truth: 10 correlated rows, all zero; estimates ~ N(0, Σ), each trial's
    R = 300 'replicates' ~ N(estimate, Σ). The Bonferroni calls over the rows and over the 45 pairs make a
    false call in at most 5% of 400 trials (binomial sd 0.011), and not far less: the correlated rows
    cost Bonferroni little."""
    g = np.random.default_rng(3)
    a = g.normal(size=(10, 10))
    cov = a @ a.T / 10 + 0.5 * np.eye(10)
    root = np.linalg.cholesky(cov)
    false = {"vs_map": 0, "pairs": 0}
    for _ in range(400):
        est = root @ g.normal(size=10)
        reps = est[:, None] + root @ g.normal(size=(10, 300))
        rep = I.Replicates(tuple(f"r{k}" for k in range(10)), torch.tensor(est), torch.tensor(reps))
        law = S.pool([rep], ["t"], [0])
        for kind, contrasts in (("vs_map", R.versus_map(law.names)), ("pairs", R.pairs(law.names))):
            false[kind] += any(r["distinguishable"] for r in R.family(law, contrasts)["rows"])
    assert 0.02 < false["vs_map"] / 400 < 0.085 and 0.02 < false["pairs"] / 400 < 0.085


def test_pairs_name_and_sign():
    c = R.pairs(["a", "b", "c"], ["c", "a"])
    assert c.names == ("c - a",) and c.weights.tolist() == [[-1.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match="at least two"):
        R.pairs(["a"])
