"""Attribution of Δ_ECE / Δ_NLL to blocks: exact Shapley values against brute force over orders, the
bootstrap interval against a naive loop, efficiency, the best sets chosen on validation by brute force
over every set of each size and reported on test, the sampled path past 16 blocks."""

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


def _split(seed, n=120):
    return A.Split(*_pass(n=n, seed=seed))


def _run(test, val=None, **kw):
    kw = {"n_bins": 10, "n_bootstrap": 0, "n_permutations": 10, "seed": 0} | kw
    return A.attribution(test, val or _split(seed=9, n=90), **kw)


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
    out = _run(A.Split(logits, variances, labels))
    entry = out["values"][score]
    brute = _brute_shapley(lambda s: _v(logits, variances, labels, s, score), 3)
    np.testing.assert_allclose(entry["shapley"], brute, atol=1e-12)
    assert sum(entry["shapley"]) == pytest.approx(entry["coalition_values"][-1], abs=1e-12)
    assert entry["coalition_values"][0] == 0 and "shapley_low" not in entry
    assert entry["shapley"][2] == pytest.approx(0, abs=1e-12)  # a block with no variance contributes nothing
    assert [s["size"] for s in entry["best_sets"]] == [1, 2, 3]


def test_bootstrap_interval_is_the_shapley_of_each_resampled_table():
    logits, variances, labels = _pass()
    out = _run(A.Split(logits, variances, labels), n_bootstrap=30, seed=4)
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
    val = _split(seed=9, n=90)
    out = _run(A.Split(logits, variances, labels), val, n_bootstrap=30, n_permutations=50)
    entry = out["values"]["ece"]
    assert out["method"] == "permutation" and len(entry["shapley_se"]) == 3
    exact = _brute_shapley(lambda s: _v(logits, variances, labels, s, "ece"), 3)
    assert np.all(np.abs(np.array(entry["shapley"]) - exact) <= 4 * np.array(entry["shapley_se"]) + 1e-12)
    chosen = []  # the naive forward greedy on VALIDATION values
    for step in entry["greedy"]:
        gain = {i: _v(*_tensors(val), chosen + [i], "ece") for i in range(3) if i not in chosen}
        chosen.append(max(sorted(gain), key=gain.get))
        assert step["blocks"] == tuple(sorted(chosen)) and step["val_value"] == pytest.approx(
            gain[chosen[-1]]
        )
        assert step["value"] == pytest.approx(_v(logits, variances, labels, chosen, "ece"), abs=1e-12)


def _tensors(split):
    return split.logits, split.variances, split.labels


@pytest.mark.parametrize("score", ["ece", "nll"])
def test_best_sets_are_chosen_on_validation_and_reported_on_test(score):
    """For every size k the best set is the argmax over all C(L, k) sets of the VALIDATION value, and it
    is reported with its TEST value; here validation and test disagree about the best block."""
    test, val = _split(seed=1), _split(seed=2, n=90)
    val.variances[:, 1] = 3.0 * val.variances[:, 0]  # block 1 is best on validation, not on test
    out = _run(test, val)
    entry = out["values"][score]
    for step, greedy in zip(entry["best_sets"], entry["greedy"], strict=True):
        sets = itertools.combinations(range(3), step["size"])
        on_val = {s: _v(*_tensors(val), list(s), score) for s in sets}
        best = max(sorted(on_val), key=on_val.get)
        assert tuple(step["blocks"]) == best and step["val_value"] == pytest.approx(on_val[best], abs=1e-12)
        assert step["value"] == pytest.approx(_v(*_tensors(test), list(best), score), abs=1e-12)
        assert greedy["value"] == pytest.approx(_v(*_tensors(test), list(greedy["blocks"]), score), abs=1e-12)
    on_test = {b: _v(*_tensors(test), [b], score) for b in range(3)}
    assert entry["best_sets"][0]["blocks"] != (max(on_test, key=on_test.get),)  # test would choose another
    np.testing.assert_allclose(
        entry["val_coalition_values"],
        [_v(*_tensors(val), [b for b in range(3) if r >> b & 1], score) for r in range(8)],
        atol=1e-12,
    )
