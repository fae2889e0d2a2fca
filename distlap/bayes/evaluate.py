"""One predictive -> its row of results: scores on validation and test, Δ over the MAP, reliability bins.

For a layer subset S: accuracy, ECE, MCE, NLL, Brier on validation and test (keys ``subset/val/ece``, ...;
:mod:`distlap.names`), the improvement over the MAP on test for every score (``subset/test/delta_nll``,
...), Δ_ECE(S) = ECE_MAP − ECE_S with its paired bootstrap interval (positive = the Bayesian predictive is
better calibrated) and the test reliability bins. A subset's row also has its improvement over the MAP
on validation (``subset/val/delta_<score>``): what a choice among subsets is made on (select on
validation, report on test). The MAP's row has the same scores under ``map/...``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch

from distlap import intervals, metrics, names


@dataclasses.dataclass(frozen=True)
class Reference:
    """MAP probabilities the subsets are compared with (same examples, same order)."""

    val_probs: torch.Tensor  # (N_val, C)
    test_probs: torch.Tensor  # (N_test, C)
    val_labels: torch.Tensor  # (N_val,)
    test_labels: torch.Tensor  # (N_test,)


def split_scores(
    predictive: str, split: str, probs: torch.Tensor, labels: torch.Tensor, n_bins: int
) -> dict[str, float]:
    """{``<predictive>/<split>/<score>``: value} for every score of :data:`distlap.names.SCORES`."""
    keys = names.scores(predictive, split)
    return {keys[k]: v for k, v in metrics.summarize(probs, labels, n_bins).items()}


def _reliability(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> dict:
    return dataclasses.asdict(metrics.reliability_bins(probs, labels, n_bins))


def subset_row(
    blocks: Sequence[int],
    val_probs: torch.Tensor,
    test_probs: torch.Tensor,
    ref: Reference,
    *,
    n_bins: int,
    n_bootstrap: int,
    seed: int,
) -> dict:
    """The row of one subset in ``layer_wise_results.json`` (see the README)."""
    row = predictive_row(
        "subset", val_probs, test_probs, ref, n_bins=n_bins, n_bootstrap=n_bootstrap, seed=seed
    )
    row["metrics"] |= deltas(row["metrics"], ref, n_bins, "subset", split="val")
    return {"blocks": list(blocks), **row}


def predictive_row(
    predictive: str, val_probs, test_probs, ref: Reference, *, n_bins: int, n_bootstrap: int, seed: int
) -> dict:
    """A predictive's scores on validation and test, its improvement over the MAP on test, the
    interval of Δ_ECE and the test reliability bins, under ``<predictive>/...`` keys.

    Probabilities (N, C), or (K, N, C) for K independent Monte-Carlo sample sets: then every score is the
    mean over the sets (the expected score of one set's predictive) and the Δ_ECE interval is the
    two-level bootstrap over test examples and sets (:func:`distlap.intervals.two_level_bootstrap_ci`;
    with one set it is the paired bootstrap over examples)."""
    ci = intervals.two_level_bootstrap_ci(
        functools.partial(metrics.expected_calibration_error, n_bins=n_bins),
        ref.test_probs,
        test_probs,
        ref.test_labels,
        n_resamples=n_bootstrap,
        seed=seed,
    )
    low, high = names.interval(names.delta(predictive, "test", "ece"))
    scores = {
        **set_scores(predictive, "val", val_probs, ref.val_labels, n_bins),
        **set_scores(predictive, "test", test_probs, ref.test_labels, n_bins),
    }
    return {
        "metrics": {**scores, **deltas(scores, ref, n_bins, predictive), low: ci.low, high: ci.high},
        "reliability": _reliability(_pooled(test_probs), ref.test_labels, n_bins),
    }


def _pooled(probs: torch.Tensor) -> torch.Tensor:
    """(N, C) as it is; (K, N, C) -> the mean over the K sets."""
    return probs.mean(0) if probs.ndim == 3 else probs


def set_scores(predictive: str, split: str, probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> dict:
    """:func:`split_scores`, averaged over the sample sets of (K, N, C) probabilities."""
    if probs.ndim == 2:
        return split_scores(predictive, split, probs, labels, n_bins)
    per_set = [split_scores(predictive, split, p, labels, n_bins) for p in probs]
    return {key: sum(s[key] for s in per_set) / len(per_set) for key in per_set[0]}


def deltas(
    scores: dict[str, float], ref: Reference, n_bins: int, predictive: str = "subset", *, split: str = "test"
) -> dict[str, float]:
    """``<predictive>/<split>/delta_<score>``: the improvement over the MAP on ``split`` (test or val),
    for every score."""
    probs, labels = (ref.test_probs, ref.test_labels) if split == "test" else (ref.val_probs, ref.val_labels)
    map_scores = split_scores("map", split, probs, labels, n_bins)
    return {
        names.delta(predictive, split, s): names.improvement(
            s, scores[names.score(predictive, split, s)], map_scores[names.score("map", split, s)]
        )
        for s in names.SCORES
    }


def map_row(ref: Reference, n_bins: int) -> dict:
    """The MAP's row: ``map/{val,test}/<score>`` and the test reliability bins."""
    return {
        "metrics": {
            **split_scores("map", "val", ref.val_probs, ref.val_labels, n_bins),
            **split_scores("map", "test", ref.test_probs, ref.test_labels, n_bins),
        },
        "reliability": _reliability(ref.test_probs, ref.test_labels, n_bins),
    }


def row_line(name: str, row: dict) -> str:
    """One log line of a subset's row."""
    m = row["metrics"]
    delta = names.delta("subset", "test", "ece")
    low, high = names.interval(delta)
    seconds = m.get(names.SUBSET_TIME)
    return (
        f"{name:>9}: test ECE {m[names.score('subset', 'test', 'ece')]:.4f}, delta_ece {m[delta]:+.4f} "
        f"[{m[low]:+.4f}, {m[high]:+.4f}], NLL {m[names.score('subset', 'test', 'nll')]:.4f}"
        + (f" ({seconds:.1f}s)" if seconds is not None else "")
    )
