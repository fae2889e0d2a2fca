"""Intervals for Δ = metric(MAP) − metric(Bayes) that cover every source of randomness that varies.

Three sources, one currency: bootstrap *replicates* of Δ, (S, R) for S predictives
(:class:`Replicates`); :mod:`distlap.ranking` turns them into the ranking's p-values and joint intervals.

1. Test examples: the paired percentile bootstrap (:func:`paired_bootstrap_ci`, Efron & Tibshirani
   1993): each replicate draws N examples with replacement (:func:`bootstrap_indices`) and scores both
   predictives on the same examples.
2. Posterior samples (:func:`delta_replicates`, :func:`two_level_bootstrap_ci`). A Monte-Carlo (``nn``)
   predictive depends on its samples. Given K independent sample sets (predictives B_1..B_K), replicate
   r draws the examples of 1. AND a set k_r uniformly from 1..K, and records metric(MAP[idx_r]) −
   metric(B_{k_r}[idx_r]) (a two-stage bootstrap, Davison & Hinkley 1997, sec. 3.8). The estimate is
   mean_k Δ_k. Identical sets (or K = 1) reduce it, bit for bit, to 1. All S predictives share the
   rows and the set draws, as the subsets of one posterior share their samples, so differences between
   subsets are paired too.
3. Training seeds: a hierarchical bootstrap over seeds, then examples (:func:`across_seeds`), when each
   seed has replicates; a t-interval (:func:`seed_t_interval`) when only one number per seed exists.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from distlap.metrics import Metric, expected_calibration_error, replicate_values

_SET_STREAM = 1  # the sample-set draws use their own stream, so the example rows equal the one-level ones
_TENSORS = ("estimate", "replicates", "mc_std", "seed_std")  # Replicates' tensor fields, in order


# -------------------------------------------------------------------- paired bootstrap over examples


@dataclass(frozen=True)
class BootstrapCI:
    """A percentile bootstrap interval for metric(a) - metric(b)."""

    estimate: float  # metric(a) - metric(b) on the full data
    low: float
    high: float
    level: float
    n_resamples: int


def _resample_indices(n: int, n_resamples: int, generator: torch.Generator) -> Tensor:
    """Bootstrap resamples of the example indices, with replacement: (n_resamples, n) int64."""
    return torch.randint(0, n, (n_resamples, n), generator=generator)


def paired_bootstrap_ci(
    metric: Metric,
    probs_a: Tensor,
    probs_b: Tensor,
    labels: Tensor,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Paired percentile bootstrap (Efron & Tibshirani 1993) for metric(a) - metric(b).

    Each replicate draws N examples with replacement and evaluates both predictives on the same
    examples; the interval is the [(1-level)/2, (1+level)/2] quantiles of the replicate differences.
    ``metric`` is any ``callable(probs, labels) -> float``; the built-in metrics (also as keyword
    ``functools.partial``) run vectorised over all replicates, anything else in a Python loop.
    """
    shape_a, shape_b = tuple(torch.as_tensor(probs_a).shape), tuple(torch.as_tensor(probs_b).shape)
    if shape_a != shape_b:
        raise ValueError(f"probs_a and probs_b must have the same shape, got {shape_a} and {shape_b}")
    check_level(level)
    labels = torch.as_tensor(labels)
    estimate = metric(probs_a, labels) - metric(probs_b, labels)  # validates probs, labels, the metric's args
    idx = bootstrap_indices(labels.shape[0], n_resamples, seed)  # (R, N)
    diffs = replicate_values(metric, probs_a, labels, idx) - replicate_values(metric, probs_b, labels, idx)
    tails = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(diffs, tails).tolist()
    return BootstrapCI(float(estimate), low, high, level, n_resamples)


