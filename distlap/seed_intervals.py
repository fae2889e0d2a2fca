"""Intervals over training seeds: the third source of randomness in :mod:`distlap.intervals`.

A hierarchical bootstrap over seeds, then test examples (:func:`across_seeds`, :func:`across_seeds_ci`)
when each seed kept its example-level replicates; a Student-t interval (:func:`seed_t_interval`) when
only one number per seed exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy import stats
from torch import Tensor

from distlap.intervals import Replicates, check_level, percentile_interval


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
