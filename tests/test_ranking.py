"""distlap.ranking: families of contrasts with p-values and simultaneous intervals that agree, against
closed forms (Šidák for independent rows, the marginal quantile for identical ones), brute-force
definitions, and families of 10 and 18 predictives where a real effect is called."""

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


@pytest.mark.parametrize("m", [10, 18])
def test_independent_rows_give_sidaks_critical_value(m):
    """max |Z| of m independent N(0, 1): P(max <= c) = (2 Φ(c) − 1)^m, so c = Φ⁻¹((1 + (1 − α)^{1/m}) / 2)."""
    law = _law(torch.zeros(m), torch.eye(m))
    rows = R.family(law, R.versus_map(law.names), draws=200_000)["rows"]
    sidak = stats.norm.ppf((1 + LEVEL ** (1 / m)) / 2)
    assert {r["critical"] for r in rows} == {rows[0]["critical"]}
    assert rows[0]["critical"] == pytest.approx(sidak, abs=0.02)  # MC: 200k draws


def test_perfectly_correlated_rows_give_the_marginal_quantile():
    law = _law(torch.zeros(10), torch.ones(10, 10))  # rank 1: ten copies of one normal
    rows = R.family(law, R.versus_map(law.names), draws=200_000)["rows"]
    assert rows[0]["critical"] == pytest.approx(stats.norm.ppf(0.975), abs=0.02)


def test_multivariate_t_with_one_row_is_students_t():
    """One row, R replicates: max |T| = |t_{R−1}|, so c = t_{R−1, 0.975}."""
    maxima = R.max_abs_t(torch.ones(1, 1), torch.ones(1, 1), torch.ones(1), 200_000, 0, df=5)
    _, crit = R.max_t_adjust(torch.tensor([1.0]), maxima, LEVEL)
    assert crit == pytest.approx(stats.t.ppf(0.975, 5), abs=0.05)


def test_pairs_of_independent_rows_have_the_correlation_of_differences():
    """Pairs of 3 independent rows are rank 2 (linear in the rows); the max over them is that of the
    studentised range over sqrt(2): P(max_{i<j} |Z_i − Z_j| / sqrt 2 <= c) with Z_i iid N(0, 1)."""
    law = _law(torch.zeros(3), torch.eye(3))
    rows = R.family(law, R.pairs(law.names), draws=200_000)["rows"]
    q = stats.studentized_range.ppf(LEVEL, 3, np.inf) / math.sqrt(2)
    assert rows[0]["critical"] == pytest.approx(q, abs=0.02)


# -------------------------------------------------------------------- definitions and their agreement


def test_adjusted_p_is_the_monte_carlo_tail_and_agrees_with_the_critical_value():
    maxima = torch.from_numpy(np.random.default_rng(0).gamma(4.0, size=999))
    p, crit = R.max_t_adjust(torch.linspace(0, 12, 4001), maxima, LEVEL)
    brute = [(1 + (maxima >= t).sum().item()) / 1000 for t in torch.linspace(0, 12, 4001).tolist()]
    assert p.tolist() == pytest.approx(brute, abs=1e-15)
    t = torch.linspace(0, 12, 4001)
    assert torch.equal(p < 0.05, t > crit)  # exactly, draw by draw
    at, above = R.max_t_adjust(
        torch.tensor([crit, math.nextafter(crit, 13.0)], dtype=torch.float64), maxima, LEVEL
    )[0]
    assert at >= 0.05 > above  # |t| = c is not called, the next float above it is


@pytest.mark.parametrize("seed", range(4))
def test_p_values_and_simultaneous_intervals_agree(seed):
    g = np.random.default_rng(seed)
    s = 12
    a = g.normal(size=(s, s))
    law = _law(g.normal(0, 3, s), a @ a.T / s + np.eye(s) * 0.1, n_resamples=1000)
    for contrasts in (R.versus_map(law.names), R.pairs(law.names)):
        fam = R.family(law, contrasts, draws=20_000)
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


def test_too_few_replicates_for_the_correlation_is_unresolvable():
    law = _law(torch.tensor([5.0] * 10), torch.eye(10), n_resamples=99)  # 10 rows need R >= 100
    fam = R.family(law, R.versus_map(law.names))
    assert fam["resolvable"] is False and "99 bootstrap replicates" in fam["reason"]
    assert all(row["distinguishable"] is None and "p_adjusted" not in row for row in fam["rows"])
    assert fam["rows"][0]["p"] < 1e-5  # the unadjusted p is still there
    assert R.family(law, R.versus_map(law.names, ["r0", "r1"]))["resolvable"]  # 2 rows: R = 99 is enough


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
    R = 300 'replicates' ~ N(estimate, Σ). The max-|t| calls over the rows and over the 45 pairs make a
    false call in about 5% of 400 trials (binomial sd 0.011)."""
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
            false[kind] += any(r["distinguishable"] for r in R.family(law, contrasts, draws=5000)["rows"])
    assert 0.02 < false["vs_map"] / 400 < 0.085 and 0.02 < false["pairs"] / 400 < 0.085


def test_pairs_name_and_sign():
    c = R.pairs(["a", "b", "c"], ["c", "a"])
    assert c.names == ("c - a",) and c.weights.tolist() == [[-1.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match="at least two"):
        R.pairs(["a"])
