"""Intervals for Delta = metric(MAP) - metric(Bayes) that cover every source of randomness that varies.

Three sources, three tools, one currency: bootstrap *replicates* of Delta, (S, R) for S predictives.

1. Test examples and posterior samples (:func:`delta_replicates`, :func:`two_level_bootstrap_ci`).
   A Monte-Carlo (``nn``) predictive depends on its posterior samples. Given K independent sample sets
   (predictives B_1..B_K, each from its own draw), replicate r draws N test examples with replacement
   (the rows of :func:`distlap.metrics.bootstrap_indices`, so paired with the MAP) AND a set k_r
   uniformly from 1..K, and records metric(MAP[idx_r]) - metric(B_{k_r}[idx_r]) (a two-stage bootstrap,
   Davison & Hinkley 1997, sec. 3.8). The estimate is mean_k Delta_k, the expected Delta of a predictive
   built from one sample set; the interval is for such a predictive. Identical sets (or K = 1) reduce
   it, bit for bit, to :func:`distlap.metrics.paired_bootstrap_ci`. All S predictives share the rows
   and the set draws, as the subsets of one posterior share their samples, so differences between
   subsets are paired too.
2. Training seeds: a hierarchical bootstrap over seeds, then examples (:func:`across_seeds`,
   :func:`across_seeds_ci`) when each seed has replicates; a t-interval (:func:`seed_t_interval`) when
   only one number per seed exists. Which covers what: see those functions.
3. Multiplicity when many subsets are ranked at once (:func:`ranking_table`): bootstrap p-values for Delta != 0, Holm's step-down adjustment, simultaneous max-|t| or Bonferroni
   intervals, and pairwise differences Delta_S - Delta_T from the same replicates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from distlap.metrics import Metric, bootstrap_indices, replicate_values

_SET_STREAM = 1  # the sample-set draws use their own stream, so the example rows equal the one-level ones


@dataclass(frozen=True)
class Replicates:
    """Bootstrap replicates of S named differences, sharing their resamples (so they are paired)."""
    names: tuple[str, ...]
    estimate: Tensor             # (S,) float64 point estimates
    replicates: Tensor           # (S, R) float64
    mc_std: Tensor | None = None    # (S,) std of Delta over posterior-sample sets (0 for identical sets)
    seed_std: Tensor | None = None  # (S,) std of Delta over training seeds

    def __post_init__(self):
        s = len(self.names)
        if self.estimate.shape != (s,) or self.replicates.ndim != 2 or self.replicates.shape[0] != s:
            raise ValueError(f"Replicates: need estimate ({s},) and replicates ({s}, R) for {s} names, got "
                             f"{tuple(self.estimate.shape)} and {tuple(self.replicates.shape)}")


@dataclass(frozen=True)
class DeltaCI:
    """A percentile interval for Delta that covers test examples and posterior-sample sets."""
    estimate: float   # mean over sample sets of metric(MAP) - metric(B_k) on the full test set
    low: float
    high: float
    level: float
    n_resamples: int
    n_sets: int       # K
    mc_std: float     # std over the K sets of Delta_k: the Monte-Carlo term (0 for identical sets)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def _as_sets(name: str, probs: Tensor, n: int, c: int) -> Tensor:
    """(N, C) -> (1, N, C); (K, N, C) unchanged; anything else refused."""
    probs = torch.as_tensor(probs).detach()
    probs = probs[None] if probs.ndim == 2 else probs
    if probs.ndim != 3 or tuple(probs.shape[1:]) != (n, c):
        raise ValueError(f"probs_bayes[{name!r}] must have shape (K, {n}, {c}) or ({n}, {c}) to match "
                         f"probs_map, got {tuple(torch.as_tensor(probs).shape)}")
    return probs


def _check_sets(probs_map: Tensor, probs_bayes: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """probs_map (N, C) and every entry as (K, N, C) with one K for all."""
    probs_map = torch.as_tensor(probs_map)
    if probs_map.ndim != 2 or not probs_bayes:
        raise ValueError(f"need probs_map (N, C) and at least one probs_bayes entry, got probs_map of "
                         f"shape {tuple(probs_map.shape)} and {len(probs_bayes)} entries")
    sets = {s: _as_sets(s, p, *probs_map.shape) for s, p in probs_bayes.items()}
    if len({p.shape[0] for p in sets.values()}) != 1:
        raise ValueError(f"every probs_bayes entry needs the same number K of sample sets, got "
                         f"{ {s: p.shape[0] for s, p in sets.items()} }")
    return probs_map, sets


def _set_replicates(metric: Metric, sets: Tensor, labels: Tensor, idx: Tensor, draw: Tensor) -> Tensor:
    """metric(B_{draw_r}[idx_r]) per replicate r: sets (K, N, C), idx (R, N), draw (R,) -> (R,)."""
    out = torch.empty(idx.shape[0], dtype=torch.float64)
    for k in range(sets.shape[0]):
        rows = draw == k
        if rows.any():  # one vectorised pass per sample set over the replicates that drew it
            out[rows] = replicate_values(metric, sets[k], labels, idx[rows])
    return out


def delta_replicates(metric: Metric, probs_map: Tensor, probs_bayes: Mapping[str, Tensor], labels: Tensor, *,
                     n_resamples: int = 1000, seed: int = 0) -> Replicates:
    """Two-level bootstrap replicates of metric(MAP) - metric(B_s) for every predictive s (module doc).

    ``probs_map`` (N, C); ``probs_bayes[s]`` (K, N, C), K sample sets shared by all s, or (N, C) (K = 1).
    Returns estimate (S,) = mean_k Delta_{s,k}, replicates (S, R), mc_std (S,) = std_k Delta_{s,k}.
    """
    labels = torch.as_tensor(labels)
    probs_map, sets = _check_sets(probs_map, probs_bayes)
    n, k = probs_map.shape[0], next(iter(sets.values())).shape[0]
    idx = bootstrap_indices(n, n_resamples, seed)                                        # (R, N)
    draw = torch.from_numpy(np.random.default_rng([seed, _SET_STREAM]).integers(0, k, n_resamples))  # (R,)
    whole = torch.arange(n)[None]                                                          # (1, N)
    map_reps = replicate_values(metric, probs_map, labels, idx)                            # (R,)
    map_full = replicate_values(metric, probs_map, labels, whole)                          # (1,)
    reps = torch.stack([map_reps - _set_replicates(metric, p, labels, idx, draw) for p in sets.values()])
    per_set = torch.stack([torch.cat([map_full - replicate_values(metric, b, labels, whole) for b in p])
                           for p in sets.values()])                                         # (S, K)
    # mean_k as first + mean of deviations from it: exactly the one-level estimate for identical sets
    estimate = per_set[:, 0] + (per_set - per_set[:, :1]).mean(1)
    mc_std = per_set.std(1) if k > 1 else torch.zeros(len(sets), dtype=torch.float64)
    return Replicates(tuple(sets), estimate, reps, mc_std=mc_std)


def percentile_interval(replicates: Tensor, level: float = 0.95) -> tuple[Tensor, Tensor]:
    """Equal-tailed percentile interval per row: the (1-level)/2 and (1+level)/2 quantiles of (S, R)."""
    _check_level(level)
    tails = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(torch.as_tensor(replicates).double(), tails, dim=-1)
    return low, high


def two_level_bootstrap_ci(metric: Metric, probs_map: Tensor, probs_bayes: Tensor, labels: Tensor, *,
                           n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> DeltaCI:
    """Delta = metric(MAP) - metric(Bayes) for a Monte-Carlo predictive with K sample sets (K, N, C),
    with a percentile interval over test examples AND sample sets (module doc, item 1).

    With K identical sets (or probs_bayes (N, C)) the result equals ``paired_bootstrap_ci`` exactly.
    """
    _check_level(level)
    rep = delta_replicates(metric, probs_map, {"bayes": probs_bayes}, labels,
                           n_resamples=n_resamples, seed=seed)
    low, high = percentile_interval(rep.replicates[0], level)
    n_sets = 1 if torch.as_tensor(probs_bayes).ndim == 2 else len(probs_bayes)
    return DeltaCI(float(rep.estimate[0]), float(low), float(high), level, n_resamples, n_sets,
                   float(rep.mc_std[0]))


# ------------------------------------------------------------------------------------ training seeds

@dataclass(frozen=True)
class SeedCI:
    """An interval for the mean of Delta over training seeds."""
    estimate: Tensor  # (S,) mean over seeds
    low: Tensor       # (S,)
    high: Tensor      # (S,)
    level: float
    n_seeds: int
    method: str       # "t" (seed_t_interval) or "hierarchical-bootstrap" (across_seeds_ci)


def seed_t_interval(estimates: Tensor, level: float = 0.95) -> SeedCI:
    """Student-t interval over n seed estimates (n,) or (n, S): mean +- t_{n-1, (1+level)/2} s / sqrt(n).

    Use it when only one number per seed exists. It treats seeds as i.i.d. draws of the whole
    experiment, so it covers training randomness; it covers test-example noise only if each seed drew
    its own test set (with one shared test set, that noise is common to all seeds and not in s).
    """
    _check_level(level)
    x = torch.as_tensor(estimates, dtype=torch.float64)
    x = x[:, None] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"estimates must be (n_seeds,) or (n_seeds, S) with n_seeds >= 2, got "
                         f"{tuple(x.shape)}")
    n = x.shape[0]
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * x.std(0) / n ** 0.5
    mean = x.mean(0)
    return SeedCI(mean, mean - half, mean + half, level, n, "t")


def across_seeds(per_seed: Sequence[Replicates], *, shared_examples: bool, n_resamples: int = 2000,
                 seed: int = 0) -> Replicates:
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
        raise ValueError(f"per_seed needs >= 2 Replicates with the same names and replicate shape, "
                         f"got {shapes}")
    x = torch.stack([rep.replicates for rep in per_seed])                     # (n, S, R)
    n, _, n_cols = x.shape
    g = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, n, (n_resamples, n), generator=g)                # (B, n)
    cols = torch.randint(0, n_cols, (n_resamples, 1 if shared_examples else n), generator=g).expand(-1, n)
    reps = x.permute(0, 2, 1)[seeds, cols].mean(1).T                         # (B, n, S) -> (S, B)
    est = torch.stack([rep.estimate for rep in per_seed])                     # (n, S)
    return Replicates(per_seed[0].names, est.mean(0), reps.contiguous(), seed_std=est.std(0))


def across_seeds_ci(per_seed: Sequence[Replicates], *, shared_examples: bool, level: float = 0.95,
                    n_resamples: int = 2000, seed: int = 0) -> SeedCI:
    """The percentile interval of :func:`across_seeds` replicates, per name (marginal, not simultaneous)."""
    rep = across_seeds(per_seed, shared_examples=shared_examples, n_resamples=n_resamples, seed=seed)
    low, high = percentile_interval(rep.replicates, level)
    return SeedCI(rep.estimate, low, high, level, len(per_seed), "hierarchical-bootstrap")


# -------------------------------------------------------------------------------------- multiplicity

def bootstrap_p_values(replicates: Tensor) -> Tensor:
    """Two-sided bootstrap p-value for Delta != 0 per row of (S, R), by inverting the percentile interval:

        p = min(1, 2 min(1 + #{Delta*_r <= 0}, 1 + #{Delta*_r >= 0}) / (R + 1)),

    so p < alpha (about) iff 0 lies outside the equal-tailed (1 - alpha) percentile interval; the +1
    (the Monte-Carlo p-value of Davison & Hinkley 1997, ch. 4) keeps p >= 2 / (R + 1) > 0. All-zero
    replicates give p = 1.
    """
    x = torch.as_tensor(replicates, dtype=torch.float64)
    x = x[None] if x.ndim == 1 else x
    r = x.shape[1]
    below, above = (x <= 0).sum(1), (x >= 0).sum(1)
    return (2 * (torch.minimum(below, above) + 1).double() / (r + 1)).clamp(max=1.0)


def holm(p_values: Tensor) -> Tensor:
    """Holm's (1979) step-down adjusted p-values: with p_(1) <= ... <= p_(m),

        p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)),

    returned in the input order. Rejecting p~ <= alpha controls the family-wise error rate at alpha
    under any dependence (Holm = the closed testing of Bonferroni tests).
    """
    p = torch.as_tensor(p_values, dtype=torch.float64)
    if p.ndim != 1 or p.numel() == 0 or not ((p >= 0) & (p <= 1)).all():
        raise ValueError(f"p_values must be a non-empty 1-D tensor with entries in [0, 1], got {p.tolist()}")
    m = p.numel()
    order = p.argsort(stable=True)
    scaled = ((m - torch.arange(m)) * p[order]).clamp(max=1.0)     # (m - j + 1) p_(j), j = 1..m
    adjusted = torch.empty_like(p)
    adjusted[order] = torch.cummax(scaled, 0).values
    return adjusted


def simultaneous_intervals(estimate: Tensor, replicates: Tensor, level: float = 0.95,
                           method: str = "max_t") -> tuple[Tensor, Tensor]:
    """Intervals (low (S,), high (S,)) that hold for all S rows at once with probability ~ ``level``.

    ``max_t``: estimate_s +- c se_s, se_s = std_r Delta*_{s,r}, c = the ``level`` quantile of
    max_s |Delta*_{s,r} - estimate_s| / se_s (the bootstrap max-modulus / max-|t| method, Romano & Wolf
    2005; rows with se = 0 get width 0). ``bonferroni``: percentile intervals at 1 - (1 - level) / S.
    """
    _check_level(level)
    est, x = torch.as_tensor(estimate, dtype=torch.float64), torch.as_tensor(replicates, dtype=torch.float64)
    if method == "bonferroni":
        return percentile_interval(x, 1 - (1 - level) / x.shape[0])
    if method != "max_t":
        raise ValueError(f"method must be 'max_t' or 'bonferroni', got {method!r}")
    se = x.std(1)                                                            # (S,)
    t = (x - est[:, None]).abs() / torch.where(se > 0, se, 1.0)[:, None]     # (S, R); se = 0 rows are 0
    crit = torch.quantile(t.amax(0), level)
    return est - crit * se, est + crit * se


def pairwise(rep: Replicates) -> Replicates:
    """Delta_S - Delta_T for every pair S before T in ``rep.names``, from the same (paired) replicates;
    names "S - T". For Delta = metric(MAP) - metric(B), this is metric(B_T) - metric(B_S)."""
    s = len(rep.names)
    if s < 2:
        raise ValueError(f"pairwise differences need at least two names, got {list(rep.names)}")
    i, j = torch.triu_indices(s, s, offset=1)
    names = tuple(f"{rep.names[a]} - {rep.names[b]}" for a, b in zip(i.tolist(), j.tolist()))
    return Replicates(names, rep.estimate[i] - rep.estimate[j], rep.replicates[i] - rep.replicates[j])


def ranking_table(rep: Replicates, level: float = 0.95, method: str = "max_t") -> list[dict]:
    """One JSON-able row per name, best (largest estimate) first: estimate, simultaneous interval
    (``method``) over the family of all rows, bootstrap p, Holm-adjusted p and ``distinguishable``
    (Holm p < 1 - level). Pass ``pairwise(rep)`` to ask which subsets differ from each other."""
    low, high = simultaneous_intervals(rep.estimate, rep.replicates, level, method)
    p = bootstrap_p_values(rep.replicates)
    p_holm = holm(p)
    rows = [{"name": name, "estimate": float(rep.estimate[k]), "low": float(low[k]), "high": float(high[k]),
             "p": float(p[k]), "p_holm": float(p_holm[k]), "distinguishable": bool(p_holm[k] < 1 - level),
             "level": level, "interval": method} for k, name in enumerate(rep.names)]
    return sorted(rows, key=lambda row: -row["estimate"])
