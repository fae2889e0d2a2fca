"""Intervals over training seeds: the third source of randomness in :mod:`distlap.intervals`, pooled by the
design the seeds had.

Seed i reports Δ_i = θ_i + e_i: θ_i the population improvement of its fine-tuned model (a draw from the
seed population, variance σ²_a) and e_i the error of its finite test set (variance σ²_e). The estimand is
E θ, estimated by the seed mean Δ̄. Two designs, told apart from the recorded test-set identity
(:func:`test_set_design`), never assumed:

- **nested** — each seed drew its own test set (``data.max_test``): the e_i are independent, so
  Var Δ̄ = (σ²_a + σ²_e)/n and the sample variance s² of the Δ_i estimates σ²_a + σ²_e without bias:
  Var̂ = s²/n with n − 1 df (the t-interval over seeds; with equal within-seed variances it is also the
  Hartung–Knapp / Sidik–Jonkman random-effects interval).
- **crossed** — the seeds share one test set and (bootstrap seeded by the test set) the very same example
  resamples: e_i and e_j share the test set's draw, Cov(e_i, e_j) = γ. Then E s² = σ²_a + σ²_e − γ (the
  common part cancels from the spread) while Var Δ̄ = σ²_a/n + σ²_e/n + (n − 1)γ/n, so

      Var̂ Δ̄ = s²/n + γ̂,   γ̂ = mean over seed pairs i ≠ j of the bootstrap covariance of Δ*_i and Δ*_j,

  unbiased (a t-interval alone would miss γ: too narrow), with n − 1 df. Not the Welch–Satterthwaite df
  (s²/n + γ̂)² (n − 1)/(s²/n)²: that plug-in df is largest exactly when s² is small by chance, i.e. when
  |t| is large, and with n − 1 = 2 it made the calls anti-conservative (benchmarks/inference_coverage.py:
  family-wise error 0.4–0.5 over the pairs of 18 null predictives, Δ_NLL coverage 0.92). With n − 1 df
  the test is conservative: s²/n + γ ≥ s²/n, and |t| exceeds a t_{n−1} statistic only when s² > its
  expectation. Why not the bootstrap over seeds (the old ``across_seeds``): with n seeds it shrinks the
  seed variance by (n − 1)/n (2/3 for 3 seeds) and counts the within-seed noise once more than needed.

Where the design is unknown (older results without a test-set identity, a shared test set without aligned
resamples, or some seeds sharing a test set and others not), γ is replaced by the mean within-seed
bootstrap variance V̄ ≥ |γ| (Cauchy–Schwarz: |Cov(e_i, e_j)| ≤ (V_i + V_j)/2), an interval valid in either
design and wider than needed. One seed alone: Var̂ = its bootstrap variance with R − 1 df (the Monte-Carlo
error of a variance from R replicates); it covers the test examples, not training randomness. Everything
goes through :func:`combine`, the one seed interval; :class:`Pooled` applies it to any contrast of many
predictives at once (:mod:`distlap.ranking`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from distlap.intervals import Replicates, check_level

SINGLE, CROSSED, NESTED, UNKNOWN = "single", "crossed", "nested", "unknown"


def test_set_design(test_sets: Sequence[Hashable | None]) -> str:
    """The design of n seeds from their test-set identities: ``single`` (n = 1), ``crossed`` (all the same),
    ``nested`` (all different), ``unknown`` (an identity missing, or some shared and some not)."""
    if len(test_sets) == 0:
        raise ValueError("test_set_design needs at least one seed's test-set identity")
    if len(test_sets) == 1:
        return SINGLE
    if any(t is None for t in test_sets):
        return UNKNOWN
    distinct = len(set(test_sets))
    return CROSSED if distinct == 1 else NESTED if distinct == len(test_sets) else UNKNOWN


def combine(
    between: Tensor, shared: Tensor, n_seeds: int, shared_df: float = math.inf
) -> tuple[Tensor, Tensor]:
    """The one seed interval's variance and df: var = s²/n + g with n − 1 df (module doc).

    ``between`` = s² (the sample variance of the seed estimates; ignored for one seed), ``shared`` = g (the
    variance common to all seeds: γ̂ crossed, 0 nested, V̄ unknown, the bootstrap variance for one seed),
    clamped at 0 (a negative γ̂ is noise). One seed: df = ``shared_df`` (R − 1 for a bootstrap variance
    from R replicates: its own Monte-Carlo error; ∞ = the normal quantile)."""
    g = torch.as_tensor(shared, dtype=torch.float64).clamp(min=0)
    if n_seeds == 1:
        return g, torch.full_like(g, float(shared_df))
    var = torch.as_tensor(between, dtype=torch.float64) / n_seeds + g
    return var, torch.full_like(var, float(n_seeds - 1))


def t_bounds(estimate: Tensor, se: Tensor, df: Tensor, level: float) -> tuple[Tensor, Tensor]:
    """estimate ± t_{ν, (1 + level)/2} se, per entry (ν = ∞: the normal quantile)."""
    check_level(level)
    q = torch.as_tensor(stats.t.ppf((1 + level) / 2, df.numpy()), dtype=torch.float64)
    return estimate - q * se, estimate + q * se


@dataclass(frozen=True)
class SeedCI:
    """An interval for the mean of Delta over training seeds."""

    estimate: Tensor  # (S,) mean over seeds
    low: Tensor  # (S,)
    high: Tensor  # (S,)
    level: float
    n_seeds: int
    method: str  # how: the design and what the variance holds
    df: Tensor | None = None  # (S,) degrees of freedom of the t quantile (inf: normal)


def seed_t_interval(
    estimates: Tensor,
    level: float = 0.95,
    *,
    within_var: Tensor | None = None,
    test_sets: Sequence[Hashable | None] | None = None,
) -> SeedCI:
    """The seed interval (:func:`combine`) when one number per seed exists: estimates (n,) or (n, S).

    ``test_sets`` (one identity per seed) gives the design; ``within_var`` (n,) or (n, S), each seed's own
    (bootstrap) variance, gives the shared term where the design is not nested: without aligned replicates
    γ is bounded by V̄ (module doc). Nested, or no ``within_var``: the t-interval over seeds, s²/n with
    n − 1 df (with a shared test set that misses the test set's noise; ``method`` says so)."""
    check_level(level)
    x = torch.tensor(np.array(estimates, dtype=np.float64))  # a copy: pandas hands out read-only arrays
    x = x[:, None] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(
            f"estimates must be (n_seeds,) or (n_seeds, S) with n_seeds >= 2, got {tuple(x.shape)}"
        )
    n = x.shape[0]
    design = test_set_design(test_sets) if test_sets is not None else UNKNOWN
    shared, method = torch.zeros(x.shape[1], dtype=torch.float64), f"t over {n} seeds ({design} design)"
    if design != NESTED and within_var is not None:
        shared = (
            torch.tensor(np.array(within_var, dtype=np.float64)).reshape(n, -1).mean(0).expand(x.shape[1])
        )
        method += " + the mean within-seed variance, a bound on the shared test set's"
    elif design != NESTED:
        method += "; misses the noise of a shared test set (no within-seed variance)"
    var, df = combine(x.var(0), shared, n)
    mean = x.mean(0)
    low, high = t_bounds(mean, var.sqrt(), df, level)
    return SeedCI(mean, low, high, level, n, method, df)


@dataclass(frozen=True)
class Pooled:
    """The joint law of the seed-mean Δ of S predictives: Cov Δ̄ = between/n + shared (module doc)."""

    names: tuple[str, ...]
    estimate: Tensor  # (S,) mean over seeds
    between: Tensor  # (S, S) sample covariance of the seed estimates (zeros for one seed)
    shared: Tensor  # (S, S) common term: bootstrap cov (one seed), γ̂ (crossed), 0 (nested), V̄ (unknown)
    n_seeds: int
    design: str
    n_resamples: int  # R, the example resamples per seed
    note: str = ""

    def contrast(self, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Estimate, standard error and df of the contrasts ``weights`` (m, S) @ Δ̄ (:func:`combine`)."""
        w = torch.as_tensor(weights, dtype=torch.float64)
        between, shared = ((w @ m.double() * w).sum(1) for m in (self.between, self.shared))
        var, df = combine(between, shared, self.n_seeds, self.n_resamples - 1)
        return w @ self.estimate.double(), var.sqrt(), df

    def interval(self, level: float = 0.95) -> tuple[Tensor, Tensor]:
        """The marginal interval of each row's Δ̄: estimate ± t_{ν, (1 + level)/2} se (:func:`t_bounds`)."""
        est, se, df = self.contrast(torch.eye(len(self.names), dtype=torch.float64))
        return t_bounds(est, se, df, level)

    def covariance(self) -> Tensor:
        """Cov̂ Δ̄ (S, S): between/n + shared (one seed: its bootstrap covariance)."""
        return self.shared + (self.between / self.n_seeds if self.n_seeds > 1 else 0.0)


def _centred(rep: Replicates) -> Tensor:
    return rep.replicates - rep.replicates.mean(1, keepdim=True)


def _shared(per_seed: Sequence[Replicates], design: str) -> tuple[Tensor, str]:
    """The shared term of :class:`Pooled` and a note: γ̂ as the mean cross-seed bootstrap covariance
    [(Σ_i Y_i)(Σ_i Y_i)ᵀ − Σ_i Y_i Y_iᵀ] / (n (n − 1) (R − 1)) (Y_i: seed i's centred replicates)."""
    y = torch.stack([_centred(rep) for rep in per_seed])  # (n, S, R)
    n, s, r = y.shape
    own = torch.einsum("isr,itr->st", y, y) / (r - 1)  # Σ_i cov_i
    if design == NESTED:
        return torch.zeros(s, s, dtype=torch.float64), ""
    if design == SINGLE:
        return own, ""
    if design == CROSSED:
        total = y.sum(0)
        return (total @ total.T / (r - 1) - own) / (n * (n - 1)), ""
    return own / n, "design unknown: the shared test-set covariance is bounded by the mean within-seed one"


def pool(
    per_seed: Sequence[Replicates],
    test_sets: Sequence[Hashable | None],
    resamples: Sequence[Hashable | None],
) -> Pooled:
    """The joint law of Δ̄ over seeds from each seed's example-level replicates (same names, same R).

    ``test_sets[i]``: seed i's test-set identity (the design, :func:`test_set_design`); ``resamples[i]``:
    the identity of its example resamples (bootstrap seed and R). A crossed design needs equal resamples
    (the same examples in replicate r of every seed); without them it is pooled as ``unknown``."""
    shapes = [(rep.names, tuple(rep.replicates.shape)) for rep in per_seed]
    if not per_seed or len(set(shapes)) != 1 or not len(test_sets) == len(per_seed) == len(resamples):
        raise ValueError(
            f"pool needs >= 1 Replicates with the same names and replicate shape and one test set and "
            f"resample identity each, got {shapes}, {list(test_sets)}, {list(resamples)}"
        )
    design = test_set_design(test_sets)
    aligned = None not in resamples and len(set(resamples)) == 1
    if design == CROSSED and not aligned:
        design = UNKNOWN
    shared, note = _shared(per_seed, design)
    x = torch.stack([rep.estimate for rep in per_seed])  # (n, S)
    n = len(per_seed)
    between = torch.cov(x.T).reshape(x.shape[1], -1) if n > 1 else torch.zeros_like(shared)
    r = per_seed[0].replicates.shape[1]
    return Pooled(per_seed[0].names, x.mean(0), between, shared, n, design, r, note)
