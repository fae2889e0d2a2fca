"""One layer subset -> metrics: the restricted posterior's predictive against the MAP's.

For subset S on validation and test: accuracy, ECE, MCE, NLL, Brier; on test also reliability bins
and Delta_ECE(S) = ECE_MAP - ECE_S with a paired bootstrap CI (positive = the Bayesian predictive is
better calibrated).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch

from distlap import metrics


@dataclasses.dataclass(frozen=True)
class Reference:
    """MAP probabilities the subsets are compared with (same examples, same order)."""

    val_probs: torch.Tensor     # (N_val, C)
    test_probs: torch.Tensor    # (N_test, C)
    val_labels: torch.Tensor
    test_labels: torch.Tensor


def subset_metrics(blocks: Sequence[int], val_probs: torch.Tensor, test_probs: torch.Tensor,
                   ref: Reference, *, n_bins: int, n_bootstrap: int, seed: int) -> dict:
    """The JSON row of one subset (see ``layer_wise_results.json`` in the README)."""
    ci = metrics.delta_ece_ci(ref.test_probs, test_probs, ref.test_labels, n_bins=n_bins,
                              n_resamples=n_bootstrap, seed=seed)
    return {
        "blocks": list(blocks),
        "val": metrics.summarize(val_probs, ref.val_labels, n_bins),
        "test": metrics.summarize(test_probs, ref.test_labels, n_bins),
        "delta_ece": dataclasses.asdict(ci),
        "reliability": dataclasses.asdict(metrics.reliability_bins(test_probs, ref.test_labels, n_bins)),
    }


def map_row(ref: Reference, n_bins: int) -> dict:
    return {"val": metrics.summarize(ref.val_probs, ref.val_labels, n_bins),
            "test": metrics.summarize(ref.test_probs, ref.test_labels, n_bins),
            "reliability": dataclasses.asdict(metrics.reliability_bins(ref.test_probs, ref.test_labels, n_bins))}


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
