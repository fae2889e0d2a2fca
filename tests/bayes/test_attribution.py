"""Attribution of Δ_ECE / Δ_NLL to blocks: exact Shapley values against brute force over orders, the
bootstrap interval against a naive loop, efficiency, the sampled path past 16 blocks."""

import functools
import itertools
import math

import numpy as np
import pytest
import torch

from distlap import metrics
from distlap.bayes import attribution as A
from distlap.bayes.glm import probit_probs
from distlap.intervals import bootstrap_indices


def _pass(n=120, blocks=3, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, classes, generator=g)
    variances = (
        torch.rand(n, blocks, classes, generator=g) * torch.tensor([4.0, 0.5, 0.0][:blocks])[None, :, None]
    )
    labels = torch.randint(0, classes, (n,), generator=g)
    return logits, variances, labels


def _v(logits, variances, labels, subset, score, idx=None):
    probs = probit_probs(logits, variances, subset)
    base = logits.softmax(-1)
    f = {
        "ece": functools.partial(metrics.expected_calibration_error, n_bins=10),
        "nll": metrics.negative_log_likelihood,
    }[score]
    if idx is not None:
        probs, base, labels = probs[idx], base[idx], labels[idx]
    return f(base, labels) - f(probs, labels)


def _brute_shapley(value, n):
    """Mean marginal contribution over all n! orders (the definition)."""
    phi = np.zeros(n)
    for order in itertools.permutations(range(n)):
        seen = []
        for i in order:
            phi[i] += value(seen + [i]) - value(seen)
            seen.append(i)
    return phi / math.factorial(n)


@pytest.mark.parametrize("score", ["ece", "nll"])
def test_exact_shapley_equals_brute_force_and_is_efficient(score):
    logits, variances, labels = _pass()
    out = A.attribution(logits, variances, labels, n_bins=10, n_bootstrap=0, n_permutations=10, seed=0)
    entry = out["values"][score]
    brute = _brute_shapley(lambda s: _v(logits, variances, labels, s, score), 3)
    np.testing.assert_allclose(entry["shapley"], brute, atol=1e-12)
    assert sum(entry["shapley"]) == pytest.approx(entry["coalition_values"][-1], abs=1e-12)
    assert entry["coalition_values"][0] == 0 and "shapley_low" not in entry
    assert entry["shapley"][2] == pytest.approx(0, abs=1e-12)  # a block with no variance contributes nothing
    assert [s["size"] for s in entry["best_sets"]] == [1, 2, 3]


def test_bootstrap_interval_is_the_shapley_of_each_resampled_table():
    logits, variances, labels = _pass()
    out = A.attribution(logits, variances, labels, n_bins=10, n_bootstrap=30, n_permutations=10, seed=4)
    idx = bootstrap_indices(len(labels), 30, 4)
    naive = np.array(
        [_brute_shapley(lambda s, r=r: _v(logits, variances, labels, s, "ece", r), 3) for r in idx]
    )
    low, high = np.quantile(naive, [0.025, 0.975], axis=0)
    np.testing.assert_allclose(out["values"]["ece"]["shapley_low"], low, atol=1e-10)
    np.testing.assert_allclose(out["values"]["ece"]["shapley_high"], high, atol=1e-10)


def test_many_blocks_are_sampled_with_standard_errors(monkeypatch):
    monkeypatch.setattr(A.shapley, "EXACT_MAX_PLAYERS", 2)
    logits, variances, labels = _pass()
    out = A.attribution(logits, variances, labels, n_bins=10, n_bootstrap=30, n_permutations=50, seed=0)
    entry = out["values"]["ece"]
    assert out["method"] == "permutation" and len(entry["shapley_se"]) == 3
    exact = _brute_shapley(lambda s: _v(logits, variances, labels, s, "ece"), 3)
    assert np.all(np.abs(np.array(entry["shapley"]) - exact) <= 4 * np.array(entry["shapley_se"]) + 1e-12)
    assert len(entry["greedy"]) == 3
