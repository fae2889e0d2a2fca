"""distlap.seed_intervals: seeds pooled by their design, against hand formulas and simulations whose truth
is known (a crossed or nested random-effects model of seed effects and test-set noise)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from distlap import intervals as I
from distlap import metrics as M
from distlap import ranking as R
from distlap import seed_intervals as S


def test_design_is_read_from_the_test_set_identities():
    assert S.test_set_design(["a"]) == S.SINGLE
    assert S.test_set_design(["a", "a", "a"]) == S.CROSSED
    assert S.test_set_design(["a", "b", "c"]) == S.NESTED
    assert S.test_set_design(["a", "a", "b"]) == S.UNKNOWN  # mixed: some shared, some not
    assert S.test_set_design(["a", None]) == S.UNKNOWN  # an older result without an identity
    with pytest.raises(ValueError, match="at least one"):
        S.test_set_design([])


def test_combine_hand_computed():
    var, df = S.combine(torch.tensor([0.3, 0.0]), torch.tensor([0.05, -0.01]), 3)
    assert var.tolist() == pytest.approx([0.1 + 0.05, 0.0])  # s²/n + g; a negative g is clamped at 0
    assert df.tolist() == [2.0, 2.0]
    var, df = S.combine(torch.tensor([9.0]), torch.tensor([0.04]), 1, shared_df=199)  # one seed: g alone
    assert (var.item(), df.item()) == (pytest.approx(0.04), 199.0)


def test_seed_t_interval_nested_is_the_t_interval_over_seeds():
    ci = S.seed_t_interval(torch.tensor([1.0, 2.0, 3.0]), level=0.95, test_sets=["a", "b", "c"])
    half = 4.302652729911275 / math.sqrt(3)  # t_{2, 0.975} * s / sqrt(n), s = 1
    got = (ci.estimate.item(), ci.low.item(), ci.high.item())
    assert got == pytest.approx((2, 2 - half, 2 + half), abs=1e-9)
    x = [1.0, 4, 2, 8, 5]
    ref = stats.t.interval(0.9, 4, loc=np.mean(x), scale=stats.sem(x))
    two = S.seed_t_interval(torch.tensor([[v, 0.0] for v in x]), level=0.9, test_sets=list("abcde"))
    assert (two.low[0].item(), two.high[0].item()) == pytest.approx(ref, abs=1e-12)
    assert (two.low[1].item(), two.high[1].item()) == (0.0, 0.0)
    assert "nested" in two.method and two.df.tolist() == [4.0, 4.0]


def test_seed_t_interval_with_a_shared_test_set_adds_the_within_seed_variance():
    """Crossed without aligned replicates: s²/n + mean V_i bounds the shared noise (Cauchy–Schwarz)."""
    x, v = np.array([0.01, 0.03, 0.02]), np.array([0.004, 0.006, 0.005]) ** 2
    ci = S.seed_t_interval(x, 0.95, within_var=v, test_sets=["t", "t", "t"])
    half = stats.t.ppf(0.975, 2) * math.sqrt(x.var(ddof=1) / 3 + v.mean())
    assert (ci.low.item(), ci.high.item()) == pytest.approx((x.mean() - half, x.mean() + half), abs=1e-12)
    assert "crossed" in ci.method and "bound" in ci.method
    nested = S.seed_t_interval(x, 0.95, within_var=v, test_sets=["a", "b", "c"])  # the spread holds it
    assert (nested.high - nested.low).item() < (ci.high - ci.low).item()
    unknown = S.seed_t_interval(x, 0.95)
    assert "misses" in unknown.method


def test_one_seed_is_refused_by_name():
    with pytest.raises(ValueError, match="n_seeds >= 2"):
        S.seed_t_interval(torch.tensor([1.0]))


def _reps(estimate, replicates, names=("a", "b")):
    return I.Replicates(
        tuple(names), torch.as_tensor(estimate).double(), torch.as_tensor(replicates).double()
    )


def test_pool_crossed_nested_single_and_unknown_against_hand_formulas():
    g = np.random.default_rng(0)
    common = g.normal(size=(2, 400))  # the shared test set's resamples: the same columns in every seed
    per_seed = [_reps(g.normal(size=2), common + 0.5 * g.normal(size=(2, 400))) for _ in range(3)]
    x = np.stack([r.estimate.numpy() for r in per_seed])  # (n, S)
    reps = [r.replicates.numpy() for r in per_seed]
    cross = np.mean([np.cov(reps[i], reps[j])[:2, 2:] for i in range(3) for j in range(3) if i != j], 0)
    own = np.mean([np.cov(r) for r in reps], 0)
    w = np.array([1.0, -1.0])  # the pair a - b
    between = w @ np.cov(x.T) @ w
    expected = {
        "crossed": (["t"] * 3, [(1, 400)] * 3, between / 3 + w @ cross @ w),
        "nested": (["a", "b", "c"], [(1, 400)] * 3, between / 3),
        "unknown": (["t"] * 3, [(1, 400), (2, 400), (1, 400)], between / 3 + w @ own @ w),
    }
    for design, (test_sets, resamples, var) in expected.items():
        law = S.pool(per_seed, test_sets, resamples)
        est, se, df = law.contrast(torch.from_numpy(w[None]))
        assert law.design == design and df.item() == 2.0
        assert est.item() == pytest.approx(w @ x.mean(0), abs=1e-12)
        assert se.item() ** 2 == pytest.approx(var, rel=1e-9)
    one = S.pool(per_seed[:1], ["t"], [(1, 400)])
    est, se, df = one.contrast(torch.eye(2))
    assert one.design == "single" and df.tolist() == [399.0, 399.0]
    assert (se**2).tolist() == pytest.approx(np.diag(np.cov(reps[0])).tolist(), rel=1e-9)


def test_pool_refuses_mismatched_seeds():
    a = _reps([0.0, 1.0], torch.zeros(2, 10))
    with pytest.raises(ValueError, match="same names"):
        S.pool([a, _reps([0.0, 1.0], torch.zeros(2, 10), ("a", "c"))], ["t", "t"], [1, 1])
    with pytest.raises(ValueError, match="one test set"):
        S.pool([a, a], ["t"], [1, 1])


def _simulate(design: str, n_seeds: int, sims: int, seed: int) -> dict:
    """Δ_i = μ + a_i + e_i, seed effects a ~ N(0, 1), test noise e with variance 4: crossed, e_i = C + D_i
    with a shared C (variance 3) and the replicate columns sharing C*; nested, independent e_i. Each
    seed's R replicates are drawn around its estimate with that structure. Returns coverage of the pooled
    interval and of the naive t-interval over seeds (which ignores the shared C)."""
    g = np.random.default_rng(seed)
    mu, r, hits = 0.5, 300, {"pooled": 0, "t_over_seeds": 0}
    for _ in range(sims):
        shared_c = g.normal(0, math.sqrt(3)) if design == "crossed" else g.normal(0, math.sqrt(3), n_seeds)
        est = mu + g.normal(0, 1, n_seeds) + shared_c + g.normal(0, 1, n_seeds)
        col_c = g.normal(0, math.sqrt(3), r)  # the shared resample effect, the same columns in every seed
        per_seed = []
        for i in range(n_seeds):
            own_c = col_c if design == "crossed" else g.normal(0, math.sqrt(3), r)
            per_seed.append(_reps([est[i]], (est[i] + own_c + g.normal(0, 1, r))[None], ("x",)))
        test_sets = ["t"] * n_seeds if design == "crossed" else [str(i) for i in range(n_seeds)]
        law = S.pool(per_seed, test_sets, [(0, r)] * n_seeds)
        low, high = law.interval(0.95)
        hits["pooled"] += bool(low.item() <= mu <= high.item())
        naive = S.seed_t_interval(torch.tensor(est), 0.95, test_sets=[str(i) for i in range(n_seeds)])
        hits["t_over_seeds"] += bool(naive.low.item() <= mu <= naive.high.item())
    return {k: v / sims for k, v in hits.items()}


@pytest.mark.parametrize("n_seeds", [3, 8])
def test_crossed_seeds_cover_where_the_t_interval_over_seeds_does_not(n_seeds):
    got = _simulate("crossed", n_seeds, 1500, n_seeds)
    assert got["pooled"] > 0.93  # conservative with n - 1 df, never short
    assert got["t_over_seeds"] < 0.85  # the shared test noise is not in the seeds' spread


def test_nested_seeds_cover_at_the_nominal_level():
    got = _simulate("nested", 3, 2000, 1)
    assert abs(got["pooled"] - 0.95) < 0.02  # exact under normality: t with n - 1 df


def test_pooled_laws_detects_the_design_from_the_recorded_test_set():
    """Trials that scored the same test set get the same identity, hence the same resamples: crossed."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (200,), generator=g)
    scores = {"ece": (M.expected_calibration_error, False)}

    def record(test_labels, seed):
        probs = torch.softmax(torch.randn(200, 3, generator=torch.Generator().manual_seed(seed)), 1)
        other = {"b": torch.softmax(2 * probs.log(), 1)}
        ident = I.test_set_identity(test_labels)
        return R.trial_replicates(probs, other, test_labels, scores, test_set=ident, n_resamples=50)

    shared = [record(labels, s) for s in range(3)]
    assert len({r["bootstrap_seed"] for r in shared}) == 1
    assert R.pooled_laws(shared)["ece"].design == "crossed"
    own = [record(torch.randint(0, 3, (200,), generator=g), s) for s in range(3)]
    assert R.pooled_laws(own)["ece"].design == "nested"
    old = [{k: v for k, v in r.items() if k not in ("test_set", "bootstrap_seed")} for r in shared]
    assert R.pooled_laws(old)["ece"].design == "unknown"
