"""Attribution of Δ_ECE / Δ_NLL to blocks: exact Shapley values against brute force over orders, the
bootstrap interval against a naive loop, efficiency, the best sets chosen on validation by brute force
over every set of each size and reported on test, the sampled path past 16 blocks; the batched coalition
scores (distlap.bayes.coalitions) against the scalar metrics per coalition and per resample.

The GLM passes here are float64, so that the batched scores and the one-subset-at-a-time references
agree to round-off (1e-12); float32 inputs are checked against float64 with their own tolerance."""

import dataclasses
import functools
import itertools
import math

import numpy as np
import pytest
import torch

from distlap import metrics
from distlap.bayes import attribution as A
from distlap.bayes import coalitions as K
from distlap.bayes import shapley
from distlap.bayes.glm import probit_probs
from distlap.intervals import bootstrap_indices


def _pass(n=120, blocks=3, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, classes, generator=g)
    variances = (
        torch.rand(n, blocks, classes, generator=g) * torch.tensor([4.0, 0.5, 0.0][:blocks])[None, :, None]
    )
    labels = torch.randint(0, classes, (n,), generator=g)
    return logits.double(), variances.double(), labels


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


# ------------------------------------------------------------------- batched coalition scores


SCORES = {
    "ece": functools.partial(metrics.expected_calibration_error, n_bins=15),
    "nll": metrics.negative_log_likelihood,
}
SMALL = K.Chunking(work_bytes=3000, table_bytes=6000, replicate_dtype=torch.float64)  # many chunks, blocks


def _random_pass(n, blocks, classes, seed):
    """float64 logits (N, C), per-block variances (N, L, C) of several scales, labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, classes, generator=g, dtype=torch.float64)
    scale = 4.0 ** -torch.arange(blocks, dtype=torch.float64)[None, :, None]  # 1, 1/4, 1/16, ...
    variances = 4 * torch.rand(n, blocks, classes, generator=g, dtype=torch.float64) * scale
    return logits, variances, torch.randint(0, classes, (n,), generator=g)


def _naive_scores(logits, variances, labels, idx):
    """{score: (values (2^L,), replicates (R, 2^L))}: the scalar metric on every coalition's probit
    probabilities, on the data and on each resample idx_r, one call at a time."""
    out = {name: ([], []) for name in SCORES}
    for mask in shapley.all_masks(variances.shape[1]):
        probs = probit_probs(logits, variances, np.flatnonzero(mask).tolist())
        for name, f in SCORES.items():
            out[name][0].append(f(probs, labels))
            out[name][1].append([f(probs[r], labels[r]) for r in idx])
    return {name: (np.array(v), np.array(r).T) for name, (v, r) in out.items()}


def _batched(logits, variances, labels, idx, chunking=SMALL):
    scores = K.coalition_scores(logits, variances, labels, 15, idx, chunking)
    return {name: (v.numpy(), r.numpy()) for name, (v, r) in scores.items()}


@pytest.mark.parametrize(
    ("blocks", "table_bytes", "span"), [(3, 6000, 0), (4, 150 * 120 * 4, 2), (4, 2**28, 4)]
)
def test_batched_scores_equal_the_scalar_metrics_per_coalition_and_resample(blocks, table_bytes, span):
    """Every coalition's ECE and NLL, and each of their bootstrap replicates, to 1e-10 in float64, with
    the coalitions in chunks of 2^span (high bits in the base, low bits doubled) and the examples in
    several blocks."""
    logits, variances, labels = _random_pass(n=150, blocks=blocks, classes=5, seed=blocks)
    idx = bootstrap_indices(150, 12, seed=7)
    chunking = dataclasses.replace(SMALL, table_bytes=table_bytes)
    assert K._span(150, blocks, 15, chunking) == span
    naive = _naive_scores(logits, variances, labels, idx)
    batched = _batched(logits, variances, labels, idx, chunking)
    for name in SCORES:
        np.testing.assert_allclose(batched[name][0], naive[name][0], rtol=0, atol=1e-10)
        np.testing.assert_allclose(batched[name][1], naive[name][1], rtol=0, atol=1e-10)


def test_float32_replicate_matmul_is_within_its_stated_tolerance():
    """The ECE replicates' matmul in float32 (``Chunking.replicate_dtype``): per-bin sums of up to N
    terms |a - c| <= 1 rounded at 2^-24 relative, so ECE replicates within 1e-6 at N = 400."""
    logits, variances, labels = _random_pass(n=400, blocks=4, classes=6, seed=3)
    idx = bootstrap_indices(400, 20, seed=1)
    fast = dataclasses.replace(SMALL, replicate_dtype=torch.float32)
    exact, single = _batched(logits, variances, labels, idx), _batched(logits, variances, labels, idx, fast)
    np.testing.assert_allclose(single["ece"][1], exact["ece"][1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(single["nll"][1], exact["nll"][1], rtol=0, atol=1e-12)  # NLL stays float64
    np.testing.assert_array_equal(single["ece"][0], exact["ece"][0])  # the values are float64 either way


def test_float32_passes_agree_with_float64_to_float32_round_off():
    """A GLM pass as it comes from ``glm_pass`` (float32) is scored in float32: within 1e-5 of the
    float64 reference on the same numbers (confidences to about 1e-7; no confidence near a bin edge here)."""
    logits, variances, labels = _pass(n=200, blocks=3, classes=5, seed=5)
    idx = bootstrap_indices(200, 10, seed=2)
    naive = _naive_scores(logits, variances, labels, idx)
    single = _batched(logits.float(), variances.float(), labels, idx)
    for name in SCORES:
        np.testing.assert_allclose(single[name][0], naive[name][0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(single[name][1], naive[name][1], rtol=0, atol=1e-5)


def test_ties_go_to_the_first_class_as_in_the_metrics():
    """Equal logits in every row (and equal variances): every class ties, argmax is class 0."""
    labels = torch.arange(12) % 3
    logits = torch.zeros(12, 3, dtype=torch.float64)
    logits[:6, 1:] = -1.0  # half the rows have a unique top class
    variances = torch.ones(12, 2, 3, dtype=torch.float64)
    idx = bootstrap_indices(12, 5, seed=0)
    naive, batched = _naive_scores(logits, variances, labels, idx), _batched(logits, variances, labels, idx)
    for name in SCORES:
        np.testing.assert_allclose(batched[name][0], naive[name][0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(batched[name][1], naive[name][1], rtol=0, atol=1e-12)


def test_exact_shapley_of_a_stack_of_tables_is_the_shapley_of_each():
    tables = np.random.default_rng(0).standard_normal((6, 2**4))
    stacked = shapley.exact_shapley(tables)
    assert stacked.shape == (6, 4)
    for row, table in zip(stacked, tables, strict=True):
        brute = _brute_shapley(lambda s, t=table: t[sum(1 << b for b in s)], 4)
        np.testing.assert_allclose(row, brute, rtol=0, atol=1e-12)
