"""Which blocks matter: every coalition of blocks, their Shapley values with intervals, the best k blocks.

From one GLM pass over the test split (:mod:`distlap.bayes.glm`), the value of a coalition S of
transformer blocks is its improvement over the MAP, v(S) = score_MAP − score_S for ECE and for NLL
(Δ_ECE, Δ_NLL; v(∅) = 0). Up to ``shapley.EXACT_MAX_PLAYERS`` blocks every one of the 2^L coalitions
is evaluated and the Shapley values (Shapley 1953) are exact — they sum to v(all) − v(∅) — with a
paired percentile bootstrap interval over test examples: each replicate resamples the examples once,
scores the MAP and every coalition on them and takes the Shapley values of that replicate's table (all
coalitions and replicates at once: :mod:`distlap.bayes.coalitions`).
Past that, permutation-sampled values with standard errors (Castro et al. 2009).

The best-k curves (the forward greedy selection and, with the full table, the exact best set of each
size) are CHOSEN ON VALIDATION — the same values v(S) from the validation pass at the same λ — and
REPORTED ON TEST: each entry's ``value`` is the chosen set's test value and ``val_value`` the validation
value it was chosen by. Choosing and reporting on the same test data would overstate the best sets
(the maximum of many noisy values is biased upwards).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from distlap.bayes import shapley
from distlap.bayes.coalitions import Chunking, coalition_scores
from distlap.intervals import bootstrap_indices, percentile_interval

VALUES = ("ece", "nll")  # the scores whose improvement is attributed
CHUNKING = Chunking()  # memory bounds and the replicates' matmul dtype of the coalition scores


@dataclass(frozen=True)
class Split:
    """One split's GLM pass at one λ: MAP logits (N, C), per-block logit variances (N, B, C), labels (N,)."""

    logits: Tensor
    variances: Tensor
    labels: Tensor


def attribution(
    test: Split, val: Split, *, n_bins: int, n_bootstrap: int, n_permutations: int, seed: int
) -> dict:
    """The JSON-able attribution: coalition values and Shapley values (with intervals or standard errors)
    on ``test``, and the best-k curves chosen on ``val`` and reported on ``test``, for Δ_ECE and Δ_NLL."""
    n_blocks = test.variances.shape[1]
    if n_blocks > shapley.EXACT_MAX_PLAYERS:
        return _sampled(test, val, n_bins, n_permutations, seed)
    masks = shapley.all_masks(n_blocks)  # (2^L, L): row r is bitmask r
    table = _coalition_scores(test, n_bins, n_bootstrap, seed)
    chooser = _coalition_scores(val, n_bins, 0, seed)
    out = {"method": "exact", "n_blocks": n_blocks, "coalitions": masks.astype(int).tolist(), "values": {}}
    for name in VALUES:
        values, replicates = table[name]  # (2^L,), (R, 2^L)
        on_val = chooser[name][0]  # (2^L,): the values the best sets are chosen by
        chosen = {
            "best_sets": shapley.best_sets(on_val),
            "greedy": shapley.greedy_sets(_lookup(on_val), n_blocks),
        }
        entry = {
            "coalition_values": values.tolist(),
            "val_coalition_values": on_val.tolist(),
            "shapley": shapley.exact_shapley(values).tolist(),
            **{k: _report(steps, _lookup(values), n_blocks) for k, steps in chosen.items()},
        }
        if replicates is not None:
            phis = torch.as_tensor(shapley.exact_shapley(replicates))  # (R, L)
            low, high = percentile_interval(phis.T)
            entry |= {"shapley_low": low.tolist(), "shapley_high": high.tolist()}
        out["values"][name] = entry
    return out


def _report(steps, test_value, n_blocks: int) -> list[dict]:
    """Sets chosen on validation as JSON rows: ``size``, ``blocks``, ``value`` (test), ``val_value``."""
    return [asdict(s) for s in shapley.reported_on(steps, test_value, n_blocks)]


def _lookup(values: np.ndarray):
    """A value function over masks that reads the full table (row = bitmask)."""
    return lambda masks: values[shapley.bits(masks)]


def _coalition_scores(split: Split, n_bins: int, n_bootstrap: int, seed: int) -> dict:
    """{score: (v (2^L,), replicates (R, 2^L) or None)}: the improvement of every coalition over the
    MAP (the empty coalition, row 0) on the data and on each bootstrap resample of the examples
    (``bootstrap_indices(N, R, seed)``), batched over coalitions and resamples (:mod:`coalitions`)."""
    idx = bootstrap_indices(len(split.labels), n_bootstrap, seed) if n_bootstrap else None  # (R, N)
    scores = coalition_scores(split.logits, split.variances, split.labels, n_bins, idx, CHUNKING)
    out = {}
    for name in VALUES:
        values, replicates = scores[name]  # (2^L,), (R, 2^L) or None
        out[name] = (
            (values[0] - values).cpu().numpy(),
            None if replicates is None else (replicates[:, :1] - replicates).cpu().numpy(),
        )
    return out


def _sampled(test: Split, val: Split, n_bins: int, n_permutations: int, seed: int) -> dict:
    """Past EXACT_MAX_PLAYERS blocks: permutation Shapley values with standard errors on test, and the
    greedy curve chosen on validation, reported on test."""
    n_blocks = test.variances.shape[1]
    out = {"method": "permutation", "n_blocks": n_blocks, "n_permutations": n_permutations, "values": {}}
    for name in VALUES:
        value = shapley.glm_values(test.logits, test.variances, test.labels, name, n_bins)
        phi, se = shapley.permutation_shapley(value, n_blocks, n_permutations, seed)
        on_val = shapley.glm_values(val.logits, val.variances, val.labels, name, n_bins)
        out["values"][name] = {
            "shapley": phi.tolist(),
            "shapley_se": se.tolist(),
            "greedy": _report(shapley.greedy_sets(on_val, n_blocks), value, n_blocks),
        }
    return out