def delta_ece_ci(
    probs_map: Tensor,
    probs_bayes: Tensor,
    labels: Tensor,
    *,
    n_bins: int = 15,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Delta_ECE = ECE_MAP - ECE_Bayes with a paired bootstrap interval over test examples; positive
    means the Bayesian predictive is better calibrated than the MAP one."""
    ece = functools.partial(expected_calibration_error, n_bins=n_bins)
    return paired_bootstrap_ci(
        ece, probs_map, probs_bayes, labels, n_resamples=n_resamples, level=level, seed=seed
    )


def bootstrap_indices(n: int, n_resamples: int, seed: int = 0) -> Tensor:
    """The example resamples :func:`paired_bootstrap_ci` draws for ``seed``: (n_resamples, n) int64.

    Row r holds N indices drawn uniformly with replacement (Efron & Tibshirani 1993); callers that use
    the same rows for several predictives get paired replicates.
    """
    for name, value in (("n", n), ("n_resamples", n_resamples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return _resample_indices(n, n_resamples, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------- examples x posterior-sample sets


@dataclass(frozen=True)
class Replicates:
    """Bootstrap replicates of S named differences, sharing their resamples (so they are paired)."""

    names: tuple[str, ...]
    estimate: Tensor  # (S,) float64 point estimates
    replicates: Tensor  # (S, R) float64
    mc_std: Tensor | None = None  # (S,) std of Delta over posterior-sample sets (0 for identical sets)
    seed_std: Tensor | None = None  # (S,) std of Delta over training seeds

    def __post_init__(self):
        s = len(self.names)
        if self.estimate.shape != (s,) or self.replicates.ndim != 2 or self.replicates.shape[0] != s:
            raise ValueError(
                f"Replicates: need estimate ({s},) and replicates ({s}, R) for {s} names, got "
                f"{tuple(self.estimate.shape)} and {tuple(self.replicates.shape)}"
            )


@dataclass(frozen=True)
class DeltaCI:
    """A percentile interval for Delta that covers test examples and posterior-sample sets."""

    estimate: float  # mean over sample sets of metric(MAP) - metric(B_k) on the full test set
    low: float
    high: float
    level: float
    n_resamples: int
    n_sets: int  # K
    mc_std: float  # std over the K sets of Delta_k: the Monte-Carlo term (0 for identical sets)


def check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def _as_sets(name: str, probs: Tensor, n: int, c: int) -> Tensor:
    """(N, C) -> (1, N, C); (K, N, C) unchanged; anything else refused."""
    probs = torch.as_tensor(probs).detach()
    probs = probs[None] if probs.ndim == 2 else probs
    if probs.ndim != 3 or tuple(probs.shape[1:]) != (n, c):
        raise ValueError(
            f"probs_bayes[{name!r}] must have shape (K, {n}, {c}) or ({n}, {c}) to match "
            f"probs_map, got {tuple(torch.as_tensor(probs).shape)}"
        )
    return probs


def _check_sets(probs_map: Tensor, probs_bayes: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """probs_map (N, C) and every entry as (K, N, C) with one K for all."""
    probs_map = torch.as_tensor(probs_map)
    if probs_map.ndim != 2 or not probs_bayes:
        raise ValueError(
            f"need probs_map (N, C) and at least one probs_bayes entry, got probs_map of "
            f"shape {tuple(probs_map.shape)} and {len(probs_bayes)} entries"
        )
    sets = {s: _as_sets(s, p, *probs_map.shape) for s, p in probs_bayes.items()}
    if len({p.shape[0] for p in sets.values()}) != 1:
        raise ValueError(
            f"every probs_bayes entry needs the same number K of sample sets, got "
            f"{ {s: p.shape[0] for s, p in sets.items()} }"
        )
    return probs_map, sets


def _set_replicates(metric: Metric, sets: Tensor, labels: Tensor, idx: Tensor, draw: Tensor) -> Tensor:
    """metric(B_{draw_r}[idx_r]) per replicate r: sets (K, N, C), idx (R, N), draw (R,) -> (R,)."""
    out = torch.empty(idx.shape[0], dtype=torch.float64)
    for k in range(sets.shape[0]):
        rows = draw == k
        if rows.any():  # one vectorised pass per sample set over the replicates that drew it
            out[rows] = replicate_values(metric, sets[k], labels, idx[rows])
    return out


def delta_replicates(
    metric: Metric,
    probs_map: Tensor,
    probs_bayes: Mapping[str, Tensor],
    labels: Tensor,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> Replicates:
    """Two-level bootstrap replicates of metric(MAP) - metric(B_s) for every predictive s (module doc).

    ``probs_map`` (N, C); ``probs_bayes[s]`` (K, N, C), K sample sets shared by all s, or (N, C) (K = 1).
    Returns estimate (S,) = mean_k Delta_{s,k}, replicates (S, R), mc_std (S,) = std_k Delta_{s,k}.
    """
    labels = torch.as_tensor(labels)
    probs_map, sets = _check_sets(probs_map, probs_bayes)
    n, k = probs_map.shape[0], next(iter(sets.values())).shape[0]
    idx = bootstrap_indices(n, n_resamples, seed)  # (R, N)
    draw = torch.from_numpy(np.random.default_rng([seed, _SET_STREAM]).integers(0, k, n_resamples))  # (R,)
    whole = torch.arange(n)[None]  # (1, N)
    map_reps = replicate_values(metric, probs_map, labels, idx)  # (R,)
    map_full = replicate_values(metric, probs_map, labels, whole)  # (1,)
    reps = torch.stack([map_reps - _set_replicates(metric, p, labels, idx, draw) for p in sets.values()])
    per_set = torch.stack(
        [torch.cat([map_full - replicate_values(metric, b, labels, whole) for b in p]) for p in sets.values()]
    )  # (S, K)
    # mean_k as first + mean of deviations from it: exactly the one-level estimate for identical sets
    estimate = per_set[:, 0] + (per_set - per_set[:, :1]).mean(1)
    mc_std = per_set.std(1) if k > 1 else torch.zeros(len(sets), dtype=torch.float64)
    return Replicates(tuple(sets), estimate, reps, mc_std=mc_std)


def percentile_interval(replicates: Tensor, level: float = 0.95) -> tuple[Tensor, Tensor]:
    """Equal-tailed percentile interval per row: the (1-level)/2 and (1+level)/2 quantiles of (S, R)."""
    check_level(level)
    tails = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(torch.as_tensor(replicates).double(), tails, dim=-1)
    return low, high


def two_level_bootstrap_ci(
    metric: Metric,
    probs_map: Tensor,
    probs_bayes: Tensor,
    labels: Tensor,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> DeltaCI:
    """Delta = metric(MAP) - metric(Bayes) for a Monte-Carlo predictive with K sample sets (K, N, C),
    with a percentile interval over test examples AND sample sets (module doc, item 1).

    With K identical sets (or probs_bayes (N, C)) the result equals ``paired_bootstrap_ci`` exactly.
    """
    check_level(level)
    rep = delta_replicates(
        metric, probs_map, {"bayes": probs_bayes}, labels, n_resamples=n_resamples, seed=seed
    )
    low, high = percentile_interval(rep.replicates[0], level)
    n_sets = 1 if torch.as_tensor(probs_bayes).ndim == 2 else len(probs_bayes)
    return DeltaCI(
        float(rep.estimate[0]), float(low), float(high), level, n_resamples, n_sets, float(rep.mc_std[0])
    )


# ------------------------------------------------------------------------------------ training seeds


@dataclass(frozen=True)
class SeedCI:
    """An interval for the mean of Delta over training seeds."""

    estimate: Tensor  # (S,) mean over seeds
    low: Tensor  # (S,)
    high: Tensor  # (S,)
    level: float
    n_seeds: int
    method: str  # "t" (seed_t_interval) or "hierarchical-bootstrap" (across_seeds_ci)


def seed_t_interval(estimates: Tensor, level: float = 0.95) -> SeedCI:
    """Student-t interval over n seed estimates (n,) or (n, S): mean +- t_{n-1, (1+level)/2} s / sqrt(n).

    Use it when only one number per seed exists. It treats seeds as i.i.d. draws of the whole
    experiment, so it covers training randomness; it covers test-example noise only if each seed drew
    its own test set (with one shared test set, that noise is common to all seeds and not in s).
    """
    check_level(level)
    x = torch.as_tensor(estimates, dtype=torch.float64)
    x = x[:, None] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(
            f"estimates must be (n_seeds,) or (n_seeds, S) with n_seeds >= 2, got {tuple(x.shape)}"
        )
    n = x.shape[0]
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * x.std(0) / n**0.5
    mean = x.mean(0)
    return SeedCI(mean, mean - half, mean + half, level, n, "t")


def across_seeds(
    per_seed: Sequence[Replicates], *, shared_examples: bool, n_resamples: int = 2000, seed: int = 0
) -> Replicates:
    """Hierarchical bootstrap over training seeds, then test examples (Davison & Hinkley 1997, sec. 3.8).

    ``per_seed[i]`` are the example-level (two-level) replicates of seed i, same names. Replicate b draws
    n seeds with replacement and, for each, one of its R replicates (the same column for all of them when
    ``shared_examples``: one test set and the same bootstrap seed, so example resample r is the same
    examples in every seed (a crossed design); independent columns when each seed has its own test set
    or bootstrap seed (nested)); it records the mean. Estimate: mean of the seed estimates. Why this and
    not a t-interval: it adds the test-example (and MC) noise that a shared test set hides from the
    spread of the seed means. Caveats: with n seeds the seed-level variance is shrunk by (n-1)/n and the
    within-seed noise is counted once more than needed (conservative); with fewer than ~5 seeds report
    :func:`seed_t_interval` beside it.
    """
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be an integer >= 1, got {n_resamples!r}")
    shapes = [(rep.names, tuple(rep.replicates.shape)) for rep in per_seed]
    if len(per_seed) < 2 or len(set(shapes)) != 1:
        raise ValueError(
            f"per_seed needs >= 2 Replicates with the same names and replicate shape, got {shapes}"
        )
    x = torch.stack([rep.replicates for rep in per_seed])  # (n, S, R)
    n, _, n_cols = x.shape
    g = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, n, (n_resamples, n), generator=g)  # (B, n)
    cols = torch.randint(0, n_cols, (n_resamples, 1 if shared_examples else n), generator=g).expand(-1, n)
    reps = x.permute(0, 2, 1)[seeds, cols].mean(1).T  # (B, n, S) -> (S, B)
    est = torch.stack([rep.estimate for rep in per_seed])  # (n, S)
    return Replicates(per_seed[0].names, est.mean(0), reps.contiguous(), seed_std=est.std(0))


def across_seeds_ci(
    per_seed: Sequence[Replicates],
    *,
    shared_examples: bool,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> SeedCI:
    """The percentile interval of :func:`across_seeds` replicates, per name (marginal, not simultaneous)."""
    rep = across_seeds(per_seed, shared_examples=shared_examples, n_resamples=n_resamples, seed=seed)
    low, high = percentile_interval(rep.replicates, level)
    return SeedCI(rep.estimate, low, high, level, len(per_seed), "hierarchical-bootstrap")


# --------------------------------------------------------------------- a family of predictives, saved


def improvement_replicates(
    probs_map: Tensor,
    probs: Mapping[str, Tensor],
    labels: Tensor,
    scores: Mapping[str, tuple[Metric, bool]],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Replicates]:
    """Per score, the improvement of every predictive over the MAP with replicates paired across
    predictives (the same example resamples for all: :func:`bootstrap_indices` of ``seed``).

    ``scores`` maps a score name to (metric, higher_is_better); the improvement is metric(MAP) − metric(B)
    for a lower-is-better score and its negative otherwise, so positive = better than the MAP. Entries of
    ``probs`` are (N, C) or (K, N, C) for K Monte-Carlo sample sets (two-level); predictives with
    different K are resampled in groups with the same example resamples."""
    groups: dict[int, dict[str, Tensor]] = {}
    for name, p in probs.items():
        groups.setdefault(1 if p.ndim == 2 else p.shape[0], {})[name] = p
    out = {}
    for score, (metric, higher) in scores.items():
        parts = [
            delta_replicates(metric, probs_map, group, labels, n_resamples=n_resamples, seed=seed)
            for group in groups.values()
        ]
        order = [n for part in parts for n in part.names]
        sign = -1.0 if higher else 1.0
        rep = Replicates(
            tuple(order),
            sign * torch.cat([part.estimate for part in parts]),
            sign * torch.cat([part.replicates for part in parts]),
            mc_std=torch.cat([part.mc_std for part in parts]),
        )
        out[score] = select(rep, [n for n in probs if n in order])
    return out


def select(rep: Replicates, names: Sequence[str]) -> Replicates:
    """The rows of ``names``, in that order."""
    index = [rep.names.index(n) for n in names]
    mc, seed = (None if t is None else t[index] for t in (rep.mc_std, rep.seed_std))
    return Replicates(tuple(names), rep.estimate[index], rep.replicates[index], mc, seed)


def replicates_to_json(rep: Replicates, digits: int = 6) -> dict:
    """A JSON-able :class:`Replicates` (values rounded to ``digits`` decimals)."""
    return {"names": list(rep.names)} | {
        k: None if (t := getattr(rep, k)) is None else torch.round(t.double(), decimals=digits).tolist()
        for k in _TENSORS
    }


def replicates_from_json(data: Mapping) -> Replicates:
    """The inverse of :func:`replicates_to_json`."""
    tensors = [None if data.get(k) is None else torch.tensor(data[k], dtype=torch.float64) for k in _TENSORS]
    return Replicates(tuple(data["names"]), *tensors)
