"""A subset's row: its scores against the metrics module, Δ signed as improvement, the bootstrap interval."""

import dataclasses
import functools

import numpy as np
import pytest
import torch

from distlap import intervals, metrics, names
from distlap.bayes.evaluate import Reference, map_row, row_line, split_scores, subset_row


def _probs(n, sharpness, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(n, 5, generator=g), dim=-1)


@pytest.fixture
def ref():
    g = torch.Generator().manual_seed(1)
    return Reference(
        _probs(80, 2.0, 0),
        _probs(120, 2.0, 1),
        torch.randint(0, 5, (80,), generator=g),
        torch.randint(0, 5, (120,), generator=g),
    )


def test_split_scores_are_the_metrics_under_their_keys(ref):
    scores = split_scores("map", "val", ref.val_probs, ref.val_labels, n_bins=10)
    assert scores == {
        names.score("map", "val", k): v
        for k, v in metrics.summarize(ref.val_probs, ref.val_labels, 10).items()
    }


def test_subset_row_scores_deltas_and_interval(ref):
    val, test = _probs(80, 0.5, 2), _probs(120, 0.5, 3)  # a less confident predictive
    row = subset_row((1, 2), val, test, ref, n_bins=10, n_bootstrap=200, seed=0)
    m = row["metrics"]
    assert row["blocks"] == [1, 2]
    assert m[names.score("subset", "test", "nll")] == metrics.negative_log_likelihood(test, ref.test_labels)
    map_ece = metrics.expected_calibration_error(ref.test_probs, ref.test_labels, 10)
    subset_ece = metrics.expected_calibration_error(test, ref.test_labels, 10)
    delta = names.delta("subset", "test", "ece")
    assert m[delta] == pytest.approx(map_ece - subset_ece, abs=1e-15)
    map_acc = metrics.accuracy(ref.test_probs, ref.test_labels)
    assert m[names.delta("subset", "test", "accuracy")] == pytest.approx(
        metrics.accuracy(test, ref.test_labels) - map_acc
    )
    for score, f in {
        "nll": metrics.negative_log_likelihood,
        "ece": lambda p, y: metrics.expected_calibration_error(p, y, 10),
    }.items():  # on validation too: what a choice among subsets is made on
        expected = f(ref.val_probs, ref.val_labels) - f(val, ref.val_labels)
        assert m[names.delta("subset", "val", score)] == pytest.approx(expected, abs=1e-12)
    val_acc = metrics.accuracy(val, ref.val_labels) - metrics.accuracy(ref.val_probs, ref.val_labels)
    assert m[names.delta("subset", "val", "accuracy")] == pytest.approx(val_acc, abs=1e-12)
    ece = functools.partial(metrics.expected_calibration_error, n_bins=10)
    ci = intervals.paired_bootstrap_ci(ece, ref.test_probs, test, ref.test_labels, n_resamples=200, seed=0)
    low, high = names.interval(delta)
    assert (m[low], m[high]) == (ci.low, ci.high)
    np.testing.assert_equal(
        row["reliability"], dataclasses.asdict(metrics.reliability_bins(test, ref.test_labels, 10))
    )
    assert row_line("mid", row).strip().startswith("mid: test ECE")


def test_the_map_compared_with_itself_changes_nothing(ref):
    row = subset_row((0,), ref.val_probs, ref.test_probs, ref, n_bins=15, n_bootstrap=100, seed=0)
    for s in names.SCORES:
        assert row["metrics"][names.delta("subset", "test", s)] == 0
        assert row["metrics"][names.delta("subset", "val", s)] == 0
    low, high = names.interval(names.delta("subset", "test"))
    assert row["metrics"][low] == row["metrics"][high] == 0


def test_map_row(ref):
    row = map_row(ref, n_bins=15)
    assert set(row["metrics"]) == {
        *names.scores("map", "val").values(),
        *names.scores("map", "test").values(),
    }
    assert sum(row["reliability"]["count"]) == len(ref.test_labels)
