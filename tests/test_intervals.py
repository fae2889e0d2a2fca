"""distlap.intervals: the paired and two-level bootstraps and seeds, on toys where the truth is known."""

import dataclasses
import functools

import numpy as np
import pytest
import torch

from distlap import intervals as I
from distlap import metrics as M
from distlap import ranking as R
from distlap import seed_intervals as S


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _probs(n, c, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(n, c, generator=g), 1)


def _sets(base_logits, k, noise, seed):
    """K Monte-Carlo 'predictives': softmax of the logits plus set-specific noise, (K, N, C)."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(base_logits[None] + noise * torch.randn(k, *base_logits.shape, generator=g), -1)


def _calibrated_pair(n=4000, c=5, seed=0):
    """p: labels drawn from it (calibrated). p2: p averaged within groups of (argmax, confidence decile),
    a function of p only, so E[y | p2] = p2: a second, blunter calibrated predictor."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(2 * torch.randn(n, c, generator=g), 1)
    y = torch.multinomial(p, 1, generator=g).squeeze(1)
    conf, pred = p.max(1)
    group = pred * 10 + (conf * 10).long().clamp(max=9)
    p2 = torch.empty_like(p)
    for gid in group.unique():
        p2[group == gid] = p[group == gid].mean(0)
    return p, p2, y


ECE = M.expected_calibration_error
METRICS = [
    ECE,
    M.negative_log_likelihood,
    M.brier_score,
    functools.partial(ECE, n_bins=7),
    lambda p, y: M.accuracy(p, y),
]  # the last one takes the generic (looped) path


# the hand-computed toy of tests/test_metrics.py
HAND_PROBS = torch.tensor(
    [
        [0.9, 0.05, 0.05],
        [0.8, 0.1, 0.1],
        [0.5, 0.25, 0.25],
        [0.4, 0.35, 0.25],
        [1.0, 0.0, 0.0],
        [0.6, 0.4, 0.0],
    ],
    dtype=torch.float64,
)
HAND_LABELS = torch.tensor([0, 1, 0, 2, 0, 1])


