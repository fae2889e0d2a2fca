"""Which blocks matter: every coalition of blocks, their Shapley values with intervals, the best k blocks.

From one GLM pass over the test split (:mod:`distlap.bayes.glm`), the value of a coalition S of
transformer blocks is its improvement over the MAP, v(S) = score_MAP − score_S for ECE and for NLL
(Δ_ECE, Δ_NLL; v(∅) = 0). Up to ``shapley.EXACT_MAX_PLAYERS`` blocks every one of the 2^L coalitions
is evaluated and the Shapley values (Shapley 1953) are exact — they sum to v(all) − v(∅) — with a
paired percentile bootstrap interval over test examples: each replicate resamples the examples once,
scores the MAP and every coalition on them and takes the Shapley values of that replicate's table.
Past that, permutation-sampled values with standard errors (Castro et al. 2009). The best-k curve is
the forward greedy selection (and, with the full table, the exact best set of each size).
"""

from __future__ import annotations

import functools
from dataclasses import asdict

import numpy as np
import torch
from torch import Tensor

from distlap import metrics
from distlap.bayes import shapley
from distlap.bayes.glm import subset_probs
from distlap.intervals import bootstrap_indices, percentile_interval

VALUES = ("ece", "nll")  # the scores whose improvement is attributed


def attribution(
    logits: Tensor,
    variances: Tensor,
    labels: Tensor,
    *,
    n_bins: int,
    n_bootstrap: int,
    n_permutations: int,
    seed: int,
) -> dict:
    """The JSON-able attribution of one test pass: coalition values, Shapley values (with intervals or
    standard errors) and the best-k curves, for Δ_ECE and Δ_NLL."""
    n_blocks = variances.shape[1]
    if n_blocks > shapley.EXACT_MAX_PLAYERS:
        return _sampled(logits, variances, labels, n_bins, n_permutations, seed)
    masks = shapley.all_masks(n_blocks)  # (2^L, L): row r is bitmask r
    table = _coalition_scores(logits, variances, labels, masks, n_bins, n_bootstrap, seed)
    out = {"method": "exact", "n_blocks": n_blocks, "coalitions": masks.astype(int).tolist(), "values": {}}
    for name in VALUES:
        values, replicates = table[name]  # (2^L,), (R, 2^L)
        phi = shapley.exact_shapley(values)
        entry = {
            "coalition_values": values.tolist(),
            "shapley": phi.tolist(),
            "best_sets": [asdict(s) for s in shapley.best_sets(values)],
            "greedy": [asdict(s) for s in shapley.greedy_sets(_lookup(values), n_blocks)],
        }
        if replicates is not None:
            phis = torch.as_tensor(np.stack([shapley.exact_shapley(v) for v in replicates]))  # (R, L)
            low, high = percentile_interval(phis.T)
            entry |= {"shapley_low": low.tolist(), "shapley_high": high.tolist()}
        out["values"][name] = entry
    return out


def _lookup(values: np.ndarray):
    """A value function over masks that reads the full table (row = bitmask)."""
    return lambda masks: values[shapley.bits(masks)]


def _coalition_scores(logits, variances, labels, masks, n_bins, n_bootstrap, seed) -> dict:
    """{score: (v (2^L,), replicates (R, 2^L) or None)}: the improvement of every coalition over the
    MAP (the empty coalition) on the data and on each bootstrap resample of the examples."""
    idx = bootstrap_indices(len(labels), n_bootstrap, seed) if n_bootstrap else None  # (R, N)
    full = {name: [] for name in VALUES}
    reps = {name: [] for name in VALUES}
    for chunk in torch.as_tensor(masks).split(256):
        probs = subset_probs(logits, variances, chunk)  # (s, N, C)
        for name, score in _score_fns(n_bins).items():
            full[name].append(torch.tensor([score(p, labels) for p in probs], dtype=torch.float64))
            if idx is not None:
                reps[name].append(
                    torch.stack([metrics.replicate_values(score, p, labels, idx) for p in probs], 1)
                )
    out = {}
    for name in VALUES:
        values = torch.cat(full[name])  # (2^L,) scores; row 0 is the MAP
        replicates = torch.cat(reps[name], 1) if idx is not None else None  # (R, 2^L)
        out[name] = (
            (values[0] - values).numpy(),
            None if replicates is None else (replicates[:, :1] - replicates).numpy(),
        )
    return out


def _score_fns(n_bins: int) -> dict:
    return {
        "ece": functools.partial(metrics.expected_calibration_error, n_bins=n_bins),
        "nll": metrics.negative_log_likelihood,
    }


def _sampled(logits, variances, labels, n_bins, n_permutations, seed) -> dict:
    """Past EXACT_MAX_PLAYERS blocks: permutation Shapley values with standard errors, greedy curve."""
    n_blocks = variances.shape[1]
    out = {"method": "permutation", "n_blocks": n_blocks, "n_permutations": n_permutations, "values": {}}
    for name in VALUES:
        value = shapley.glm_values(logits, variances, labels, name, n_bins)
        phi, se = shapley.permutation_shapley(value, n_blocks, n_permutations, seed)
        out["values"][name] = {
            "shapley": phi.tolist(),
            "shapley_se": se.tolist(),
            "greedy": [asdict(s) for s in shapley.greedy_sets(value, n_blocks)],
        }
    return out