def _random_probs(n: int, c: int, seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(scale * torch.randn(n, c, generator=g), dim=1)  # (n, c)
    return probs, torch.randint(0, c, (n,), generator=g)


# ---------------------------------------------------------------------------------- paired bootstrap

BUILTINS = [
    M.accuracy,
    M.expected_calibration_error,
    M.maximum_calibration_error,
    M.negative_log_likelihood,
    M.brier_score,
    functools.partial(M.expected_calibration_error, n_bins=7),
]


@pytest.mark.parametrize("metric", BUILTINS)
def test_bootstrap_fast_path_equals_generic_loop(metric):
    probs_a, labels = _random_probs(200, 10, seed=5)
    probs_b, _ = _random_probs(200, 10, seed=6, scale=1.0)
    assert M._fast_path(metric) is not None
    fast = I.paired_bootstrap_ci(metric, probs_a, probs_b, labels, n_resamples=50, seed=1)
    loop = I.paired_bootstrap_ci(lambda p, y: metric(p, y), probs_a, probs_b, labels, n_resamples=50, seed=1)
    assert M._fast_path(lambda p, y: metric(p, y)) is None
    assert dataclasses.astuple(fast) == pytest.approx(dataclasses.astuple(loop), abs=1e-12)


def test_test_set_identity_tells_test_sets_apart_and_seeds_their_resamples():
    images = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(40) % 5
    ident = I.test_set_identity(images, labels)
    assert len(ident) == 16 and ident == I.test_set_identity(images.clone(), labels.clone())
    others = [
        I.test_set_identity(images[:39], labels[:39]),  # one example fewer (a max_test subsample)
        I.test_set_identity(images.flip(0), labels.flip(0)),  # another order
        I.test_set_identity(images, (labels + 1) % 5),  # other labels
        I.test_set_identity(images.float(), labels),  # the same values, another dtype
    ]
    assert len({ident, *others}) == 5
    seed = I.bootstrap_seed(ident)
    assert seed == int(ident[:15], 16) and torch.equal(
        I.bootstrap_indices(40, 7, seed), I.bootstrap_indices(40, 7, seed)
    )


def test_resample_indices_are_seeded():
    draw = lambda seed: I.bootstrap_indices(50, 20, seed)
    idx = draw(0)
    assert idx.shape == (20, 50) and idx.dtype == torch.int64 and idx.min() >= 0 and idx.max() < 50
    assert torch.equal(idx, draw(0)) and not torch.equal(idx, draw(1))


def _calibrated_and_overconfident(n: int = 2000, c: int = 10) -> tuple[torch.Tensor, ...]:
    """Labels drawn from the 'Bayes' probabilities (calibrated); 'MAP' sharpens the same logits."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(n, c, generator=g)
    bayes = torch.softmax(logits, 1)
    labels = torch.multinomial(bayes, 1, generator=g).squeeze(1)
    return torch.softmax(4 * logits, 1), bayes, labels


def test_delta_ece_positive_when_bayes_is_better_calibrated():
    probs_map, probs_bayes, labels = _calibrated_and_overconfident()
    ci = I.paired_bootstrap_ci(ECE, probs_map, probs_bayes, labels, n_resamples=300)
    ece = M.expected_calibration_error
    assert ci.estimate == pytest.approx(ece(probs_map, labels) - ece(probs_bayes, labels))
    assert 0 < ci.low <= ci.estimate <= ci.high
    assert (ci.level, ci.n_resamples) == (0.95, 300)


def test_bootstrap_identical_inputs_give_zero_interval():
    probs, labels = _random_probs(300, 5, seed=8)
    ci = I.paired_bootstrap_ci(ECE, probs, probs.clone(), labels, n_resamples=200)
    assert (ci.estimate, ci.low, ci.high) == (0.0, 0.0, 0.0)


def test_bootstrap_is_reproducible_and_seed_dependent():
    probs_map, probs_bayes, labels = _calibrated_and_overconfident(n=500)
    run = functools.partial(I.paired_bootstrap_ci, ECE, probs_map, probs_bayes, labels, n_resamples=200)
    assert run(seed=3) == run(seed=3)
    assert run(seed=3) != run(seed=4)


@pytest.mark.parametrize("level", [0.0, 1.0, -0.5, 1.5])
def test_invalid_level_raises(level):
    with pytest.raises(ValueError, match="level"):
        I.paired_bootstrap_ci(M.accuracy, HAND_PROBS, HAND_PROBS, HAND_LABELS, level=level)


def test_bootstrap_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        I.paired_bootstrap_ci(M.accuracy, HAND_PROBS, HAND_PROBS[:, :2].softmax(1), HAND_LABELS)
    with pytest.raises(ValueError, match="n_resamples"):
        I.paired_bootstrap_ci(M.accuracy, HAND_PROBS, HAND_PROBS, HAND_LABELS, n_resamples=0)


# --------------------------------------------------------------------------------- two-level bootstrap


@pytest.mark.parametrize("metric", METRICS)
def test_identical_sample_sets_give_exactly_the_paired_bootstrap(metric):
    """A posterior whose sample sets are identical has an MC term of exactly 0: the one-level interval."""
    probs_map = _probs(300, 6, 0)
    labels = torch.randint(0, 6, (300,), generator=torch.Generator().manual_seed(1))
    bayes = _probs(300, 6, 2, scale=1.0)
    one = I.paired_bootstrap_ci(metric, probs_map, bayes, labels, n_resamples=200, seed=5)
    for sets in (bayes, bayes.expand(4, -1, -1)):
        two = I.two_level_bootstrap_ci(metric, probs_map, sets, labels, n_resamples=200, seed=5)
        assert (two.estimate, two.low, two.high, two.level, two.n_resamples) == (
            one.estimate,
            one.low,
            one.high,
            one.level,
            one.n_resamples,
        )
        assert two.mc_std == 0.0 and two.n_sets == (1 if sets.ndim == 2 else 4)


def test_replicates_equal_a_naive_loop_over_drawn_examples_and_sets():
    logits = torch.randn(80, 4, generator=torch.Generator().manual_seed(0))
    probs_map, labels = torch.softmax(logits, 1), torch.arange(80) % 4
    sets = _sets(logits, 3, 1.0, seed=1)
    rep = I.delta_replicates(ECE, probs_map, {"s": sets}, labels, n_resamples=40, seed=9)
    idx = I.bootstrap_indices(80, 40, 9)
    draw = np.random.default_rng([9, I._SET_STREAM]).integers(0, 3, 40)  # the documented set stream
    naive = [ECE(probs_map[i], labels[i]) - ECE(sets[k][i], labels[i]) for i, k in zip(idx, draw)]
    assert rep.replicates[0].tolist() == pytest.approx(naive, abs=1e-12)
    per_set = torch.tensor([ECE(probs_map, labels) - ECE(s, labels) for s in sets], dtype=torch.float64)
    assert rep.estimate.item() == pytest.approx(per_set.mean().item(), abs=1e-15)
    assert rep.mc_std.item() == pytest.approx(per_set.std().item(), abs=1e-15)


def test_two_level_variance_adds_the_monte_carlo_term():
    """Law of total variance: Var(two-level) ~ mean_k Var(one-level | set k) + Var_k(Delta_k)."""
    logits = 2 * torch.randn(1000, 5, generator=torch.Generator().manual_seed(3))
    probs_map = torch.softmax(logits, 1)
    labels = torch.multinomial(probs_map, 1, generator=torch.Generator().manual_seed(4)).squeeze(1)
    sets = _sets(logits, 8, 1.5, seed=5)
    nll = M.negative_log_likelihood
    two = I.delta_replicates(nll, probs_map, {"s": sets}, labels, n_resamples=2000, seed=0)
    one = I.delta_replicates(
        nll, probs_map, {f"k{k}": s for k, s in enumerate(sets)}, labels, n_resamples=2000, seed=0
    )
    within = one.replicates.var(1).mean()
    between = one.estimate.var(correction=0)
    assert between > within  # the toy's MC term is large, so the check has teeth
    assert two.replicates.var() == pytest.approx((within + between).item(), rel=0.25)
    assert two.mc_std.item() == pytest.approx(one.estimate.std().item(), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibrated_predictors_give_a_delta_ece_interval_around_zero(seed):
    p, p2, y = _calibrated_pair(seed=seed)
    against_itself = I.two_level_bootstrap_ci(ECE, p, p.clone().expand(3, -1, -1), y, n_resamples=300)
    assert (against_itself.estimate, against_itself.low, against_itself.high) == (0.0, 0.0, 0.0)
    ci = I.two_level_bootstrap_ci(ECE, p, p2, y, n_resamples=300, seed=seed)
    assert ci.low <= 0 <= ci.high and abs(ci.estimate) < 0.01


def test_subsets_share_rows_and_set_draws():
    logits = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    probs_map, labels = torch.softmax(logits, 1), torch.arange(200) % 3
    sets = _sets(logits, 4, 1.0, seed=1)
    rep = I.delta_replicates(
        ECE, probs_map, {"a": sets, "b": sets.clone(), "c": _sets(logits, 4, 2.0, 2)}, labels, n_resamples=100
    )
    pairs = R.pairs(rep.names)
    diffs = pairs.weights @ rep.replicates
    assert pairs.names == ("a - b", "a - c", "b - c")
    assert torch.equal(diffs[0], torch.zeros(100, dtype=torch.float64))  # a, b: the same sets, rows, draws
    torch.testing.assert_close(diffs[1], rep.replicates[0] - rep.replicates[2], rtol=0, atol=0)
    law = S.pool([rep], ["t"], [0])
    first = next(r for r in R.family(law, pairs)["rows"] if r["name"] == "a - b")
    assert (first["se"], first["p"], first["distinguishable"]) == (0.0, 1.0, False)  # never tested


# ------------------------------------------------------------------------------------------ validation


def test_invalid_arguments_are_named():
    probs, labels = _probs(20, 3, 0), torch.arange(20) % 3
    with pytest.raises(ValueError, match="probs_bayes\\['b'\\]"):
        I.delta_replicates(ECE, probs, {"b": probs[:10]}, labels)
    with pytest.raises(ValueError, match="same number K"):
        I.delta_replicates(ECE, probs, {"a": probs.expand(2, -1, -1), "b": probs.expand(3, -1, -1)}, labels)
    with pytest.raises(ValueError, match="level"):
        I.two_level_bootstrap_ci(ECE, probs, probs, labels, level=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        I.two_level_bootstrap_ci(ECE, probs, probs, labels, n_resamples=0)
    with pytest.raises(ValueError, match="idx"):
        M.replicate_values(ECE, probs, labels, torch.tensor([[0, 20]]))


SCORES = {"ece": (ECE, False), "nll": (M.negative_log_likelihood, False), "accuracy": (M.accuracy, True)}


def test_improvement_replicates_signs_pairing_and_groups():
    """Positive = better than the MAP for every score; the MAP itself improves by exactly 0; a (N, C)
    baseline beside (K, N, C) nn predictives gets the very replicates it gets alone (same examples)."""
    n, c = 300, 4
    y = torch.arange(n) % c
    p_map = _probs(n, c, seed=1)
    perfect = torch.nn.functional.one_hot(y, c).double() * 0.96 + 0.01  # rows sum to 1
    nn_sets = _sets(torch.log(p_map), 3, 0.5, seed=2)
    probs = {"same": p_map, "nn": nn_sets, "perfect": perfect}
    reps = I.improvement_replicates(p_map, probs, y, SCORES, n_resamples=200, seed=5)
    for score, rep in reps.items():
        assert rep.names == ("same", "nn", "perfect")
        assert torch.equal(rep.replicates[0], torch.zeros(200, dtype=torch.float64)), score
        assert rep.estimate[2] > 0 and (rep.replicates[2] > 0).all(), score
        alone = I.delta_replicates(SCORES[score][0], p_map, {"perfect": perfect}, y, n_resamples=200, seed=5)
        sign = -1 if SCORES[score][1] else 1
        torch.testing.assert_close(rep.replicates[2], sign * alone.replicates[0])
    assert reps["ece"].mc_std[1] > 0 and reps["ece"].mc_std[0] == 0


def test_replicates_survive_json():
    rep = I.improvement_replicates(
        _probs(50, 3, seed=0), {"a": _probs(50, 3, seed=1)}, torch.arange(50) % 3, SCORES, n_resamples=20
    )["nll"]
    back = I.replicates_from_json(I.replicates_to_json(rep))
    assert back.names == rep.names and back.seed_std is None
    torch.testing.assert_close(back.replicates, rep.replicates, atol=1e-6, rtol=0)
